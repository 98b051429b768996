"""The checkout's `attnc/` folder finds its sibling subpackages (passes, kernels, cli: pyproject's
package-dir) when Python picks it up first, as it does from the checkout's root with a
non-editable install."""

from __future__ import annotations

import subprocess
import sys


def test_checkout_root_imports_all_subpackages(root):
    code = ("import sys; sys.meta_path = [m for m in sys.meta_path "
            "if 'editable' not in repr(m).lower()]; "
            "import attnc.kernels.masks, attnc.passes.llm_drop, attnc.cli.main; "
            "print(attnc.kernels.masks.__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.strip() == str(root / "kernels" / "masks.py")
