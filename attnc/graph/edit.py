"""Graph edits shared by passes: rerouting uses, and pruning what no longer reaches the output
(dead nodes, the shape assertions torch.export leaves on them, and the unused weights)."""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

_ASSERT_PREFIXES = ("_assert", "sym_constrain_range")


def _is_assert(node: Node) -> bool:
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", str(node.target))
    return any(p in name for p in _ASSERT_PREFIXES)


def _impure(node: Node) -> bool:
    """Only real side effects keep a dead node: SDPA is tagged nondeterministic (dropout), which
    torch.fx's default treats as impure, so dead attention would never leave the graph."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op != "call_function":
        return False
    if _is_assert(node):
        return True
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


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
        changed |= graph.eliminate_dead_code(is_impure_node=_impure)
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
