"""The head-split ONNX form of `attnc::sliding_window_attention`, for a site whose heads differ
(dense heads, window -1, beside windows, or windows of different widths), which otherwise
exports masked dense (every head's S x S scores plus a per-head mask).

The heads are grouped by window. A group whose window the blocked rule
(`window_blocked.blocked_pays`) takes at the target length runs the blocked form on its slice
of heads (its own key range, not the widest head's); every other group runs opset-23
`Attention` on its slice with its window's in-graph mask (a dense group: the causal mask only).
The groups' outputs are concatenated and put back in head order. Exact: each head sees what the
op's reference shows it. `sliding_window.onnx_form` picks it where the site would otherwise
export masked dense and at least one group runs blocked (measured by
benchmarks/onnx_sparse_cost.py; priced by passes/sparse_cost.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxscript import ir
from onnxscript import opset23 as op

from attnc.kernels import window_blocked
from attnc.kernels.patterns import (
    as_cols,
    as_rows,
    attention_with_mask,
    i64,
    positions,
    seq_len,
    with_padding,
)

FORM = ("head groups by window: blocked local attention on the heads whose window pays, "
        "masked Attention on the others, Concat")


def groups(windows: Sequence[int]) -> list[tuple[int, list[int]]]:
    """(window, heads) in order of first appearance (-1: dense heads)."""
    out: dict[int, list[int]] = {}
    for h, w in enumerate(windows):
        out.setdefault(int(w), []).append(h)
    return list(out.items())


def blocked_groups(seq: int | None, windows: Sequence[int], causal: bool) -> list[int]:
    """The windows of the groups that run blocked at `seq`."""
    return [w for w, _ in groups(windows)
            if w >= 0 and window_blocked.blocked_pays(seq, [w], causal)]


def split_pays(seq: int | None, windows: Sequence[int], causal: bool) -> bool:
    """Heads that differ, a known length, and at least one group that runs blocked."""
    if seq is None or seq < 0 or len(set(windows)) < 2:
        return False
    return bool(blocked_groups(seq, windows, causal))


def why(seq: int, windows: Sequence[int], causal: bool) -> str:
    ws = blocked_groups(seq, windows, causal)
    return (f"heads differ; length {seq}: window(s) {', '.join(map(str, ws))} run blocked on "
            f"their heads, the other heads masked dense")


def _shaped(t, like, heads: int):
    t.shape = ir.Shape([like.shape[0], heads, like.shape[2], like.shape[3]])
    return t


def _masked(q, k, v, window: int, num_sinks: int, causal: bool, scale, mask):
    """opset-23 Attention with one window's mask (-1: dense), as sliding_window's masked form."""
    i = as_rows(positions(seq_len(q)))  # (Sq, 1)
    j = as_cols(positions(seq_len(k)))  # (1, Skv)
    dist = op.Sub(i, j)
    sink = op.Less(j, i64(num_sinks))
    w = i64(window if window >= 0 else 1 << 62)
    if causal:
        local = op.And(op.GreaterOrEqual(dist, i64(0)), op.Less(dist, w))
        vis = op.And(op.Or(local, sink), op.LessOrEqual(j, i))
    else:
        vis = op.Or(op.Less(op.Abs(dist), w), sink)
    vis = with_padding(vis, mask)  # (B|1, H|1, Sq, Skv)
    return attention_with_mask(q, k, v, vis, scale, zero_unseen=mask is not None)


def _kv_heads(idx: list[int], g: int) -> list[int] | None:
    """KV heads of query heads `idx` when they are whole GQA groups in order (GQA kept)."""
    kvs = sorted({h // g for h in idx})
    return kvs if idx == [kv * g + r for kv in kvs for r in range(g)] else None


def split_onnx(q, k, v, windows: Sequence[int], num_sinks: int, causal: bool, scale,
               mask, seq: int, same_length: bool):
    """q (B, Hq, Sq, D), k/v (B, Hkv, Skv, D) with static heads and head size; `mask` the op's
    padding mask (None, (B, Skv), or 4-D broadcastable to (B, H, Sq, Skv))."""
    hq, hkv = int(q.shape[1]), int(k.shape[1])
    g = hq // hkv
    rank = None if mask is None else len(mask.shape)
    outs, order = [], []
    for w, idx in groups(windows):
        kv = _kv_heads(idx, g)
        kidx = kv if kv is not None else [h // g for h in idx]  # else K/V per query head
        qg = _shaped(op.Gather(q, op.Constant(value_ints=idx), axis=1), q, len(idx))
        kg = _shaped(op.Gather(k, op.Constant(value_ints=kidx), axis=1), k, len(kidx))
        vg = _shaped(op.Gather(v, op.Constant(value_ints=kidx), axis=1), v, len(kidx))
        mg = mask
        if rank == 4 and isinstance(mask.shape[1], int) and mask.shape[1] > 1:
            mg = op.Gather(mask, op.Constant(value_ints=idx), axis=1)  # per-head mask rows
        if w >= 0 and window_blocked.blocked_pays(seq, [w], causal):
            pad = window_blocked.diagonal_padding(mg) if rank == 4 else mg
            out = window_blocked.blocked_onnx(qg, kg, vg, [w] * len(idx), num_sinks, causal,
                                              scale, pad, same_length=same_length,
                                              padding_is_bool=mask is None or mask.dtype == 9)
        else:
            out = _masked(qg, kg, vg, w, num_sinks, causal, scale, mg)
        outs.append(out)
        order += idx
    cat = op.Concat(*outs, axis=1)  # (B, Hq, Sq, D), heads in group order
    back = sorted(range(hq), key=lambda h: order[h])  # position of head h in `order`
    return op.Gather(cat, op.Constant(value_ints=back), axis=1)
