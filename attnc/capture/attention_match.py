"""Pattern matching for `attnc.capture.canonicalize`: from a softmax outward to the q/k/v, scale and
mask of a hand-written attention (see that module's docstring for the forms matched)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

SDPA = aten.scaled_dot_product_attention.default
SOFTMAX_OPS = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default}
CASTS = {
    aten.to.dtype,
    aten._to_copy.default,
    aten.type_as.default,
    aten.to.dtype_layout,
    torch.ops.prims.convert_element_type.default,
}
COPIES = {aten.clone.default, aten.contiguous.default, aten.alias.default}
VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
ASSERT_OPS = {aten._assert_tensor_metadata.default}
MaskKind = Literal["none", "causal", "bool", "float"]
MASKED_VALUE = -1e4  # a fill at or below this is "masked out" after softmax in fp32/fp16


class NoMatch(Exception):
    pass


@dataclass
class Match:
    q: Node
    k: Node | None  # None: build kᵀ.transpose(-2, -1) from `kt`
    kt: Node
    v: Node
    out: Node  # replaced by the SDPA node
    scale: float = 1.0
    mask: Node | None = None
    mask_kind: MaskKind = "none"
    invert_mask: bool = False  # bool mask marks masked-out positions; SDPA wants "attend"
    chain: list[Node] = field(default_factory=list)
    walk: Any = None  # a `score_terms.ScoreWalk`: the mask is emitted from its bias program


def value_of(n):
    return n.meta.get("val") if isinstance(n, Node) else None


def shape_of(n) -> tuple:
    v = value_of(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def sym_eq(a, b) -> bool:
    return statically_known_true(a == b)


def same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(sym_eq(x, y) for x, y in zip(a, b, strict=True))


def _attr(gm: GraphModule, n: Node):
    obj = gm
    for part in str(n.target).split("."):
        obj = getattr(obj, part, None)
    return obj


def _arg(n: Node, i: int, name: str, default=None):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def value_users(n: Node) -> list[Node]:
    """Users that read n's values (not asserts, not `x.type_as(n)` which reads only its dtype)."""
    return [
        u
        for u in n.users
        if u.target not in ASSERT_OPS
        and not (u.target == aten.type_as.default and u.args[0] is not n)
    ]


def single_user(n: Node, what: str) -> Node:
    users = value_users(n)
    if len(users) != 1:
        raise NoMatch(f"{what} has {len(users)} users (e.g. attention weights are returned)")
    return users[0]


def const_value(gm: GraphModule, x) -> float | None:
    """The value of a python scalar or a one-element constant node, else None."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if not isinstance(x, Node):
        return None
    if x.op == "get_attr":
        t = _attr(gm, x)
        return float(t.item()) if isinstance(t, torch.Tensor) and t.numel() == 1 else None
    if x.target == aten.scalar_tensor.default:
        return const_value(gm, x.args[0])
    if x.target == aten.full.default and all(sym_eq(s, 1) for s in x.args[0]):
        return const_value(gm, x.args[1])
    if x.target in CASTS | COPIES | {
        aten.lift_fresh_copy.default,
        aten.detach_.default,
        aten.detach.default,
    }:
        return const_value(gm, x.args[0])
    folded = _fold(gm, x, 0)  # e.g. DeBERTa's sqrt(tensor(head_dim) * scale_factor)
    return float(folded.item()) if isinstance(folded, torch.Tensor) else None


def _fold(gm: GraphModule, n, depth: int):
    """Evaluate a small constant subgraph of one-element tensors (None if it is not one)."""
    if not isinstance(n, Node):
        plain = isinstance(n, (int, float, bool, torch.dtype, torch.device)) or n is None
        return n if plain else None
    if n.op == "get_attr":
        t = _attr(gm, n)
        return t if isinstance(t, torch.Tensor) and t.numel() == 1 else None
    val = value_of(n)
    if (
        depth > 8
        or n.op != "call_function"
        or not isinstance(n.target, torch._ops.OpOverload)
        or torch.Tag.nondeterministic_seeded in n.target.tags
        or not isinstance(val, torch.Tensor)
        or val.numel() != 1
    ):
        return None
    args, kwargs = [], {}
    for a in n.args:
        if isinstance(a, (list, tuple)):
            if any(isinstance(e, Node) for e in a):
                return None
            args.append(a)
            continue
        f = _fold(gm, a, depth + 1)
        if f is None and a is not None:
            return None
        args.append(f)
    for key, a in n.kwargs.items():
        f = _fold(gm, a, depth + 1) if isinstance(a, Node) else a
        if f is None and a is not None:
            return None
        kwargs[key] = f
    try:
        out = n.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - not foldable after all
        return None
    return out if isinstance(out, torch.Tensor) and out.numel() == 1 else None


def is_noop(n: Node) -> bool:
    """Casts, copies, eval dropout, no-op expands and slices: values pass through unchanged."""
    if n.op != "call_function" or not n.args or not isinstance(n.args[0], Node):
        return False
    if n.target in CASTS | COPIES:
        return True
    if n.target == aten.dropout.default:
        return n.args[1] == 0 or not n.args[2]
    if n.target in (aten.expand.default, aten.slice.Tensor) or n.target in VIEWS:
        return same_shape(shape_of(n), shape_of(n.args[0]))  # e.g. Falcon's probs.view(B, H, S, S)
    return False


def flattens_batch(n: Node) -> bool:
    """A view that merges leading (batch, head) dims and keeps the last two."""
    src = n.args[0] if n.args else None
    a, b = shape_of(n), shape_of(src)
    return (
        n.target in VIEWS
        and isinstance(src, Node)
        and len(a) == 3
        and len(b) > 3
        and same_shape(a[-2:], b[-2:])
    )


def peel_back(n: Node, chain: list[Node]) -> Node:
    """Walk up through no-ops and batch-flattening views (the decomposed matmul's wrappers)."""
    while isinstance(n, Node) and (is_noop(n) or flattens_batch(n)):
        chain.append(n)
        n = n.args[0]
    return n


def matmul_operands(n: Node, chain: list[Node]) -> tuple[Node, Node] | None:
    """(a, b) if n computes a @ b, as aten.matmul or as view(bmm(view(a), view(b)))."""
    if n.target == aten.matmul.default:
        return n.args[0], n.args[1]
    if n.target in VIEWS and isinstance(n.args[0], Node) and n.args[0].target == aten.bmm.default:
        bmm = n.args[0]
        if len(bmm.users) != 1:
            return None
        chain.append(bmm)
        a, b = peel_back(bmm.args[0], chain), peel_back(bmm.args[1], chain)
        if len(shape_of(a)) == len(shape_of(n)) == len(shape_of(b)):
            return a, b
    return None


def peel_scale(gm: GraphModule, n: Node, chain: list[Node]) -> tuple[Node, float]:
    """Strip multiplications/divisions by constants; return (tensor, product of factors)."""
    scale = 1.0
    while isinstance(n, Node):
        if n.target in CASTS and n.target != aten.type_as.default:
            chain.append(n)
            n = n.args[0]
            continue
        if n.target not in (aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar):
            break
        a, b = n.args[0], n.args[1]
        ca, cb = const_value(gm, a), const_value(gm, b)
        if cb is not None and isinstance(a, Node):
            factor, n_next = (cb if n.target in (aten.mul.Tensor, aten.mul.Scalar) else 1 / cb), a
        elif ca is not None and isinstance(b, Node) and n.target == aten.mul.Tensor:
            factor, n_next = ca, b
        else:
            break
        scale *= factor
        chain.append(n)
        n = n_next
    return n, scale


def untranspose(n: Node) -> Node | None:
    """x if n is x with its last two dims swapped (aten.transpose / aten.permute), else None."""
    nd = len(shape_of(n))
    if n.target == aten.transpose.int:
        dims = sorted(d % nd for d in n.args[1:3])
        return n.args[0] if dims == [nd - 2, nd - 1] else None
    if n.target == aten.permute.default:
        perm = [d % nd for d in n.args[1]]
        return n.args[0] if perm == [*range(nd - 2), nd - 1, nd - 2] else None
    return None


def _match_scores(gm: GraphModule, x: Node, m: Match, chain: list[Node]) -> None:
    """Fill q, k/kt and scale of `m` from the (mask-free) scores node `x`."""
    x = peel_back(x, chain) if is_noop(x) else x
    x, scale = peel_scale(gm, x, chain)
    if not isinstance(x, Node):
        raise NoMatch("softmax input is not a q @ kᵀ matmul")
    ops = matmul_operands(x, chain)
    if ops is None:
        raise NoMatch(f"softmax input comes from {x.target}, not a q @ kᵀ matmul")
    chain.append(x)
    q, sq = peel_scale(gm, ops[0], chain)
    kt, sk = peel_scale(gm, ops[1], chain)
    k = untranspose(kt) if isinstance(kt, Node) else None
    sk2 = 1.0
    if k is not None:
        chain.append(kt)
        k, sk2 = peel_scale(gm, k, chain)
    if not (isinstance(q, Node) and isinstance(kt, Node)):
        raise NoMatch("q or k is not a tensor")
    if len(shape_of(q)) < 3:
        raise NoMatch(f"scores have rank {len(shape_of(x))}, attention needs at least 3")
    m.q, m.kt, m.k, m.scale = q, kt, k, scale * sq * sk * sk2


def _tril_buffer(gm: GraphModule, n: Node) -> bool:
    """True if n is a slice [:L, :S] of a constant lower-triangular 0/1 buffer (nonzero: attend)."""
    while isinstance(n, Node) and (n.target in CASTS or n.target == aten.slice.Tensor):
        if n.target == aten.slice.Tensor and (
            _arg(n, 2, "start") not in (None, 0) or _arg(n, 4, "step", 1) != 1
        ):
            return False
        n = n.args[0]
    t = _attr(gm, n) if isinstance(n, Node) and n.op == "get_attr" else None
    if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[-1] != t.shape[-2]:
        return False
    if any(s != 1 for s in t.shape[:-2]):
        return False
    nz = t.reshape(t.shape[-2:]) != 0
    return bool(torch.equal(nz, torch.ones_like(nz).tril()))


def _causal_bool(gm: GraphModule, n: Node, masked: bool, scores: tuple) -> bool:
    """Whether bool mask n is the causal pattern (masked=True: True marks masked-out entries)."""
    if not same_shape(shape_of(n)[-2:], scores[-2:]):
        return False
    if n.target == aten.logical_not.default:
        return _causal_bool(gm, n.args[0], not masked, scores)
    if n.target == aten.eq.Scalar and n.args[1] == 0:
        return masked and _tril_buffer(gm, n.args[0])
    if n.target == aten.ne.Scalar and n.args[1] == 0:
        return not masked and _tril_buffer(gm, n.args[0])
    return not masked and _tril_buffer(gm, n)


def _causal_float(gm: GraphModule, n: Node, scores: tuple) -> bool:
    """triu(full((L, S), -inf), 1): the additive causal mask."""
    if n.target != aten.triu.default or (n.args[1:2] or [0])[0] != 1:
        return False
    full = n.args[0]
    return (
        isinstance(full, Node)
        and full.target == aten.full.default
        and (const_value(gm, full.args[1]) or 0.0) <= MASKED_VALUE
        and same_shape(shape_of(n)[-2:], scores[-2:])
    )


def _match_mask(gm: GraphModule, x: Node, m: Match, chain: list[Node]) -> None:
    """Peel an optional mask off the pre-softmax scores, then match the scores."""
    scores = shape_of(x)
    if x.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self):
        if x.target == aten.where.self:
            cond, a, b = x.args
            if (const_value(gm, b) or 0.0) <= MASKED_VALUE and const_value(gm, b) is not None:
                src, mask, masked = a, cond, False
            elif (const_value(gm, a) or 0.0) <= MASKED_VALUE and const_value(gm, a) is not None:
                src, mask, masked = b, cond, True
            else:
                raise NoMatch("where() before softmax does not fill with a large negative value")
        else:
            src, mask, masked = x.args[0], x.args[1], True
            fill = const_value(gm, x.args[2])
            if fill is None or fill > MASKED_VALUE:
                raise NoMatch(f"masked_fill value {fill} does not mask out")
        chain.append(x)
        if _causal_bool(gm, mask, masked, scores):
            m.mask_kind = "causal"
        else:
            m.mask, m.mask_kind, m.invert_mask = mask, "bool", masked
        _match_scores(gm, src, m, chain)
        return
    if x.target == aten.add.Tensor and all(isinstance(a, Node) for a in x.args):
        errors = []
        for src, mask in ((x.args[0], x.args[1]), (x.args[1], x.args[0])):
            trial: list[Node] = []
            try:
                _match_scores(gm, src, m, trial)
            except NoMatch as e:
                errors.append(str(e))
                continue
            chain += [x, *trial]
            if not value_of(mask).dtype.is_floating_point:
                raise NoMatch("additive mask is not floating point")
            if _causal_float(gm, mask, scores):
                m.mask_kind = "causal"
            else:
                m.mask, m.mask_kind = mask, "float"
            return
        raise NoMatch(errors[0])
    _match_scores(gm, x, m, chain)


def match_forward(sm: Node) -> tuple[Node, Node, list[Node]]:
    """(v, out, chain) of softmax `sm`: probs -> casts/dropout/flatten -> matmul with v -> out."""
    dim = sm.args[1] if len(sm.args) > 1 else sm.kwargs.get("dim")
    nd = len(shape_of(sm))
    if not isinstance(dim, int) or nd == 0 or dim % nd != nd - 1:
        raise NoMatch(f"softmax over dim {dim}, not the last one")
    chain: list[Node] = [sm]
    n = sm
    while True:
        u = single_user(n, "the softmax output")
        if not (u.args and u.args[0] is n and (is_noop(u) or flattens_batch(u))):
            break
        chain.append(u)
        n = u
    if u.target == aten.matmul.default and u.args[0] is n:
        v, out = u.args[1], u
    elif u.target == aten.bmm.default and u.args[0] is n:
        chain.append(u)
        v, out = peel_back(u.args[1], chain), single_user(u, "the attention bmm")
        if out.target not in VIEWS:
            raise NoMatch("the attention bmm is not reshaped back to (B, H, S, D)")
    else:
        raise NoMatch(f"softmax output feeds {u.target}, not a matmul with values")
    if not isinstance(v, Node) or len(shape_of(v)) != nd:
        raise NoMatch("values do not have the same rank as the attention weights")
    return v, out, chain


def scores_input(sm: Node, chain: list[Node]) -> Node:
    """The softmax's input, past casts and copies (added to `chain`)."""
    x = sm.args[0]
    while is_noop(x):
        chain.append(x)
        x = x.args[0]
    return x


def finish(m: Match, sm: Node, chain: list[Node]) -> Match:
    """Check that q, k, v and out form attention and that nothing else reads the chain."""
    nd = len(shape_of(sm))
    qs, ks, vs = shape_of(m.q), shape_of(m.kt), shape_of(m.v)
    if len(qs) != nd or not same_shape(shape_of(m.out), (*qs[:-1], vs[-1])):
        raise NoMatch("q, k, v shapes do not form attention")
    if not (same_shape(ks[:-2], qs[:-2]) and same_shape(vs[:-2], qs[:-2])):
        raise NoMatch("k or v broadcasts over q's batch or head dims")
    for c in chain[1:]:
        if c is not m.out and c not in (m.q, m.k, m.kt, m.v):
            single_user(c, f"intermediate {c.name}")
    m.chain = chain
    return m


def match_softmax(gm: GraphModule, sm: Node) -> Match:
    v, out, chain = match_forward(sm)
    x = scores_input(sm, chain)
    m = Match(q=sm, k=None, kt=sm, v=v, out=out)
    _match_mask(gm, x, m, chain)
    return finish(m, sm, chain)
