"""Attention scores that are `scale * (q @ kᵀ)` plus terms that do not depend on q @ kᵀ, in the
eager forms real models write them, rewritten as SDPA's `scale` and a float `attn_mask`.

Walked back from the softmax input, through any order of:

    baddbmm(bias, q, kᵀ, beta, alpha)           fused bias (BLOOM's ALiBi)          -> beta*bias
    scores * c, scores / c (also in place)       either scale placement             -> scale
    scores + bias, bias + scores                 relative-position bias, ALiBi,    -> + bias
                                                 DeBERTa's disentangled terms, masks
    masked_fill(scores, m, -big), where(m, ...)  masks                        -> where(m, -big, ·)
    view (B*H, S, S) <-> (B, H, S, S)            bias added before or after a reshape
    casts, copies, same-shape views, eval dropout

Each term is emitted in the (B, H, Sq, Skv) layout, broadcastable as it was: a (B*H, 1, S) ALiBi
bias becomes (B, H, 1, S) by `unflatten`, never materialised to (B, H, S, S). The algebra is exact:
`(s + b) * c + m == s * c + (b * c + m)`. A large-negative fill absorbs the q @ kᵀ entries it
replaces (c * s + finfo.min == finfo.min in floating point), so masked rows match too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.fx import Graph, GraphModule, Node

from attnc.capture.attention_match import (
    MASKED_VALUE,
    VIEWS,
    Match,
    NoMatch,
    const_value,
    finish,
    is_noop,
    match_forward,
    matmul_operands,
    peel_back,
    peel_scale,
    same_shape,
    scores_input,
    shape_of,
    sym_eq,
    untranspose,
)

aten = torch.ops.aten

_MUL = {aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor}
_DIV = {aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor}
_ADD = {aten.add.Tensor, aten.add_.Tensor}
_FILL = {aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.masked_fill_.Scalar}
_WHERE = {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf}


@dataclass(frozen=True)
class BiasOp:
    """One step of the bias program, applied from q @ kᵀ outward.

    kind "mul": multiply by `value`; "add": add `node` * `value`; "fill": put `value` where
    `node` is True (`masked`) or False (not `masked`). `rank` is the rank of the scores where the
    step applies: 3 for (B*H, S, S), 4 for (B, H, S, S)."""

    kind: Literal["mul", "add", "fill"]
    rank: int
    value: float = 1.0
    node: Node | None = None
    masked: bool = True


@dataclass
class ScoreWalk:
    leaf: Node  # the q @ kᵀ node (matmul, bmm, view(bmm) or baddbmm)
    a: Node  # its operands
    b: Node
    ops: list[BiasOp] = field(default_factory=list)  # from the leaf outward
    heads: int | None = None  # H, from a (B*H, S, S) <-> (B, H, S, S) view

    @property
    def scale(self) -> float:
        out = 1.0
        for op in self.ops:
            if op.kind == "mul":
                out *= op.value
        return out

    @property
    def has_bias(self) -> bool:
        return any(op.kind == "add" for op in self.ops)


class ScoreStop(NoMatch):
    """The walk met an op that is not affine in q @ kᵀ (a score function such as tanh)."""

    def __init__(self, node: Node, message: str):
        super().__init__(message)
        self.node = node


def walk_scores(gm: GraphModule, x: Node, chain: list[Node]) -> ScoreWalk:
    """The affine form of scores node `x` (nodes it passes are added to `chain`); raises
    ScoreStop at the first op it cannot see through."""
    if not isinstance(x, Node):
        raise ScoreStop(x, "softmax input is not a q @ kᵀ matmul")
    t, rank = x.target, len(shape_of(x))
    if is_noop(x) or _same_shape_view(x):
        chain.append(x)
        return walk_scores(gm, x.args[0], chain)
    if t in _MUL | _DIV:
        a, b = x.args[0], x.args[1]
        ca, cb = const_value(gm, a), const_value(gm, b)
        if cb is not None and isinstance(a, Node):
            c, nxt = (cb if t in _MUL else 1.0 / cb), a
        elif ca is not None and isinstance(b, Node) and t in _MUL:
            c, nxt = ca, b
        else:
            raise ScoreStop(x, f"scores are multiplied by a tensor ({t})")
        chain.append(x)
        w = walk_scores(gm, nxt, chain)
        w.ops.append(BiasOp("mul", rank, c))
        return w
    if t in _ADD and len(x.args) == 2 and x.kwargs.get("alpha", 1) == 1:
        return _walk_add(gm, x, chain)
    if t in _FILL | _WHERE:
        src, mask, fill, masked = _fill_parts(gm, x)
        chain.append(x)
        w = walk_scores(gm, src, chain)
        w.ops.append(BiasOp("fill", rank, fill, mask, masked))
        return w
    if _regroups_heads(x):
        chain.append(x)
        w = walk_scores(gm, x.args[0], chain)
        four = shape_of(x) if rank == 4 else shape_of(x.args[0])
        if isinstance(four[1], int):
            w.heads = four[1]
        return w
    if t == aten.baddbmm.default:
        beta = x.kwargs.get("beta", x.args[3] if len(x.args) > 3 else 1)
        alpha = x.kwargs.get("alpha", x.args[4] if len(x.args) > 4 else 1)
        chain.append(x)
        w = ScoreWalk(x, x.args[1], x.args[2])
        w.ops += [BiasOp("mul", 3, float(alpha)), BiasOp("add", 3, float(beta), x.args[0])]
        return w
    if t == aten.bmm.default:  # (B*H, Sq, D) @ (B*H, D, Skv), regrouped into heads later on
        chain.append(x)
        return ScoreWalk(x, x.args[0], x.args[1])
    sub: list[Node] = []
    ops = matmul_operands(x, sub)
    if ops is None:
        raise ScoreStop(x, f"softmax input comes from {t}, not a q @ kᵀ matmul")
    chain += [*sub, x]
    return ScoreWalk(x, ops[0], ops[1])


def match_affine(gm: GraphModule, sm: Node) -> Match:
    """Softmax `sm` as SDPA with a bias program (`Match.walk`); raises NoMatch (ScoreStop at a
    score function)."""
    v, out, chain = match_forward(sm)
    x = scores_input(sm, chain)
    w = walk_scores(gm, x, chain)
    side: list[Node] = []  # q/k views and scalings: erased if dead, may feed other terms too
    q, sq = peel_scale(gm, w.a, side)
    kt, sk = peel_scale(gm, w.b, side)
    k = untranspose(kt) if isinstance(kt, Node) else None
    if not isinstance(q, Node) or k is None:
        raise NoMatch("scores are not q @ kᵀ with kᵀ a transpose of k")
    side.append(kt)
    k, sk2 = peel_scale(gm, k, side)
    q, k = _heads_form(q, side), _heads_form(k, side)
    heads = shape_of(q)[1] if len(shape_of(q)) == 4 else None
    if w.heads is not None and not sym_eq(w.heads, heads):
        raise NoMatch(f"scores regroup {w.heads} heads but q has {heads}")
    w.heads = heads if isinstance(heads, int) else w.heads
    for op in w.ops:
        if op.kind == "fill" and _reaches(op.node, w.leaf):
            raise ScoreStop(w.leaf, "the mask is computed from the scores themselves")
    m = Match(q=q, k=k, kt=k, v=v, out=out, scale=w.scale * sq * sk * sk2, walk=w)
    m = finish(m, sm, chain)
    m.chain = chain + side
    return m


def _heads_form(n: Node, chain: list[Node]) -> Node:
    """The (B, H, S, D) tensor a (B*H, S, D) operand was flattened from."""
    if len(shape_of(n)) != 3:
        return n
    trial: list[Node] = []
    src = peel_back(n, trial)
    if len(shape_of(src)) != 4:
        raise NoMatch("q or k is (B*H, S, D) without a (B, H, S, D) form to take heads from")
    chain += trial
    return src


def _walk_add(gm: GraphModule, x: Node, chain: list[Node]) -> ScoreWalk:
    a, b = x.args
    if not isinstance(b, Node):  # scores + python scalar: a row constant, softmax ignores it
        chain.append(x)
        return walk_scores(gm, a, chain)
    stops: list[ScoreStop] = []
    for src, term in ((a, b), (b, a)):
        trial: list[Node] = []
        try:
            w = walk_scores(gm, src, trial)
        except ScoreStop as e:
            stops.append(e)
            continue
        if not value_dtype(term).is_floating_point:
            raise ScoreStop(x, "additive mask is not floating point")
        if _reaches(term, w.leaf):
            continue  # the term reads q @ kᵀ itself: not a bias; try the other side
        chain += [x, *trial]
        w.ops.append(BiasOp("add", len(shape_of(x)), 1.0, term))
        return w
    if stops:
        raise stops[0]  # the scores side comes first in most models
    raise ScoreStop(x, "both operands of an add before softmax read q @ kᵀ")


def value_dtype(n) -> torch.dtype:
    v = n.meta.get("val") if isinstance(n, Node) else None
    return v.dtype if isinstance(v, torch.Tensor) else torch.float32


def _fill_parts(gm, x: Node) -> tuple[Node, Node, float, bool]:
    """(scores, mask, fill value, True if the fill goes where mask is True)."""
    if x.target in _FILL:
        fill = const_value(gm, x.args[2])
        if fill is None or fill > MASKED_VALUE:
            raise ScoreStop(x, f"masked_fill value {fill} does not mask out")
        return x.args[0], x.args[1], fill, True
    cond, a, b = x.args
    fa, fb = const_value(gm, a), const_value(gm, b)
    if fb is not None and fb <= MASKED_VALUE and isinstance(a, Node):
        return a, cond, fb, False
    if fa is not None and fa <= MASKED_VALUE and isinstance(b, Node):
        return b, cond, fa, True
    raise ScoreStop(x, "where() before softmax does not fill with a large negative value")


def _same_shape_view(n: Node) -> bool:
    src = n.args[0] if n.args else None
    if n.target not in VIEWS | {aten.flatten.using_ints, aten.unflatten.int}:
        return False
    return isinstance(src, Node) and same_shape(shape_of(n), shape_of(src))


def _regroups_heads(n: Node) -> bool:
    """A view between (B*H, Sq, Skv) and (B, H, Sq, Skv) (either way) that keeps the last two."""
    src = n.args[0] if n.args else None
    if not isinstance(src, Node):
        return False
    if n.target not in VIEWS | {aten.flatten.using_ints, aten.unflatten.int}:
        return False
    a, b = shape_of(n), shape_of(src)
    return {len(a), len(b)} == {3, 4} and same_shape(a[-2:], b[-2:])


def _reaches(start: Node, target: Node, limit: int = 200000) -> bool:
    """Whether `target` is an ancestor of `start` (or `start` itself)."""
    seen, stack = {start}, [start]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n is target:
            return True
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return False


# ----------------------------------------------------------------------------------------------
# emitting the mask


def _call(g: Graph, target, args: tuple, kwargs: dict | None = None) -> Node:
    """A new node with fake-tensor `meta["val"]` (best effort: shapes are re-traced on export)."""
    kwargs = kwargs or {}
    node = g.call_function(target, args, kwargs)
    vals = [a.meta.get("val") if isinstance(a, Node) else a for a in args]
    with contextlib.suppress(Exception):  # metadata only
        node.meta["val"] = target(*vals, **kwargs)
    return node


def _rank(n: Node) -> int:
    v = n.meta.get("val")
    return v.dim() if isinstance(v, torch.Tensor) else 0


def lift(g: Graph, n: Node, rank: int, heads: int | None) -> Node:
    """Term `n`, broadcast against rank-`rank` scores, in the (B, H, Sq, Skv) layout."""
    if rank == 4 or heads is None:
        return n
    while _rank(n) < 3:  # right-aligned broadcasting: leading dims of size 1
        n = _call(g, aten.unsqueeze.default, (n, 0))
    if sym_eq(shape_of(n)[0], 1):
        return _call(g, aten.unsqueeze.default, (n, 0))  # (1, 1, a, b)
    return _call(g, aten.unflatten.int, (n, 0, [-1, heads]))  # (B*H, a, b) -> (B, H, a, b)


def emit_mask(g: Graph, w: ScoreWalk) -> tuple[Node | None, Literal["none", "bool", "float"]]:
    """The attn_mask for SDPA from the walk's bias program: a boolean "attend" mask when the
    program only masks, a float mask otherwise; inserted at the graph's insertion point."""
    lifted = {}

    def up(node: Node, rank: int) -> Node:
        if (node, rank) not in lifted:
            lifted[node, rank] = lift(g, node, rank, w.heads)
        return lifted[node, rank]

    fills = [op for op in w.ops if op.kind == "fill"]
    if not w.has_bias and all(_stays_masked(w.ops, op) for op in fills):
        attend: Node | None = None
        for op in fills:
            keep = up(op.node, op.rank)
            if op.masked:
                keep = _call(g, aten.logical_not.default, (keep,))
            elif value_dtype(keep) != torch.bool:
                keep = _call(g, aten._to_copy.default, (keep,), {"dtype": torch.bool})
            attend = keep if attend is None else _call(g, aten.logical_and.default, (attend, keep))
        return attend, ("none" if attend is None else "bool")
    acc: Node | None = None
    for op in w.ops:
        if op.kind == "mul" and acc is not None:
            acc = _call(g, aten.mul.Tensor, (acc, op.value))
        elif op.kind == "add":
            t = up(op.node, op.rank)
            if op.value != 1.0:
                t = _call(g, aten.mul.Tensor, (t, op.value))
            acc = t if acc is None else _call(g, aten.add.Tensor, (acc, t))
        elif op.kind == "fill":
            cond = up(op.node, op.rank)
            if value_dtype(cond) != torch.bool:
                cond = _call(g, aten._to_copy.default, (cond,), {"dtype": torch.bool})
            if not op.masked:
                cond = _call(g, aten.logical_not.default, (cond,))
            if acc is None:
                acc = _call(g, aten.scalar_tensor.default, (0.0,), {"dtype": _float_dtype(w)})
            acc = _call(g, aten.where.ScalarSelf, (cond, op.value, acc))
    return acc, "float"


def _float_dtype(w: ScoreWalk) -> torch.dtype:
    for op in w.ops:
        if op.kind == "add":
            return value_dtype(op.node)
    return value_dtype(w.leaf)


def _stays_masked(ops: list[BiasOp], fill: BiasOp) -> bool:
    """Whether a fill is still a large negative value after the scalings that follow it."""
    value, after = fill.value, False
    for op in ops:
        if op is fill:
            after = True
        elif after and op.kind == "mul":
            value *= op.value
    return value <= MASKED_VALUE


def describe(w: ScoreWalk) -> dict[str, Any]:
    """A short summary for logs."""
    return {
        "scale": w.scale,
        "bias_terms": sum(op.kind == "add" for op in w.ops),
        "masks": sum(op.kind == "fill" for op in w.ops),
        "heads": w.heads,
    }
