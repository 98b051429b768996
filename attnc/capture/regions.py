"""Hand-written attention whose scores SDPA cannot express (Gemma-2's logit soft-capping
`tanh(s / c) * c`, any other score function) stays as it is, marked as an attention region: the
P@V node carries `meta["attnc_attention_region"]`, which `attnc.graph.sites` reads as a site
with its q/k/v, heads, mask and score kind, so `inspect` lists it and llm-drop can drop it.

    scores = q @ kᵀ (* c)                           the one matmul of (Sq, Skv) scores upstream
    scores = f(scores)                              tanh soft-cap -> score "soft-cap", else "other"
    scores = scores + mask | masked_fill / where    optional: the region's mask, for the mask probe
    out    = softmax(scores) @ v
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from attnc.capture.attention_match import (
    NoMatch,
    const_value,
    is_noop,
    match_forward,
    matmul_operands,
    peel_scale,
    same_shape,
    scores_input,
    shape_of,
    untranspose,
)
from attnc.capture.score_terms import _fill_parts, _heads_form, _reaches
from attnc.graph.sites import REGION_META, kv_heads

aten = torch.ops.aten
_MUL = {aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor}
_DIV = {aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor}
_ADD = {aten.add.Tensor, aten.add_.Tensor}


@dataclass(frozen=True)
class Region:
    out: Node  # the P@V node (or the view after a bmm): the site's node
    q: Node
    k: Node
    v: Node
    scale: float
    score: str  # "soft-cap" or "other"
    softcap: float | None
    mask: Node | None
    mask_kind: str  # "none", "bool" (True: attend), "float"
    mask_inverted: bool  # a bool mask whose True marks masked-out entries


def match_region(gm: GraphModule, sm: Node) -> Region:
    """The attention region around softmax `sm`, or NoMatch with the reason."""
    v, out, chain = match_forward(sm)
    x = scores_input(sm, chain)
    scores = shape_of(x)
    leaf = _the_leaf(x, scores)
    mask, mask_kind, inverted, inner = _outer_mask(gm, x, leaf)
    ops = matmul_operands(leaf, [])
    if ops is None:  # _the_leaf found one; a graph that changed under us is not matched
        raise NoMatch("the scores are not one q @ k^T matmul")
    q, sq = peel_scale(gm, ops[0], [])
    kt, sk = peel_scale(gm, ops[1], [])
    k = untranspose(kt) if isinstance(kt, Node) else None
    if not isinstance(q, Node) or k is None:
        raise NoMatch("scores are not q @ kᵀ with kᵀ a transpose of k")
    k, sk2 = peel_scale(gm, k, [])
    q, k = _heads_form(q, []), _heads_form(k, [])
    qs, ks, vs = shape_of(q), shape_of(k), shape_of(v)
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        raise NoMatch("a score function on attention that is not (B, H, S, D)")
    if not same_shape(shape_of(out), (*qs[:-1], vs[-1])):
        raise NoMatch("q, k, v shapes do not form attention")
    score, cap, scale = _score_function(gm, inner, leaf)
    return Region(out, q, k, v, scale * sq * sk * sk2, score, cap, mask, mask_kind, inverted)


def mark_region(r: Region) -> None:
    r.out.meta[REGION_META] = {
        "q": r.q.name,
        "k": r.k.name,
        "v": r.v.name,
        "mask": r.mask.name if r.mask is not None else None,
        "mask_kind": r.mask_kind,
        "mask_inverted": r.mask_inverted,
        "scale": r.scale,
        "score": r.score,
        "softcap": r.softcap,
    }
    r.out.meta["attnc_num_kv_heads"] = kv_heads(r.k)
    r.out.meta["attnc_score"] = r.score


def _the_leaf(x: Node, scores: tuple) -> Node:
    """The one q @ kᵀ matmul with the scores' (Sq, Skv) upstream of `x` through score-shaped
    nodes."""
    found: list[Node] = []
    seen, stack = {x}, [x]
    while stack:
        n = stack.pop()
        if matmul_operands(n, []) is not None:
            found.append(n)
            continue
        for a in n.all_input_nodes:
            s = shape_of(a)
            if a not in seen and len(s) >= 3 and same_shape(s[-2:], scores[-2:]):
                seen.add(a)
                stack.append(a)
    if len(found) != 1:
        raise NoMatch(f"found {len(found)} q @ kᵀ matmuls under the softmax, not one")
    return found[0]


def _outer_mask(gm, x: Node, leaf: Node) -> tuple[Node | None, str, bool, Node]:
    """Masks added after the score function: (mask, kind, inverted, the scores under them)."""
    masks: list[tuple[Node, str, bool]] = []
    while True:
        if is_noop(x):
            x = x.args[0]
        elif x.target in _ADD and len(x.args) == 2 and all(isinstance(a, Node) for a in x.args):
            a, b = x.args
            if _reaches(a, leaf) == _reaches(b, leaf):
                break
            x, term = (a, b) if _reaches(a, leaf) else (b, a)
            masks.append((term, "float", False))
        elif x.target in {aten.masked_fill.Scalar, aten.where.self, aten.where.ScalarOther}:
            try:
                src, cond, _fill, masked = _fill_parts(gm, x)
            except NoMatch:
                break
            x = src
            masks.append((cond, "bool", masked))
        else:
            break
    if len(masks) == 1:
        node, kind, inverted = masks[0]
        return node, kind, inverted, x
    return None, ("none" if not masks else "float"), False, x


def _score_function(gm, x: Node, leaf: Node) -> tuple[str, float | None, float]:
    """("soft-cap", cap, scale) for `tanh(s * scale / cap) * cap`, else ("other", None, scale of
    the constant factors right above the matmul)."""
    if x.target in _MUL:
        t, c = _const_operand(gm, x)
        if t is not None and t.target == aten.tanh.default and c:
            inner, d = _const_operand(gm, t.args[0])
            if inner is not None and t.args[0].target in _DIV:
                d = 1.0 / d if d else None
            if inner is not None and d and math.isclose(d * c, 1.0, rel_tol=1e-6):
                s, scale = peel_scale(gm, inner, [])
                if s is leaf:
                    return "soft-cap", float(c), scale
    scale, n = 1.0, leaf
    while True:
        users = [u for u in n.users if u.op == "call_function"]
        if len(users) != 1 or users[0].target not in _MUL | _DIV:
            break
        t, c = _const_operand(gm, users[0])
        if t is not n or not c:
            break
        scale *= c if users[0].target in _MUL else 1.0 / c
        n = users[0]
    return "other", None, scale


def _const_operand(gm, n: Node) -> tuple[Node | None, float | None]:
    """(tensor, constant) of a multiply/divide by a constant, else (None, None)."""
    if not isinstance(n, Node) or n.target not in _MUL | _DIV or len(n.args) < 2:
        return None, None
    a, b = n.args[0], n.args[1]
    cb = const_value(gm, b)
    if cb is not None and isinstance(a, Node):
        return a, cb
    ca = const_value(gm, a)
    if ca is not None and isinstance(b, Node) and n.target in _MUL:
        return b, ca
    return None, None


__all__ = ["Region", "mark_region", "match_region"]
