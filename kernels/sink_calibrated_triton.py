"""Triton kernels of `attnc::sink_calibrated_attention` (math in `sink_calibrated.py`).

Three launches over (B, H, S, D) inputs whose heads are all active (the op picks them):
  1. `_lse_kernel`     per query tile: the row log-sum-exp (base 2), online max/sum;
  2. `_colstat_kernel` per key tile: column sums of exp2(s - lse) and the number of valid query
                       rows that see each key (the causal count), padding rows excluded;
  -- the sink set S (B, H, Skv) from those two vectors, in torch (O(S) per head) --
  3. `_out_kernel`     per query tile: O = sum_j p v, O^S = sum_{j in S} p v, s = sum_{j in S} p,
                       then out = g (O - O^S) + beta O^S with g = 1 + (1 - beta) s / (1 - s).
No S x S tensor is formed. The mask is read through strides (0 on broadcast axes): bool
(MASK_KIND 1, True = attend) or float added to the scores (2). Masked loads at ragged edges.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _scores(q, K, MASK, b, h, qtok, qvalid, ktok, kvalid, offs_d, dmask,
            skb, skh, skn, smb, smh, smm, smn, qk_scale,
            IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, IEEE: tl.constexpr):
    k = tl.load(K + b * skb + h * skh + ktok[None, :] * skn + offs_d[:, None],
                mask=kvalid[None, :] & dmask[:, None], other=0.0)  # (D, BLOCK_N)
    if IEEE:
        qk = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee") * qk_scale
    else:
        qk = tl.dot(q, k) * qk_scale
    vis = qvalid[:, None] & kvalid[None, :]
    if IS_CAUSAL:
        vis = vis & (ktok[None, :] <= qtok[:, None])
    if MASK_KIND == 1:
        m = tl.load(MASK + b * smb + h * smh + qtok[:, None] * smm + ktok[None, :] * smn,
                    mask=qvalid[:, None] & kvalid[None, :], other=0)
        vis = vis & (m != 0)
    if MASK_KIND == 2:
        bias = tl.load(MASK + b * smb + h * smh + qtok[:, None] * smm + ktok[None, :] * smn,
                       mask=qvalid[:, None] & kvalid[None, :], other=0.0)
        qk = qk + bias.to(tl.float32) * 1.4426950408889634
        vis = vis & (bias > -1e4)  # a float mask: entries <= -1e4 are not seen (not counted)
    return qk, vis


@triton.jit
def _lse_kernel(Q, K, MASK, LSE, sqb, sqh, sqm, skb, skh, skn, smb, smh, smm, smn,
                H, SQ, SKV, HEAD_D, qk_scale,
                IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_D
    qtok = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qvalid = qtok < SQ
    q = tl.load(Q + b * sqb + h * sqh + qtok[:, None] * sqm + offs_d[None, :],
                mask=qvalid[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    end = SKV
    if IS_CAUSAL:
        end = tl.minimum(SKV, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        ktok = n0 + tl.arange(0, BLOCK_N)
        qk, vis = _scores(q, K, MASK, b, h, qtok, qvalid, ktok, ktok < SKV, offs_d, dmask,
                          skb, skh, skn, smb, smh, smm, smn, qk_scale, IS_CAUSAL, MASK_KIND, IEEE)
        qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - safe) + tl.sum(tl.math.exp2(qk - safe[:, None]), 1)
        m_i = m_new
    lse2 = tl.where(l_i > 0, m_i + tl.math.log2(l_i), float("-inf"))
    tl.store(LSE + bh.to(tl.int64) * SQ + qtok, lse2, mask=qvalid)


@triton.jit
def _colstat_kernel(Q, K, MASK, LSE, QV, CS, CNT, sqb, sqh, sqm, skb, skh, skn,
                    smb, smh, smm, smn, H, SQ, SKV, HEAD_D, qk_scale,
                    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_D
    ktok = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kvalid = ktok < SKV
    colsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    count = tl.zeros([BLOCK_N], dtype=tl.float32)
    start = 0
    if IS_CAUSAL:
        start = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for m0 in range(start, SQ, BLOCK_M):
        qtok = m0 + tl.arange(0, BLOCK_M)
        inb = qtok < SQ
        q = tl.load(Q + b * sqb + h * sqh + qtok[:, None] * sqm + offs_d[None, :],
                    mask=inb[:, None] & dmask[None, :], other=0.0)
        real = tl.load(QV + bh.to(tl.int64) * SQ + qtok, mask=inb, other=0) != 0
        lse2 = tl.load(LSE + bh.to(tl.int64) * SQ + qtok, mask=inb, other=float("-inf"))
        qk, vis = _scores(q, K, MASK, b, h, qtok, inb, ktok, kvalid, offs_d, dmask,
                          skb, skh, skn, smb, smh, smm, smn, qk_scale, IS_CAUSAL, MASK_KIND, IEEE)
        vis = vis & real[:, None]
        lsafe = tl.where(lse2 == float("-inf"), 0.0, lse2)
        p = tl.where(vis & (lse2[:, None] > float("-inf")), tl.math.exp2(qk - lsafe[:, None]), 0.0)
        colsum += tl.sum(p, 0)
        count += tl.sum(vis.to(tl.float32), 0)
    tl.store(CS + bh.to(tl.int64) * SKV + ktok, colsum, mask=kvalid)
    tl.store(CNT + bh.to(tl.int64) * SKV + ktok, count, mask=kvalid)


@triton.jit
def _out_kernel(Q, K, V, MASK, LSE, SINK, BETA, OUT, sqb, sqh, sqm, skb, skh, skn,
                svb, svh, svn, smb, smh, smm, smn, H, SQ, SKV, HEAD_D, HEAD_DV, qk_scale,
                IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_D
    offs_dv = tl.arange(0, BLOCK_DV)
    dvmask = offs_dv < HEAD_DV
    qtok = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qvalid = qtok < SQ
    q = tl.load(Q + b * sqb + h * sqh + qtok[:, None] * sqm + offs_d[None, :],
                mask=qvalid[:, None] & dmask[None, :], other=0.0)
    lse2 = tl.load(LSE + bh.to(tl.int64) * SQ + qtok, mask=qvalid, other=float("-inf"))
    lsafe = tl.where(lse2 == float("-inf"), 0.0, lse2)
    seen = lse2 > float("-inf")
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    tot = tl.zeros([BLOCK_M], dtype=tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    end = SKV
    if IS_CAUSAL:
        end = tl.minimum(SKV, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        ktok = n0 + tl.arange(0, BLOCK_N)
        kvalid = ktok < SKV
        qk, vis = _scores(q, K, MASK, b, h, qtok, qvalid, ktok, kvalid, offs_d, dmask,
                          skb, skh, skn, smb, smh, smm, smn, qk_scale, IS_CAUSAL, MASK_KIND, IEEE)
        p = tl.where(vis & seen[:, None], tl.math.exp2(qk - lsafe[:, None]), 0.0)
        sink = tl.load(SINK + bh.to(tl.int64) * SKV + ktok, mask=kvalid, other=0) != 0
        v = tl.load(V + b * svb + h * svh + ktok[:, None] * svn + offs_dv[None, :],
                    mask=kvalid[:, None] & dvmask[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        tot += tl.sum(p, 1)
        if tl.sum(sink.to(tl.int32), 0) > 0:  # only tiles holding a calibrated column
            ps = tl.where(sink[None, :], p, 0.0)
            if IEEE:
                acc_s += tl.dot(ps, v.to(tl.float32), input_precision="ieee")
            else:
                acc_s += tl.dot(ps.to(v.dtype), v)
            s_i += tl.sum(ps, 1)
    beta = tl.load(BETA + h)
    R = tot - s_i
    ok = R > 0
    gain = tl.where(ok, 1.0 + (1.0 - beta) * s_i / tl.where(ok, R, 1.0), 1.0)
    sf = tl.where(ok, beta, 1.0)
    out = gain[:, None] * (acc - acc_s) + sf[:, None] * acc_s
    tl.store(OUT + bh.to(tl.int64) * SQ * HEAD_DV + qtok[:, None] * HEAD_DV + offs_dv[None, :],
             out, mask=qvalid[:, None] & dvmask[None, :])


def _interpret() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _mask_args(mask, shape):
    if mask is None:
        return 0, torch.zeros(1, dtype=torch.uint8), (0, 0, 0, 0)
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(shape)  # stride 0
    if m.dtype == torch.bool:
        return 1, m.view(torch.uint8), tuple(m.stride())
    return 2, m, tuple(m.stride())


def calibrated(q, k, v, beta, threshold, mask, is_causal: bool, scale):
    """(out float32 (B, H, Sq, Dv), S (B, H, Skv) bool) for heads that are all active; k and v
    have H heads (views with stride 0 are fine), beta/threshold (H,)."""
    from attnc.kernels.sink_calibrated import sink_set, validity

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, SQ, D = q.shape
    SKV, DV = k.shape[2], v.shape[-1]
    dev = q.device
    s = 1.0 / math.sqrt(D) if scale is None else scale
    kind, mt, ms = _mask_args(mask, (B, H, SQ, SKV))
    mt = mt.to(dev)
    interp = _interpret()
    bm, bn = (16, 16) if interp else (64, 64)
    bd, bdv = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(DV))
    ieee = q.dtype == torch.float32 or interp  # fp16/bf16 on a GPU: native tensor-core dots
    common = dict(IS_CAUSAL=bool(is_causal), MASK_KIND=kind, BLOCK_M=bm, BLOCK_N=bn,
                  BLOCK_D=bd, IEEE=ieee)
    qs, ks = (q.stride(0), q.stride(1), q.stride(2)), (k.stride(0), k.stride(1), k.stride(2))
    lse = torch.empty(B, H, SQ, device=dev, dtype=torch.float32)
    _lse_kernel[(triton.cdiv(SQ, bm), B * H)](q, k, mt, lse, *qs, *ks, *ms, H, SQ, SKV, D,
                                             s * LOG2E, **common)
    kvalid, qvalid = validity(mask, B, H, SQ, SKV, dev)
    qv = qvalid.to(torch.uint8).contiguous()
    cs = torch.zeros(B, H, SKV, device=dev, dtype=torch.float32)
    cnt = torch.zeros(B, H, SKV, device=dev, dtype=torch.float32)
    _colstat_kernel[(triton.cdiv(SKV, bn), B * H)](q, k, mt, lse, qv, cs, cnt, *qs, *ks, *ms,
                                                  H, SQ, SKV, D, s * LOG2E, **common)
    S = sink_set(cs, cnt, kvalid, threshold, torch.ones(H, dtype=torch.bool, device=dev))
    out = torch.empty(B, H, SQ, DV, device=dev, dtype=torch.float32)
    _out_kernel[(triton.cdiv(SQ, bm), B * H)](
        q, k, v, mt, lse, S.to(torch.uint8).contiguous(), beta.float().contiguous(), out,
        *qs, *ks, v.stride(0), v.stride(1), v.stride(2), *ms, H, SQ, SKV, D, DV, s * LOG2E,
        BLOCK_DV=bdv, **common)
    return out, S
