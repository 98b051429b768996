"""What each attention site's mask really is, found by running the graph once on the example
inputs (padding masks set to all ones): causal, a causal sliding window of W keys, or other.
Hugging Face passes causality as an explicit boolean mask, so `is_causal` alone would miss it.
A float mask that also carries a bias is told apart too: ALiBi (a per-head slope times the key
position, or times -|i - j|) or another additive bias (`meta["attnc_score"]`)."""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch.fx import Interpreter, Node

from attnc.graph.sites import attention_args, is_attention

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


def score_kind(mask: torch.Tensor) -> str:
    """"none" when the mask only masks (every row's allowed entries are equal), "alibi" when
    what it adds is per head a slope times the key position j (or times -|i - j|), plus a
    constant per row, "additive-bias" otherwise. Tolerance: 1% of the bias's range (Falcon
    builds its ALiBi in bfloat16)."""
    if mask.dtype == torch.bool or mask.dim() < 2:
        return "none"
    m = mask.float()
    while m.dim() < 4:
        m = m.unsqueeze(0)
    allowed = m > -1e4
    sq, skv = m.shape[-2:]
    i = torch.arange(sq, dtype=torch.float32)[:, None].expand(sq, skv)
    j = torch.arange(skv, dtype=torch.float32)[None, :].expand(sq, skv)
    w = allowed.float()
    count = w.sum(-1, keepdim=True).clamp(min=1)
    centred = lambda x: (x - (x * w).sum(-1, keepdim=True) / count) * w  # noqa: E731
    bias = centred(torch.where(allowed, m, torch.zeros_like(m)))  # (B, H, Sq, Skv)
    spread = float(bias.abs().max())
    if spread <= 1e-6:
        return "none"
    for pos in (j, -(i - j).abs()):
        f = centred(pos.expand_as(m))
        slope = (bias * f).sum((0, 2, 3), keepdim=True) / (f * f).sum((0, 2, 3), keepdim=True)
        if float((bias - slope * f).abs().max()) <= 1e-2 * spread:
            return "alibi"
    return "additive-bias"


class _MaskProbe(Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.found: dict[str, tuple[bool, int | None]] = {}
        self.scores: dict[str, str] = {}
        self.masks: dict[Node, tuple[Node, bool]] = {}  # site -> (mask node, inverted)
        for n in gm.graph.nodes:
            if is_attention(n):
                a = attention_args(n)
                if isinstance(a.get("attn_mask"), Node):
                    self.masks[n] = (a["attn_mask"], bool(a.get("mask_inverted")))
        self.pending = Counter(m for m, _ in self.masks.values())
        self.kept: dict[Node, torch.Tensor] = {}  # a region's mask is freed before its P@V runs

    def run_node(self, n: Node):
        out = super().run_node(n)
        if n in self.pending:
            self.kept[n] = out
        if n in self.masks:
            mask, inverted = self.masks[n]
            value = self.kept[mask]
            self.pending[mask] -= 1
            if not self.pending[mask]:
                del self.kept[mask]  # held only until the last site that reads it
            if inverted:
                value = value.logical_not()
            self.found[n.name] = classify(value)
            self.scores[n.name] = score_kind(value)
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
        if node.meta.get("attnc_score", "none") in ("none", "additive-bias") and (
            node.name in probe.scores
        ):
            node.meta["attnc_score"] = probe.scores[node.name]  # soft-cap regions stay so
    return marked
