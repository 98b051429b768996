"""`attnc::sink_calibrated_attention`: attention with ACT's sink recalibration folded in
(arXiv 2406.15765; spec: shared/specs/sink_calibration.md).

For a head h that is active (`enable[h] > 0`, `beta[h] != 1`, `threshold[h] < 1`), with
P = softmax(scale * q kᵀ + mask) (B, H, Sq, Skv), padding keys and padding query rows excluded:

    count_j = #{valid query rows i that see key j}            (the causal count, N - j)
    r_j     = (sum_i P[i, j] over valid rows i) / count_j      (mean attention received)
    S0      = {j : r_j > threshold, j not padding, count_j > 0};  S = S0 minus min(S0)
    s_i = sum_{j in S} P[i, j];  R_i = sum_{j not in S} P[i, j]
    P'[i, j] = beta * P[i, j]                          (j in S)
             = P[i, j] * (1 + (1 - beta) s_i / R_i)    (j not in S; rows with R_i = 0 unchanged)
    out_i = sum_j P'[i, j] v_j = g_i (O_i - O^S_i) + beta O^S_i

Layout (B, H, S, D); k, v may have fewer heads (GQA). `enable`, `beta`, `threshold` are (H,)
float tensors: runtime buffers a search flips between runs without re-capture. Heads that are
not active, and (b, h) whose sink set S is empty, return torch SDPA's output bit for bit, so
beta = 1 or threshold >= 1 is exact. Padding: a key no query row may see under the mask alone
(without causality) is padding; with Sq == Skv, query row i is padding when key i is.

Paths: CUDA + Triton: three kernels (`sink_calibrated_triton.py`): lse, per-key column sums and
counts, then the output; never an S x S tensor. CPU: the same two passes in torch, chunked over
query rows. ONNX: opset-23 `Attention` gives the output O and the probabilities P; the export
reads P in two reductions (column sums, row sums), picks the few sink columns with TopK and
Gather and forms out = g (O - O_S) + beta O_S from them (S x K work, K the largest sink count).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from onnxscript import opset23 as op

from attnc.kernels.onnx import register_translation
from attnc.kernels.reference import expand_kv, masked_attention, sdpa_mask

CHUNK = 256  # query rows per step of the CPU path: memory O(CHUNK * Skv) per head


# ------------------------------------------------------------------------ shared pieces


def active_heads(enable: torch.Tensor, beta: torch.Tensor, threshold: torch.Tensor, heads: int):
    """(H,) bool: heads whose output the calibration can change."""
    def per_head(t):
        return t.float().reshape(-1).expand(heads) if t.numel() == 1 else t.float().reshape(-1)
    return (per_head(enable) > 0) & (per_head(beta) != 1) & (per_head(threshold) < 1)


def _allowed(attn_mask, b: int, h: int, sq: int, skv: int) -> torch.Tensor | None:
    """The mask alone as bool (B|1, H|1, Sq|1, Skv), True = may attend (no causality)."""
    if attn_mask is None:
        return None
    m = attn_mask if attn_mask.dtype == torch.bool else attn_mask > -1e4
    return m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))


def validity(attn_mask, b: int, h: int, sq: int, skv: int, device):
    """(key_valid (B, H, Skv), query_valid (B, H, Sq)) bool: padding excluded."""
    m = _allowed(attn_mask, b, h, sq, skv)
    if m is None:
        kv = torch.ones(b, h, skv, dtype=torch.bool, device=device)
    else:
        kv = m.any(-2).expand(b, h, skv)
    qv = kv if sq == skv else torch.ones(b, h, sq, dtype=torch.bool, device=device)
    return kv, qv


def sink_set(colsum, count, key_valid, threshold, active) -> torch.Tensor:
    """(B, H, Skv) bool: the calibrated columns S = S0 minus its first element, active heads."""
    h = colsum.shape[1]
    thr = threshold.float().reshape(-1).expand(h) if threshold.numel() == 1 else threshold.float()
    r = colsum / count.clamp(min=1)
    s0 = (r > thr.reshape(1, -1, 1)) & key_valid & (count > 0)
    first = s0 & (torch.cumsum(s0.int(), -1) == 1)
    return s0 & ~first & active.reshape(1, -1, 1)


def _per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    t = t.float().reshape(-1)
    return t.expand(heads) if t.numel() == 1 else t


# ------------------------------------------------------------------- plain reference (S x S)


def calibrated_probs(q, k, v, enable, beta, threshold, attn_mask=None, is_causal=False,
                     scale=None):
    """(P, P', S): the probabilities (B, H, Sq, Skv) float32, the calibrated ones, and the
    calibrated columns (B, H, Skv) bool. S x S: the spec and the tests, not a runtime path."""
    B, H, sq, d = q.shape
    skv = k.shape[-2]
    s = 1.0 / math.sqrt(d) if scale is None else scale
    allowed, bias = sdpa_mask(attn_mask, is_causal, sq, skv, q.device)
    _, lse = masked_attention(q, k, v, allowed, s, bias)
    scores = (q.float() @ expand_kv(k, H).float().transpose(-1, -2)) * s  # (B, H, Sq, Skv)
    if bias is not None:
        scores = scores + bias.float()
    vis = torch.ones_like(scores, dtype=torch.bool)
    if allowed is not None:
        vis = vis & allowed
    if bias is not None:  # a float mask: entries <= -1e4 are not seen (not counted)
        vis = vis & (bias > -1e4)
    finite = torch.isfinite(lse)[..., None]
    probs = torch.where(vis & finite, torch.exp(scores - torch.where(finite, lse[..., None], 0)),
                        0.0)
    kvalid, qvalid = validity(attn_mask, B, H, sq, skv, q.device)
    count = (vis & qvalid[..., None]).sum(-2).float()  # (B, H, Skv)
    colsum = (probs * qvalid[..., None]).sum(-2)
    act = active_heads(enable, beta, threshold, H)
    S = sink_set(colsum, count, kvalid, threshold, act)  # (B, H, Skv)
    bt = _per_head(beta, H).reshape(1, -1, 1)
    sm = (probs * S[:, :, None, :]).sum(-1)  # (B, H, Sq)
    R = probs.sum(-1) - sm
    ok = R > 0
    gain = torch.where(ok, 1 + (1 - bt) * sm / torch.where(ok, R, 1.0), 1.0)
    sf = torch.where(ok, bt.expand_as(sm), 1.0)
    factor = torch.where(S[:, :, None, :], sf[..., None], gain[..., None])
    return probs, probs * factor, S


def sink_calibrated_attention_ref(q, k, v, enable, beta, threshold, attn_mask=None,
                                  is_causal=False, scale=None):
    """The executable spec: the calibrated probability matrix P' (S x S) times V; (b, h) with
    nothing calibrated keep torch SDPA's output."""
    H = q.shape[1]
    base = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          scale=scale, enable_gqa=k.shape[1] != H)
    _, pp, S = calibrated_probs(q, k, v, enable, beta, threshold, attn_mask, is_causal, scale)
    out = pp @ expand_kv(v, H).float()  # (B, H, Sq, Dv)
    changed = S.any(-1)[..., None, None]
    return torch.where(changed, out.to(q.dtype), base).contiguous()


# ------------------------------------------------------------- the CPU path (chunked torch)


def _chunk_scores(q, k, s, bias, allowed, i0, i1, sq, skv, is_causal):
    sc = (q[:, :, i0:i1].float() @ k.float().transpose(-1, -2)) * s  # (B, h, C, Skv)
    vis = torch.ones_like(sc, dtype=torch.bool)
    if bias is not None:  # a float mask: entries <= -1e4 are not seen (not counted)
        b = bias[..., i0:i1, :] if bias.shape[-2] != 1 else bias
        sc, vis = sc + b.float(), vis & (b > -1e4)
    if allowed is not None:
        vis = vis & (allowed[..., i0:i1, :] if allowed.shape[-2] != 1 else allowed)
    if is_causal:
        i = torch.arange(i0, i1, device=q.device)[:, None]
        vis = vis & (torch.arange(skv, device=q.device)[None, :] <= i)
    return sc, vis


def calibrated_chunked(q, k, v, beta, threshold, attn_mask, is_causal, scale):
    """(out float32, S) for heads that are all active: q (B, h, Sq, D), k and v already with h
    heads, beta/threshold (h,), mask broadcastable with its head axis already taken."""
    B, H, sq, d = q.shape
    skv = k.shape[-2]
    s = 1.0 / math.sqrt(d) if scale is None else scale
    allowed = bias = None
    if attn_mask is not None:
        m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        allowed, bias = (m, None) if m.dtype == torch.bool else (None, m)
    kvalid, qvalid = validity(attn_mask, B, H, sq, skv, q.device)
    lse = torch.empty(B, H, sq, device=q.device)
    colsum = torch.zeros(B, H, skv, device=q.device)
    count = torch.zeros(B, H, skv, device=q.device)
    for i0 in range(0, sq, CHUNK):  # pass 1: lse, column sums, counts
        i1 = min(sq, i0 + CHUNK)
        sc, vis = _chunk_scores(q, k, s, bias, allowed, i0, i1, sq, skv, is_causal)
        sc = sc.masked_fill(~vis, float("-inf"))
        ls = torch.logsumexp(sc, -1)  # (B, H, C)
        lse[..., i0:i1] = ls
        p = torch.exp(sc - torch.where(torch.isfinite(ls), ls, 0.0)[..., None])
        qv = qvalid[..., i0:i1, None]
        colsum += (p * qv).sum(-2)
        count += (vis & qv).sum(-2)
    S = sink_set(colsum, count, kvalid, threshold, torch.ones(H, dtype=torch.bool))
    bt = beta.float().reshape(1, -1, 1)
    out = torch.empty(B, H, sq, v.shape[-1], device=q.device)
    vf, Sf = v.float(), S.float()
    for i0 in range(0, sq, CHUNK):  # pass 2: the output with S scaled and the rest renormalised
        i1 = min(sq, i0 + CHUNK)
        sc, vis = _chunk_scores(q, k, s, bias, allowed, i0, i1, sq, skv, is_causal)
        ls = lse[..., i0:i1, None]
        p = torch.where(vis & torch.isfinite(ls), torch.exp(sc - torch.where(
            torch.isfinite(ls), ls, 0.0)), 0.0)
        ps = p * Sf[:, :, None, :]
        sm, tot = ps.sum(-1), p.sum(-1)
        R = tot - sm
        ok = R > 0
        gain = torch.where(ok, 1 + (1 - bt) * sm / torch.where(ok, R, 1.0), 1.0)
        sf = torch.where(ok, bt.expand_as(sm), 1.0)
        o_all, o_s = p @ vf, ps @ vf  # (B, H, C, Dv)
        out[..., i0:i1, :] = gain[..., None] * (o_all - o_s) + sf[..., None] * o_s
    return out, S


# ------------------------------------------------------------------------------- the op


def _take_heads(t, idx, heads):
    """t's head axis (dim 1) restricted to the query heads `idx` (GQA: their kv heads)."""
    if t is None:
        return None
    if t.dim() < 4 or t.shape[1] == 1:
        return t
    group = heads // t.shape[1]
    return t.index_select(1, idx // group)


@torch.library.custom_op("attnc::sink_calibrated_attention", mutates_args=())
def sink_calibrated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    enable: torch.Tensor,
    beta: torch.Tensor,
    threshold: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    H = q.shape[1]
    base = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          scale=scale, enable_gqa=k.shape[1] != H).contiguous()
    act = active_heads(enable, beta, threshold, H)
    if not bool(act.any()):
        return base
    idx = act.nonzero().flatten().to(q.device)
    qs, ks, vs = q.index_select(1, idx), _take_heads(k, idx, H), _take_heads(v, idx, H)
    ks = ks if ks.shape[1] == idx.numel() else ks.expand(-1, idx.numel(), -1, -1)
    vs = vs if vs.shape[1] == idx.numel() else vs.expand(-1, idx.numel(), -1, -1)
    mask = _take_heads(attn_mask, idx, H) if attn_mask is not None and attn_mask.dim() == 4 \
        else attn_mask
    bt = _per_head(beta, H).to(q.device)[idx]
    th = _per_head(threshold, H).to(q.device)[idx]
    if q.is_cuda:
        from attnc.kernels import sink_calibrated_triton as tri

        out, S = tri.calibrated(qs, ks, vs, bt, th, mask, is_causal, scale)
    else:
        out, S = calibrated_chunked(qs, ks, vs, bt, th, mask, is_causal, scale)
    sub = torch.where(S.any(-1)[..., None, None], out.to(q.dtype), base.index_select(1, idx))
    return base.index_copy(1, idx, sub)


@sink_calibrated_attention.register_fake
def _(q, k, v, enable, beta, threshold, attn_mask=None, is_causal=False, scale=None):
    batch = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    return q.new_empty((*batch, q.shape[-3], q.shape[-2], v.shape[-1]))


# ------------------------------------------------------------------------------------ ONNX


def _ints(*xs):
    return op.Constant(value_ints=list(xs))


def _mask_counts(attn_mask, is_causal, sq, skv):
    """From the mask alone, at the mask's own shape (no head axis added): (key_valid float
    (.., 1, Skv), query-valid row vector (.., 1, Sq) or None when all valid, count (.., 1, Skv):
    the number of valid query rows that see each key)."""
    from attnc.kernels.patterns import as_cols, as_rows, positions

    one = op.Constant(value_float=1.0)
    row, col = as_rows(positions(sq)), as_cols(positions(skv))  # (Sq, 1), (1, Skv)
    if attn_mask is None:
        if is_causal:  # key j is seen by rows i >= j: max(Sq - j, 0)
            count = op.Cast(op.Max(op.Sub(op.Reshape(sq, _ints(1)), col), _ints(0)), to=1)
        else:
            count = op.Expand(op.Cast(op.Reshape(sq, _ints(1, 1)), to=1), op.Shape(col))
        return None, None, count
    m = attn_mask if attn_mask.dtype == 9 else op.Greater(
        attn_mask, op.CastLike(op.Constant(value_float=-1e4), attn_mask))
    mf = op.Cast(m, to=1)
    kvalid = op.ReduceMax(mf, _ints(-2), keepdims=1)  # (.., 1, Skv)
    if is_causal:
        vis = op.Cast(op.And(m, op.GreaterOrEqual(row, col)), to=1)  # (.., Sq, Skv)
    else:
        vis = op.Expand(mf, op.Concat(op.Reshape(sq, _ints(1)), op.Reshape(skv, _ints(1)),
                                      axis=0))
    # query row i is padding when key i is (Sq == Skv); otherwise every row is valid
    ones = op.Expand(one, op.Concat(op.Shape(kvalid, end=-1), op.Reshape(sq, _ints(1)), axis=0))
    qv = op.Slice(op.Concat(op.Where(op.Equal(sq, skv), kvalid, one), ones, axis=-1),
                  _ints(0), op.Reshape(sq, _ints(1)), _ints(-1))  # (.., 1, Sq)
    return kvalid, qv, op.MatMul(qv, vis)


@register_translation(torch.ops.attnc.sink_calibrated_attention.default)
def sink_calibrated_attention_onnx(q, k, v, enable, beta, threshold, attn_mask=None,
                                   is_causal: bool = False, scale: float | None = None):
    from attnc.kernels.patterns import seq_len

    kw = {"is_causal": 1 if is_causal else 0, "qk_matmul_output_mode": 3}
    if scale is not None:
        kw["scale"] = float(scale)
    if attn_mask is None:
        y, _, _, probs = op.Attention(q, k, v, **kw)
    else:
        y, _, _, probs = op.Attention(q, k, v, attn_mask, **kw)
    p = probs if probs.dtype == 1 else op.Cast(probs, to=1)  # (B, H, Sq, Skv) float32
    one, zero = op.Constant(value_float=1.0), op.Constant(value_float=0.0)
    sq, skv = seq_len(q), seq_len(k)
    kvalid, qv, count = _mask_counts(attn_mask, is_causal, sq, skv)
    # (B, H, 1, Skv): over valid rows only, (.., 1, Sq) @ (B, H, Sq, Skv)
    colsum = op.ReduceSum(p, _ints(-2), keepdims=1) if qv is None else op.MatMul(qv, p)
    r = op.Div(colsum, op.Max(count, one))
    head = _ints(1, -1, 1, 1)
    thr, bt = op.Reshape(op.Cast(threshold, to=1), head), op.Reshape(op.Cast(beta, to=1), head)
    en = op.Reshape(op.Cast(enable, to=1), head)
    act = op.And(op.And(op.Greater(en, zero), op.Not(op.Equal(bt, one))), op.Less(thr, one))
    s0 = op.And(op.Greater(r, thr), op.Greater(count, zero))
    if kvalid is not None:
        s0 = op.And(s0, op.Greater(kvalid, zero))
    first = op.Equal(op.CumSum(op.Cast(s0, to=1), op.Constant(value_int=-1)), one)
    Sf = op.Cast(op.And(op.And(s0, op.Not(first)), act), to=1)  # (B, H, 1, Skv) 0/1
    # the sink columns: K = the largest sink count over (B, H), at least 1 (weight 0 if none)
    K = op.Reshape(op.Cast(op.Max(op.ReduceMax(op.ReduceSum(Sf, _ints(-1), keepdims=0),
                                               keepdims=0), one), to=7), _ints(1))
    _, idx = op.TopK(Sf, K, axis=-1, largest=1, sorted=0)  # (B, H, 1, K)
    w = op.GatherElements(Sf, idx, axis=-1)  # (B, H, 1, K): 1 on a sink, 0 on a filler
    pk = op.Mul(op.GatherElements(p, op.Expand(idx, op.Concat(op.Shape(p, end=-1), K, axis=0)),
                                  axis=-1), w)  # (B, H, Sq, K)
    sm = op.ReduceSum(pk, _ints(-1), keepdims=1)  # (B, H, Sq, 1)
    R = op.Sub(op.ReduceSum(p, _ints(-1), keepdims=1), sm)
    ok = op.Greater(R, zero)
    gain = op.Where(ok, op.Add(one, op.Div(op.Mul(op.Sub(one, bt), sm), op.Where(ok, R, one))),
                    one)
    sf = op.Where(ok, bt, one)  # (B, H, Sq, 1)
    # GQA: query head h reads kv head h // g; idx (B, H, 1, K) -> (B, Hkv, g*K, 1) rows of V
    vf = v if v.dtype == 1 else op.Cast(v, to=1)
    ix = op.Unsqueeze(op.Reshape(idx, op.Concat(op.Shape(v, end=2), _ints(-1), axis=0)),
                      _ints(-1))
    vk = op.GatherElements(vf, op.Expand(ix, op.Concat(_ints(1, 1, 1), op.Shape(v, start=3),
                                                        axis=0)), axis=2)  # (B, Hkv, g*K, Dv)
    vk = op.Reshape(vk, op.Concat(op.Shape(q, end=2), _ints(-1), op.Shape(v, start=3), axis=0))
    o_s = op.MatMul(pk, vk)  # (B, H, Sq, Dv)
    yf = y if y.dtype == 1 else op.Cast(y, to=1)
    out = op.Add(op.Mul(gain, op.Sub(yf, o_s)), op.Mul(sf, o_s))
    changed = op.Greater(op.ReduceMax(Sf, _ints(-1), keepdims=1), zero)  # (B, H, 1, 1)
    return op.Where(changed, op.CastLike(out, y), y)
