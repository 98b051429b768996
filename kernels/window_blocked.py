"""Blocked local attention for `attnc::sliding_window_attention`: only (about) the visible work.

Queries go in blocks of BQ. Block n's queries [n BQ, n BQ + BQ) see window keys in

    causal:        [n BQ - (W - 1), n BQ + BQ - 1]            W' = BQ + W - 1 keys
    bidirectional: [n BQ - (W - 1), n BQ + BQ - 1 + W - 1]    W' = BQ + 2W - 2 keys

(W the widest window), gathered as W'' = min(W', Skv) consecutive keys starting at
start_n = clamp(n BQ - (W - 1), 0, Skv - W'') (a range that always covers the block's window),
plus the `num_sinks` sink keys in front. The in-tile mask is the op's predicate (masks.py) on
the gathered key indices: a window key j < num_sinks is left to the sink part, so no key counts
twice. Scores per block: BQ x (num_sinks + W''), against Sq x Skv for the masked-dense form.
GQA: the g = Hq / Hkv query heads of a KV head share its key windows, so they are folded into
the query block (g BQ rows), and K/V are never expanded. A key padding mask is gathered like
the keys. Rows that see no key give zeros (reference.masked_attention).

`blocked_attention` is the torch form (the op's path off CUDA at long sequences, SDPA per
block); `blocked_onnx` is the ONNX form (standard opset-23 ops: Range/Min/Max index arithmetic,
Gather, MatMul, Softmax; dynamic batch and sequence). `blocked_pays` is the cost rule choosing it
over masked-dense.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from onnxscript import opset23 as op

BQ = 64
FORM = (f"blocked local attention (query blocks of {BQ}: Gather of each block's key window + "
        f"sinks, MatMul/Softmax)")

_SEQ_HINT: contextvars.ContextVar[int | None] = contextvars.ContextVar("attnc_onnx_seq",
                                                                       default=None)


@contextlib.contextmanager
def onnx_seq_hint(seq: int | None) -> Iterator[None]:
    """The sequence length an ONNX export is built for (the build's target length): inside,
    a sliding-window op with a dynamic length gets the form `blocked_pays` picks for it."""
    tok = _SEQ_HINT.set(seq)
    try:
        yield
    finally:
        _SEQ_HINT.reset(tok)


def seq_hint() -> int | None:
    return _SEQ_HINT.get()


def span(windows: Sequence[int], causal: bool) -> int | None:
    """Keys one query's window covers (the widest head); None when a head is dense (-1)."""
    if any(w < 0 for w in windows):
        return None
    w = max(windows)
    return w if causal else 2 * w - 1


def blocked_pays(seq: int | None, windows: Sequence[int], causal: bool, bq: int = BQ) -> bool:
    """The cost rule: blocked when every head has a window and S > 2 (span + BQ). A block costs
    BQ x (BQ + span) scores against S per row dense, plus a few gathers and small ops; below
    about twice that, the fused dense kernel wins. `seq` None (unknown, dynamic): blocked, whose
    key range shrinks to the sequence (min(W', S) keys), so a short input costs about dense."""
    s = span(windows, causal)
    if s is None:
        return False
    return seq is None or seq > 2 * (s + bq)


def _key_range(nb: int, sq_skv: tuple[int, int], wmax: int, causal: bool, bq: int, device):
    skv = sq_skv[1]
    wfull = bq + wmax - 1 if causal else bq + 2 * wmax - 2
    weff = min(wfull, skv)
    n = torch.arange(nb, device=device)
    start = (n * bq - (wmax - 1)).clamp(min=0).clamp(max=skv - weff)
    return n, start[:, None] + torch.arange(weff, device=device)  # (nb,), (nb, W'')


@functools.lru_cache(maxsize=32)
def _block_plan(sq: int, skv: int, wins: tuple[int, ...], num_sinks: int, causal: bool, bq: int,
                hkv: int, g: int, device: str):
    """(keys (nb, K), vis (1, Hkv|1, nb, g|1, bq, K) bool, a real query row sees no key): the
    gathered key indices and the in-tile mask, which depend only on the shapes (cached)."""
    nb = -(-sq // bq)
    n, idx = _key_range(nb, (sq, skv), max(wins), causal, bq, device)
    ns = min(num_sinks, skv)
    keys = torch.cat([torch.arange(ns, device=device).expand(nb, ns), idx], 1)  # (nb, K)
    qi = (n[:, None] * bq + torch.arange(bq, device=device))[:, None, :, None]  # (nb,1,bq,1)
    kj = keys[:, None, None, :]  # (nb, 1, 1, K)
    w = torch.as_tensor(wins, device=device)
    w = w.view(hkv, 1, g, 1, 1) if len(wins) > 1 else w.view(())
    dist = qi - kj
    near = (dist >= 0) & (dist < w) if causal else dist.abs() < w
    vis = near & (kj >= num_sinks)  # (Hkv|., nb, g|1, bq, K)
    if ns:  # sink positions hold keys < num_sinks, which the window part excludes
        sink = (dist >= 0) if causal else torch.ones_like(dist, dtype=torch.bool)
        vis = vis | (sink & (torch.arange(keys.shape[1], device=device) < ns))
    vis = vis.reshape((1,) * (6 - vis.dim()) + tuple(vis.shape))
    if vis.dim() == 6 and vis.shape[1] == 1 and len(wins) > 1:
        vis = vis.expand(1, hkv, *vis.shape[2:])
    real_rows = (qi < sq).reshape(1, 1, nb, 1, bq, 1)
    unseen = bool((~vis.any(-1, keepdim=True) & real_rows).any())
    return keys, vis, unseen


def _mask_bias(vis: torch.Tensor, b: int, hkv: int, g: int, dtype: torch.dtype):
    """vis (B|1, Hkv|1, nb, g|1, bq, K) as SDPA's (B*Hkv | 1, nb, g*bq, K) bool mask and additive
    bias (0 or -inf)."""
    _, _, nb, _, bq, kk = vis.shape
    b, hkv = (b, hkv) if vis.shape[0] > 1 or vis.shape[1] > 1 else (1, 1)
    mask = vis.expand(b, hkv, nb, g, bq, kk).reshape(b * hkv, nb, g * bq, kk)
    return mask, torch.zeros((), dtype=dtype, device=vis.device).masked_fill(~mask, -math.inf)


@functools.lru_cache(maxsize=32)
def _plan_bias(sq, skv, wins, num_sinks, causal, bq, hkv, g, device, b, dtype):
    return _mask_bias(_block_plan(sq, skv, wins, num_sinks, causal, bq, hkv, g, device)[1], b,
                      hkv, g, dtype)


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: Sequence[int],
                      num_sinks: int, causal: bool, scale: float | None,
                      key_padding_mask: torch.Tensor | None = None,
                      bq: int = BQ) -> torch.Tensor:
    """Sliding window (`windows`: one int, or one per query head, all >= 1) + sinks, blocked.
    q (B, Hq, Sq, D), k/v (B, Hkv, Skv, D), key_padding_mask (B|1, Skv) bool or None."""
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    g = hq // hkv
    if sq == 0 or skv == 0:
        return q.new_zeros(q.shape)
    nb = -(-sq // bq)
    keys, vis, unseen = _block_plan(sq, skv, tuple(int(w) for w in windows), num_sinks, causal,
                                    bq, hkv, g, str(q.device))
    kk = keys.shape[1]
    kw = k.index_select(2, keys.flatten()).view(b * hkv, nb, kk, d)
    vw = v.index_select(2, keys.flatten()).view(b * hkv, nb, kk, d)
    if key_padding_mask is not None:
        real = key_padding_mask.to(device=q.device, dtype=torch.bool)[:, keys]  # (B|1, nb, K)
        vis = vis & real[:, None, :, None, None, :]  # (B|1, Hkv|1, nb, g|1, bq, K)
        mask, bias = _mask_bias(vis, b, hkv, g, q.dtype)
        unseen = True
    else:
        mask, bias = _plan_bias(sq, skv, tuple(int(w) for w in windows), num_sinks, causal, bq,
                                hkv, g, str(q.device), b, q.dtype)
    qb = q if nb * bq == sq else F.pad(q, (0, 0, 0, nb * bq - sq))
    qb = qb.view(b, hkv, g, nb, bq, d).transpose(2, 3)
    qb = qb.reshape(b * hkv, nb, g * bq, d)
    out = F.scaled_dot_product_attention(qb, kw, vw, attn_mask=bias, scale=scale)
    if unseen:  # rows that see no key give zeros (SDPA gives NaN)
        out = torch.where(mask.any(-1, keepdim=True), out, 0.0)
    out = out.view(b, hkv, nb, g, bq, d).transpose(2, 3).reshape(b, hq, nb * bq, d)
    return out[:, :, :sq].to(q.dtype).contiguous()


# ------------------------------------------------------------------ ONNX


def _c(x: int):
    return op.Constant(value_int=int(x))


def _ints(xs):
    return op.Constant(value_ints=[int(x) for x in xs])


def _len(t, axis: int):
    return op.Squeeze(op.Shape(t, start=axis, end=axis + 1), _ints([0]))


def diagonal_padding(mask):
    """The (B|1, S) key padding mask a 4-D (B|1, H|1, S, S) mask is, read off its diagonal:
    key j's pattern always contains (j, j), and the op checked that the mask only masks keys on
    the pattern's support, so mask[b, 0, j, j] is key j's padding flag. Reads S entries."""
    s = _len(mask, 2)
    head0 = op.Slice(mask, _ints([0]), _ints([1]), _ints([1]))  # (B|1, 1, S, S)
    flat = op.Reshape(head0, _ints([0, -1]))  # (B|1, S*S)
    diag = op.Mul(op.Range(_c(0), s, _c(1)), op.Add(s, _c(1)))  # (S,)
    return op.Gather(flat, diag, axis=1)  # (B|1, S)


def blocked_onnx(q, k, v, windows: Sequence[int], num_sinks: int, causal: bool,
                 scale: float | None, padding=None, same_length: bool = False, bq: int = BQ,
                 padding_is_bool: bool = True):
    """The ONNX graph of `blocked_attention`. q (B, Hq, Sq, D), k/v (B, Hkv, Skv, D) with
    static heads and head size; `padding` a (B|1, Skv) key padding mask (bool, or float with
    masked entries <= -1e4: `padding_is_bool` False) or None; `same_length`: Sq == Skv."""
    hq, d, hkv = int(q.shape[1]), int(q.shape[3]), int(k.shape[1])
    g = hq // hkv
    wins = [int(w) for w in windows]
    wmax = max(wins)
    wfull = bq + wmax - 1 if causal else bq + 2 * wmax - 2
    sq, skv = _len(q, 2), _len(k, 2)
    nb = op.Div(op.Add(sq, _c(bq - 1)), _c(bq))
    weff = op.Min(_c(wfull), skv)
    n = op.Range(_c(0), nb, _c(1))  # (nb,)
    lo = op.Max(op.Sub(op.Mul(n, _c(bq)), _c(wmax - 1)), _c(0))
    start = op.Min(lo, op.Sub(skv, weff))  # (nb,)
    keys = op.Add(op.Unsqueeze(start, _ints([1])),
                  op.Unsqueeze(op.Range(_c(0), weff, _c(1)), _ints([0])))  # (nb, W'')
    if num_sinks:
        sink = op.Min(_ints(range(num_sinks)), op.Sub(skv, _c(1)))  # (ns,), clamped
        shape = op.Concat(op.Unsqueeze(nb, _ints([0])), _ints([num_sinks]), axis=0)
        keys = op.Concat(op.Expand(op.Unsqueeze(sink, _ints([0])), shape), keys, axis=1)
    kw = op.Gather(k, keys, axis=2)  # (B, Hkv, nb, K, D)
    vw = op.Gather(v, keys, axis=2)
    # queries: pad to nb * bq, fold the g heads of a KV head into the block
    pads = op.Concat(_ints([0] * 6), op.Unsqueeze(op.Sub(op.Mul(nb, _c(bq)), sq), _ints([0])),
                     _ints([0]), axis=0)
    qb = op.Reshape(op.Pad(q, pads), _ints([0, hkv, g, -1, bq, d]))  # (B, Hkv, g, nb, bq, D)
    qb = op.Reshape(op.Transpose(qb, perm=[0, 1, 3, 2, 4, 5]), _ints([0, 0, 0, g * bq, d]))
    sc = (1.0 / d ** 0.5) if scale is None else float(scale)
    qb = op.Mul(qb, op.CastLike(op.Constant(value_float=sc), q))
    s = op.MatMul(qb, op.Transpose(kw, perm=[0, 1, 2, 4, 3]))  # (B, Hkv, nb, g*bq, K)
    s = op.Reshape(s, _ints([0, 0, 0, g, bq, -1]))  # (B, Hkv, nb, g, bq, K)
    # the in-tile mask from index arithmetic
    qi = op.Add(op.Unsqueeze(op.Mul(n, _c(bq)), _ints([1])), _ints(range(bq)))  # (nb, bq)
    qi = op.Unsqueeze(qi, _ints([1, 3]))  # (nb, 1, bq, 1)
    kj = op.Unsqueeze(keys, _ints([1, 2]))  # (nb, 1, 1, K)
    dist = op.Sub(qi, kj)
    w = _c(wmax) if len(wins) == 1 else op.Reshape(_ints(wins), _ints([hkv, 1, g, 1, 1]))
    if causal:
        near = op.And(op.GreaterOrEqual(dist, _c(0)), op.Less(dist, w))
    else:
        near = op.Less(op.Abs(dist), w)
    vis = op.And(near, op.GreaterOrEqual(kj, _c(num_sinks)))  # (Hkv|., nb, g|1, bq, K)
    if num_sinks:
        pos = op.Range(_c(0), op.Squeeze(op.Shape(keys, start=1, end=2), _ints([0])), _c(1))
        seen_key = op.Less(pos, skv)  # a sink position past the keys is no key
        sink = op.And(op.GreaterOrEqual(dist, _c(0)), seen_key) if causal else seen_key
        # a sink position's key is < num_sinks, which the window part excludes: OR them
        vis = op.Or(vis, op.And(op.Less(pos, _c(num_sinks)), sink))
    zero_unseen = padding is not None or not same_length
    if padding is not None:
        if not padding_is_bool:  # a float mask: 0 attend, <= -1e4 masked
            padding = op.Greater(padding, op.CastLike(op.Constant(value_float=-1e4), padding))
        real = op.Gather(padding, keys, axis=1)  # (B|1, nb, K)
        vis = op.And(vis, op.Unsqueeze(real, _ints([1, 3, 4])))  # (B|1, Hkv|1, nb, g|1, bq, K)
    neg = op.CastLike(op.Constant(value_float=float("-inf")), s)
    p = op.Softmax(op.Add(s, op.Where(vis, op.CastLike(op.Constant(value_float=0.0), s), neg)),
                   axis=-1)
    o = op.MatMul(op.Reshape(p, _ints([0, 0, 0, g * bq, -1])), vw)  # (B, Hkv, nb, g*bq, D)
    o = op.Reshape(o, _ints([0, 0, 0, g, bq, d]))
    if zero_unseen:  # rows that see no key give zeros, not NaN
        seen = op.ReduceMax(op.Cast(vis, to=1), _ints([-1]), keepdims=1)
        o = op.Where(op.Greater(seen, op.Constant(value_float=0.0)), o,
                     op.CastLike(op.Constant(value_float=0.0), o))
    o = op.Reshape(op.Transpose(o, perm=[0, 1, 3, 2, 4, 5]), _ints([0, hq, -1, d]))
    return op.Slice(o, _ints([0]), op.Unsqueeze(sq, _ints([0])), _ints([2]))
