"""Candidate sparse patterns whose kept attention mass `attnc.graph.stats` measures.

A `Candidate` is a pattern with JSON-able parameters and, per sequence length, a mask predicate
`mask_mod(b, h, q, kv) -> bool` (FlexAttention's signature, on broadcastable integer tensors;
True = the pattern lets query q see key kv). The predicates are the ones of `kernels/masks.py`,
so a statistic measures exactly what the rewritten op computes (both AND the site's own mask).

    window(w, num_sinks, causal)                  sliding window + sink keys
    neighborhood(grid, kernel_size, ..., num_global)  NATTEN 1-D/2-D/3-D on a row-major token grid
                                                  after `num_global` prefix tokens (CLS, registers,
                                                  BOS) that see every key and every query sees
    block_sparse("power" | "local-stride" | layout, block_size, causal, ...)
    custom(name, mask_mod)                        any predicate

Positions are absolute token indices (0 = the first token of the padded sequence).
A neighborhood kernel wider than its axis covers the axis whole (the NATTEN window formulas
degrade to the full axis), so a candidate stays defined at short calibration lengths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from attnc.errors import PassError
from attnc.kernels import masks

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Candidate:
    """One pattern to score: `kind`, its parameters (JSON-able) and how to build its mask."""

    kind: str  # "window", "neighborhood", "block", "custom"
    params: tuple[tuple[str, Any], ...]
    causal: bool = False
    # custom predicates and user block layouts (not part of equality or the JSON form)
    fn: Callable[[int, int], MaskMod] | None = field(default=None, compare=False, repr=False)
    layout: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        args = ",".join(f"{k}={_fmt(v)}" for k, v in self.params)
        return f"{self.kind}({args}{',causal' if self.causal else ''})"

    def config(self) -> dict[str, Any]:
        """The JSON form: kind, parameters and causality."""
        return {"kind": self.kind, **{k: _jsonable(v) for k, v in self.params},
                "causal": self.causal}

    def param(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    def mask_mod(self, sq: int, skv: int) -> MaskMod:
        """The predicate over (b, h, q, kv) at these sequence lengths."""
        p = dict(self.params)
        if self.kind == "window":
            return masks.sliding_window_mask_mod(p["window"], p["num_sinks"], self.causal)
        if self.kind == "neighborhood":
            return _neighborhood_mod(p, self.causal, sq, skv)
        if self.kind == "block":
            lay = self.block_layout(sq, skv)
            return masks.block_sparse_mask_mod(lay, p["block_size"], self.causal)
        if self.kind == "custom" and self.fn is not None:
            return self.fn(sq, skv)
        raise PassError(f"candidate {self.name} has no mask predicate")

    def block_layout(self, sq: int, skv: int) -> torch.Tensor:
        """The (B|1, H|1, nq, nkv) bool layout of a block candidate at these lengths."""
        p = dict(self.params)
        bs = p["block_size"]
        nq, nkv = -(-sq // bs), -(-skv // bs)
        if p["layout"] == "power":
            lay = masks.power_attention_layout(max(nq, nkv), p["local_blocks"], p["sink_blocks"])
        elif p["layout"] == "local-stride":
            lay = masks.local_stride_layout(max(nq, nkv), p["local_blocks"], p["vert_stride"],
                                            self.causal)
        else:
            lay = self.layout
            if lay is None or lay.shape[-2] < nq or lay.shape[-1] < nkv:
                have = None if lay is None else tuple(lay.shape[-2:])
                raise PassError(f"block layout {p['layout']!r} has {have} blocks; sequence "
                                f"lengths ({sq}, {skv}) with block_size {bs} need ({nq}, {nkv})",
                                "give a layout for the longest calibration sequence")
        return lay[:, :, :nq, :nkv]

    def flash_form(self, sq: int, skv: int):
        """(Pattern, layout) of the Triton kernel computing this pattern, or None."""
        from attnc.kernels.flash import Pattern, natten_pattern

        p = dict(self.params)
        if self.kind == "window":
            return Pattern("sliding", window=p["window"], num_sinks=p["num_sinks"]), None
        if self.kind == "block":
            return Pattern("block", block_size=p["block_size"]), self.block_layout(sq, skv)
        if self.kind == "neighborhood" and p["num_global"] == 0 and sq == skv:
            grid = masks.resolve_grid(p["grid"], sq)
            axes = zip(grid, p["kernel_size"], p["dilation"], p["stride"], strict=True)
            if all(k * d <= n and s <= k for n, k, d, s in axes):
                return natten_pattern(grid, p["kernel_size"], p["dilation"], p["stride"],
                                      _axes(p["is_causal"], len(grid))), None
        return None


def window(size: int, num_sinks: int = 0, causal: bool = True) -> Candidate:
    """Sliding window of `size` keys (causal: i - size < j <= i; else |i - j| < size), plus the
    first `num_sinks` keys."""
    if size < 1 or num_sinks < 0:
        raise PassError(f"window {size} with {num_sinks} sinks: window >= 1, sinks >= 0")
    return Candidate("window", (("window", int(size)), ("num_sinks", int(num_sinks))), causal)


def windows(sizes: Sequence[int], num_sinks: int = 0, causal: bool = True) -> list[Candidate]:
    return [window(w, num_sinks, causal) for w in sizes]


def neighborhood(grid: Sequence[int], kernel_size: int | Sequence[int], dilation: int |
                 Sequence[int] = 1, stride: int | Sequence[int] = 1,
                 is_causal: bool | Sequence[bool] = False, num_global: int = 0) -> Candidate:
    """NATTEN neighborhood attention on `grid` (one entry may be -1: inferred from the sequence
    length less `num_global`) over the tokens after `num_global` global prefix tokens."""
    n = len(grid)
    ks, dl, st = (_per_axis(x, n, nm) for x, nm in ((kernel_size, "kernel_size"),
                                                   (dilation, "dilation"), (stride, "stride")))
    ca = _axes(is_causal, n)
    if not 1 <= n <= 3 or min(ks + dl + st) < 1 or num_global < 0:
        raise PassError(f"neighborhood on grid {list(grid)}: 1-3 axes, kernel_size, dilation "
                        f"and stride >= 1, num_global >= 0")
    params = (("grid", tuple(int(g) for g in grid)), ("kernel_size", ks), ("dilation", dl),
              ("stride", st), ("is_causal", ca), ("num_global", int(num_global)))
    return Candidate("neighborhood", params, all(ca))


def neighborhoods(grid: Sequence[int], kernel_sizes: Sequence[int | Sequence[int]],
                  **kw) -> list[Candidate]:
    return [neighborhood(grid, k, **kw) for k in kernel_sizes]


def block_sparse(layout: str | torch.Tensor, block_size: int, causal: bool = True,
                 local_blocks: int = 5, sink_blocks: int = 1, vert_stride: int = 4,
                 name: str = "user") -> Candidate:
    """Block-sparse attention: "power" (PowerAttention, causal), "local-stride" (Phi-3-small), or a
    (B|1, H|1, nq, nkv) bool layout tensor (cropped to each sequence's blocks)."""
    if block_size < 1:
        raise PassError(f"block_size must be >= 1, got {block_size}")
    if isinstance(layout, torch.Tensor):
        if layout.dtype != torch.bool or layout.dim() != 4:
            raise PassError(f"a block layout is a 4-D bool tensor, got {layout.dtype} "
                            f"{tuple(layout.shape)}")
        return Candidate("block", (("layout", name), ("block_size", int(block_size))), causal,
                         layout=layout)
    if layout == "power":
        params = (("local_blocks", int(local_blocks)), ("sink_blocks", int(sink_blocks)))
        causal = True
    elif layout == "local-stride":
        params = (("local_blocks", int(local_blocks)), ("vert_stride", int(vert_stride)))
    else:
        raise PassError(f"unknown block layout {layout!r}", "power, local-stride or a tensor")
    return Candidate("block", (("layout", layout), ("block_size", int(block_size)), *params),
                     causal)


def custom(name: str, mask_mod: MaskMod | Callable[[int, int], MaskMod],
           per_length: bool = False, causal: bool = False) -> Candidate:
    """Any predicate: `mask_mod(b, h, q, kv)`, or with `per_length` a function of (sq, skv)
    returning one."""
    fn = mask_mod if per_length else (lambda sq, skv: mask_mod)
    return Candidate("custom", (("name", name),), causal, fn=fn)


def _neighborhood_mod(p: dict, causal: bool, sq: int, skv: int) -> MaskMod:
    ng = p["num_global"]
    if sq != skv:
        raise PassError(f"neighborhood attention needs one sequence for queries and keys, got "
                        f"{sq} and {skv}")
    grid = masks.resolve_grid(p["grid"], sq - ng)
    args = (grid, p["kernel_size"], p["dilation"], p["stride"], p["is_causal"])

    def mod(b, h, q, kv):  # the grid starts after the global tokens (clamped: they see all)
        vis = masks.natten_visible((q - ng).clamp(min=0), (kv - ng).clamp(min=0), *args)
        return masks.with_global(vis, q, kv, ng)

    return mod


def _per_axis(x, n: int, name: str) -> tuple[int, ...]:
    vals = (int(x),) * n if isinstance(x, int) else tuple(int(v) for v in x)
    if len(vals) != n:
        raise PassError(f"{name} {list(vals)} must have one entry per grid axis ({n})")
    return vals


def _axes(x, n: int) -> tuple[bool, ...]:
    return (bool(x),) * n if isinstance(x, bool) else tuple(bool(v) for v in x)


def _fmt(v) -> str:
    if isinstance(v, tuple):
        return "x".join(str(int(x)) for x in v)
    return str(v)


def _jsonable(v):
    return [_jsonable(x) for x in v] if isinstance(v, tuple) else v


def as_candidates(items: Sequence[Candidate | MaskMod]) -> list[Candidate]:
    """Candidates, with bare predicates wrapped as `custom` ones (named by position)."""
    out = []
    for i, c in enumerate(items):
        out.append(c if isinstance(c, Candidate) else custom(f"fn{i}", c))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise PassError(f"candidate {dup} is given twice")
    return out
