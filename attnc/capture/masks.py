"""What each attention site's mask really is, found by running the graph once on the example
inputs (padding masks set to all ones): causal, a causal sliding window of W keys, or other.
Hugging Face passes causality as an explicit boolean mask, so `is_causal` alone would miss it."""

from __future__ import annotations

import logging

import torch
from torch.fx import Interpreter, Node

from attnc.graph.sites import is_attention, sdpa_args

log = logging.getLogger(__name__)


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > -1e4  # (B, H|1, Sq, Skv)


def classify(mask: torch.Tensor) -> tuple[bool, int | None]:
    """(causal, window) of a mask where every row of every batch/head agrees; window is the
    number of keys a query sees (itself included) when the band is narrower than the sequence."""
    allowed = _allowed(mask)
    sq, skv = allowed.shape[-2:]
    if sq != skv or sq < 2:
        return False, None
    allowed = allowed.reshape(-1, sq, skv)
    if not bool((allowed == allowed[:1]).all()):
        return False, None
    a = allowed[0]
    i = torch.arange(sq)[:, None]
    j = torch.arange(skv)[None, :]
    if not bool((a & (j > i)).logical_not().all()):  # anything above the diagonal: not causal
        return False, None
    counts = a.sum(-1)
    window = int(counts.max())
    band = (j <= i) & (i - j < window)
    if bool((a == band).all()):
        return True, (window if window < sq else None)
    return False, None


class _MaskProbe(Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.found: dict[str, tuple[bool, int | None]] = {}

    def run_node(self, n: Node):
        out = super().run_node(n)
        if is_attention(n):
            mask = sdpa_args(n).get("attn_mask")
            if isinstance(mask, Node):
                self.found[n.name] = classify(self.env[mask])
        return out


def annotate_masks(gm, names: list[str], example_args: tuple) -> int:
    """Run once on the examples with padding masks all ones; mark causal/windowed sites in node
    meta (`attnc_causal`, `attnc_window`). Returns how many sites were marked causal."""
    args = tuple(
        torch.ones_like(a) if "mask" in n else a for n, a in zip(names, example_args, strict=True)
    )
    probe = _MaskProbe(gm)
    try:
        with torch.no_grad():
            probe.run(*args)
    except Exception as exc:  # noqa: BLE001 - analysis is best effort; the graph is untouched
        log.info("mask analysis skipped: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return 0
    marked = 0
    for node in gm.graph.nodes:
        if node.name in probe.found:
            causal, window = probe.found[node.name]
            node.meta["attnc_causal"] = causal
            node.meta["attnc_window"] = window
            marked += causal
    return marked
