"""Residual structure read off the graph as sums: where a sublayer's output joins the stream.

A sublayer (attention or MLP) contributes one *branch* node to a sum of same-shape tensors whose
other leaves are the stream entering the block and, in a parallel-residual block
(`x + attn(ln(x)) + mlp(ln(x))`: GPT-J, GPT-NeoX, Phi, Falcon, Cohere), its sibling branches.
Dropping a sublayer removes its branch from that sum and nothing else. In-place adds (`add_`, as
Falcon's `mlp_output += attention_output` exports) count as adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.fx import Node

from attnc.graph.sites import (
    ADD_OPS,
    PASSTHROUGH_OPS,
    _post_norm_output,
    _shape,
    ancestors,
    is_attention,
    module_path,
)

Style = Literal["pre-norm", "post-norm", "parallel"]

_IDENTITY_OPS = {
    torch.ops.aten.clone.default,
    torch.ops.aten.alias.default,
    torch.ops.aten.contiguous.default,
}
_DROPOUT_OPS = {torch.ops.aten.dropout.default}
_TO_OPS = {torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout, torch.ops.aten._to_copy.default}


def users(node: Node) -> list[Node]:
    return [u for u in node.users if not (u.op == "call_function" and u.target in PASSTHROUGH_OPS)]


def is_sum(node: Node) -> bool:
    """A plain elementwise sum of two same-shape tensors (`add` or in-place `add_`, alpha 1)."""
    if node.op != "call_function" or node.target not in ADD_OPS or len(node.args) < 2:
        return False
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, Node) and isinstance(b, Node)):
        return False
    if node.kwargs.get("alpha", 1) != 1:
        return False
    shp = _shape(node)
    return shp is not None and _shape(a) == shp and _shape(b) == shp


def is_identity(node: Node) -> bool:
    """An op that returns its input unchanged in eval: clone, alias, eval dropout, a same-dtype
    cast. Zeroing a summand commutes with it."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], Node):
        return False
    src = node.args[0]
    if _shape(src) != _shape(node):
        return False
    if node.target in _IDENTITY_OPS:
        return True
    if node.target in _DROPOUT_OPS:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.0)
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False)
        return train is False or p == 0.0
    if node.target in _TO_OPS:
        src_val, val = src.meta.get("val"), node.meta.get("val")
        return (
            isinstance(src_val, torch.Tensor)
            and isinstance(val, torch.Tensor)
            and src_val.dtype == val.dtype
        )
    return False


def other_operand(add: Node, branch: Node) -> Node:
    a, b = add.args[0], add.args[1]
    return b if a is branch else a


def join_of(branch: Node) -> Node | None:
    """The sum that `branch` is an operand of, directly or through identity ops (eval dropout,
    left after a sibling branch was dropped); None when there is not exactly one."""
    return _join(branch)[0]


def _join(branch: Node) -> tuple[Node | None, Node]:
    operand = branch
    while True:
        us = users(operand)
        joins = [u for u in us if is_sum(u) and operand in u.args[:2]]
        if len(joins) == 1:
            return joins[0], operand
        if len(us) == 1 and is_identity(us[0]) and not joins:
            operand = us[0]
            continue
        return None, operand


@dataclass(frozen=True)
class SumTree:
    """A tree of sums and identity ops: `root` is its value, `leaves` what it adds up."""

    root: Node
    leaves: tuple[Node, ...]


def sum_tree(join: Node) -> SumTree:
    """The whole sum `join` belongs to: climb while the value flows into exactly one further sum
    (through identity ops), then collect the leaves below the top. Only sums of the same module
    as `join` count (a block's sum, not a sum inside its MLP such as routed + shared experts)."""
    where = module_path(join)

    def same(n: Node) -> bool:
        return not where or module_path(n) == where

    root = top = join
    while True:
        us = users(top)
        if len(us) != 1 or not same(us[0]):
            break
        u = us[0]
        if is_identity(u):
            top = u
        elif is_sum(u) and top in u.args[:2]:
            root = top = u
        else:
            break
    leaves: list[Node] = []
    stack = [root]
    while stack:
        n = stack.pop()
        inner = n is root or (len(users(n)) == 1 and same(n))
        if inner and is_sum(n):
            stack.extend([n.args[1], n.args[0]])
        elif inner and is_identity(n) and is_sum(n.args[0]):  # dropout between two sums
            stack.append(n.args[0])
        else:
            leaves.append(n)
    return SumTree(root, tuple(leaves))


@dataclass(frozen=True)
class Branch:
    """A sublayer's branch in its block, as the graph stands now."""

    branch: Node  # the sublayer's contribution (a leaf of the sum)
    join: Node  # the sum that adds it
    operand: Node  # the join's operand carrying it: the branch, or an identity op of it
    stream: Node  # the stream entering the block (the sum's leaf the branch is computed from)
    siblings: tuple[Node, ...]  # the other branches of a parallel block
    root: Node  # the block's sum
    style: Style
    out: Node  # the stream after the sublayer: the root, or the norm after it (post-norm)


def resolve_branch(branch: Node, style: Style | None = None) -> Branch | None:
    """Where `branch` joins its block now; `style` forces a block style found earlier (a parallel
    block stays parallel after one branch is dropped)."""
    join, operand = _join(branch)
    if join is None:
        return None
    tree = sum_tree(join)
    others = [leaf for leaf in tree.leaves if leaf is not operand]
    anc = ancestors(branch)
    streams = [leaf for leaf in others if leaf in anc]
    if len(streams) != 1:
        return None
    stream = streams[0]
    # other branches computed from the same stream make the block parallel; a leaf that is not
    # (a constant term) is left where it is
    siblings = tuple(leaf for leaf in others if leaf is not stream and stream in ancestors(leaf))
    if style is None:
        style = "parallel" if siblings else None
    if style is None:
        style = "post-norm" if _post_norm_output(tree.root) is not None else "pre-norm"
    out = tree.root
    if style == "post-norm":
        out = _post_norm_output(tree.root) or tree.root
    return Branch(branch, join, operand, stream, siblings, tree.root, style, out)


def attention_branch(attn: Node, max_steps: int = 200) -> Node | None:
    """The node that carries the attention call's output into the stream: the operand, on the
    attention's side, of the first sum downstream whose other operand is not computed from it."""
    frontier, seen = [attn], {attn}
    for _ in range(max_steps):
        nxt = []
        for n in frontier:
            for u in users(n):
                if u in seen:
                    continue
                seen.add(u)
                if is_sum(u):
                    a, b = u.args[0], u.args[1]
                    for mine, other in ((a, b), (b, a)):
                        if mine in seen and other not in seen and attn not in ancestors(other):
                            return mine
                nxt.append(u)
        frontier = nxt
        if not frontier:
            return None
    return None


def find_attention_branch(attn: Node, max_steps: int = 200) -> Branch | None:
    b = attention_branch(attn, max_steps)
    return resolve_branch(b) if b is not None else None


def has_attention(branch: Node, stream: Node) -> bool:
    """Whether the branch's computation from the stream includes an attention call."""
    return any(is_attention(n) for n in (ancestors(branch) | {branch}) - ancestors(stream))
