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
ATTENTION_OP = False  # blocks as the batch of one opset-23 Attention (else MatMul/Softmax)
KB = 16  # key block rows of the ONNX form (its Gather copies KB x D values at a time)
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


_FORMS: contextvars.ContextVar[list | None] = contextvars.ContextVar("attnc_onnx_forms",
                                                                    default=None)


@contextlib.contextmanager
def recording_forms() -> Iterator[list[dict]]:
    """Collect, in translation order, the ONNX form each pattern op's translation emits and
    why (`record_form`); an export's report lists them per site."""
    forms: list[dict] = []
    tok = _FORMS.set(forms)
    try:
        yield forms
    finally:
        _FORMS.reset(tok)


def record_form(op_name: str, form: str, why: str) -> None:
    forms = _FORMS.get()
    if forms is not None:
        forms.append({"op": op_name, "onnx_form": form, "why": why})


def why_form(seq: int | None, windows: Sequence[int], causal: bool, bq: int = BQ) -> str:
    """One line: why `blocked_pays` chose as it did at `seq`."""
    s = span(windows, causal)
    if s is None:
        return "a dense head: the blocked form needs a window on every head"
    if seq is None:
        return "length unknown (no target length): the blocked form shrinks to short inputs"
    rel = ">" if seq > 2 * (s + bq) else "<="
    return f"length {seq} {rel} 2 x (span {s} + block {bq}) (onnxruntime-cpu cost rule)"


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
                 padding_is_bool: bool = True, kb: int = KB):
    """The ONNX graph of `blocked_attention`, on key blocks of `kb` rows: K/V, padded by
    m = ceil((W-1)/kb) blocks in front, are viewed as (NB, kb) blocks, and one Gather of whole
    blocks through a small (nb, blocks per query block) table gives each query block its
    window's blocks (plus, first, the blocks holding the sinks): one copy, kb x D contiguous
    values at a time. Window key c of query block n is n BQ - m kb + c, so its distance to
    query row r is r + m kb - c whatever n is: the window mask is one static (BQ, K) pattern,
    folded at export; only which keys exist (>= num_sinks, < Skv) and the sink columns depend
    on n. The g query heads of a KV head are a broadcast batch dim of the MatMuls: no
    Transpose, K/V never expanded. q (B, Hq, Sq, D), k/v (B, Hkv, Skv, D) with static heads
    and head size; `padding` a (B|1, Skv) key padding mask (bool, or float with masked
    entries <= -1e4: `padding_is_bool` False) or None; `same_length`: Sq == Skv."""
    hq, d, hkv = int(q.shape[1]), int(q.shape[3]), int(k.shape[1])
    g = hq // hkv
    wins = [int(w) for w in windows]
    wmax = max(wins)
    kb = kb if bq % kb == 0 else bq
    m = -(-(wmax - 1) // kb)  # key blocks before a query block's first row
    reach = bq + (0 if causal else wmax - 1)  # keys from the block's first row on
    nwin = m + -(-reach // kb)  # window key blocks per query block
    nsb = -(-num_sinks // kb)  # sink key blocks
    nblk = nsb + nwin
    sq, skv = _len(q, 2), _len(k, 2)
    nb = op.Div(op.Add(sq, _c(bq - 1)), _c(bq))
    nb1 = op.Unsqueeze(nb, _ints([0]))
    ax2 = _ints([2])
    n = op.Range(_c(0), nb, _c(1))  # (nb,)
    # padded block b holds keys (b - m) kb ..: block n BQ/kb starts query block n's window
    table = op.Add(op.Unsqueeze(op.Mul(n, _c(bq // kb)), _ints([1])), _ints(range(nwin)))
    if nsb:  # (nb, nsb + nwin): the sink blocks m.. first
        table = op.Concat(op.Expand(op.Unsqueeze(_ints(range(m, m + nsb)), _ints([0])),
                                    op.Concat(nb1, _ints([nsb]), axis=0)), table, axis=1)
    # keys the padded view holds past its front padding (at least the sink blocks)
    seen = op.Max(op.Mul(op.Add(op.Mul(op.Sub(nb, _c(1)), _c(bq // kb)), _c(nwin - m)),
                         _c(kb)), _c(nsb * kb))

    def blocks(t):  # (B, Hkv, Skv, D) -> (B, Hkv, 1, nb, K, D)
        cut = op.Slice(t, _ints([0]), op.Unsqueeze(seen, _ints([0])), ax2)
        back = op.Sub(seen, op.Min(seen, skv))
        pads = op.Concat(_ints([0, 0, m * kb, 0, 0, 0]), op.Unsqueeze(back, _ints([0])),
                         _ints([0]), axis=0)
        tb = op.Reshape(op.Pad(cut, pads), _ints([0, hkv, -1, kb, d]))  # (B, Hkv, NB, kb, D)
        out = op.Gather(tb, table, axis=2)  # (B, Hkv, nb, nblk, kb, D)
        return op.Reshape(out, _ints([0, hkv, 1, -1, nblk * kb, d]))  # (B, Hkv, 1, nb, K, D)

    # the window mask: static (Hkv|1, g|1, 1, BQ, nwin kb)
    dist = torch.arange(bq)[:, None] + m * kb - torch.arange(nwin * kb)[None, :]
    wt = torch.tensor(wins).view(hkv, g, 1, 1, 1) if len(wins) > 1 else torch.tensor(wmax)
    near = ((dist >= 0) & (dist < wt)) if causal else (dist.abs() < wt)
    near = near.reshape((1,) * (5 - near.dim()) + tuple(near.shape))
    kj = op.Add(op.Unsqueeze(op.Mul(n, _c(bq)), _ints([1])),
                _ints(range(-m * kb, (nwin - m) * kb)))  # (nb, nwin kb) window key indices
    exists = op.And(op.GreaterOrEqual(kj, _c(num_sinks)), op.Less(kj, skv))
    vis = op.And(op.Constant(value=_bool_tensor(near)),
                 op.Unsqueeze(exists, _ints([1])))  # (Hkv|1, g|1, nb, BQ, nwin kb)
    keys = kj
    if nsb:  # sink columns: keys 0..nsb kb - 1, of which those < min(num_sinks, Skv) count
        sk = _ints(range(nsb * kb))
        sink_vis = op.Unsqueeze(op.And(op.Less(sk, _c(num_sinks)), op.Less(sk, skv)),
                                _ints([0, 1]))  # (1, 1, nsb kb)
        if causal:
            qi = op.Add(op.Unsqueeze(op.Mul(n, _c(bq)), _ints([1])), _ints(range(bq)))
            sink_vis = op.And(sink_vis, op.LessOrEqual(op.Unsqueeze(sk, _ints([0, 1])),
                                                       op.Unsqueeze(qi, _ints([2]))))
        full = op.Concat(op.Shape(vis, end=-1), _ints([nsb * kb]), axis=0)
        vis = op.Concat(op.Expand(sink_vis, full), vis, axis=-1)  # (.., nb, BQ, K)
        keys = op.Concat(op.Expand(op.Unsqueeze(sk, _ints([0])), op.Concat(
            nb1, _ints([nsb * kb]), axis=0)), kj, axis=1)  # (nb, K)
    zero_unseen = padding is not None or not same_length
    if padding is not None:
        if not padding_is_bool:  # a float mask: 0 attend, <= -1e4 masked
            padding = op.Greater(padding, op.CastLike(op.Constant(value_float=-1e4), padding))
        safe = op.Min(op.Max(keys, _c(0)), op.Sub(skv, _c(1)))
        real = op.Gather(padding, safe, axis=1)  # (B|1, nb, K)
        vis = op.And(vis, op.Unsqueeze(real, _ints([1, 2, 4])))  # (B|1, Hkv|1, g|1, nb, BQ, K)
    sc = (1.0 / d ** 0.5) if scale is None else float(scale)
    if ATTENTION_OP:
        return _via_attention(q, k, v, table, vis, seen, nb, sq, skv, sc, zero_unseen,
                              (hq, hkv, d, bq, kb, m, nblk), len(wins) > 1, padding is not None)
    kw, vw = blocks(k), blocks(v)
    pads = op.Concat(_ints([0] * 6), op.Unsqueeze(op.Sub(op.Mul(nb, _c(bq)), sq), _ints([0])),
                     _ints([0]), axis=0)
    qb = op.Reshape(op.Mul(op.Pad(q, pads), op.CastLike(op.Constant(value_float=sc), q)),
                    _ints([0, hkv, g, -1, bq, d]))  # (B, Hkv, g, nb, BQ, D)
    s = op.MatMul(qb, op.Transpose(kw, perm=[0, 1, 2, 3, 5, 4]))  # (B, Hkv, g, nb, BQ, K)
    neg = op.CastLike(op.Constant(value_float=float("-inf")), s)
    bias = op.Where(vis, op.CastLike(op.Constant(value_float=0.0), s), neg)
    p = op.Softmax(op.Add(s, bias), axis=-1)
    o = op.MatMul(p, vw)  # (B, Hkv, g, nb, BQ, D)
    if zero_unseen:  # rows that see no key give zeros, not NaN
        seen_row = op.ReduceMax(op.Cast(vis, to=1), _ints([-1]), keepdims=1)
        o = op.Where(op.Greater(seen_row, op.Constant(value_float=0.0)), o,
                     op.CastLike(op.Constant(value_float=0.0), o))
    o = op.Reshape(o, _ints([0, hq, -1, d]))  # (B, Hq, nb BQ, D)
    return op.Slice(o, _ints([0]), op.Unsqueeze(sq, _ints([0])), _ints([2]))


def _via_attention(q, k, v, table, vis, seen, nb, sq, skv, sc, zero_unseen, dims,
                   per_head: bool, padded: bool):
    """The blocks as the batch of one opset-23 `Attention` (3-D inputs, GQA by its head
    attributes): Q (B nb, BQ, Hq D), K/V gathered in (B nb, K, Hkv D), the in-tile mask
    (B nb | nb, Hq|1, BQ, K)."""
    hq, hkv, d, bq, kb, m, nblk = dims
    b1 = op.Shape(q, start=0, end=1)

    def blocks(t):  # (B, Hkv, Skv, D) -> (B nb, K, Hkv D)
        t = op.Transpose(t, perm=[0, 2, 1, 3])  # (B, Skv, Hkv, D)
        cut = op.Slice(t, _ints([0]), op.Unsqueeze(seen, _ints([0])), _ints([1]))
        back = op.Sub(seen, op.Min(seen, skv))
        pads = op.Concat(_ints([0, m * kb, 0, 0, 0]), op.Unsqueeze(back, _ints([0])),
                         _ints([0, 0]), axis=0)
        tb = op.Reshape(op.Pad(cut, pads), _ints([0, -1, kb, hkv * d]))  # (B, NB, kb, Hkv D)
        out = op.Gather(tb, table, axis=1)  # (B, nb, nblk, kb, Hkv D)
        return op.Reshape(out, _ints([-1, nblk * kb, hkv * d]))  # (B nb, K, Hkv D)

    pads = op.Concat(_ints([0, 0, 0, 0, 0]), op.Unsqueeze(op.Sub(op.Mul(nb, _c(bq)), sq),
                                                          _ints([0])), _ints([0, 0]), axis=0)
    qt = op.Pad(op.Transpose(q, perm=[0, 2, 1, 3]), pads)  # (B, nb BQ, Hq, D)
    q3 = op.Reshape(qt, _ints([-1, bq, hq * d]))  # (B nb, BQ, Hq D)
    # vis (B|1 if padded, Hkv|1, g|1, nb, BQ, K) -> (B nb, Hq|1, BQ, K)
    h = hq if per_head else 1
    v6 = vis if padded else op.Unsqueeze(vis, _ints([0]))  # (B|1, Hkv|1, g|1, nb, BQ, K)
    v5 = op.Reshape(v6, op.Concat(op.Shape(v6, start=0, end=1), _ints([h]),
                                  op.Shape(v6, start=3), axis=0))  # (B|1, H|1, nb, BQ, K)
    v5 = op.Transpose(v5, perm=[0, 2, 1, 3, 4])  # (B|1, nb, H|1, BQ, K)
    v5 = op.Expand(v5, op.Concat(b1, _ints([1, 1, 1, 1]), axis=0))  # (B, nb, H|1, BQ, K)
    mask = op.Reshape(v5, op.Concat(_ints([-1, h]), op.Shape(v5, start=3), axis=0))
    y = op.Attention(q3, blocks(k), blocks(v), mask, q_num_heads=hq, kv_num_heads=hkv,
                     scale=float(sc))
    y = y[0] if isinstance(y, (tuple, list)) else y  # (B nb, BQ, Hq D)
    y = op.Reshape(y, _ints([-1, bq, hq, d]))  # (B nb, BQ, Hq, D)
    if zero_unseen:  # rows that see no key give zeros
        row = op.ReduceMax(op.Cast(mask, to=1), _ints([-1]), keepdims=1)  # (B nb, H|1, BQ, 1)
        row = op.Transpose(row, perm=[0, 2, 1, 3])  # (B nb, BQ, H|1, 1)
        y = op.Where(op.Greater(row, op.Constant(value_float=0.0)), y,
                     op.CastLike(op.Constant(value_float=0.0), y))
    y = op.Reshape(y, op.Concat(b1, _ints([-1, hq, d]), axis=0))  # (B, nb BQ, Hq, D)
    y = op.Slice(y, _ints([0]), op.Unsqueeze(sq, _ints([0])), _ints([1]))
    return op.Transpose(y, perm=[0, 2, 1, 3])  # (B, Hq, Sq, D)


def _bool_tensor(t: torch.Tensor):
    import onnx.numpy_helper as nh

    return nh.from_array(t.numpy())
