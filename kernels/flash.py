"""FlashAttention-style attention forward in Triton: dense, masked and block-sparse patterns.

    out[b, h, i] = sum_j softmax_j(scale * <q[b,h,i], k[b,h//g,j]> + bias[b,h,i,j]) v[b,h//g,j]
    lse[b, h, i] = log sum_j exp(scale * <q, k> + bias)          (natural log, float32)

Layout (B, H, S, D) with any strides (last dim contiguous); K/V may have Hq // g heads (GQA/MQA).
Online softmax in base 2 with float32 accumulators; fp16, bf16 and fp32 inputs (fp32 dots in
IEEE precision); D from 16 to 256 padded to a power of two with masked loads; ragged Sq, Skv.
A row that sees no key returns zeros and lse = -inf.

This module is the host side (public API: `Pattern`, `natten_pattern`, `can_use_flash`,
`attention_fwd`, `column_sums`): argument checks, FlexAttention-style full/partial block lists
built on the host and cached (tile_lists.py), config choice (autotune.py) and launches.
The kernel bodies live in `flash_kernels.py` (forward, patterns 0-3) and `colsum.py` (column
sums: probabilities recomputed from the lse and summed per key over chosen query rows, without
materialising the attention matrix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from attnc.errors import KernelError
from attnc.kernels import autotune, masks, tile_lists
from attnc.kernels.colsum import _colsum_kernel
from attnc.kernels.flash_kernels import _fwd_kernel

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# kernel variants (switches for A/B timing): neighborhood attention with dilation 1 checks only
# the window bounds that can cut a tile; a positive scale is folded into one fma per score
NA_FAST_MASK = True
FOLD_SCALE = True
# how dilation-1 neighborhood attention walks its key tiles (a config's "na_loop" picks one;
# autotuning times the default against "class"):
#   "lists"  host-built full/partial tile lists, the partial ones with per-tile bound flags;
#   "box"    the tiles as a box of per-axis ranges, flags computed per tile (no lists);
#   "class"  one branch-free loop per cut class (whole tiles unmasked, then tiles cut on one axis,
#            on two, ...), each checking only its cut axes (no lists, no per-tile flags).
# Measured on the H100 (round 2): box beats lists in 1-D, lists beat box in 2-D/3-D; NA_LOOP
# None takes that default, a name forces one loop everywhere.
NA_LOOPS = ("lists", "box", "class")
NA_LOOP: str | None = None
_NA_LOOP_ID = {"lists": 0, "box": 1, "class": 2}
# a config's "kv_tma": 1 loads K/V tiles through tensor descriptors (TMA bulk copies on Hopper)
# instead of pointer gathers; offered to autotuning where _tma_ok holds


# ------------------------------------------------------------------------------ host side


@dataclass(frozen=True)
class Pattern:
    """What the kernel computes besides scores: kind 'dense', 'natten', 'sliding' or 'block'."""

    kind: str = "dense"
    grid: tuple[int, int, int] = (1, 1, 1)
    kernel_size: tuple[int, int, int] = (1, 1, 1)
    dilation: tuple[int, int, int] = (1, 1, 1)
    stride: tuple[int, int, int] = (1, 1, 1)
    causal_axes: tuple[bool, bool, bool] = (False, False, False)
    ndim: int = 1
    window: int = 0
    num_sinks: int = 0
    block_size: int = 128


def natten_pattern(grid, kernel_size, dilation, stride, is_causal) -> Pattern:
    n = len(grid)
    pad = [1] * (3 - n)

    def p3(x):
        return tuple(pad + [int(v) for v in x])

    return Pattern("natten", p3(grid), p3(kernel_size), p3(dilation), p3(stride),
                   tuple([False] * (3 - n) + [bool(c) for c in is_causal]), n)


_KINDS = {"dense": 0, "natten": 1, "sliding": 2, "block": 3}


def can_use_flash(q, k, v, mask=None) -> str | None:
    """Why the Triton kernel cannot take these inputs, or None when it can."""
    if not (q.is_cuda or _interpret()):
        return "not on a CUDA device"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "inputs are not 4-D (B, H, S, D)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not fp16/bf16/fp32"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return "q, k and v dtypes differ"
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        return "k/v shapes do not match q"
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads"
    if not 16 <= q.shape[-1] <= 256:
        return f"head dim {q.shape[-1]} outside 16..256"
    if mask is not None:
        try:
            torch.broadcast_shapes(mask.shape, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        except RuntimeError:
            return f"mask shape {tuple(mask.shape)} does not broadcast to the scores"
        if mask.dtype != torch.bool and not mask.is_floating_point():
            return f"mask dtype {mask.dtype} is neither bool nor float"
    return None


def can_use_flash_site(site) -> str | None:
    """Why the Triton kernel cannot serve an `attnc.graph.sites.AttentionSite` (head dim, head
    grouping;
    the device and dtype are checked at run time by `can_use_flash`), or None."""
    if not 16 <= site.head_dim <= 256:
        return f"head dim {site.head_dim} outside 16..256"
    if site.num_kv_heads < 1 or site.num_heads % site.num_kv_heads:
        return f"{site.num_heads} query heads are not a multiple of {site.num_kv_heads} kv heads"
    return None


def _ieee(dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _interpret())


def _interpret() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _na_fast(pattern: Pattern) -> bool:
    return NA_FAST_MASK and pattern.kind == "natten" and all(d == 1 for d in pattern.dilation)


def na_loop(pattern: Pattern, cfg: dict | None = None) -> str | None:
    """The key-tile loop a neighborhood launch uses (None: not the dilation-1 fast path)."""
    if not _na_fast(pattern):
        return None
    name = (cfg or {}).get("na_loop") or NA_LOOP or ("box" if pattern.ndim == 1 else "lists")
    if name not in NA_LOOPS:
        raise KernelError(f"unknown neighborhood loop {name!r}; expected one of {NA_LOOPS}")
    return name


def _config(pattern: Pattern, q, k, v, causal, mask, layout) -> dict:
    def bench(cfg):
        return lambda: _launch(q, k, v, pattern, cfg, mask, causal, 1.0, layout)[0]

    variants = [{}]
    default = na_loop(pattern)
    if default is not None:  # the measured default loop first, then the class loops
        variants = [{"na_loop": n} for n in dict.fromkeys((default, "class"))]
    if _tma_ok(q, k, v):
        variants += [{**variants[-1], "kv_tma": 1}]
    return autotune.choose(f"flash-{pattern.kind}", q, k, causal, mask is not None, bench,
                           extra=repr(pattern), variants=variants)


def attention_fwd(q, k, v, *, mask=None, causal=False, scale, pattern: Pattern | None = None,
                  layout=None, config: dict | None = None):
    """(out, lse) of attention over (B, H, S, D) inputs with the Triton kernel."""
    reason = can_use_flash(q, k, v, mask)
    if reason is not None:
        raise KernelError(f"the flash kernel cannot run: {reason}")
    pattern = pattern or Pattern()
    if pattern.kind == "block" and layout is None:
        raise KernelError("a block-sparse pattern needs a layout")
    cfg = config or _config(pattern, q, k, v, causal, mask, layout)
    return _launch(q, k, v, pattern, cfg, mask, causal, scale, layout)


def _tma_ok(q, k, v) -> bool:
    """Whether K/V can be read through tensor descriptors: a GPU with TMA (Hopper or newer) or
    the interpreter, and 16-byte aligned head bases and rows."""
    if q.is_cuda:
        if torch.cuda.get_device_capability(q.device)[0] < 9:
            return False
    elif not _interpret():
        return False
    for t in (k, v):
        e = t.element_size()
        if t.data_ptr() % 16 or t.stride(-1) != 1 or any((t.stride(i) * e) % 16 for i in (0, 1, 2)):
            return False
    return True


def _tma_alloc(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda" if not _interpret() else "cpu")


def _ensure_allocator() -> None:
    """In-kernel tensor descriptors need Triton's scratch allocator; install a torch one unless
    the caller has set their own."""
    try:
        from triton.runtime import _allocation

        current = _allocation._allocator.get()
        if not isinstance(current, _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # another Triton layout: set ours
        pass
    triton.set_allocator(_tma_alloc)


def _prep(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _mask_args(mask, q, k):
    if mask is None:
        return 0, q, (0, 0, 0, 0)
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if mask.dim() < 4:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    m = mask.expand(shape)  # stride 0 on broadcast dims
    if m.dtype == torch.bool:
        return 1, m.view(torch.uint8), tuple(m.stride())
    return 2, m, tuple(m.stride())


def _layout_args(layout):
    lay = layout.view(torch.uint8)
    s = lay.stride()
    return lay, (s[0] if lay.shape[0] > 1 else 0, s[1] if lay.shape[1] > 1 else 0, s[2], s[3])


def _launch(q, k, v, pattern, cfg, mask, causal, scale, layout):
    q, k, v = _prep(q), _prep(k), _prep(v)
    B, H, SQ, D = q.shape
    SKV = k.shape[2]
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    out = torch.empty_like(q)
    lse = torch.empty((B, H, SQ), device=q.device, dtype=torch.float32)
    if B * H * SQ == 0:
        return out, lse
    mask_kind, mt, ms = _mask_args(mask, q, k)
    kind = _KINDS[pattern.kind]
    tq = tk = (1, 1, bm)
    tk = (1, 1, bn)
    dummy = torch.zeros(1, device=q.device, dtype=torch.int32)
    fnum = fidx = pnum = pidx = dummy
    lsb = (0, 0, 0, 0)
    lay = dummy
    nq_tiles, nkl, lst = triton.cdiv(SQ, bm), 1, (0, 0, 0, 0)
    if kind == 1:
        if SQ != SKV or math.prod(pattern.grid) != SQ:
            raise KernelError(f"neighborhood attention needs Sq == Skv == prod(grid) "
                              f"{pattern.grid}, got {SQ}, {SKV}")
        reach = [kk * dd for kk, dd in zip(pattern.kernel_size, pattern.dilation, strict=True)]
        tq = tile_lists.natten_tile_shape(bm, pattern.grid, reach)
        tk = tile_lists.natten_tile_shape(bn, pattern.grid, reach)
    if kind == 3:
        masks.check_layout(layout, pattern.block_size, SQ, SKV)
        lay, lsb = _layout_args(layout)
    # a mask (padding, a site's own mask) must reach every tile: no unmasked `full` tiles and
    # no neighborhood fast loops (they check only the window bounds)
    loop = na_loop(pattern, cfg) if mask_kind == 0 else None
    fast = loop is not None
    tma = bool(cfg.get("kv_tma")) and _tma_ok(q, k, v)
    if tma:
        _ensure_allocator()
    box = loop in ("box", "class")  # no lists: the kernel derives its key tiles
    if box:
        nq_tiles = math.prod(triton.cdiv(pattern.grid[a], tq[a]) for a in range(3))
    elif fast:
        fnum, fidx, pnum, pidx = tile_lists.na_fast_lists(pattern, tq, tk, q.device)
    if kind != 0 and not box:
        if not fast:
            fnum, fidx, pnum, pidx = tile_lists.lists(pattern, SQ, SKV, bm, bn, layout, tq, tk,
                                                      causal, q.device)
        nq_tiles, nkl = fidx.shape[2], fidx.shape[3]
        lst = (fnum.stride(0) if fnum.shape[0] > 1 else 0, fnum.stride(1) if fnum.shape[1] > 1
               else 0, fidx.stride(0) if fidx.shape[0] > 1 else 0,
               fidx.stride(1) if fidx.shape[1] > 1 else 0)
    g, ks, dl, st = pattern.grid, pattern.kernel_size, pattern.dilation, pattern.stride
    nqt = [triton.cdiv(g[a], tq[a]) for a in range(3)]
    nkt = [triton.cdiv(g[a], tk[a]) for a in range(3)]
    ca = pattern.causal_axes
    grid = (nq_tiles, B * H)
    _fwd_kernel[grid](
        q, k, v, out, lse, mt, lay, fnum, fidx, pnum, pidx,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *ms, *lsb, *lst, nkl,
        H, H // k.shape[1], SQ, SKV, D, scale * LOG2E,
        *g, *ks, *dl, *st, nqt[1], nqt[2], nkt[1], nkt[2],
        pattern.window, pattern.num_sinks, pattern.block_size,
        IS_CAUSAL=bool(causal), MASK_KIND=mask_kind, PATTERN=kind, NDIM=pattern.ndim,
        CA0=ca[0], CA1=ca[1], CA2=ca[2], TQ0=tq[0], TQ1=tq[1], TQ2=tq[2],
        TK0=tk[0], TK1=tk[1], TK2=tk[2], BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_D=max(16, triton.next_power_of_2(D)), IEEE=_ieee(q.dtype),
        FASTNA=fast, FOLD=FOLD_SCALE and scale > 0 and mask_kind != 2,
        NA_LOOP=_NA_LOOP_ID[loop] if fast else 0, KV_TMA=tma,
        LAY_TILED=kind == 3 and pattern.block_size % bm == 0 and pattern.block_size % bn == 0,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


def column_sums(q, k, lse, rows, *, mask=None, causal=False, scale, pattern: Pattern | None = None,
                layout=None) -> torch.Tensor:
    """(B, Hq, Skv) float32: sum over query rows `rows` (bool (Sq,) or int indices) of the
    attention probabilities exp(s_ij - lse_i), with the same pattern as the forward."""
    q, k = _prep(q), _prep(k)
    pattern = pattern or Pattern()
    B, H, SQ, D = q.shape
    SKV = k.shape[2]
    if rows.dtype == torch.bool:
        rows = rows.nonzero().flatten()
    rows = rows.to(device=q.device, dtype=torch.int32).contiguous()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= SQ):
        raise KernelError(f"query rows must lie in [0, {SQ})")
    cs = torch.zeros((B, H, SKV), device=q.device, dtype=torch.float32)
    if rows.numel() == 0 or B * H * SKV == 0:
        return cs
    mask_kind, mt, ms = _mask_args(mask, q, k)
    kind = _KINDS[pattern.kind]
    lay, lsb = torch.zeros(1, device=q.device, dtype=torch.uint8), (0, 0, 0, 0)
    if kind == 3:
        masks.check_layout(layout, pattern.block_size, SQ, SKV)
        lay, lsb = _layout_args(layout)
    ca = pattern.causal_axes
    interp = _interpret()
    bm, bn = (16, 32) if interp else (64, 64)
    _colsum_kernel[(triton.cdiv(SKV, bn), B * H)](
        q, k, lse.contiguous(), rows, cs, mt, lay,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        *ms, *lsb, rows.numel(), H, H // k.shape[1], SQ, SKV, D, scale * LOG2E,
        *pattern.grid, *pattern.kernel_size, *pattern.dilation, *pattern.stride,
        pattern.window, pattern.num_sinks, pattern.block_size,
        IS_CAUSAL=bool(causal), MASK_KIND=mask_kind, PATTERN=kind, NDIM=pattern.ndim,
        CA0=ca[0], CA1=ca[1], CA2=ca[2], BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_D=max(16, triton.next_power_of_2(D)), IEEE=_ieee(q.dtype),
        num_warps=4, num_stages=1 if interp else 2,
    )
    return cs
