"""Graph edits shared by passes: rerouting uses, and pruning what no longer reaches the output
(dead nodes, the shape assertions torch.export leaves on them, and the unused weights)."""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

_ASSERT_PREFIXES = ("_assert", "sym_constrain_range")


def _is_assert(node: Node) -> bool:
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", str(node.target))
    return any(p in name for p in _ASSERT_PREFIXES)


def _impure(node: Node, order: dict[Node, int] | None = None) -> bool:
    """Only real side effects keep a dead node: SDPA is tagged nondeterministic (dropout), which
    torch.fx's default treats as impure, so dead attention would never leave the graph."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op != "call_function":
        return False
    if _is_assert(node):
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return False
    return order is None or not _local_mutation(node, order)


def _written(node: Node) -> list:
    """The arguments an in-place/out op writes into (schema `Tensor(a!)`)."""
    schema = node.target._schema
    out = []
    for i, arg in enumerate(schema.arguments):
        val = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if arg.alias_info is not None and arg.alias_info.is_write:
            out.append(val)
    return out


def _fresh(node) -> bool:
    """A tensor an op computed or allocated (not a view of another, not an input or weight)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    if node.target is operator.getitem:  # one output of a multi-output op (topk's values)
        return _fresh(node.args[0])
    schema = getattr(node.target, "_schema", None)
    if schema is None or node.target == torch.ops.aten.add_.Tensor:
        return False
    return all(r.alias_info is None for r in schema.returns)


def _local_mutation(node: Node, order: dict[Node, int]) -> bool:
    """An unused in-place op whose writes land only in fresh tensors that nothing reads after it
    but other such writes (MoE routing's `index_put_` into an `empty_like`, `div_` of top-k
    weights, once the MoE output is dead): no observable effect, so it goes with the dead code."""
    if node.users:
        return False
    at = order.get(node, -1)
    written = _written(node)
    return bool(written) and all(
        _fresh(w)
        and all(u is node or order.get(u, -1) < at or _writes_only(u, w) for u in w.users)
        for w in written
    )


def _writes_only(user: Node, target: Node) -> bool:
    schema = getattr(user.target, "_schema", None)
    return (
        user.op == "call_function"
        and schema is not None
        and schema.is_mutable
        and not user.users
        and target in _written(user)
    )


def prune(gm: GraphModule) -> int:
    """Remove dead code, assertions that only guard dead values, and unused parameters/buffers.
    Returns the number of parameters and buffers deleted."""
    graph = gm.graph
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if not _is_assert(node) or not node.all_input_nodes:
                continue
            data = [a for a in node.all_input_nodes if a.op != "placeholder"]
            if data and all(len(a.users) == 1 for a in data):
                graph.erase_node(node)
                changed = True
        order = {n: i for i, n in enumerate(graph.nodes)}
        changed |= graph.eliminate_dead_code(is_impure_node=lambda n, o=order: _impure(n, o))
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    removed = 0
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(
        gm.named_buffers(remove_duplicate=False)
    ):
        if name in used:
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if hasattr(owner, attr):
            delattr(owner, attr)
            removed += 1
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
    return removed


def reroute(gm: GraphModule, old: Node, new: Node) -> None:
    """Every use of `old` reads `new` instead (old then dies unless something else holds it)."""
    old.replace_all_uses_with(new, propagate_meta=False)


def param_count(gm: torch.nn.Module) -> int:
    return sum(p.numel() for p in gm.parameters())


# ----------------------------------------------------------------------------------------------
# dropping a sublayer: take its branch out of the residual sum, then check what left the graph

INPLACE_ADD = torch.ops.aten.add_.Tensor


def tensor_names(gm: GraphModule) -> dict[str, tuple[int, bool]]:
    """Every parameter and buffer: name -> (elements, is a parameter)."""
    out = {n: (p.numel(), True) for n, p in gm.named_parameters(remove_duplicate=False)}
    out.update({n: (b.numel(), False) for n, b in gm.named_buffers(remove_duplicate=False)})
    return out


def _order(gm: GraphModule) -> dict[Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def _later_users(gm: GraphModule, node: Node, after: Node) -> list[Node]:
    order = _order(gm)
    return [u for u in node.users if u is not after and order[u] > order[after]]


def drop_summand(gm: GraphModule, join: Node, branch: Node) -> Node:
    """Take `branch` out of the sum `join`: every use of the sum reads the other operand, and the
    sum leaves the graph. An in-place `add_(x, y)` mutated x: if x is the branch, the later
    readers of x read the other operand; if x stays, they read it unchanged. Returns the operand
    that takes the sum's place."""
    from attnc.errors import PassError

    a, b = join.args[0], join.args[1]
    keep = b if a is branch else a
    if join.target == INPLACE_ADD:
        if a.op in ("placeholder", "get_attr"):
            raise PassError(f"llm-drop: the sum {join.name} writes into a model input or weight")
        if a is branch:
            for u in _later_users(gm, a, join):
                u.replace_input_with(a, keep)
    join.replace_all_uses_with(keep, propagate_meta=False)
    gm.graph.erase_node(join)
    return keep


def drop_span(gm: GraphModule, out: Node, stream: Node, inner: list[Node]) -> None:
    """Everything between `stream` and `out` leaves: uses of `out` read `stream`. The now unused
    nodes of `inner` (in graph order) go at once, in-place sums included, so that no sum keeps
    mutating what it wrote into."""
    out.replace_all_uses_with(stream, propagate_meta=False)
    for n in reversed(inner):
        if n is stream or n.op != "call_function" or any(not _is_assert(u) for u in n.users):
            continue
        if _impure(n) and n.target != INPLACE_ADD:
            continue
        for u in list(n.users):
            gm.graph.erase_node(u)
        gm.graph.erase_node(n)


def dying_tensors(
    gm: GraphModule, killed: Node, kept: Node, moved: frozenset[Node] = frozenset()
) -> set[str]:
    """The parameters/buffers that leave the graph when nothing reads `killed` any more and
    `kept` takes its place (`moved`: readers of killed's in-place target that move to `kept`)."""
    dead = {killed}

    def mutable(n: Node) -> bool:
        schema = getattr(n.target, "_schema", None)
        return n.op == "call_function" and schema is not None and schema.is_mutable

    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def unobserved(w, writer: Node) -> bool:  # a fresh tensor no live node reads after `writer`
        return _fresh(w) and all(
            r in dead or order[r] < order[writer] or (mutable(r) and w in _written(r))
            for r in w.users
            if not _is_assert(r)
        )

    changed = True
    while changed:
        changed = False
        for n in reversed(list(gm.graph.nodes)):
            if n in dead or n is kept or n.op in ("placeholder", "output") or _is_assert(n):
                continue
            if not all(u in dead for u in n.users if not _is_assert(u) and u not in moved):
                continue
            if (
                mutable(n)
                and n.target != INPLACE_ADD
                and not all(unobserved(w, n) for w in _written(n))
            ):
                continue
            dead.add(n)
            changed = True
    names = tensor_names(gm)
    live = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n not in dead}
    return {
        n.target
        for n in dead
        if n.op == "get_attr" and n.target in names and n.target not in live
    }
