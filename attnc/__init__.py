"""attnc: an attention compiler for PyTorch models."""

from __future__ import annotations

__version__ = "0.1.0"
