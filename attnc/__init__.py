"""attnc: an attention compiler for PyTorch models."""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# In a source checkout, attnc.passes, attnc.kernels and attnc.cli live beside this folder
# (pyproject's package-dir); an installed attnc has them inside it. When Python finds this
# folder first (run from the checkout's root, say, with a non-editable install), look beside it.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(
        _os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)
