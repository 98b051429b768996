"""Droppable sublayers (attention, MLP, whole block) read off the residual sums of the graph.

A sublayer is keyed by its place in the graph, not by a module path alone: its attention call
(`nn_module_stack` numbers the calls of a module whose weights several calls share, as ALBERT's
one layer run N times) and, in a decoder layer with self- and cross-attention, which of the two it
is. Keys stay readable: `attention@model.layers.3`, `attention@decoder.layers.0.encoder_attn`,
`mlp@encoder.albert_layer_groups.0.albert_layers.0#2` (the third call of a shared layer).

A sublayer records branch *node names*, not nodes: names survive `Program.clone` and other drops,
so the same record resolves on a partly dropped graph (`attnc.graph.residual.resolve_branch`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from torch.fx import GraphModule, Node

from attnc.graph.residual import (
    Branch,
    Style,
    attention_branch,
    has_attention,
    resolve_branch,
)
from attnc.graph.sites import (
    _is_norm,
    _walk_back_linear,
    ancestors,
    attention_args,
    find_mlp_residual,
    is_attention,
    layer_index,
    module_path,
)

Kind = Literal["attention", "mlp", "block"]


@dataclass(frozen=True)
class Sublayer:
    key: str
    kind: Kind
    layer: int | None
    block: str  # the block's module path (selectors match it)
    branches: tuple[str, ...]  # the branch node(s) it contributes to the stream
    stream: str  # the stream entering it, when found
    out: str  # the stream leaving it, when found
    style: Style
    modules: tuple[str, ...]  # module paths whose parameters it owns ("" = unknown)
    calls: tuple[str, ...] = field(default=())  # the attention call nodes inside it


def block_name(path: str) -> str:
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    return path


def call_index(node: Node) -> int:
    """Which call of its module this node belongs to (torch.export numbers repeat calls `@N`)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return 0
    m = re.search(r"@(\d+)$", list(stack.keys())[-1])
    return int(m.group(1)) if m else 0


def common_module(paths) -> str:
    split = [p.split(".") for p in paths if p]
    if not split:
        return ""
    out = []
    for parts in zip(*split, strict=False):
        if any(p != parts[0] for p in parts):
            break
        out.append(parts[0])
    return ".".join(out)


def _projection(attn: Node, arg: str) -> Node | None:
    x = attention_args(attn).get(arg)
    return _walk_back_linear(x) if isinstance(x, Node) else None


def _is_cross(attn: Node) -> bool:
    q_lin, k_lin = _projection(attn, "query"), _projection(attn, "key")
    if q_lin is None or k_lin is None:
        return False
    return q_lin.all_input_nodes[:1] != k_lin.all_input_nodes[:1]


def _region(branch: Node, stream: Node) -> set[Node]:
    return (ancestors(branch) | {branch}) - ancestors(stream) - {stream}


def _weighted(n: Node) -> bool:
    return n.op == "call_function" and any(a.op == "get_attr" for a in n.all_input_nodes)


def _mlp_module(branch: Node, stream: Node, block: str) -> str:
    """The module holding the MLP's weights: the common path of the weighted ops of its branch
    (norms apart)."""
    return common_module(
        module_path(n)
        for n in _region(branch, stream)
        if _weighted(n) and not _is_norm(n) and module_path(n).startswith(block)
    )


def _attention_module(attn: Node, branch: Node) -> str:
    """The module holding the attention's weights: the common path of the call, its query
    projection and its output projection."""
    q_lin = _projection(attn, "query")
    o_lin = _walk_back_linear(branch)
    return common_module(
        [module_path(attn)] + [module_path(n) for n in (q_lin, o_lin) if n is not None]
    )


@dataclass
class _Block:
    stream: Node
    style: Style
    attn: list[tuple[Node, Branch]] = field(default_factory=list)
    mlps: list[Branch] = field(default_factory=list)
    out: Node | None = None


def _blocks(gm: GraphModule) -> list[_Block]:
    blocks: list[_Block] = []
    by_root: dict[Node, _Block] = {}
    open_block: _Block | None = None
    for node in gm.graph.nodes:
        if not is_attention(node):
            continue
        b = attention_branch(node)
        br = resolve_branch(b) if b is not None else None
        if br is None:
            continue
        if br.style == "parallel":
            blk = by_root.get(br.root)
            if blk is None:
                blk = by_root[br.root] = _Block(br.stream, "parallel", out=br.root)
                blocks.append(blk)
                for sib in br.siblings:
                    if not has_attention(sib, br.stream):
                        mb = resolve_branch(sib, "parallel")
                        if mb is not None:
                            blk.mlps.append(mb)
            blk.attn.append((node, br))
            open_block = None
            continue
        if open_block is None or open_block.out is not br.stream:
            open_block = _Block(br.stream, br.style)
            blocks.append(open_block)
        open_block.attn.append((node, br))
        open_block.out = br.out
        mres = find_mlp_residual(br.out, br.style)
        mb = resolve_branch(mres.branch, br.style) if mres is not None else None
        if mb is not None:
            open_block.mlps.append(mb)
            open_block.out = mb.out
            open_block = None
    return blocks


def find_sublayers(gm: GraphModule) -> list[Sublayer]:
    """Every attention call's sublayer, the MLP(s) of its block and the block, in graph order."""
    out: list[Sublayer] = []
    for blk in _blocks(gm):
        first = blk.attn[0][0]
        path0 = module_path(first)
        bname = block_name(path0)
        layer = layer_index(path0)
        suffix = f"#{call_index(first)}" if call_index(first) else ""
        for node, br in blk.attn:
            path = module_path(node)
            base = path if _is_cross(node) else block_name(path)
            c = call_index(node)
            mod = _attention_module(node, br.branch)
            out.append(
                Sublayer(
                    f"attention@{base}" + (f"#{c}" if c else ""),
                    "attention",
                    layer_index(path),
                    block_name(path),
                    (br.branch.name,),
                    br.stream.name,
                    br.out.name,
                    br.style,
                    (mod,),
                    (node.name,),
                )
            )
        for i, mb in enumerate(blk.mlps):
            tag = f".{i}" if len(blk.mlps) > 1 else ""
            out.append(
                Sublayer(
                    f"mlp{tag}@{bname}{suffix}",
                    "mlp",
                    layer,
                    bname,
                    (mb.branch.name,),
                    mb.stream.name,
                    mb.out.name,
                    blk.style,
                    (_mlp_module(mb.branch, mb.stream, bname),),
                )
            )
        if blk.mlps and blk.out is not None:
            branches = tuple(br.branch.name for _, br in blk.attn) + tuple(
                mb.branch.name for mb in blk.mlps
            )
            mods = tuple(s.modules[0] for s in out[-len(blk.attn) - len(blk.mlps) :])
            out.append(
                Sublayer(
                    f"block@{bname}{suffix}",
                    "block",
                    layer,
                    bname,
                    branches,
                    blk.stream.name,
                    blk.out.name,
                    blk.style,
                    mods,
                    tuple(n.name for n, _ in blk.attn),
                )
            )
    return _unique(out)


def _unique(subs: list[Sublayer]) -> list[Sublayer]:
    """Keys that still collide (two self-attention modules in one block) take their attention
    call's node name (`attention@model.layers.0~scaled_dot_product_attention_1`)."""
    from dataclasses import replace

    seen: dict[str, int] = {}
    for s in subs:
        seen[s.key] = seen.get(s.key, 0) + 1
    fixed = []
    for s in subs:
        if seen[s.key] > 1 and s.calls:
            s = replace(s, key=f"{s.key}~{s.calls[0]}")
        fixed.append(s)
    keys = [s.key for s in fixed]
    if len(set(keys)) != len(keys):
        fixed = [replace(s, key=f"{s.key}~{s.branches[0]}") for s in fixed]
    return fixed


# ----------------------------------------------------------------------------------------------
# dropping one sublayer, checked against the parameters it owns


@dataclass(frozen=True)
class Removal:
    """What one drop took out of the graph."""

    key: str
    params: int  # parameter elements removed
    tensors: int  # parameter tensors removed
    modules: tuple[str, ...]  # module paths of the removed parameters
    buffers: tuple[str, ...] = ()

    def metrics(self) -> dict:
        return {
            "removed_params": self.params,
            "removed_tensors": self.tensors,
            "removed_modules": list(self.modules),
        }


def _clean_name(name: str) -> str:
    return name[len("model.") :] if name.startswith("model.") else name


def _owner(name: str) -> str:
    return _clean_name(name).rpartition(".")[0]


def resolve(gm: GraphModule, sub: Sublayer) -> tuple[Node, Node, list[Branch]] | None:
    """(stream in, stream out, live branches) of `sub` as the graph stands now; None when it is
    no longer there."""
    nodes = {n.name: n for n in gm.graph.nodes}
    live = [nodes[b] for b in sub.branches if b in nodes]
    brs = [resolve_branch(b, sub.style) for b in live]
    brs = [b for b in brs if b is not None]
    if not brs or (sub.kind != "block" and len(brs) != 1):
        return None
    if sub.kind == "block":
        out = nodes.get(sub.out)
        if out is None:
            return None
        return brs[0].stream, out, brs
    return brs[0].stream, brs[0].out, brs


def drop_sublayer(gm: GraphModule, sub: Sublayer) -> Removal:
    """Remove `sub` from `gm` (then prune), and check the result: exactly the parameters only its
    branch used left (its own norm too; weights it shares with other calls stay), every node that
    left was computed between the stream and its branch (never a sibling branch or the block's
    shared norm), and exactly its attention calls went. A mismatch is a PassError."""
    from attnc.errors import PassError
    from attnc.graph.edit import (
        INPLACE_ADD,
        drop_span,
        drop_summand,
        dying_tensors,
        prune,
        tensor_names,
    )

    where = resolve(gm, sub)
    if where is None:
        raise PassError(f"llm-drop: sublayer {sub.key!r} is no longer in the graph")
    stream, out, brs = where
    calls_before = {n.name for n in gm.graph.nodes if is_attention(n)}
    before = tensor_names(gm)
    nodes_before = {n.name for n in gm.graph.nodes}
    if sub.kind == "block":
        inner = sorted((ancestors(out) | {out}) - ancestors(stream) - {stream}, key=_order_key(gm))
        region = {n.name for n in inner}
        expected = dying_tensors(gm, out, stream)
        drop_span(gm, out, stream, inner)
    else:
        br = brs[0]
        join, branch = br.join, br.operand
        own = (ancestors(branch) | {branch, join}) - ancestors(stream) - {stream}
        region = {n.name for n in own}
        keep = join.args[1] if join.args[0] is branch else join.args[0]
        moved: frozenset[Node] = frozenset()
        if join.target == INPLACE_ADD and join.args[0] is branch:
            order = _order_key(gm)
            moved = frozenset(u for u in branch.users if order(u) > order(join))
        expected = dying_tensors(gm, join, keep, moved)
        drop_summand(gm, join, branch)
    prune(gm)
    after = tensor_names(gm)
    removed = set(before) - set(after)
    gone_calls = calls_before - {n.name for n in gm.graph.nodes if is_attention(n)}
    problems = []
    if removed != expected:
        problems.append(
            f"removed {sorted(removed ^ expected)[:4]} differently from what only it used"
        )
    if gone_calls != set(sub.calls):
        problems.append(f"removed attention calls {sorted(gone_calls)}, expected {sub.calls}")
    # everything that left must have been computed between the stream and the sublayer's
    # branch: the old edit of a parallel block took the sibling MLP and the shared norm too
    left = {n.name for n in gm.graph.nodes}
    stray = sorted(
        n for n in nodes_before - left - region if not n.startswith(("_assert", "sym_constrain"))
    )
    if stray:
        problems.append(f"removed nodes outside the sublayer's branch: {stray[:4]}")
    if not removed and sub.kind != "block" and any(before[n][1] for n in expected):
        problems.append("removed nothing")
    if problems:
        raise PassError(
            f"llm-drop: dropping {sub.key!r} did not remove exactly its own sublayer: "
            + "; ".join(problems),
            "report this model; attnc refuses a drop it cannot check",
        )
    params = [n for n in sorted(removed) if before[n][1]]
    return Removal(
        sub.key,
        sum(before[n][0] for n in params),
        len(params),
        tuple(sorted({_owner(n) for n in params})),
        tuple(sorted(n for n in removed if not before[n][1])),
    )


def _order_key(gm: GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: order.get(n, -1)
