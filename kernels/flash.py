"""FlashAttention-style forward kernels in Triton: dense, masked and block-sparse patterns.

    out[b, h, i] = sum_j softmax_j(scale * <q[b,h,i], k[b,h//g,j]> + bias[b,h,i,j]) v[b,h//g,j]
    lse[b, h, i] = log sum_j exp(scale * <q, k> + bias)          (natural log, float32)

Layout (B, H, S, D) with any strides (last dim contiguous); K/V may have Hq // g heads (GQA/MQA).
Online softmax in base 2 with float32 accumulators; fp16, bf16 and fp32 inputs (fp32 dots in
IEEE precision); D from 16 to 256 padded to a power of two with masked loads; ragged Sq, Skv.
A row that sees no key returns zeros and lse = -inf.

One kernel, specialised by constexpr switches:
  PATTERN 0  dense: key blocks [0, hi) walked by range; causal diagonal and ragged tail masked;
             MASK_KIND 1/2 reads a bool / additive mask through strides (0 on broadcast dims).
  PATTERN 1  neighborhood attention (NATTEN semantics, masks.py) on a 3-D grid with Cartesian
             tiles: a query tile is TQ0 x TQ1 x TQ2 grid points, a key tile TK0 x TK1 x TK2 (token
             gather through the row-major grid; multi-dim tiling, so 2-D/3-D windows hit few tiles).
  PATTERN 2  sliding window + global sink keys, causal or bidirectional.
  PATTERN 3  block-sparse from a (B|1, H|1, nq, nkv) bool layout of block size LBS.
Patterns 1-3 walk FlexAttention-style block lists built on the host (masks.compact_lists): per
query tile, `full` key tiles (no mask arithmetic at all) then `partial` ones (predicate per
element); a tile no query of the tile can see is never listed, so never loaded.

A second kernel (`column_sums`) recomputes probabilities from the lse and sums them per key over
a chosen set of query rows, without materialising the attention matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from attnc.kernels import autotune, masks

from attnc.errors import KernelError

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _tile_coords(t, NT1, NT2, L0, L1, L2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    offs = tl.arange(0, T0 * T1 * T2)
    c0 = (t // (NT1 * NT2)) * T0 + offs // (T1 * T2)
    c1 = ((t // NT2) % NT1) * T1 + (offs // T2) % T1
    c2 = (t % NT2) * T2 + offs % T2
    valid = (c0 < L0) & (c1 < L1) & (c2 < L2)
    return (c0 * L1 + c1) * L2 + c2, valid, c0, c1, c2


@triton.jit
def _na_win(x, L, K, DIL, ST, CAUSAL: tl.constexpr):
    g = x % DIL
    xi = x // DIL
    lg = (L - g + DIL - 1) // DIL
    wl = K // 2
    wr = K // 2 + K % 2 - 1
    if CAUSAL:
        c0 = tl.minimum((xi // ST) * ST + ST - 1, lg - 1)
        start = tl.maximum(c0 - K + 1, 0)
        end = xi + 1
    else:
        c0 = tl.minimum((xi // ST) * ST + ST // 2, lg - 1)
        c = tl.minimum(tl.maximum(c0, wl), lg - 1 - wr)
        start = c - wl
        end = c + wr + 1
    return g, start, end


@triton.jit
def _na_vis(g, start, end, xk, DIL):
    ki = xk // DIL
    return (((xk % DIL)[None, :] == g[:, None]) & (ki[None, :] >= start[:, None])
            & (ki[None, :] < end[:, None]))


@triton.jit
def _visible(qtok, qvalid, ktok, kvalid, W, kc0, kc1, kc2, P, mbase, smm, smn, lbase, slq, slk,
             IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PATTERN: tl.constexpr,
             NDIM: tl.constexpr):
    # W: the query windows of pattern 1 (g, start, end per axis); P: the scalar parameters
    g0, s0, e0, g1, s1, e1, g2, s2, e2 = W
    DL0, DL1, DL2, WINDOW, NSINK, LBS = P
    vis = kvalid[None, :] & (qtok >= 0)[:, None]
    if IS_CAUSAL:
        vis = vis & (ktok[None, :] <= qtok[:, None])
    if PATTERN == 1:
        vis = vis & _na_vis(g2, s2, e2, kc2, DL2)
        if NDIM >= 2:
            vis = vis & _na_vis(g1, s1, e1, kc1, DL1)
        if NDIM >= 3:
            vis = vis & _na_vis(g0, s0, e0, kc0, DL0)
    if PATTERN == 2:
        dist = qtok[:, None] - ktok[None, :]
        if not IS_CAUSAL:
            dist = tl.abs(dist)
        vis = vis & ((dist < WINDOW) | (ktok[None, :] < NSINK))
    if PATTERN == 3:
        lay = tl.load(lbase + (qtok // LBS)[:, None] * slq + (ktok // LBS)[None, :] * slk,
                      mask=vis & qvalid[:, None], other=0)
        vis = vis & (lay != 0)
    if MASK_KIND == 1:
        mk = tl.load(mbase + qtok[:, None] * smm + ktok[None, :] * smn,
                     mask=qvalid[:, None] & kvalid[None, :], other=0)
        vis = vis & (mk != 0)
    return vis


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _attend(acc, l_i, m_i, q, qtok, qvalid, n, kbase, vbase, skn, svn, offs_d, dmask, SKV,
            qk_scale, W, P, G, mbase, smm, smn, lbase, slq, slk,
            FULL: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
            PATTERN: tl.constexpr, NDIM: tl.constexpr, TK0: tl.constexpr, TK1: tl.constexpr,
            TK2: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    if PATTERN == 1:
        NKT1, NKT2, L0, L1, L2 = G
        ktok, kvalid, kc0, kc1, kc2 = _tile_coords(n, NKT1, NKT2, L0, L1, L2, TK0, TK1, TK2)
    else:
        ktok = n * BLOCK_N + tl.arange(0, BLOCK_N)
        kvalid = ktok < SKV
        kc0 = ktok
        kc1 = ktok
        kc2 = ktok
    k = tl.load(kbase + ktok[None, :] * skn + offs_d[:, None],
                mask=kvalid[None, :] & dmask[:, None], other=0.0)  # (D, BLOCK_N)
    qk = _dot(q, k, IEEE) * qk_scale
    if not FULL:
        vis = _visible(qtok, qvalid, ktok, kvalid, W, kc0, kc1, kc2, P, mbase, smm, smn, lbase,
                       slq, slk, IS_CAUSAL, MASK_KIND, PATTERN, NDIM)
        if MASK_KIND == 2:
            bias = tl.load(mbase + qtok[:, None] * smm + ktok[None, :] * smn,
                           mask=qvalid[:, None] & kvalid[None, :], other=0.0)
            qk = qk + bias.to(tl.float32) * 1.4426950408889634
        qk = tl.where(vis, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = tl.load(vbase + ktok[:, None] * svn + offs_d[None, :],
                mask=kvalid[:, None] & dmask[None, :], other=0.0)  # (BLOCK_N, D)
    if IEEE:  # fp32 inputs, or bf16 under the interpreter (its bf16 dot is broken): exact
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc,
                     input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, MASK, LAY, FNUM, FIDX, PNUM, PIDX,  # noqa: E741
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    smb, smh, smm, smn, slb, slh, slq, slk, snb, snh, sib, sih, NKL,
    H, GROUP, SQ, SKV, HEAD_D, qk_scale,
    L0, L1, L2, K0, K1, K2, DL0, DL1, DL2, ST0, ST1, ST2, NQT1, NQT2, NKT1, NKT2,
    WINDOW, NSINK, LBS,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PATTERN: tl.constexpr,
    NDIM: tl.constexpr, CA0: tl.constexpr, CA1: tl.constexpr, CA2: tl.constexpr,
    TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
    TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    # heavy (late) causal query blocks first
    start_m = pid_m
    if IS_CAUSAL:
        start_m = tl.num_programs(0) - 1 - pid_m
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_D
    if PATTERN == 1:
        qtok, qvalid, qc0, qc1, qc2 = _tile_coords(start_m, NQT1, NQT2, L0, L1, L2, TQ0, TQ1, TQ2)
        g0, s0, e0 = _na_win(qc0, L0, K0, DL0, ST0, CA0)
        g1, s1, e1 = _na_win(qc1, L1, K1, DL1, ST1, CA1)
        g2, s2, e2 = _na_win(qc2, L2, K2, DL2, ST2, CA2)
        W = (g0, s0, e0, g1, s1, e1, g2, s2, e2)
    else:
        qtok = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        qvalid = qtok < SQ
        W = (qtok, qtok, qtok, qtok, qtok, qtok, qtok, qtok, qtok)
    P = (DL0, DL1, DL2, WINDOW, NSINK, LBS)
    G = (NKT1, NKT2, L0, L1, L2)
    q = tl.load(Q + b * sqb + h * sqh + qtok[:, None] * sqm + offs_d[None, :],
                mask=qvalid[:, None] & dmask[None, :], other=0.0)  # (BLOCK_M, D)
    kbase = K + b * skb + hk * skh
    vbase = V + b * svb + hk * svh
    mbase = MASK + b * smb + h * smh
    lbase = LAY + b * slb + h * slh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if PATTERN == 0:
        hi = SKV
        n_full = SKV // BLOCK_N
        if IS_CAUSAL:
            hi = tl.minimum(SKV, (start_m + 1) * BLOCK_M)
            n_full = tl.minimum(n_full, (start_m * BLOCK_M + 1) // BLOCK_N)
        if MASK_KIND != 0:
            n_full = 0
        for n in range(0, n_full):
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, qtok, qvalid, n, kbase, vbase, skn, svn,
                                    offs_d, dmask, SKV, qk_scale, W, P, G, mbase, smm, smn,
                                    lbase, slq, slk, True, IS_CAUSAL, MASK_KIND, PATTERN, NDIM,
                                    TK0, TK1, TK2, BLOCK_N, IEEE)
        for n in range(n_full, tl.cdiv(hi, BLOCK_N)):
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, qtok, qvalid, n, kbase, vbase, skn, svn,
                                    offs_d, dmask, SKV, qk_scale, W, P, G, mbase, smm, smn,
                                    lbase, slq, slk, False, IS_CAUSAL, MASK_KIND, PATTERN, NDIM,
                                    TK0, TK1, TK2, BLOCK_N, IEEE)
    else:
        lb = (bh // H) * snb + (bh % H) * snh + start_m
        ib = FIDX + (bh // H).to(tl.int64) * sib + (bh % H) * sih + start_m.to(tl.int64) * NKL
        for i in range(0, tl.load(FNUM + lb)):
            n = tl.load(ib + i)
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, qtok, qvalid, n, kbase, vbase, skn, svn,
                                    offs_d, dmask, SKV, qk_scale, W, P, G, mbase, smm, smn,
                                    lbase, slq, slk, True, IS_CAUSAL, MASK_KIND, PATTERN, NDIM,
                                    TK0, TK1, TK2, BLOCK_N, IEEE)
        ib = PIDX + (bh // H).to(tl.int64) * sib + (bh % H) * sih + start_m.to(tl.int64) * NKL
        for i in range(0, tl.load(PNUM + lb)):
            n = tl.load(ib + i)
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, qtok, qvalid, n, kbase, vbase, skn, svn,
                                    offs_d, dmask, SKV, qk_scale, W, P, G, mbase, smm, smn,
                                    lbase, slq, slk, False, IS_CAUSAL, MASK_KIND, PATTERN, NDIM,
                                    TK0, TK1, TK2, BLOCK_N, IEEE)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + b * sob + h * soh + qtok[:, None] * som + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=qvalid[:, None] & dmask[None, :])
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + bh.to(tl.int64) * SQ + qtok, lse, mask=qvalid)


@triton.jit
def _colsum_kernel(
    Q, K, LSE, ROWS, CS, MASK, LAY,
    sqb, sqh, sqm, skb, skh, skn, smb, smh, smm, smn, slb, slh, slq, slk,
    NROWS, H, GROUP, SQ, SKV, HEAD_D, qk_scale,
    L0, L1, L2, K0, K1, K2, DL0, DL1, DL2, ST0, ST1, ST2, WINDOW, NSINK, LBS,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PATTERN: tl.constexpr,
    NDIM: tl.constexpr, CA0: tl.constexpr, CA1: tl.constexpr, CA2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_D
    ktok = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kvalid = ktok < SKV
    kc0 = ktok // (L1 * L2)
    kc1 = (ktok // L2) % L1
    kc2 = ktok % L2
    k = tl.load(K + b * skb + hk * skh + ktok[None, :] * skn + offs_d[:, None],
                mask=kvalid[None, :] & dmask[:, None], other=0.0)  # (D, BLOCK_N)
    P = (DL0, DL1, DL2, WINDOW, NSINK, LBS)
    mbase = MASK + b * smb + h * smh
    lbase = LAY + b * slb + h * slh
    colsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, NROWS, BLOCK_M):
        ridx = r0 + tl.arange(0, BLOCK_M)
        qvalid = ridx < NROWS
        qtok = tl.load(ROWS + ridx, mask=qvalid, other=0)
        q = tl.load(Q + b * sqb + h * sqh + qtok[:, None] * sqm + offs_d[None, :],
                    mask=qvalid[:, None] & dmask[None, :], other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * SQ + qtok, mask=qvalid, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        g0, s0, e0 = _na_win(qtok // (L1 * L2), L0, K0, DL0, ST0, CA0)
        g1, s1, e1 = _na_win((qtok // L2) % L1, L1, K1, DL1, ST1, CA1)
        g2, s2, e2 = _na_win(qtok % L2, L2, K2, DL2, ST2, CA2)
        W = (g0, s0, e0, g1, s1, e1, g2, s2, e2)
        qk = _dot(q, k, IEEE) * qk_scale
        vis = _visible(qtok, qvalid, ktok, kvalid, W, kc0, kc1, kc2, P, mbase, smm, smn, lbase,
                       slq, slk, IS_CAUSAL, MASK_KIND, PATTERN, NDIM)
        if MASK_KIND == 2:
            bias = tl.load(mbase + qtok[:, None] * smm + ktok[None, :] * smn,
                           mask=qvalid[:, None] & kvalid[None, :], other=0.0)
            qk = qk + bias.to(tl.float32) * 1.4426950408889634
        p = tl.math.exp2(qk - lse2[:, None])
        p = tl.where(vis & qvalid[:, None], p, 0.0)
        colsum += tl.sum(p, 0)
    tl.store(CS + bh.to(tl.int64) * SKV + ktok, colsum, mask=kvalid)


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


def _ieee(dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _interpret())


def _interpret() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _lists(pattern: Pattern, sq, skv, bm, bn, layout, tq, tk, causal, device):
    if pattern.kind == "natten":
        key = (pattern, tq, tk, str(device))
        if key not in _LIST_CACHE:
            a, b = masks.natten_tile_any_all(pattern.grid, pattern.kernel_size, pattern.dilation,
                                             pattern.stride, pattern.causal_axes, tq, tk, device)
            _LIST_CACHE[key] = masks.compact_lists(a[None, None], b[None, None])
        return _LIST_CACHE[key]
    if pattern.kind == "sliding":
        key = (pattern, causal, sq, skv, bm, bn, str(device))
        if key not in _LIST_CACHE:
            def pred(i, j):
                return masks.sliding_window_visible(i, j, pattern.window, pattern.num_sinks,
                                                    causal)

            a, b = masks.tile_any_all(pred, sq, skv, bm, bn, device)
            _LIST_CACHE[key] = masks.compact_lists(a[None, None], b[None, None])
        return _LIST_CACHE[key]
    key = ("block", layout.data_ptr(), layout._version, tuple(layout.shape),
           tuple(layout.stride()), pattern.block_size, causal, sq, skv, bm, bn, str(device))
    if key not in _LIST_CACHE:
        _LIST_CACHE[key] = masks.compact_lists(*_layout_tiles(layout, pattern.block_size, sq, skv,
                                                              bm, bn, causal))
    return _LIST_CACHE[key]


_LIST_CACHE: dict = {}


def _layout_tiles(layout, bs, sq, skv, bm, bn, causal):
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


def _config(pattern: Pattern, q, k, v, causal, mask, layout) -> dict:
    def bench(cfg):
        return lambda: _launch(q, k, v, pattern, cfg, mask, causal, 1.0, layout)[0]

    return autotune.choose(f"flash-{pattern.kind}", q, k, causal, mask is not None, bench,
                           extra=repr(pattern))


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
        tq = masks.natten_tile_shape(bm, pattern.grid, reach)
        tk = masks.natten_tile_shape(bn, pattern.grid, reach)
    if kind == 3:
        masks.check_layout(layout, pattern.block_size, SQ, SKV)
        lay, lsb = _layout_args(layout)
    if kind != 0:
        fnum, fidx, pnum, pidx = _lists(pattern, SQ, SKV, bm, bn, layout, tq, tk, causal,
                                        q.device)
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
