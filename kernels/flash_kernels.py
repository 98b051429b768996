"""Triton kernel bodies of attnc's flash attention forward (launched from `flash.py`).

One kernel, `_fwd_kernel`, specialised by constexpr switches:
  PATTERN 0  dense: key blocks [0, hi) walked by range; causal diagonal and ragged tail masked;
             MASK_KIND 1/2 reads a bool / additive mask through strides (0 on broadcast dims).
  PATTERN 1  neighborhood attention (NATTEN semantics, masks.py) on a 3-D grid with Cartesian
             tiles: a query tile is TQ0 x TQ1 x TQ2 grid points, a key tile TK0 x TK1 x TK2 (token
             gather through the row-major grid; multi-dim tiling, so 2-D/3-D windows hit few tiles).
  PATTERN 2  sliding window + global sink keys, causal or bidirectional.
  PATTERN 3  block-sparse from a (B|1, H|1, nq, nkv) bool layout of block size LBS.
Patterns 1-3 walk FlexAttention-style block lists built on the host (tile_lists.compact_lists): per
query tile, `full` key tiles (no mask arithmetic at all) then `partial` ones (predicate per
element). The helpers (`_na_win`, `_visible`, `_dot`) are shared with `colsum.py`.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
             NDIM: tl.constexpr, LAY_TILED: tl.constexpr = False):
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
    if PATTERN == 3 and not LAY_TILED:  # LAY_TILED: each kernel tile lies in one layout block,
        # so a listed tile's block is visible and the (register-hungry) gather is not needed
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
def _na_cut(qk, fl, BIT: tl.constexpr, kc, start, end):
    # the window bounds of one axis that can cut this tile (flags from tile_lists.natten_tile_flags)
    if (fl & BIT) != 0:
        qk = tl.where(kc[None, :] >= start[:, None], qk, float("-inf"))
    if (fl & (2 * BIT)) != 0:
        qk = tl.where(kc[None, :] < end[:, None], qk, float("-inf"))
    return qk


@triton.jit
def _na_range(start, end, L, TK: tl.constexpr):
    # key tiles [lo, lo + n) of one axis that the query tile's windows touch (dilation 1: the
    # windows' union is an interval; a causal window of a query past the extent ends past it),
    # and the bounds that decide which of them the windows cut
    lo = tl.min(start, 0) // TK
    hi = tl.minimum((tl.max(end, 0) + TK - 1) // TK, (L + TK - 1) // TK)
    return lo, hi - lo, tl.max(start, 0), tl.min(end, 0)


@triton.jit
def _na_split(start, end, L, TK: tl.constexpr):
    # key tiles [lo, hi) of one axis that the windows touch, and [ilo, ihi) among them that every
    # row's window covers whole (dilation 1); the rest, [lo, ilo) and [ihi, hi), are cut
    lo, n, ms, me = _na_range(start, end, L, TK)
    hi = lo + n
    ilo = tl.minimum(tl.maximum((ms + TK - 1) // TK, lo), hi)
    ihi = tl.minimum(tl.maximum(me // TK, ilo), hi)
    return lo, ilo, ihi, hi


@triton.jit
def _na_axis_count(R, C: tl.constexpr):
    lo, ilo, ihi, hi = R
    n = ihi - ilo
    if C:
        n = (ilo - lo) + (hi - ihi)
    return n


@triton.jit
def _na_axis_tile(u, R, C: tl.constexpr):
    lo, ilo, ihi, hi = R
    a = ilo + u
    if C:
        a = tl.where(u < ilo - lo, lo + u, ihi + u - (ilo - lo))
    return a


@triton.jit
def _na_class_loop(acc, l_i, m_i, q, qtok, qvalid, R0, R1, R2, kbase, vbase, skn, svn, offs_d,
                   dmask, SKV, qk_scale, W, P, G, C0: tl.constexpr, C1: tl.constexpr,
                   C2: tl.constexpr, NDIM: tl.constexpr, TK0: tl.constexpr, TK1: tl.constexpr,
                   TK2: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                   FOLD: tl.constexpr, KV_TMA: tl.constexpr):
    # one branch-free loop over the key tiles of one cut class: Ci = 1 walks axis i's cut tiles
    # (and checks that axis's window bounds), Ci = 0 its whole-covered ones (no check)
    NKT1, NKT2, L0, L1, L2 = G
    n0 = _na_axis_count(R0, C0)
    n1 = _na_axis_count(R1, C1)
    n2 = _na_axis_count(R2, C2)
    for t in range(0, n0 * n1 * n2):
        a0 = _na_axis_tile(t // (n1 * n2), R0, C0)
        a1 = _na_axis_tile((t // n2) % n1, R1, C1)
        a2 = _na_axis_tile(t % n2, R2, C2)
        n = (a0 * NKT1 + a1) * NKT2 + a2
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, qtok, qvalid, n, 0, kbase, vbase, skn, svn,
                                offs_d, dmask, SKV, qk_scale, W, P, G, kbase, 0, 0, kbase, 0, 0,
                                C0 + C1 + C2 == 0, False, 0, 1, NDIM, TK0, TK1, TK2, BLOCK_N,
                                IEEE, True, FOLD, C0 * 4 + C1 * 2 + C2, KV_TMA)
    return acc, l_i, m_i


@triton.jit
def _na_flags(a, TK: tl.constexpr, max_start, min_end):
    # tile_lists.natten_tile_flags for key tile a of one axis: bit 0 `k >= start`, bit 1 `k < end`
    return (a * TK < max_start).to(tl.int32) | ((a * TK + TK - 1 >= min_end).to(tl.int32) << 1)


@triton.jit
def _attend(acc, l_i, m_i, q, qtok, qvalid, n, fl, kbase, vbase, skn, svn, offs_d, dmask, SKV,
            qk_scale, W, P, G, mbase, smm, smn, lbase, slq, slk,
            FULL: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
            PATTERN: tl.constexpr, NDIM: tl.constexpr, TK0: tl.constexpr, TK1: tl.constexpr,
            TK2: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
            FASTNA: tl.constexpr, FOLD: tl.constexpr, CUT: tl.constexpr = 0,
            KV_TMA: tl.constexpr = False, LAY_TILED: tl.constexpr = False):
    # kbase/vbase: pointers to this head's K/V, or (KV_TMA) tensor descriptors over them
    if PATTERN == 1:
        NKT1, NKT2, L0, L1, L2 = G
        ktok, kvalid, kc0, kc1, kc2 = _tile_coords(n, NKT1, NKT2, L0, L1, L2, TK0, TK1, TK2)
    else:
        ktok = n * BLOCK_N + tl.arange(0, BLOCK_N)
        kvalid = ktok < SKV
        kc0 = ktok
        kc1 = ktok
        kc2 = ktok
    if KV_TMA:  # bulk tensor copies; out-of-range rows/dims read as zeros
        if PATTERN == 1:
            NKT1_, NKT2_, L0_, L1_, L2_ = G
            at = [(n // (NKT1_ * NKT2_)) * TK0, ((n // NKT2_) % NKT1_) * TK1, (n % NKT2_) * TK2,
                  0]
            k = tl.trans(tl.reshape(kbase.load(at), [BLOCK_N, q.shape[1]]))
        else:
            at = [n * BLOCK_N, 0]
            k = tl.trans(kbase.load(at))
    else:
        k = tl.load(kbase + ktok[None, :] * skn + offs_d[:, None],
                    mask=kvalid[None, :] & dmask[:, None], other=0.0)  # (D, BLOCK_N)
    qk = _dot(q, k, IEEE)
    if not FOLD:
        qk = qk * qk_scale
    if not FULL:
        if CUT != 0:  # class loops: both window bounds of the cut axes (bits 1/2/4 = axis 2/1/0)
            g0, s0, e0, g1, s1, e1, g2, s2, e2 = W
            if (CUT & 1) != 0:
                qk = tl.where((kc2[None, :] >= s2[:, None]) & (kc2[None, :] < e2[:, None]), qk,
                              float("-inf"))
            if (CUT & 2) != 0:
                qk = tl.where((kc1[None, :] >= s1[:, None]) & (kc1[None, :] < e1[:, None]), qk,
                              float("-inf"))
            if (CUT & 4) != 0:
                qk = tl.where((kc0[None, :] >= s0[:, None]) & (kc0[None, :] < e0[:, None]), qk,
                              float("-inf"))
        elif FASTNA:  # dilation 1: only the flagged window bounds, one compare each
            g0, s0, e0, g1, s1, e1, g2, s2, e2 = W
            qk = _na_cut(qk, fl, 1, kc2, s2, e2)
            if NDIM >= 2:
                qk = _na_cut(qk, fl, 4, kc1, s1, e1)
            if NDIM >= 3:
                qk = _na_cut(qk, fl, 16, kc0, s0, e0)
        else:
            vis = _visible(qtok, qvalid, ktok, kvalid, W, kc0, kc1, kc2, P, mbase, smm, smn,
                           lbase, slq, slk, IS_CAUSAL, MASK_KIND, PATTERN, NDIM, LAY_TILED)
            if MASK_KIND == 2:
                bias = tl.load(mbase + qtok[:, None] * smm + ktok[None, :] * smn,
                               mask=qvalid[:, None] & kvalid[None, :], other=0.0)
                qk = qk + bias.to(tl.float32) * 1.4426950408889634
            qk = tl.where(vis, qk, float("-inf"))
    if FOLD:  # qk_scale > 0 folded into one fma per score
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * qk_scale - m_safe[:, None])  # one fma (fp fusion)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if KV_TMA:
        v = tl.reshape(vbase.load(at), [BLOCK_N, q.shape[1]])
    else:
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
    FASTNA: tl.constexpr, FOLD: tl.constexpr, NA_LOOP: tl.constexpr, KV_TMA: tl.constexpr,
    LAY_TILED: tl.constexpr,
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
    if KV_TMA:  # descriptors over this head's keys/values (flash._tma_ok checked the alignment)
        if PATTERN == 1:
            kbase = tl.make_tensor_descriptor(kbase, shape=[L0, L1, L2, HEAD_D],
                                              strides=[L1 * L2 * skn, L2 * skn, skn, 1],
                                              block_shape=[TK0, TK1, TK2, BLOCK_D])
            vbase = tl.make_tensor_descriptor(vbase, shape=[L0, L1, L2, HEAD_D],
                                              strides=[L1 * L2 * svn, L2 * svn, svn, 1],
                                              block_shape=[TK0, TK1, TK2, BLOCK_D])
        else:
            kbase = tl.make_tensor_descriptor(kbase, shape=[SKV, HEAD_D], strides=[skn, 1],
                                              block_shape=[BLOCK_N, BLOCK_D])
            vbase = tl.make_tensor_descriptor(vbase, shape=[SKV, HEAD_D], strides=[svn, 1],
                                              block_shape=[BLOCK_N, BLOCK_D])
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
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, qtok, qvalid, n, 0, kbase, vbase, skn,
                                    svn, offs_d, dmask, SKV, qk_scale, W, P, G, mbase, smm, smn,
                                    lbase, slq, slk, True, IS_CAUSAL, MASK_KIND, PATTERN, NDIM,
                                    TK0, TK1, TK2, BLOCK_N, IEEE, FASTNA, FOLD, 0,
                                    KV_TMA, LAY_TILED)
        for n in range(n_full, tl.cdiv(hi, BLOCK_N)):
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, qtok, qvalid, n, 0, kbase, vbase, skn,
                                    svn, offs_d, dmask, SKV, qk_scale, W, P, G, mbase, smm, smn,
                                    lbase, slq, slk, False, IS_CAUSAL, MASK_KIND, PATTERN, NDIM,
                                    TK0, TK1, TK2, BLOCK_N, IEEE, FASTNA, FOLD, 0,
                                    KV_TMA, LAY_TILED)
    elif NA_LOOP == 2:  # dilation-1 neighborhood: one branch-free loop per cut class
        R0 = _na_split(s0, e0, L0, TK0)
        R1 = _na_split(s1, e1, L1, TK1)
        R2 = _na_split(s2, e2, L2, TK2)
        for cls in tl.static_range(0, 8):  # class 0 (whole tiles, no mask) first
            if (cls >> NDIM) == 0:  # axes beyond NDIM have one tile, never cut
                acc, l_i, m_i = _na_class_loop(acc, l_i, m_i, q, qtok, qvalid, R0, R1, R2,
                                               kbase, vbase, skn, svn, offs_d, dmask, SKV,
                                               qk_scale, W, P, G, (cls >> 2) & 1,
                                               (cls >> 1) & 1, cls & 1, NDIM, TK0, TK1, TK2,
                                               BLOCK_N, IEEE, FOLD, KV_TMA)
    elif NA_LOOP == 1:  # dilation-1 neighborhood: the key tiles are a box of per-axis ranges
        lo0, n0, ms0, me0 = _na_range(s0, e0, L0, TK0)
        lo1, n1, ms1, me1 = _na_range(s1, e1, L1, TK1)
        lo2, n2, ms2, me2 = _na_range(s2, e2, L2, TK2)
        for t in range(0, n0 * n1 * n2):
            a0 = lo0 + t // (n1 * n2)
            a1 = lo1 + (t // n2) % n1
            a2 = lo2 + t % n2
            fl = (_na_flags(a2, TK2, ms2, me2) | (_na_flags(a1, TK1, ms1, me1) << 2)
                  | (_na_flags(a0, TK0, ms0, me0) << 4))
            n = (a0 * NKT1 + a1) * NKT2 + a2
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, qtok, qvalid, n, fl, kbase, vbase, skn,
                                    svn, offs_d, dmask, SKV, qk_scale, W, P, G, mbase, smm, smn,
                                    lbase, slq, slk, False, IS_CAUSAL, MASK_KIND, PATTERN, NDIM,
                                    TK0, TK1, TK2, BLOCK_N, IEEE, FASTNA, FOLD, 0,
                                    KV_TMA, LAY_TILED)
    else:
        lb = (bh // H) * snb + (bh % H) * snh + start_m
        ib = FIDX + (bh // H).to(tl.int64) * sib + (bh % H) * sih + start_m.to(tl.int64) * NKL
        for i in range(0, tl.load(FNUM + lb)):
            n = tl.load(ib + i)
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, qtok, qvalid, n, 0, kbase, vbase, skn,
                                    svn, offs_d, dmask, SKV, qk_scale, W, P, G, mbase, smm, smn,
                                    lbase, slq, slk, MASK_KIND == 0, IS_CAUSAL, MASK_KIND,
                                    PATTERN, NDIM, TK0, TK1, TK2, BLOCK_N, IEEE, FASTNA, FOLD,
                                    0, KV_TMA, LAY_TILED)  # a mask reaches `full` tiles too
        ib = PIDX + (bh // H).to(tl.int64) * sib + (bh % H) * sih + start_m.to(tl.int64) * NKL
        for i in range(0, tl.load(PNUM + lb)):
            n = tl.load(ib + i)
            fl = 0
            if FASTNA:  # flags of the bounds to check in the top byte (tile_lists.na_fast_lists)
                fl = n >> 24
                n = n & 0xFFFFFF
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, qtok, qvalid, n, fl, kbase, vbase, skn,
                                    svn, offs_d, dmask, SKV, qk_scale, W, P, G, mbase, smm, smn,
                                    lbase, slq, slk, False, IS_CAUSAL, MASK_KIND, PATTERN, NDIM,
                                    TK0, TK1, TK2, BLOCK_N, IEEE, FASTNA, FOLD, 0,
                                    KV_TMA, LAY_TILED)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + b * sob + h * soh + qtok[:, None] * som + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=qvalid[:, None] & dmask[None, :])
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + bh.to(tl.int64) * SQ + qtok, lse, mask=qvalid)
