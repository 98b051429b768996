"""attnc: an attention compiler for PyTorch models."""

from __future__ import annotations

import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys

__version__ = "0.1.0"

# In a source checkout, attnc.passes, attnc.kernels and attnc.cli live beside this folder
# (pyproject's package-dir); an installed attnc has them inside it. When Python finds this
# folder first (run from the checkout's root, say, with a non-editable install), map exactly
# those three names to the folders beside it: nothing else in the checkout (tests, examples,
# benchmarks) becomes importable as attnc.*.
_SUBPACKAGES = {"attnc.passes": "passes", "attnc.kernels": "kernels", "attnc.cli": "cli"}
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))


class _CheckoutFinder(_abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        folder = _SUBPACKAGES.get(fullname)
        if folder is None:
            return None
        init = _os.path.join(_root, folder, "__init__.py")
        return _util.spec_from_file_location(
            fullname, init, submodule_search_locations=[_os.path.join(_root, folder)]
        )


if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "__init__.py")
):
    _sys.meta_path.insert(0, _CheckoutFinder())

_API = ("optimize", "inspect", "evaluate", "OptimizeResult")


def __getattr__(name: str):
    """`attnc.optimize`, `attnc.inspect`, `attnc.evaluate`: imported on first use, so that
    `import attnc` stays cheap."""
    if name in _API:
        from attnc import api

        return getattr(api, name)
    raise AttributeError(f"module 'attnc' has no attribute {name!r}")
