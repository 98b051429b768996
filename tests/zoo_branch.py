"""The graph side of the zoo's llm-drop check (tests/zoo_triage.py): parameter names as Hugging
Face paths, and the weights only one attention site's branch uses, found from the graph
independently of attnc's own residual analysis."""

from __future__ import annotations


def _hf_path(param: str) -> str:
    return param[len("model.") :] if param.startswith("model.") else param  # the output adapter


def _params(gm) -> set[str]:
    return {_hf_path(n) for n, _ in gm.named_parameters(remove_duplicate=False)}


def _node_module(program, node_name: str | None) -> str | None:
    from attnc.graph.sites import module_path

    if node_name is None:
        return None
    node = next((n for n in program.gm.graph.nodes if n.name == node_name), None)
    return module_path(node) if node is not None else None


_ADDS = {"add", "add_", "iadd"}


def _is_add(node) -> bool:
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    return node.op == "call_function" and name in _ADDS and len(node.all_input_nodes) == 2


def _is_assert(node) -> bool:  # torch.export's metadata checks are no use of a weight
    return "_assert" in getattr(node.target, "__name__", str(node.target))


def _ancestors(node) -> set:
    seen, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _branch_params(gm, site) -> set[str]:
    """The weights only the site's attention branch uses, found from the graph independently of
    attnc's own residual analysis: the branch runs from the stream to the first add after the
    site's output projection whose other operand is the stream (it derives from an input, not
    from the attention); a weight is the branch's own when everything computed from it reaches
    the output only through that add's branch operand (so a norm shared with a parallel MLP, or a
    bias table shared across layers, is not)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    sdpa = nodes[site.node]
    start = nodes.get(site.o_proj) if site.o_proj else sdpa
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    desc, todo = {start}, [start]
    residual = None
    while todo and residual is None:
        todo.sort(key=order.__getitem__)
        node = todo.pop(0)
        for user in sorted(node.users, key=order.__getitem__):
            if user in desc:
                continue
            if _is_add(user):
                other = next(a for a in user.all_input_nodes if a is not node)
                anc = _ancestors(other)
                if sdpa not in anc and other is not sdpa and any(
                    a.op == "placeholder" for a in anc | {other}
                ):
                    residual = (node, other)
                    break
            desc.add(user)
            todo.append(user)
    if residual is None:
        return set()
    branch_out, stream = residual
    add = next(u for u in branch_out.users if _is_add(u) and stream in u.all_input_nodes)
    branch = (_ancestors(branch_out) | {branch_out}) - _ancestors(stream) - {stream}
    own: set = set()  # branch nodes whose every use flows into the residual add via the branch
    for n in reversed([n for n in gm.graph.nodes if n in branch]):
        users = [u for u in n.users if not _is_assert(u)]
        if all(u in own or (u is add and n is branch_out) for u in users):
            own.add(n)
    uses: dict[str, bool] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            uses[n.target] = uses.get(n.target, True) and n in own
    params = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    return {_hf_path(t) for t, only in uses.items() if only and t in params}
