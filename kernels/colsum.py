"""Triton kernel of `flash.column_sums`: per-key sums of attention probabilities over chosen rows.

Recomputes p_ij = exp(s_ij - lse_i) from the forward's lse, with the forward's pattern predicate
(`flash_kernels._visible`), without materialising the attention matrix.
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnc.kernels.flash_kernels import _dot, _na_win, _visible


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
