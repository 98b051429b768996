"""The sparse pass's candidate patterns per site: families of one op with shared parameters, each
with members from sparse to dense whose kept mass the statistics measure.

- window (+ sinks): `attnc::sliding_window_attention`; causal sites get causal windows, the
  others symmetric ones. Sizes: fractions 1/64 .. 1/2 of the target length and powers of two,
  or the recipe's `windows` (an int is a size, a float in (0, 1] a fraction of the target).
- neighborhood: `attnc::neighborhood_attention`; 1-D with dilation 1 and 2, and 2-D/3-D on a
  token grid (the recipe's `grid`, or the patch grid read off the pixel input's shape) with the
  prefix tokens (CLS, registers) as global tokens.
- block-sparse: `attnc::block_sparse_attention` with PowerAttention, local + vertical-stride, or
  the recipe's layout file.

Neighborhood and block layouts are defined on a fixed length (the op checks the grid and the
layout against the sequence at run time), so they are offered only on sites whose sequence
length is static; sites with a dynamic length get windows, which hold at every length.

Layout file (`layout_file`), never pickle: JSON `{"block_size": 64, "layout": [[1, 0, ...], ...]}`
(rows = query blocks, 0/1 or true/false; a list of such matrices gives one per head), or `.npy`
(bool or 0/1 integers, 2-D or 3-D, read with allow_pickle=False; `block_size` from the recipe).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnc.errors import RecipeError
from attnc.graph import stats_patterns as P
from attnc.graph.stats_patterns import Candidate
from attnc.kernels import masks

FRACTIONS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
MAX_LAYOUT_BYTES = 64 << 20
PATTERN_NAMES = ("window", "neighborhood", "block-sparse", "power", "local-stride", "layout")


@dataclass(frozen=True)
class Member:
    cand: Candidate
    value: Any  # window size, kernel tuple, (local_blocks, vert_stride) or "file"
    label: str


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # window | neighborhood | block
    shared: dict[str, Any]
    members: tuple[Member, ...]
    unmeasured: int = 0  # members the calibration length cannot judge (left out)
    layouts: dict[Any, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class SiteInfo:
    calib: int  # calibration sequence length (the longest batch)
    target: int
    static: bool  # the site's length is fixed in the graph
    grid: tuple[int, ...] | None = None  # token grid (vision), after num_global prefix tokens
    num_global: int = 0
    note: str = ""


def patterns_wanted(patterns) -> set[str]:
    """The candidate kinds a recipe's `patterns` asks for."""
    if patterns == "auto":
        return {"window", "neighborhood", "power", "local-stride", "layout"}
    want = set(patterns)
    if "block-sparse" in want:
        want |= {"power", "local-stride", "layout"}
    return want


def window_sizes(cfg, target: int) -> list[int]:
    if cfg.windows:
        return sorted({max(1, round(w * target)) if isinstance(w, float) else int(w)
                       for w in cfg.windows})
    sizes = {max(2, round(f * target)) for f in FRACTIONS}
    sizes |= {1 << e for e in range(3, 20) if (1 << e) < target}
    return sorted(s for s in sizes if s < target)


def families(site, info: SiteInfo, cfg, layout_file: tuple[torch.Tensor, int] | None):
    """The candidate families of one site (members sparse first)."""
    want = patterns_wanted(cfg.patterns)
    out: list[Family] = []
    t = info.target
    if "window" in want:
        sinks = info.num_global if info.grid is not None else cfg.sinks
        for ns in sorted({0, sinks}):
            mem, skipped = [], 0
            for w in window_sizes(cfg, t):
                if w >= info.calib and t > info.calib:
                    skipped += 1  # reaches past what calibration saw
                    continue
                mem.append(Member(P.window(w, ns, site.causal), w, f"window {w}"))
            name = f"window+{ns} sinks" if ns else "window"
            out.append(Family(name, "window", {"num_sinks": ns, "causal": site.causal},
                              tuple(mem), skipped))
    if info.static and "neighborhood" in want:
        out += _neighborhoods(site, info, cfg)
    if info.static:
        out += _blocks(site, info, cfg, want, layout_file)
    return [f for f in out if f.members]


def _neighborhoods(site, info: SiteInfo, cfg) -> list[Family]:
    out = []
    g = info.num_global if not site.causal else 0
    n = info.target - g
    for d in (1, 2):
        if n < 4 * d:
            continue
        ks = [k for k in window_sizes(cfg, n) if k >= 2 and k * d <= n and k < n]
        mem = [Member(P.neighborhood([n], k, d, 1, site.causal, g), (k,), f"1-D kernel {k}")
               for k in ks]
        shared = {"grid": [n], "dilation": [d], "stride": [1], "is_causal": [site.causal],
                  "num_global": g}
        out.append(Family(f"neighborhood 1-D dilation {d}", "neighborhood", shared, tuple(mem)))
    if info.grid is not None and len(info.grid) >= 2 and not site.causal:
        grid = list(info.grid)
        top = min(grid)
        ks = [k for k in range(3, top, 2)] or []
        mem = [Member(P.neighborhood(grid, [min(k, e) for e in grid], 1, 1, False,
                                     info.num_global), tuple(min(k, e) for e in grid),
                      f"{'x'.join(str(min(k, e)) for e in grid)}") for k in ks]
        shared = {"grid": grid, "dilation": [1] * len(grid), "stride": [1] * len(grid),
                  "is_causal": [False] * len(grid), "num_global": info.num_global}
        out.append(Family(f"neighborhood {len(grid)}-D", "neighborhood", shared, tuple(mem)))
    return out


def block_size_for(cfg, target: int) -> int:
    if cfg.block_size:
        return cfg.block_size
    return max(4, min(64, 1 << max(0, int(math.log2(max(target, 2) / 8)))))


def _blocks(site, info: SiteInfo, cfg, want: set[str], layout_file) -> list[Family]:
    out = []
    t = info.target
    bs = block_size_for(cfg, t)
    n = -(-t // bs)
    if n >= 4 and "power" in want and site.causal:
        layouts, mem = {}, []
        for lb in sorted({1, 2, 3, 5, 8, n // 4, n // 2} - {0}):
            if lb >= n:
                continue
            layouts[lb] = masks.power_attention_layout(n, lb, 1)[0, 0]
            mem.append(Member(P.block_sparse("power", bs, True, local_blocks=lb, sink_blocks=1),
                              lb, f"power local {lb}"))
        out.append(Family(f"power (block {bs})", "block",
                          {"layout": "power", "block_size": bs, "causal": True},
                          tuple(mem), layouts=layouts))
    if n >= 4 and "local-stride" in want:
        layouts, mem = {}, []
        for lb in sorted({1, 2, 4, n // 4} - {0}):
            for vs in (4, 8):
                if lb >= n or vs > n:
                    continue
                layouts[(lb, vs)] = masks.local_stride_layout(n, lb, vs, site.causal)[0, 0]
                mem.append(Member(P.block_sparse("local-stride", bs, site.causal,
                                                 local_blocks=lb, vert_stride=vs),
                                  (lb, vs), f"local {lb} stride {vs}"))
        out.append(Family(f"local-stride (block {bs})", "block",
                          {"layout": "local-stride", "block_size": bs, "causal": site.causal},
                          tuple(mem), layouts=layouts))
    if layout_file is not None and "layout" in want:
        lay, fbs = layout_file  # (1, H|1, nq, nk)
        nb = -(-t // fbs)
        if lay.shape[-1] >= nb and lay.shape[-2] >= nb and lay.shape[1] in (1, site.num_heads):
            cropped = lay[:, :, :nb, :nb]
            cand = P.block_sparse(cropped, fbs, site.causal, name="file")
            out.append(Family(f"layout file (block {fbs})", "block",
                              {"layout": "file", "block_size": fbs, "causal": site.causal},
                              (Member(cand, "file", "layout file"),),
                              layouts={"file": cropped}))
    return out


# ------------------------------------------------------------------------------ layout files


def read_layout_file(path: str, block_size: int | None) -> tuple[torch.Tensor, int]:
    """(layout (1, H|1, nq, nk) bool, block size) from a JSON or .npy file; RecipeError naming
    what is wrong."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise RecipeError(f"sparse layout_file {path} does not exist")
    if p.stat().st_size > MAX_LAYOUT_BYTES:
        raise RecipeError(f"sparse layout_file {path} is over {MAX_LAYOUT_BYTES >> 20} MB")
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise RecipeError(f"sparse layout_file {path} is not JSON: {exc}") from None
        if not isinstance(data, dict) or "layout" not in data:
            raise RecipeError(f"sparse layout_file {path} needs a 'layout' key (0/1 rows)")
        bs = data.get("block_size", block_size)
        try:
            arr = np.array(data["layout"])
        except ValueError:
            raise RecipeError(f"sparse layout_file {path}: rows of unequal length") from None
    elif p.suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError as exc:
            raise RecipeError(f"sparse layout_file {path} is not a plain .npy array: "
                              f"{exc}") from None
        bs = block_size
    else:
        raise RecipeError(f"sparse layout_file {path} must be .json or .npy")
    if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
        raise RecipeError(f"sparse layout_file {path}: block_size must be a positive integer, "
                          f"got {bs!r}", "give block_size in the file (JSON) or the recipe")
    if arr.dtype == object or arr.ndim not in (2, 3) or arr.size == 0:
        raise RecipeError(f"sparse layout_file {path}: a 2-D (blocks x blocks) or 3-D "
                          f"(heads x blocks x blocks) array of 0/1, got shape {arr.shape}")
    if arr.dtype != bool and not (np.issubdtype(arr.dtype, np.integer)
                                  and set(np.unique(arr).tolist()) <= {0, 1}):
        raise RecipeError(f"sparse layout_file {path}: entries must be 0/1 or true/false")
    t = torch.from_numpy(arr.astype(bool))
    t = t[None, None] if t.dim() == 2 else t[None]
    diag = torch.arange(min(t.shape[-2:]))
    if not bool(t[..., diag, diag].all()):
        raise RecipeError(f"sparse layout_file {path}: every diagonal block must be kept",
                          "a query block that sees no key block gives zeros")
    return t, bs


# ------------------------------------------------------------------------------ sites


def vision_grid(program, seq: int) -> tuple[tuple[int, int], int] | None:
    """The patch grid and the prefix token count from a pixel input (B, C, H, W): the patch
    size p with (H/p)(W/p) + g == seq for the fewest prefix tokens g (at most 16)."""
    for name, arg in zip(program.input_names, program.example_args, strict=False):
        if "pixel" not in name or not isinstance(arg, torch.Tensor) or arg.dim() != 4:
            continue
        h, w = int(arg.shape[-2]), int(arg.shape[-1])
        for g in range(0, min(seq - 1, 17)):
            n = seq - g
            if (h * w) % n:
                continue
            p = math.isqrt(h * w // n)
            if p * p * n == h * w and h % p == 0 and w % p == 0:
                return (h // p, w // p), g
    return None
