"""Host-side tile lists of attnc's flash kernel (FlexAttention-style): per query tile, the key
tiles that are fully visible (no mask arithmetic) and those partly visible, for neighborhood,
sliding-window and block-sparse patterns; built with `masks.py` and cached.

    lists(pattern, ...)         -> (full_num, full_idx, partial_num, partial_idx), (B|1, H|1, ...)
    na_fast_lists(pattern, ...) -> the same with natten_tile_flags in each partial index's
                                   top byte (the dilation-1 neighborhood fast path)
    layout_tiles(layout, ...)   -> kernel-tile any/all of a block layout
    tile_any_all, compact_lists, natten_tile_any_all / _flags / _shape: the tile-level
                                   reductions of masks.py predicates these are built from

The cache is an LRU of CACHE_SIZE entries keyed on the pattern and tile shapes; a block layout's
lists are reused only for the same live, unmodified tensor.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from attnc.errors import KernelError
from attnc.kernels import masks


def lists(pattern, sq, skv, bm, bn, layout, tq, tk, causal, device):
    if pattern.kind == "natten":
        def build():
            a, b = natten_tile_any_all(pattern.grid, pattern.kernel_size, pattern.dilation,
                                             pattern.stride, pattern.causal_axes, tq, tk, device)
            return compact_lists(a[None, None], b[None, None])

        return _cached((pattern, tq, tk, str(device)), build)
    if pattern.kind == "sliding":
        def build():
            def pred(i, j):
                return masks.sliding_window_visible(i, j, pattern.window, pattern.num_sinks,
                                                    causal)

            a, b = tile_any_all(pred, sq, skv, bm, bn, device)
            return compact_lists(a[None, None], b[None, None])

        return _cached((pattern, causal, sq, skv, bm, bn, str(device)), build)
    # a layout is data: its lists are reused only for the same live tensor, unmodified (an
    # address and a version alone can belong to a new layout once the old one is freed)
    key = ("block", id(layout), pattern.block_size, causal, sq, skv, bm, bn, str(device))
    hit = CACHE.get(key)
    if hit is not None and hit[0]() is layout and hit[1] == layout._version:
        CACHE.move_to_end(key)
        return hit[2]
    lists = compact_lists(*layout_tiles(layout, pattern.block_size, sq, skv, bm, bn,
                                               causal))
    _remember(key, (weakref.ref(layout), layout._version, lists))
    return lists


# tile lists by pattern and tiles, least recently used dropped past CACHE_SIZE entries
CACHE: OrderedDict = OrderedDict()
CACHE_SIZE = 256


def _cached(key, build):
    if key in CACHE:
        CACHE.move_to_end(key)
        return CACHE[key]
    value = build()
    _remember(key, value)
    return value


def _remember(key, value) -> None:
    CACHE[key] = value
    CACHE.move_to_end(key)
    while len(CACHE) > CACHE_SIZE:
        CACHE.popitem(last=False)


def na_fast_lists(pattern, tq, tk, device):
    """The natten lists with natten_tile_flags in the top byte of each partial index."""
    def build():
        fnum, fidx, pnum, pidx = lists(pattern, 0, 0, 0, 0, None, tq, tk, False, device)
        if pidx.shape[-1] >= 1 << 24:
            raise KernelError(f"{pidx.shape[-1]} key tiles exceed the 24-bit tile index")
        flags = natten_tile_flags(pattern.grid, pattern.kernel_size, pattern.stride,
                                        pattern.causal_axes, tq, tk, device)  # (NQ, NK)
        fl = flags.gather(-1, pidx[0, 0].long()).to(torch.int32)
        return fnum, fidx, pnum, (pidx | (fl << 24)).contiguous()

    return _cached(("na-fast", pattern, tq, tk, str(device)), build)


def layout_tiles(layout, bs, sq, skv, bm, bn, causal):
    """Kernel-tile any/all of a block layout: upsample to the gcd unit, reduce to tiles."""
    u = math.gcd(bs, math.gcd(bm, bn))
    r = bs // u
    lay = layout.repeat_interleave(r, dim=2).repeat_interleave(r, dim=3)  # (B, H, units, units)
    nq, nk = -(-sq // bm), -(-skv // bn)
    lay = lay[:, :, : nq * bm // u][:, :, :, : nk * bn // u]
    pq, pk = nq * bm // u - lay.shape[2], nk * bn // u - lay.shape[3]
    lay = torch.nn.functional.pad(lay, (0, pk, 0, pq))  # (B, H, nq*bm/u, nk*bn/u)
    t = lay.reshape(*lay.shape[:2], nq, bm // u, nk, bn // u)  # (B, H, nq, tq, nk, tk)
    any_, all_ = t.any(-1).any(-2), t.all(-1).all(-2)
    if skv % bn:
        all_[..., -1] = False
    if causal:
        qt = torch.arange(nq, device=layout.device)[:, None]
        kt = torch.arange(nk, device=layout.device)[None, :]
        any_ = any_ & (kt * bn <= torch.clamp((qt + 1) * bm, max=sq) - 1)
        all_ = all_ & ((kt + 1) * bn - 1 <= qt * bm)
    return any_, all_


# ------------------------------------------------------------ tile-level any/all (from masks.py)


def tile_any_all(pred: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], lq: int, lk: int,
                 tq: int, tk: int, device, chunk_elems: int = 1 << 26):
    """Reduce a predicate over (lq, lk) to (..., ceil(lq/tq), ceil(lk/tk)) `any` and `all` tiles.

    Rows past lq do not exist (ignored); columns past lk are never visible, so a ragged last
    column tile is never `all`. Evaluated in chunks of query tiles to bound memory."""
    nq, nk = -(-lq // tq), -(-lk // tk)
    cols = torch.arange(nk * tk, device=device)
    col_ok = cols < lk
    rows_per = max(tq, (chunk_elems // max(nk * tk, 1)) // tq * tq)
    anys, alls = [], []
    for r0 in range(0, nq * tq, rows_per):
        rows = torch.arange(r0, min(r0 + rows_per, nq * tq), device=device)
        m = pred(rows[:, None], cols[None, :]) & col_ok  # (..., r, nk*tk)
        row_ok = (rows < lq)[:, None]
        lead = m.shape[:-2]
        r = rows.numel() // tq
        a = (m & row_ok).reshape(*lead, r, tq, nk, tk).any(-1).any(-2)
        b = (m | ~row_ok).reshape(*lead, r, tq, nk, tk).all(-1).all(-2)
        anys.append(a)
        alls.append(b)
    return torch.cat(anys, -2), torch.cat(alls, -2)


def compact_lists(any_: torch.Tensor, all_: torch.Tensor):
    """FlexAttention-style lists: (full_num, full_idx, part_num, part_idx), int32, the counts
    (..., NQ) and the indices (..., NQ, NK) with the valid ones first in increasing order."""
    full = all_
    part = any_ & ~all_

    def compact(b):
        num = b.sum(-1, dtype=torch.int32)
        idx = torch.sort((~b).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
        return num.contiguous(), idx.contiguous()

    return (*compact(full), *compact(part))


def natten_tile_any_all(grid3, ks3, dil3, st3, ca3, tq3, tk3, device):
    """Tile-level any/all of 3-D neighborhood attention with Cartesian tiles tq3 (queries) and
    tk3 (keys): the mask is an AND over axes and a tile a product of per-axis ranges, so the
    tile-level any/all are outer ANDs of per-axis any/all. Returns (NQ, NK) each."""
    anys, alls = [], []
    for a in range(3):
        L, K, d, s, c = grid3[a], ks3[a], dil3[a], st3[a], bool(ca3[a])

        def pred(i, j, L=L, K=K, d=d, s=s, c=c):
            return masks.natten_axis_visible(i, j, L, K, d, s, c)

        x, y = tile_any_all(pred, L, L, tq3[a], tk3[a], device)
        anys.append(x)
        alls.append(y)

    def outer(m):
        full = (m[0][:, None, None, :, None, None] & m[1][None, :, None, None, :, None]
                & m[2][None, None, :, None, None, :])  # (q0, q1, q2, k0, k1, k2)
        nq = m[0].shape[0] * m[1].shape[0] * m[2].shape[0]
        return full.reshape(nq, -1)  # (NQ, NK)

    return outer(anys), outer(alls)


def natten_tile_flags(grid3, ks3, st3, ca3, tq3, tk3, device) -> torch.Tensor:
    """(NQ, NK) int32 per tile pair, for dilation 1 on every axis: which window bounds can cut
    the pair. Bit 2 * (2 - a) is set when the key tile starts before the last window start of the
    query tile on axis a (`k >= start` must be checked), bit 2 * (2 - a) + 1 when it ends at or
    past the first window end (`k < end`; this also covers keys past the extent, since
    end <= L). A partial tile needs only the checks of its set bits."""
    flags = None
    for a in range(3):
        L, K, s, c, tq, tk = grid3[a], ks3[a], st3[a], bool(ca3[a]), tq3[a], tk3[a]
        nq, nk = -(-L // tq), -(-L // tk)
        x = torch.arange(nq * tq, device=device).clamp(max=L - 1).reshape(nq, tq)
        _, start, end = masks.natten_window(x, L, K, 1, s, c)
        k0 = torch.arange(nk, device=device) * tk
        lo = (k0[None, :] < start.amax(1)[:, None]).int()
        hi = ((k0 + tk - 1)[None, :] >= end.amin(1)[:, None]).int()
        f = (lo | (hi << 1)) << (2 * (2 - a))  # (nq_a, nk_a)
        f = f.view(*[nq if i == a else 1 for i in range(3)], *[nk if i == a else 1
                                                                for i in range(3)])
        flags = f if flags is None else flags | f
    nq_all = flags.shape[0] * flags.shape[1] * flags.shape[2]
    return flags.reshape(nq_all, -1).contiguous()


def natten_tile_shape(block: int, grid3: Sequence[int], reach3: Sequence[int]) -> tuple[int, ...]:
    """A power-of-two tile (t0, t1, t2) with prod == block for a 3-D grid: grow the axis whose
    window reach (K * d) is largest relative to its tile size, never beyond the extent."""
    t = [1, 1, 1]
    while math.prod(t) < block:
        best, score = None, -1.0
        for a in (2, 1, 0):
            if t[a] >= grid3[a]:
                continue
            sc = reach3[a] / t[a]
            if sc > score:
                best, score = a, sc
        if best is None:  # grid smaller than the block: pad the last axis
            best = 2
        t[best] *= 2
    return tuple(t)
