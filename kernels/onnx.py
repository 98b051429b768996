"""ONNX translations of attnc ops, collected into the table `torch.onnx.export` takes.

Each op file registers a plain-Python function built from `onnxscript.opsetNN` ops with
`@register_translation(torch.ops.attnc.<op>.default)`; the exporter traces it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_TABLE: dict[Any, Callable[..., Any]] = {}


def register_translation(op: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if op in _TABLE:
            raise RuntimeError(f"ONNX translation for {op} registered twice")
        _TABLE[op] = fn
        return fn

    return deco


def translation_table() -> dict[Any, Callable[..., Any]]:
    """The custom translation table for every registered attnc op."""
    return dict(_TABLE)
