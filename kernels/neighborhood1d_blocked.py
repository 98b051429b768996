"""Blocked 1-D neighborhood attention for `attnc::neighborhood_attention` (one grid axis): only
(about) the visible work, in torch (the op's path off CUDA) and in ONNX.

The N = S - num_global grid tokens split into the d dilation groups (token t: group t mod d,
in-group coordinate x = t div d; group g holds L_g = ceil((N - g) / d) tokens). In each group,
queries go in blocks of BQ in-group rows. NATTEN's window starts are non-decreasing in x, and
one block's windows lie within W' = BQ + K + s - 2 consecutive in-group keys (K the widest
kernel, s the stride), so block n of group g scores the W'' = min(W', ceil(N / d)) keys from

    lo = clamp(start(n BQ), 0, L_g - W'')      (start(x): the window start, masks.natten_window)

plus the num_global global keys in front. Queries and keys are gathered by index tables
(group, block, row) -> token, so any d works (no d | S requirement, no interleaving reshape);
the output is gathered back into token order. The in-tile mask is NATTEN's exact [start, end)
per row and head. Global query rows (they see every key) are one small dense attention.
GQA: the g = Hq / Hkv query heads of a KV head are a broadcast batch dim of the MatMuls.
Scores: S x (num_global + W'') against S x S dense.

The ONNX in-tile mask without a key padding mask, where every grid query sees its own key
(NATTEN's window of in-group row x holds x whenever stride <= kernel, which NATTEN's argument
check enforces; `own_key_visible`): the scores come shifted from one MatMul of
[q * scale, a - s_ii] against [k, 1] (s_ii = q_i . k_i * scale, so the own key scores a), and
one op over the full scores, its second input from the small head-broadcast in-tile mask:
  - "mul" (MASK, float32): a = MARGIN, times the 0/1 mask: a masked key scores 0;
  - "min" (bf16/fp16, whose scores near +MARGIN would lose bits): a = 0, Min with a cap from
    one Where over the mask (+3e38 visible, -MARGIN masked), as the 2-D form
    (neighborhood_blocked_onnx.min_onnx): a masked key scores <= -MARGIN.
In float32 the capped blocks run in the steps of a Loop (`_loop_blocks`, ~STEP_SCORES scores
a step, the tables padded with block 0 to whole steps): each step Gathers its blocks' queries
and keys itself, so neither the gathered keys/values nor the scores of every block exist at once
(as the 2-D form's Loop); bf16/fp16 keep one flat chain at the top level, where the export
widens the nodes ONNX Runtime's CPU build has no low-precision kernel for.
Either way a masked key sits >= MARGIN below the row's max: weight <= e^-40 (exact in fp32),
and a normal float, where the Add of Where(vis, 0, -inf) before (still the form with a key
padding mask: a row may see no key; rows that see nothing zeroed) gave MLAS's exp a clamped
input (its Softmax: 27-36 ms against 6-7 capped at 1 thread, with or without denormal-as-zero).
ORT's Min runs on one thread (variadic broadcast), Mul over the pool; the shift costs a Concat,
a Pad and q . k over (B, H, S, D). ORT CPU, Intel Xeon, S = 4096, kernel 169, against dense
`Attention` in the same run, every session with intra-op spinning off (on the shared 2 cores a
spinning pool takes the cores the next session needs), medians of 2 passes, load ~2.8 with the
run itself: 2 threads mul+Loop 8.57x (the default), min+Loop 7.93x, min flat 7.16x, mul flat
6.67x, the old form 5.48x (denormal-as-zero sessions: 8.66x, 8.46x, 6.81x, 6.32x, 7.31x);
1 thread 8.29x, 8.24x, 7.19x, 6.76x, 6.30x. With spinning on, 2 threads, the Loop forms lose
(3.5x against 4.2x flat, 3.9x old): benchmarks/onnx_na1d_min.py,
benchmarks/results/onnx_na1d_min-*.json (-spinning-: spinning on).

`blocked_pays` is the cost rule (both the torch op and the ONNX translation ask it);
`blocked_attention` the torch form; `blocked_onnx` the ONNX form (opset-23 Range/Div/Mod index
arithmetic, Gather, MatMul, Softmax; dynamic batch and sequence).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import onnx_ir as ir
import torch
from onnxscript import opset23 as op

from attnc.kernels.window_blocked import record_form

BQ = 64
MARGIN = 40.0  # a masked key scores at most (own-key score - MARGIN): weight <= e^-40
# the in-tile mask without a key padding mask (module doc): "mul" (scores shifted to own key +
# MARGIN times the 0/1 mask), "min" (scores shifted to own key, Min with the cap) or "add" (the
# Add of -inf, as with a padding mask); benchmarks/onnx_na1d_min.py times the three
MASK = "mul"
LOOP = True  # float32 capped blocks in the steps of a Loop (False: one flat chain)
STEP_SCORES = 1 << 20  # score elements per Loop step (B = 1): ~4 MB of fp32, cache-sized
FORM = (f"blocked 1-D neighborhood attention (query blocks of {BQ} per dilation group: Gather "
        f"of each block's key span + global keys, MatMul/Softmax)")


def span(kernels: Sequence[int], stride: int) -> int | None:
    """In-group keys one query block's windows cover; None when a head is dense (-1)."""
    if any(k < 1 for k in kernels):
        return None
    return BQ + max(kernels) + stride - 2


def blocked_pays(seq: int | None, kernels: Sequence[int], dilation: int, stride: int,
                 num_global: int = 0) -> bool:
    """The cost rule: blocked when every head has a kernel and S > 2 (W' + BQ) + num_global
    (a query block scores BQ x W' keys against S per row dense, plus the gathers and small
    ops). `seq` None (unknown): blocked (its span shrinks to the sequence)."""
    w = span(kernels, stride)
    if w is None:
        return False
    return seq is None or seq > 2 * (w + BQ) + num_global


def onnx_form(seq: int | None, kernels: Sequence[int], dilation: int, stride: int,
              num_global: int = 0, mask_rank: int | None = None) -> str | None:
    """FORM where the neighborhood translation emits the 1-D blocked form at length `seq` (the
    static length, or the build's target length), with no mask, a (B|1, S) key padding mask or
    a 4-D mask (its diagonal read as the padding); else None (masked dense). The one rule the
    translation and the sparse pass's cost model both call."""
    if mask_rank not in (None, 2, 4):
        return None
    return FORM if blocked_pays(seq, kernels, dilation, stride, num_global) else None


def why_form(seq: int | None, kernels: Sequence[int], stride: int, num_global: int) -> str:
    w = span(kernels, stride)
    if w is None:
        return "a dense head: the blocked form needs a kernel on every head"
    if seq is None:
        return "length unknown (no target length): the blocked form shrinks to short inputs"
    rel = ">" if seq > 2 * (w + BQ) + num_global else "<="
    return (f"length {seq} {rel} 2 x (span {w} + block {BQ}) + {num_global} global "
            f"(onnxruntime-cpu cost rule)")


def _windows(x, lg, kk, s: int, causal: bool, xp):
    """NATTEN [start, end) of in-group rows x with group lengths lg, kernels kk (masks.py),
    in torch (xp = None) or ONNX (xp = the op helpers)."""
    if xp is None:
        if causal:
            c0 = torch.minimum((x // s) * s + (s - 1), lg - 1)
            return (c0 - kk + 1).clamp(min=0), x + 1
        wl, wr = kk // 2, kk // 2 + kk % 2 - 1
        c0 = torch.minimum((x // s) * s + s // 2, lg - 1)
        c = torch.minimum(torch.maximum(c0, wl), lg - 1 - wr)
        return c - wl, c + wr + 1
    c_ = xp
    base = op.Mul(op.Div(x, c_(s)), c_(s))
    if causal:
        c0 = op.Min(op.Add(base, c_(s - 1)), op.Sub(lg, c_(1)))
        return op.Max(op.Add(op.Sub(c0, kk), c_(1)), c_(0)), op.Add(x, c_(1))
    wl = op.Div(kk, c_(2))
    wr = op.Sub(op.Add(wl, op.Mod(kk, c_(2))), c_(1))
    c0 = op.Min(op.Add(base, c_(s // 2)), op.Sub(lg, c_(1)))
    c = op.Min(op.Max(c0, wl), op.Sub(op.Sub(lg, c_(1)), wr))
    return op.Sub(c, wl), op.Add(op.Add(c, wr), c_(1))


@functools.lru_cache(maxsize=32)
def _plan(s: int, ng: int, kernels: tuple[int, ...], d: int, st: int, causal: bool, hkv: int,
          device: str):
    """Index tables and the in-tile mask for length s (cached): qidx (d, nb, BQ) query tokens,
    keys (d, nb, K) key tokens, vis (Hkv|1, g|1, d, nb, BQ, K) bool, back (N,) each grid
    token's row in the (d, nb BQ) layout."""
    n = s - ng
    lmax = -(-n // d)
    nb = -(-lmax // BQ)
    gi = torch.arange(d, device=device)
    lg = ((n - gi + d - 1) // d).view(d, 1, 1)  # (d, 1, 1)
    x = torch.arange(nb * BQ, device=device).view(1, nb, BQ)  # (1, nb, BQ)
    kk = torch.tensor(kernels, device=device)
    kk = kk.view(hkv, -1, 1, 1, 1) if len(kernels) > 1 else kk.view(())
    start, end = _windows(x, lg, kk, st, causal, None)  # (H|., d, nb, BQ)
    w = min(BQ + max(kernels) + st - 2, lmax)
    first = start[..., 0].reshape(-1, d, nb).amin(0)  # (d, nb)
    lo = torch.minimum(first, lg.view(d, 1) - w).clamp(min=0)
    kx = lo[..., None] + torch.arange(w, device=device)  # (d, nb, W)
    vis = (kx[..., None, :] >= start[..., None]) & (kx[..., None, :] < end[..., None])
    keys = (ng + kx * d + gi.view(d, 1, 1)).clamp(max=s - 1)
    if ng:
        glob = torch.arange(ng, device=device).expand(d, nb, ng)
        keys = torch.cat([glob, keys], -1)  # (d, nb, ng + W)
        vis = torch.cat([torch.ones(*vis.shape[:-1], ng, dtype=torch.bool, device=device),
                         vis], -1)
    vis = vis.reshape((1,) * (6 - vis.dim()) + tuple(vis.shape))  # (Hkv|1, g|1, d, nb, BQ, K)
    qidx = (ng + x * d + gi.view(d, 1, 1)).clamp(max=s - 1)  # (d, nb, BQ)
    t = torch.arange(n, device=device)
    back = (t % d) * (nb * BQ) + t // d  # (N,)
    return qidx, keys, vis, back


def blocked_attention(q, k, v, kernels: Sequence[int], dilation: int, stride: int, causal: bool,
                      scale: float | None, num_global: int = 0,
                      key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """1-D neighborhood attention (`kernels`: one per query head or one for all, each >= 1),
    blocked. q (B, Hq, S, D), k/v (B, Hkv, S, D), key_padding_mask (B|1, S) bool or None."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    ng = num_global
    kern = tuple(int(x) for x in kernels)
    qidx, keys, vis, back = _plan(s, ng, kern, dilation, stride, causal, hkv, str(q.device))
    dg, nb, kk = keys.shape
    sc = d ** -0.5 if scale is None else scale
    qb = q.index_select(2, qidx.flatten()).view(b, hkv, g, dg, nb, BQ, d)
    kw = k.index_select(2, keys.flatten()).view(b, hkv, 1, dg, nb, kk, d)
    vw = v.index_select(2, keys.flatten()).view(b, hkv, 1, dg, nb, kk, d)
    if key_padding_mask is not None:
        real = key_padding_mask.to(device=q.device, dtype=torch.bool)[:, keys]  # (B|1, d, nb, K)
        vis = vis[None] & real[:, None, None, :, :, None, :]  # (B|1, Hkv|1, g|1, d, nb, BQ, K)
    sco = (qb * sc) @ kw.transpose(-1, -2)  # (B, Hkv, g, d, nb, BQ, K)
    p = torch.softmax(sco.masked_fill(~vis, -math.inf), -1).nan_to_num(0.0)
    o = (p @ vw).reshape(b, hq, dg * nb * BQ, d)
    out = o.index_select(2, back)  # (B, Hq, N, D)
    if ng:
        og = _global_rows(q[:, :, :ng], k, v, sc, key_padding_mask)
        out = torch.cat([og, out], 2)
    return out.to(q.dtype).contiguous()


def _global_rows(qg, k, v, sc, kpm):
    """Global query rows (B, Hq, ng, D): dense attention over every key."""
    b, hq, ng, d = qg.shape
    hkv = k.shape[1]
    s = (qg.reshape(b, hkv, -1, d) * sc) @ k.transpose(-1, -2)  # (B, Hkv, g ng, S)
    if kpm is not None:
        s = s.masked_fill(~kpm.to(torch.bool)[:, None, None, :], -math.inf)
    return (torch.softmax(s, -1).nan_to_num(0.0) @ v).reshape(b, hq, ng, d)


# ------------------------------------------------------------------ ONNX


def _c(x: int):
    return op.Constant(value_int=int(x))


def _ints(xs):
    return op.Constant(value_ints=[int(x) for x in xs])


def blocked_onnx(q, k, v, kernels: Sequence[int], dilation: int, stride: int, causal: bool,
                 scale: float | None, num_global: int = 0, padding=None,
                 padding_is_bool: bool = True):
    """The ONNX graph of `blocked_attention`: q (B, Hq, S, D), k/v (B, Hkv, S, D) with static
    heads and head size; `padding` a (B|1, S) key padding mask (bool, or float with masked
    entries <= -1e4: `padding_is_bool` False) or None."""
    hq, dh, hkv = int(q.shape[1]), int(q.shape[3]), int(k.shape[1])
    g = hq // hkv
    d, st, ng = int(dilation), int(stride), int(num_global)
    kern = [int(x) for x in kernels]
    s = op.Squeeze(op.Shape(q, start=2, end=3), _ints([0]))
    n = op.Sub(s, _c(ng))
    lmax = op.Div(op.Add(n, _c(d - 1)), _c(d))
    nb = op.Div(op.Add(lmax, _c(BQ - 1)), _c(BQ))
    gi = op.Range(_c(0), _c(d), _c(1))  # (d,)
    lg = op.Reshape(op.Div(op.Add(op.Sub(n, gi), _c(d - 1)), _c(d)), _ints([d, 1, 1]))
    x = op.Reshape(op.Range(_c(0), op.Mul(nb, _c(BQ)), _c(1)), _ints([1, -1, BQ]))  # (1, nb, BQ)
    kk = _ints(kern) if len(kern) > 1 else _c(kern[0])
    if len(kern) > 1:
        kk = op.Reshape(kk, _ints([hkv, g, 1, 1, 1]))
    start, end = _windows(x, lg, kk, st, causal, _c)  # (Hkv|., g|., d, nb, BQ)
    w = op.Min(_c(BQ + max(kern) + st - 2), lmax)
    first = op.Gather(start, _c(0), axis=-1)  # (.., d, nb)
    if len(kern) > 1:
        first = op.ReduceMin(op.Reshape(first, op.Concat(_ints([-1, d]), op.Unsqueeze(
            nb, _ints([0])), axis=0)), _ints([0]), keepdims=0)  # (d, nb)
    lo = op.Max(op.Min(first, op.Sub(op.Reshape(lg, _ints([d, 1])), w)), _c(0))
    kx = op.Add(op.Unsqueeze(lo, _ints([2])), op.Range(_c(0), w, _c(1)))  # (d, nb, W)
    kxr = op.Unsqueeze(kx, _ints([2]))  # (d, nb, 1, W)
    vis = op.And(op.GreaterOrEqual(kxr, op.Unsqueeze(start, _ints([-1]))),
                 op.Less(kxr, op.Unsqueeze(end, _ints([-1]))))  # (Hkv|., g|., d, nb, BQ, W)
    dg = op.Reshape(gi, _ints([d, 1, 1]))
    last = op.Sub(s, _c(1))
    keys = op.Min(op.Add(op.Add(op.Mul(kx, _c(d)), dg), _c(ng)), last)  # (d, nb, W)
    if ng:
        shp = op.Concat(_ints([d]), op.Unsqueeze(nb, _ints([0])), _ints([ng]), axis=0)
        keys = op.Concat(op.Expand(_ints(range(ng)), shp), keys, axis=-1)  # (d, nb, K)
        vshape = op.Concat(op.Shape(vis, end=-1), _ints([ng]), axis=0)
        vis = op.Concat(op.Expand(op.Constant(value_ints=[1]), vshape), op.Cast(vis, to=7),
                        axis=-1)
        vis = op.Cast(vis, to=9)
    qidx = op.Min(op.Add(op.Add(op.Mul(x, _c(d)), dg), _c(ng)), last)  # (d, nb, BQ)
    sc = dh ** -0.5 if scale is None else float(scale)
    sc_ = op.CastLike(op.Constant(value_float=sc), q)
    qs = op.Mul(q, sc_)
    capped = MASK in ("mul", "min") and padding is None and own_key_visible(kern, st)
    # "mul" in float32 only: its scores sit near +MARGIN, where bf16/fp16 lose 3-8 more bits
    mask = MASK if q.dtype == ir.DataType.FLOAT else "min"
    at = MARGIN if mask == "mul" else 0.0  # the own key's shifted score
    qx, kx, dx = (own_shift(qs, k, hkv, g, dh, at) if capped else (qs, k, dh))  # module doc
    if capped:  # the second operand of the one op over the scores, from the small mask
        m = (op.CastLike(vis, q) if mask == "mul" else op.Where(  # (Hkv|1, g|1, d, nb, BQ, K)
            vis, op.CastLike(op.Constant(value_float=3e38), q),
            op.CastLike(op.Constant(value_float=-MARGIN), q)))
        if LOOP and q.dtype == ir.DataType.FLOAT:  # blocks in Loop steps (module doc)
            kk = ng + BQ + max(kern) + st - 2  # keys per block (at most)
            o = _loop_blocks(qx, kx, v, qidx, keys, m, mask, (hkv, g) if len(kern) > 1 else (1, 1),
                             hq, hkv, g, dx, kk, op.Mul(nb, _c(d)))
            return _finish(o, q, k, v, qs, None, hq, hkv, g, dh, d, ng, n, nb)
    qb = op.Gather(qx, qidx, axis=2)  # (B, Hq, d, nb, BQ, D|D+1)
    qb = op.Reshape(qb, op.Concat(_ints([0, hkv, g, d]), op.Unsqueeze(nb, _ints([0])),
                                  _ints([BQ, dx]), axis=0))  # (B, Hkv, g, d, nb, BQ, D|D+1)
    kw = op.Unsqueeze(op.Gather(kx, keys, axis=2), _ints([2]))  # (B, Hkv, 1, d, nb, K, D|D+1)
    vw = op.Unsqueeze(op.Gather(v, keys, axis=2), _ints([2]))
    sco = op.MatMul(qb, op.Transpose(kw, perm=[0, 1, 2, 3, 4, 6, 5]))  # (B, Hkv, g, d, nb, BQ, K)
    if capped:  # mul: masked keys score 0, the own key MARGIN; min: <= -MARGIN and 0
        sco = op.Mul(sco, m) if mask == "mul" else op.Min(sco, m)
        o = op.MatMul(op.Softmax(sco, axis=-1), vw)  # (B, Hkv, g, d, nb, BQ, D)
        return _finish(o, q, k, v, qs, None, hq, hkv, g, dh, d, ng, n, nb)
    real = None
    if padding is not None:
        if not padding_is_bool:  # a float mask: 0 attend, <= -1e4 masked
            padding = op.Greater(padding, op.CastLike(op.Constant(value_float=-1e4), padding))
        real = padding
        pk = op.Gather(padding, keys, axis=1)  # (B|1, d, nb, K)
        vis = op.And(vis, op.Unsqueeze(pk, _ints([1, 2, 5])))  # (B|1, Hkv|1, g|1, d, nb, BQ, K)
    neg = op.CastLike(op.Constant(value_float=float("-inf")), sco)
    zero = op.CastLike(op.Constant(value_float=0.0), sco)
    p = op.Softmax(op.Add(sco, op.Where(vis, zero, neg)), axis=-1)
    o = op.MatMul(p, vw)  # (B, Hkv, g, d, nb, BQ, D)
    if padding is not None:  # rows that see no key give zeros, not NaN
        seen = op.ReduceMax(op.Cast(vis, to=1), _ints([-1]), keepdims=1)
        o = op.Where(op.Greater(seen, op.Constant(value_float=0.0)), o, zero)
    return _finish(o, q, k, v, qs, real, hq, hkv, g, dh, d, ng, n, nb)


def _loop_blocks(qx, kx, v, qidx, keys, m, mask: str, mh: tuple[int, int], hq: int, hkv: int,
                 g: int, dx: int, kk: int, blocks):
    """The capped chain over the `blocks` (= d nb) query blocks in the steps of a Loop, `per`
    blocks a step (~STEP_SCORES scores at B = 1; the tables padded with block 0 to whole steps):
    step i Gathers its blocks' queries and keys from the outer qx/kx/v, scores them, applies m
    (Mul or Min), Softmax, MatMul(V). Returns (B, Hkv, g, steps, per, BQ, D)."""
    from attnc.kernels.neighborhood_blocked_onnx import TapeOps, loop

    per = max(1, STEP_SCORES // (hq * BQ * kk))
    steps = op.Div(op.Add(blocks, _c(per - 1)), _c(per))
    pads = op.Concat(_ints([0]), op.Unsqueeze(op.Sub(op.Mul(steps, _c(per)), blocks),
                                                 _ints([0])), axis=0)

    kdim = op.Shape(keys, start=2, end=3)  # K: at most kk (fewer on a short sequence)

    def table(t, pre, post, last):  # (.., d, nb, ..) -> padded to whole steps: (.., steps, per, ..)
        t = op.Pad(op.Reshape(t, op.Concat(_ints([*pre, -1, *post]), last, axis=0)), pads, None,
                   _ints([len(pre)]))
        return op.Reshape(t, op.Concat(_ints([*pre, -1, per, *post]), last, axis=0))

    qt, kt = table(qidx, [], [], _ints([BQ])), table(keys, [], [], kdim)  # (steps, per, BQ|K)
    mt = table(m, list(mh), [BQ], kdim)  # (Hkv|1, g|1, steps, per, BQ, K)
    tp = ir.tape.Tape()
    i = ir.Value(name="na1d_step", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    cond = ir.Value(name="na1d_cond", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    o = TapeOps(tp)
    qi, ki = o.Gather(qt, i, axis=0), o.Gather(kt, i, axis=0)  # (per, BQ), (per, K)
    qb = o.Reshape(o.Gather(qx, qi, axis=2), o.Constant(value_ints=[0, hkv, g, per, BQ, dx]))
    kw = o.Unsqueeze(o.Gather(kx, ki, axis=2), o.Constant(value_ints=[2]))  # (B,Hkv,1,per,K,Dx)
    vw = o.Unsqueeze(o.Gather(v, ki, axis=2), o.Constant(value_ints=[2]))
    s = o.MatMul(qb, o.Transpose(kw, perm=[0, 1, 2, 3, 5, 4]))  # (B, Hkv, g, per, BQ, K)
    mi = o.Gather(mt, i, axis=2)  # (Hkv|1, g|1, per, BQ, K)
    s = o.Mul(s, mi) if mask == "mul" else o.Min(s, mi)
    y = o.MatMul(o.Softmax(s, axis=-1), vw)  # (B, Hkv, g, per, BQ, D)
    body = ir.Graph([i, cond], [tp.op("Identity", [cond]), y], nodes=tp.nodes,
                    name="na1d_blocks")
    return op.Transpose(loop(steps, body), perm=[1, 2, 3, 0, 4, 5, 6])


def own_key_visible(kernels: Sequence[int], stride: int) -> bool:
    """Every grid query sees its own key: NATTEN's window of in-group row x (stride s <= K,
    which check_natten_args enforces) holds x, causal or not (module doc)."""
    return all(k >= 1 for k in kernels) and stride <= min(kernels)


def own_shift(qs, k, hkv: int, g: int, dh: int, at: float):
    """[q * scale, at - s_ii] (B, Hq, S, D + 1) and [k, 1] (B, Hkv, S, D + 1), s_ii = q_i . k_i
    * scale: their MatMul scores each row shifted so that its own key scores `at`."""
    kk = k if g == 1 else op.Unsqueeze(k, _ints([2]))  # (B, Hkv, 1, S, D)
    qq = qs if g == 1 else op.Reshape(qs, _ints([0, hkv, g, -1, dh]))
    own = op.Reshape(op.ReduceSum(op.Mul(qq, kk), _ints([-1]), keepdims=1),
                     _ints([0, hkv * g, -1, 1]))  # (B, Hq, S, 1)
    own = op.Neg(own) if at == 0 else op.Sub(op.CastLike(op.Constant(value_float=at), k), own)
    k1 = op.Pad(k, _ints([0, 0, 0, 0, 0, 0, 0, 1]), op.CastLike(op.Constant(value_float=1.0), k))
    return op.Concat(qs, own, axis=3), k1, dh + 1


def _finish(o, q, k, v, qs, real, hq, hkv, g, dh, d, ng, n, nb):
    """o (B, Hkv, g, d, nb, BQ, D) back into token order (B, Hq, N, D), the global query rows
    (dense over every key, `real` the key padding or None) in front."""
    o = op.Reshape(o, _ints([0, hq, -1, dh]))  # (B, Hq, d nb BQ, D)
    t = op.Range(_c(0), n, _c(1))  # (N,)
    back = op.Add(op.Mul(op.Mod(t, _c(d)), op.Mul(nb, _c(BQ))), op.Div(t, _c(d)))
    out = op.Gather(o, back, axis=2)  # (B, Hq, N, D)
    if not ng:
        return out
    qg = op.Reshape(op.Slice(qs, _ints([0]), _ints([ng]), _ints([2])),
                    _ints([0, hkv, g * ng, dh]))  # (B, Hkv, g ng, D)
    sg = op.MatMul(qg, op.Transpose(k, perm=[0, 1, 3, 2]))  # (B, Hkv, g ng, S)
    zero = op.CastLike(op.Constant(value_float=0.0), q)
    if real is not None:
        neg = op.CastLike(op.Constant(value_float=float("-inf")), q)
        sg = op.Add(sg, op.Where(op.Unsqueeze(real, _ints([1, 2])), zero, neg))
    pg = op.Softmax(sg, axis=-1)
    if real is not None:  # every key padded: zeros
        pg = op.Where(op.IsNaN(pg), zero, pg)
    og = op.Reshape(op.MatMul(pg, v), _ints([0, hq, ng, dh]))  # (B, Hq, ng, D)
    return op.Concat(og, out, axis=2)


def record(seq, kernels, stride, num_global, blocked: bool, dense_form: str) -> None:
    form = FORM if blocked else dense_form
    record_form("neighborhood_attention", form, why_form(seq, kernels, stride, num_global))
