"""Host-side tile lists of attnc's flash kernel (FlexAttention-style): per query tile, the key
tiles that are fully visible (no mask arithmetic) and those partly visible, for neighborhood,
sliding-window and block-sparse patterns; built with `masks.py` and cached.

    lists(pattern, ...)         -> (full_num, full_idx, partial_num, partial_idx), (B|1, H|1, ...)
    na_fast_lists(pattern, ...) -> the same with masks.natten_tile_flags in each partial index's
                                   top byte (the dilation-1 neighborhood fast path)
    layout_tiles(layout, ...)   -> kernel-tile any/all of a block layout

The cache is an LRU of CACHE_SIZE entries keyed on the pattern and tile shapes; a block layout's
lists are reused only for the same live, unmodified tensor.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict

import torch
from attnc.kernels import masks

from attnc.errors import KernelError


def lists(pattern, sq, skv, bm, bn, layout, tq, tk, causal, device):
    if pattern.kind == "natten":
        def build():
            a, b = masks.natten_tile_any_all(pattern.grid, pattern.kernel_size, pattern.dilation,
                                             pattern.stride, pattern.causal_axes, tq, tk, device)
            return masks.compact_lists(a[None, None], b[None, None])

        return _cached((pattern, tq, tk, str(device)), build)
    if pattern.kind == "sliding":
        def build():
            def pred(i, j):
                return masks.sliding_window_visible(i, j, pattern.window, pattern.num_sinks,
                                                    causal)

            a, b = masks.tile_any_all(pred, sq, skv, bm, bn, device)
            return masks.compact_lists(a[None, None], b[None, None])

        return _cached((pattern, causal, sq, skv, bm, bn, str(device)), build)
    # a layout is data: its lists are reused only for the same live tensor, unmodified (an
    # address and a version alone can belong to a new layout once the old one is freed)
    key = ("block", id(layout), pattern.block_size, causal, sq, skv, bm, bn, str(device))
    hit = CACHE.get(key)
    if hit is not None and hit[0]() is layout and hit[1] == layout._version:
        CACHE.move_to_end(key)
        return hit[2]
    lists = masks.compact_lists(*layout_tiles(layout, pattern.block_size, sq, skv, bm, bn,
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
    """The natten lists with masks.natten_tile_flags in the top byte of each partial index."""
    def build():
        fnum, fidx, pnum, pidx = lists(pattern, 0, 0, 0, 0, None, tq, tk, False, device)
        if pidx.shape[-1] >= 1 << 24:
            raise KernelError(f"{pidx.shape[-1]} key tiles exceed the 24-bit tile index")
        flags = masks.natten_tile_flags(pattern.grid, pattern.kernel_size, pattern.stride,
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
