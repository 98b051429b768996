"""Rewrite hand-written attention in a torch.export ATen graph into one SDPA node.

Matched, from each softmax outward (all inside one `torch.export(...).module()` graph):

    scores = matmul(q * c_q, (k * c_k)ᵀ) * c_s          (or / c; scale on q, k, scores or several)
    scores = scores + float_mask                          (optional; either operand order)
           | masked_fill(scores, bool_mask, -inf)         (optional; or where(cond, scores, -inf))
    probs  = softmax(scores.to(f32), -1).to(dtype)        (casts optional)
    probs  = dropout(probs, p=0 or train=False)           (optional)
    out    = matmul(probs, v)

`kᵀ` is `aten.transpose`/`aten.permute` of the last two dims; matmuls are `aten.matmul` or the
decomposed `view(bmm(view(expand(a)), view(expand(b))))`. k/v expanded by `repeat_interleave(dim=1)`
or llama's `repeat_kv` (unsqueeze, expand, reshape) become `enable_gqa=True` on the un-expanded
tensors. A mask built from a lower-triangular buffer (nanoGPT's `bias[:, :, :T, :T] == 0`) or from
`triu(full(-inf), 1)` becomes `is_causal=True`. Each new node carries `meta["val"]`, the final
matmul's `nn_module_stack`, and `attnc_num_kv_heads`, `attnc_mask_kind`, `attnc_scale`,
`attnc_score` ("none" or "additive-bias"; `capture.masks` refines the latter to "alibi").

Scores in any other affine form (biases, `baddbmm`, a (B*H, S, S) view between the terms, scales in
between) go through `capture.score_terms`: the bias becomes SDPA's float mask. Scores under a
score function SDPA cannot express (soft-capping) stay as written and are marked as an attention
region (`capture.regions`). Softmaxes that are neither stay, listed as candidates with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from attnc.capture.attention_match import (
    ASSERT_OPS,
    COPIES,
    SDPA,
    SOFTMAX_OPS,
    VIEWS,
    Match,
    NoMatch,
    is_noop,
    match_softmax,
    same_shape,
    shape_of,
    sym_eq,
    value_of,
)
from attnc.capture.regions import mark_region, match_region
from attnc.capture.score_terms import ScoreStop, emit_mask, match_affine
from attnc.graph.sites import kv_heads

log = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass(frozen=True)
class Candidate:
    """A softmax that looked like attention but was not matched."""

    node: str
    module: str
    reason: str


def module_name(node: Node) -> str:
    """Innermost module path from `nn_module_stack` ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def unexpand(n: Node) -> tuple[Node, int]:
    """(kv, rep) when n repeats kv's heads rep times along dim -3; (n, 1) otherwise."""
    shape = shape_of(n)
    if len(shape) != 4:
        return n, 1
    if n.target == aten.repeat_interleave.self_int and n.args[2] % 4 == 1:
        return n.args[0], int(n.args[1])
    if n.target in VIEWS and isinstance(n.args[0], Node):
        e = n.args[0]
        while isinstance(e, Node) and e.target in COPIES:
            e = e.args[0]
        if not (isinstance(e, Node) and e.target == aten.expand.default):
            return n, 1
        u = e.args[0]
        es, us = shape_of(e), shape_of(u)
        if len(es) != 5 or len(us) != 5 or not sym_eq(us[2], 1) or not isinstance(es[2], int):
            return n, 1
        x = u.args[0] if u.target in VIEWS | {aten.unsqueeze.default} else None
        while isinstance(x, Node) and is_noop(x) and len(shape_of(x.args[0])) == 4:
            x = x.args[0]
        xs = (*us[:2], *us[3:])
        fits = isinstance(x, Node) and same_shape(shape_of(x), xs)
        if fits and sym_eq(es[2] * us[1], shape[1]):
            return x, es[2]
    return n, 1


def _rewrite(gm: GraphModule, m: Match) -> Node:
    g = gm.graph
    k, v, gqa = m.k, m.v, False
    with g.inserting_before(m.out):
        if k is None:
            k = g.call_function(aten.transpose.int, (m.kt, -2, -1))
            k.meta["val"] = value_of(m.kt).transpose(-2, -1)
        (k0, rk), (v0, rv) = unexpand(k), unexpand(v)
        if rk == rv > 1:
            k, v, gqa = k0, v0, True
        n_kv = kv_heads(k0)
        mask = m.mask
        if m.walk is not None:
            mask, m.mask_kind = emit_mask(g, m.walk)
        if mask is not None and m.invert_mask:
            mask = g.call_function(aten.logical_not.default, (mask,))
            mask.meta["val"] = value_of(m.mask).logical_not()
        qdt = value_of(m.q).dtype
        if mask is not None and m.mask_kind == "float" and value_of(mask).dtype != qdt:
            cast = g.call_function(aten.to.dtype, (mask, qdt))
            cast.meta["val"] = value_of(mask).to(qdt)
            mask = cast
        kwargs = {"scale": m.scale, "enable_gqa": gqa} if gqa else {"scale": m.scale}
        args = (m.q, k, v, mask, 0.0, m.mask_kind == "causal")
        node = g.call_function(SDPA, args, kwargs)
    node.meta.update({key: val for key, val in m.out.meta.items() if key != "val"})
    try:
        vals = [value_of(a) if isinstance(a, Node) else a for a in args]
        node.meta["val"] = SDPA(*vals, **kwargs)
    except Exception:  # fake propagation is best effort; the replaced matmul has the same meta
        node.meta["val"] = value_of(m.out)
    node.meta["attnc_num_kv_heads"] = n_kv
    node.meta["attnc_mask_kind"] = m.mask_kind
    node.meta["attnc_scale"] = m.scale
    # refined to "alibi" where the bias is one (attnc.capture.masks, on the example inputs)
    has_bias = m.walk is not None and m.walk.has_bias
    node.meta["attnc_score"] = "additive-bias" if has_bias else "none"
    m.out.replace_all_uses_with(node)
    dead = {*m.chain, m.out}
    for a in {u for c in dead for u in c.users if u.target in ASSERT_OPS}:
        g.erase_node(a)
    for c in reversed([n for n in g.nodes if n in dead]):
        if not c.users:  # dropout counts as impure for eliminate_dead_code; erase it here
            g.erase_node(c)
    return node


def _match(gm: GraphModule, sm: Node):
    """A Match (becomes SDPA), a Region (stays, marked), or NoMatch with the reason."""
    try:
        return match_softmax(gm, sm)
    except NoMatch:
        pass
    try:
        return match_affine(gm, sm)  # the general form: the reason it gives is the one to report
    except ScoreStop as stop:
        try:
            return match_region(gm, sm)
        except NoMatch as e:
            raise NoMatch(f"{stop}; not an attention region either: {e}") from None


def annotate_sdpa(gm: GraphModule) -> None:
    """Record `attnc_num_kv_heads` on SDPA nodes that were SDPA from the start."""
    for n in gm.graph.nodes:
        if n.target == SDPA and "attnc_num_kv_heads" not in n.meta:
            n.meta["attnc_num_kv_heads"] = kv_heads(n.args[1])


def canonicalize_attention(gm: GraphModule) -> tuple[int, list[Candidate]]:
    """Rewrite in place; return (number rewritten, unmatched candidates with reasons)."""
    softmaxes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SOFTMAX_OPS]
    count, regions, candidates = 0, 0, []
    for sm in softmaxes:
        try:
            match = _match(gm, sm)
        except NoMatch as e:
            cand = Candidate(sm.name, module_name(sm), str(e))
            log.info("not attention: %s in %r: %s", cand.node, cand.module, cand.reason)
            candidates.append(cand)
            continue
        if not isinstance(match, Match):
            mark_region(match)
            regions += 1
            log.info(
                "kept %s in %r as a %s attention region (not expressible as SDPA)",
                sm.name,
                module_name(sm),
                match.score,
            )
            continue
        node = _rewrite(gm, match)
        log.debug(
            "rewrote %s in %r as %s (%s mask, scale %.4g, %s kv heads)",
            sm.name,
            module_name(node),
            node.name,
            match.mask_kind,
            match.scale,
            node.meta["attnc_num_kv_heads"],
        )
        count += 1
    if regions:
        log.info("%d attention region(s) with a score function stay hand-written", regions)
    if count:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
    annotate_sdpa(gm)
    gm.recompile()
    return count, candidates


__all__ = ["Candidate", "annotate_sdpa", "canonicalize_attention", "module_name"]
