"""The ONNX forms of the blocked 2-D/3-D neighborhood (kernels/neighborhood_blocked.py).

Both Gather the query tiles and their key halos through the plan's index tables and score a
tile's T queries against its K keys only (a KV head's g query heads folded into the rows):
  - `min_onnx` (no key padding mask, every token in its own window): the scores of a tile in
    one MatMul of [q * scale, a - s_ii] against [k, 1] (s_ii = q_i . k_i * scale, the query's
    score against its own key, which it always sees: rows shifted so their own key scores a),
    then one op over the scores from the constant in-tile mask: in float32 Mul by the 0/1 mask
    with a = MARGIN (a masked key scores 0, MARGIN below the own key: Mul runs on ORT's thread
    pool, Min/Max broadcast on one thread), in bf16/fp16 (whose scores near +MARGIN would lose
    bits) Min with a cap (+3e38 visible, -MARGIN masked) with a = 0; then Softmax, MatMul(V).
    Either way a masked key sits >= MARGIN below the row's max: weight <= e^-40 per key, exact
    in fp32, and, unlike a -1e9 bias, a normal float, not a denormal: MLAS's exp of a clamped
    input and a P @ V over denormals take microcode assists on Intel CPUs
    (ORT CPU, Intel Xeon, 64x64 grid, 13x13 window, against dense `Attention`: 2.99x vs the
    fused form's 2.41x at 2 threads, 4.63x vs 2.64x at 1; with session.set_denormal_as_zero
    on every session the fused form wins, 3.55x vs 2.94x: the chain's extra passes over the
    scores; benchmarks/results/onnx_patterns_nbhd2-*.json). In float32 the tiles go through
    the steps of a `Loop`, a few tiles per step (`tiles_per_step`), so one step's scores stay
    in cache through MatMul, Mul, Softmax and MatMul instead of streaming a (B, H, tiles, T, K)
    tensor through memory four times; bf16/fp16 keep one flat chain at the top level, where the
    export widens the nodes ONNX Runtime's CPU build has no low-precision kernel for;
  - `fused_onnx` (a key padding mask, or a pattern without the diagonal): the tiles as the
    heads of one opset-23 `Attention` over their halo keys with the in-tile mask as a -1e9
    bias, rows that see no key zeroed.
The global query rows attend densely (a MatMul/Softmax chain)."""

from __future__ import annotations

import math

import onnx_ir as ir
import torch
from onnxscript import opset23 as op

from attnc.kernels import neighborhood1d_blocked as nb1d
from attnc.kernels import neighborhood_blocked as nb

MARGIN = 40.0  # a masked key scores at most (own-key score - MARGIN): weight <= e^-40
LOOP = True  # float32 tiles in the steps of a Loop (False: one flat chain, as bf16/fp16 get)
MASK = "mul"  # float32's in-tile mask op (module doc); "min": the one bf16/fp16 get


def _ints(xs):
    return op.Constant(value_ints=[int(x) for x in xs])


def _table(t: torch.Tensor, bool_: bool = False):
    """A small constant table (int64, or bool) of t's shape."""
    c = op.Reshape(_ints(t.flatten().long().tolist()), _ints(t.shape))
    return op.Cast(c, to=9) if bool_ else c


def _vis(p, hkv: int, g: int):
    """The in-tile mask (1, Hkv|1, nt, g|1, T, K), the global keys in front: the AND of the
    per-axis tables, (Hk, nt_0.., T_0.., H_0..) -> (Hk, nt, T, H), never an S x S table."""
    nt, t = p.qtok.shape
    kk = p.keys.shape[1]
    ng = kk - math.prod(p.halos)
    n = len(p.tiles)
    vis = None
    for a, va in enumerate(p.axis_vis):
        shape = [va.shape[0]] + [1] * (3 * n)
        shape[1 + a], shape[1 + n + a], shape[1 + 2 * n + a] = va.shape[1:]
        m = op.Reshape(_table(va, True), _ints(shape))
        vis = m if vis is None else op.And(vis, m)
    hk = p.axis_vis[0].shape[0]
    vis = op.Reshape(vis, _ints([hk, nt, t, -1]))  # (Hk, nt, T, H)
    if ng:
        vis = op.Concat(op.Expand(op.Cast(_ints([1]), to=9), _ints([hk, nt, t, ng])), vis,
                        axis=3)
    if hk == 1:
        return op.Reshape(vis, _ints([1, 1, nt, 1, t, kk]))
    # (Hq, nt, T, K) -> (1, Hkv, nt, g, T, K)
    vis = op.Transpose(op.Reshape(vis, _ints([hkv, g, nt, t, kk])), perm=[0, 2, 1, 3, 4])
    return op.Unsqueeze(vis, _ints([0]))


def _setup(q, k, grid, heads, dilation, stride, is_causal, num_global, tiles):
    """What both forms start from: query/KV heads and head size, the query heads per KV head,
    the tile plan, tiles x tokens per tile, keys per tile, and the global tokens."""
    hq, d, hkv = int(q.shape[1]), int(q.shape[3]), int(k.shape[1])
    p = nb.plan(*nb._args(grid, heads, dilation, stride, is_causal), int(num_global), tiles)
    nt, t = p.qtok.shape
    return hq, d, hkv, hq // hkv, p, nt, t, p.keys.shape[1], int(num_global)


def fused_onnx(q, k, v, grid, heads, dilation, stride, is_causal, scale=None, padding=None,
               num_global: int = 0, padding_is_bool: bool = True,
               tiles: tuple[int, ...] | None = None):
    """The fused-Attention ONNX graph of `blocked_attention`: q (B, Hq, S, D), k/v
    (B, Hkv, S, D) with static heads and head size, S = num_global + prod(grid); `padding` a
    (B|1, S) key padding mask (bool, or float with masked entries <= -1e4: `padding_is_bool`
    False) or None."""
    hq, d, hkv, g, p, nt, t, kk, ng = _setup(q, k, grid, heads, dilation, stride, is_causal,
                                              num_global, tiles)
    hk = p.axis_vis[0].shape[0]
    vis = _vis(p, hkv, g)  # (1, Hkv|1, nt, g|1, T, K)
    keys = _table(p.keys)  # (nt, K)
    kw = op.Reshape(op.Gather(k, keys, axis=2), _ints([-1, nt, kk, d]))  # (B Hkv, nt, K, D)
    vw = op.Reshape(op.Gather(v, keys, axis=2), _ints([-1, nt, kk, d]))
    qb = op.Gather(q, _table(p.qtok), axis=2)  # (B, Hq, nt, T, D)
    if g > 1:  # fold a KV head's query heads into the tile rows
        qb = op.Transpose(op.Reshape(qb, _ints([0, hkv, g, nt, t, d])), perm=[0, 1, 3, 2, 4, 5])
    qb = op.Reshape(qb, _ints([-1, nt, g * t, d]))  # (B Hkv, nt, g T, D): the tiles as heads
    sc = (1.0 / d ** 0.5) if scale is None else float(scale)
    real = None
    if padding is not None:
        if not padding_is_bool:  # a float mask: 0 attend, <= -1e4 masked
            padding = op.Greater(padding, op.CastLike(op.Constant(value_float=-1e4), padding))
        real = padding
        vis = op.And(vis, op.Unsqueeze(op.Gather(padding, keys, axis=1), _ints([1, 3, 4])))
    neg = op.CastLike(op.Constant(value_float=float("-inf")), q)
    zero = op.CastLike(op.Constant(value_float=0.0), q)
    if padding is None and hk == 1:  # one (1, nt, g T, K) mask for every batch and head
        vb = op.Reshape(op.Expand(vis, _ints([1, 1, nt, g, t, kk])), _ints([1, nt, g * t, kk]))
    else:  # (B|1, Hkv|1, nt, g|1, T, K) -> (B Hkv, nt, g T, K)
        full = op.Concat(op.Shape(q, start=0, end=1), _ints([hkv, nt, g, t, kk]), axis=0)
        vb = op.Reshape(op.Expand(vis, full), _ints([-1, nt, g * t, kk]))
    # the mask as a bias of -1e9, not -inf (faster in ORT CPU; a masked key's weight exp(-1e9) is
    # 0 unless its score beats every visible one by ~1e9); rows that see nothing: zeroed below
    bias = op.Where(vb, zero, op.CastLike(op.Constant(value_float=-1e9), q))
    res = op.Attention(qb, kw, vw, bias, scale=sc)  # (Y, present_key, present_value, qk)
    o = res[0] if isinstance(res, (tuple, list)) else res  # (B Hkv, nt, g T, D)
    o = op.Reshape(o, _ints([-1, hkv, nt, g, t, d]))
    if padding is not None or p.unseen:  # rows that see no key give zeros
        seen = op.ReduceMax(op.Cast(vis, to=1), _ints([-1]), keepdims=1)
        o = op.Where(op.Greater(seen, op.Constant(value_float=0.0)), o, zero)
    if g > 1:
        o = op.Transpose(o, perm=[0, 1, 3, 2, 4, 5])
    o = op.Reshape(o, _ints([-1, hq, nt * t, d]))
    o = op.Gather(o, _table(p.inv), axis=2)  # (B, Hq, prod grid, D)
    if not ng:
        return o
    return op.Concat(_global_rows(q, k, v, hq, hkv, g, d, ng, sc, real, zero, neg), o,
                     axis=2)


def _global_rows(q, k, v, hq, hkv, g, d, ng, sc, real, zero, neg):
    """(B, Hq, ng, D): the global query rows attend to every (real) key."""
    qg = op.Slice(q, _ints([0]), _ints([ng]), _ints([2]))  # (B, Hq, ng, D)
    qg = op.Mul(op.Reshape(qg, _ints([0, hkv, g * ng, d])), op.CastLike(
        op.Constant(value_float=sc), q))  # (B, Hkv, g*ng, D): a KV head's query heads in a row
    sg = op.MatMul(qg, op.Transpose(k, perm=[0, 1, 3, 2]))  # (B, Hkv, g*ng, S)
    if real is not None:
        m = op.Unsqueeze(real, _ints([1, 2]))  # (B|1, 1, 1, S)
        sg = op.Add(sg, op.Where(m, zero, neg))
    go = op.MatMul(op.Softmax(sg, axis=-1), v)  # (B, Hkv, g*ng, D)
    if real is not None:  # a row whose keys are all padding gives zeros
        seen = op.ReduceMax(op.Cast(m, to=1), _ints([-1]), keepdims=1)
        go = op.Where(op.Greater(seen, op.Constant(value_float=0.0)), go, zero)
    return op.Reshape(go, _ints([0, hq, ng, d]))


def min_onnx(q, k, v, grid, heads, dilation, stride, is_causal, scale=None, num_global: int = 0,
             tiles: tuple[int, ...] | None = None):
    """The Min-capped MatMul form (module doc): no padding mask, `plan(...).diag` true."""
    hq, d, hkv, g, p, nt, t, kk, ng = _setup(q, k, grid, heads, dilation, stride, is_causal,
                                              num_global, tiles)
    vis = op.Reshape(op.Expand(_vis(p, hkv, g), _ints([1, 1, nt, g, t, kk])),
                     _ints([1, -1, nt, g * t, kk]))  # (1, Hkv|1, nt, g T, K)
    fp32 = q.dtype == ir.DataType.FLOAT
    mul = fp32 and MASK == "mul"
    if mul:  # Mul by the 0/1 mask, the own key at +MARGIN (module doc); folded by ORT
        cap, at = op.CastLike(vis, q), MARGIN
    else:  # Min with the cap, the own key at 0
        cap, at = op.Where(vis, op.CastLike(op.Constant(value_float=3e38), q),
                           op.CastLike(op.Constant(value_float=-MARGIN), q)), 0.0
    sc = (1.0 / d ** 0.5) if scale is None else float(scale)
    qs = op.Mul(q, op.CastLike(op.Constant(value_float=sc), q))
    q1, k1, _ = nb1d.own_shift(qs, k, hkv, g, d, at)  # [q * scale, at - s_ii], [k, 1]
    if LOOP and fp32:  # tiles in Loop steps (ORT CPU runs float32 bodies)
        per = tiles_per_step(nt, hq * t * kk)
        cap = op.Reshape(cap, _ints([1, -1, nt // per, per, g * t, kk]))  # folded by ORT
        y = loop(op.Constant(value_int=nt // per), _tile_body(
            q1, k1, v, _table(p.qtok.reshape(nt // per, per, t)),
            _table(p.keys.reshape(nt // per, per, kk)), cap, hkv, g, per, t, kk, d, mul))
        # y: (steps, B, Hkv, per, g T, D) -> (B, Hkv, nt, g T, D)
        o = op.Reshape(op.Transpose(y, perm=[1, 2, 0, 3, 4, 5]), _ints([0, hkv, nt, g * t, d]))
    else:  # bf16/fp16: one chain over every tile, its nodes at the top level where the
        # export's float32 widening of ORT CPU's missing low-precision kernels finds them
        o = _chain(op, q1, k1, v, _table(p.qtok), _table(p.keys), cap, hkv, g, nt, t, d, mul)
    if g > 1:
        o = op.Transpose(op.Reshape(o, _ints([0, hkv, nt, g, t, d])), perm=[0, 1, 3, 2, 4, 5])
    o = op.Reshape(o, _ints([0, hq, nt * t, d]))
    o = op.Gather(o, _table(p.inv), axis=2)  # (B, Hq, prod grid, D)
    if not ng:
        return o
    zero = op.CastLike(op.Constant(value_float=0.0), q)
    neg = op.CastLike(op.Constant(value_float=float("-inf")), q)
    return op.Concat(_global_rows(q, k, v, hq, hkv, g, d, ng, sc, None, zero, neg), o, axis=2)


STEP_SCORES = 1 << 20  # score elements per Loop step (B = 1): ~4 MB of fp32, cache-sized


def tiles_per_step(nt: int, scores_per_tile: int) -> int:
    """Tiles per Loop step: the largest divisor of nt whose scores (all heads, B = 1) stay
    within STEP_SCORES, at least 1."""
    return max([p for p in range(1, nt + 1) if nt % p == 0 and p * scores_per_tile <= STEP_SCORES]
               or [1])


def loop(m, body):
    """Loop(M = m, no condition, no loop-carried values, body): its one scan output. The
    generated `op.Loop` demands a loop-carried value, so the node goes to the exporter's
    recorder (the evaluator in charge while torch.onnx translates) with the Loop schema."""
    import onnx
    import onnxscript

    rec = onnxscript.evaluator.default()
    if not hasattr(rec, "_call_op"):  # not inside torch.onnx's translation
        raise RuntimeError("the tiled neighborhood ONNX form is built only by torch.onnx export")
    sig = ir.schemas.OpSignature.from_op_schema(onnx.defs.get_schema("Loop", 23))
    cond = op.Cast(op.Constant(value_int=1), to=9)  # true: M alone ends the loop
    return rec._call_op(sig, {"M": m, "cond": cond, "v_initial": ()}, {"body": body}, 1)[0]


class TapeOps:
    """`ops.Name(*inputs, **attributes)` records a node on an onnx_ir tape: `_chain` builds
    with it what it builds with onnxscript's `op` at the top level."""

    def __init__(self, tape):
        self.tape = tape

    def __getattr__(self, name):
        return lambda *inputs, **attrs: self.tape.op(name, list(inputs), attrs)


def _chain(o, q1, k1, v, qtok, keys, cap, hkv: int, g: int, n: int, t: int, d: int,
           mul: bool):
    """n tiles: Gather their queries (qtok (n, T)) and key halos (keys (n, K)), score
    [q * scale, a - s_ii] . [k, 1], Mul (`mul`) or Min with cap (1, Hkv|1, n, g T, K), Softmax,
    MatMul(V): (B, Hkv, n, g T, D). `o` builds the nodes (onnxscript's op, or a Loop body's
    _TapeOps)."""
    kw = o.Gather(k1, keys, axis=2)  # (B, Hkv, n, K, D + 1)
    vw = o.Gather(v, keys, axis=2)  # (B, Hkv, n, K, D)
    qb = o.Gather(q1, qtok, axis=2)  # (B, Hq, n, T, D + 1)
    if g > 1:  # fold a KV head's query heads into the tile rows
        qb = o.Transpose(o.Reshape(qb, o.Constant(value_ints=[0, hkv, g, n, t, d + 1])),
                         perm=[0, 1, 3, 2, 4, 5])
    qb = o.Reshape(qb, o.Constant(value_ints=[0, hkv, n, g * t, d + 1]))
    s = o.MatMul(qb, o.Transpose(kw, perm=[0, 1, 2, 4, 3]))  # (B, Hkv, n, g T, K)
    s = o.Mul(s, cap) if mul else o.Min(s, cap)
    return o.MatMul(o.Softmax(s, axis=-1), vw)


def _tile_body(q1, k1, v, qtok, keys, cap, hkv: int, g: int, per: int, t: int, kk: int, d: int,
               mul: bool):
    """The Loop body of `min_onnx`: step i Gathers its `per` tiles' queries (qtok row i) and
    key halos (keys row i) from the outer q1/k1/v, scores them, masks with cap[:, :, i], Softmax,
    MatMul(V): (B, Hkv, per, g T, D). One step's scores stay in cache, where ORT's op-by-op
    MatMul/Mul/Softmax/MatMul over all tiles at once would stream them through memory 4-5 times
    (64x64 grid, 13x13 window: 74 -> 55 ms for the chain, ORT CPU, 2 threads)."""
    tp = ir.tape.Tape()
    i = ir.Value(name="tile_step", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    cond = ir.Value(name="tile_cond", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))

    ops = TapeOps(tp)
    qi, ki = ops.Gather(qtok, i, axis=0), ops.Gather(keys, i, axis=0)  # (per, T), (per, K)
    o = _chain(ops, q1, k1, v, qi, ki, ops.Gather(cap, i, axis=2), hkv, g, per, t, d, mul)
    cond_out = tp.op("Identity", [cond])
    return ir.Graph([i, cond], [cond_out, o], nodes=tp.nodes, name="neighborhood_tiles")


def blocked_onnx(q, k, v, grid, heads, dilation, stride, is_causal, scale=None, padding=None,
                 num_global: int = 0, padding_is_bool: bool = True,
                 tiles: tuple[int, ...] | None = None):
    """The ONNX graph of `blocked_attention`: `min_onnx` without a padding mask when every
    token sees itself, else `fused_onnx`."""
    p = nb.plan(*nb._args(grid, heads, dilation, stride, is_causal), int(num_global), tiles)
    if padding is None and p.diag:
        return min_onnx(q, k, v, grid, heads, dilation, stride, is_causal, scale, num_global,
                        tiles)
    return fused_onnx(q, k, v, grid, heads, dilation, stride, is_causal, scale, padding,
                      num_global, padding_is_bool, tiles)
