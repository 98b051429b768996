"""`replace_attention`: swap one attention call for another attention op.

The new call keeps the old one's q, k, v and mask (a pattern op takes the mask as its key
padding mask; the op checks at run time that it masks only keys on the pattern's support), its
causality and scale unless given, the node's `nn_module_stack` and the rest of its meta, and a
fake-tensor `meta["val"]` computed by the op's fake kernel, so the graph re-exports with its
dynamic batch and sequence. Parameters are checked against the op's schema before any edit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from attnc.errors import PassError
from attnc.graph.calls import AttentionCall, is_attention_op, read_call
from attnc.graph.sites import REGION_META, AttentionSite

_Q, _K, _V = ("query", "q"), ("key", "k"), ("value", "v")
_MASKS = ("attn_mask", "key_padding_mask")
_NOT_COPIED = {"val", "tensor_meta", "example_value", REGION_META, "original_aten"}


def replace_attention(program, site: AttentionSite | str | int, op: Any, **params: Any):
    """A copy of `program` (`Program.clone`) whose attention call at `site` (a site, its node
    name or index) runs `op` (an `attnc::` OpOverload, its packet, or "attnc::<name>") with
    `params`; `program` is left as it is. PassError (one line, naming the parameter) when the
    parameters do not fit the op's schema or the call cannot be carried over exactly."""
    from attnc.graph.edit import prune

    out = program.clone()
    replace_attention_node(out.gm, _site_node(out.gm, site), op, **params)
    prune(out.gm)  # what only the old call read (a block layout) leaves; lints, recompiles
    return out


def replace_attention_node(gm: GraphModule, node: Node, op: Any, **params: Any) -> Node:
    """In place: the attention call at `node` becomes a call of `op`; returns the new node.
    The caller lints and recompiles `gm` once after its edits (or runs `edit.prune`)."""
    op = _resolve(op)
    name = op._schema.name
    call = read_call(node)
    if call is None:
        raise PassError(f"{node.name} is not an attention call")
    _refuse(node, call, name)
    vals = _bind(call, op, params)
    graph = gm.graph
    new = None
    added: list[Node] = []  # get_attr nodes of tensor parameters, taken out again on failure
    try:
        for key, value in params.items():
            if isinstance(value, torch.Tensor):
                vals[key] = _tensor_param(gm, node, key, value, added)
        args, kwargs = _layout(op, vals)
        with graph.inserting_after(node):
            new = graph.call_function(op, args, kwargs)
        new.meta.update({k: v for k, v in node.meta.items() if k not in _NOT_COPIED})
        val = _fake_value(op, args, kwargs)
        if val is not None:
            new.meta["val"] = val
        got = read_call(new)
        # a causal call stays causal: by the new op's flag, or by the full mask it carries
        if call.causal and not (got.is_causal or (got.mask_arg == "attn_mask" and got.causal_mask)):
            raise PassError(
                f"{call.node} is causal; {name} with is_causal={vals.get('is_causal')} would "
                f"see later keys"
            )
    except Exception:
        for n in ([new] if new is not None else []) + added:
            graph.erase_node(n)
            if n.op == "get_attr":
                delattr(gm, n.target)
        raise
    node.replace_all_uses_with(new, propagate_meta=False)
    graph.erase_node(node)
    return new


def _site_node(gm: GraphModule, site: AttentionSite | str | int) -> Node:
    if isinstance(site, int):
        from attnc.graph.sites import find_sites

        sites = find_sites(gm)
        if not 0 <= site < len(sites):
            raise PassError(f"no attention site {site}: the program has {len(sites)}")
        site = sites[site]
    want = site.node if isinstance(site, AttentionSite) else str(site)
    node = next((n for n in gm.graph.nodes if n.name == want), None)
    if node is None:
        raise PassError(f"no attention site {want!r} in the program's graph")
    return node


def _resolve(op: Any):
    if isinstance(op, str):
        ns, _, base = op.partition("::") if "::" in op else ("attnc", "", op)
        packet = getattr(getattr(torch.ops, ns), base, None)
        if packet is None:
            raise PassError(f"no op {op!r} is registered", "import attnc.kernels first")
        op = packet
    if isinstance(op, torch._ops.OpOverloadPacket):
        op = op.default
    if not isinstance(op, torch._ops.OpOverload):
        raise PassError(f"{op!r} is not a torch op")
    if not is_attention_op(op):
        raise PassError(f"{op._schema.name} is not an attention op attnc can read")
    rets = op._schema.returns
    if len(rets) != 1 or not isinstance(rets[0].type, torch._C.TensorType):
        raise PassError(f"{op._schema.name} does not return one tensor, as attention does")
    return op


def _refuse(node: Node, call: AttentionCall, name: str) -> None:
    if call.op == "region":
        raise PassError(
            f"{call.node} is hand-written attention with a {call.score} score; {name} would drop it"
        )
    if call.dropout_p:
        raise PassError(f"{call.node} has dropout {call.dropout_p}, which {name} does not do")
    if len(node.target._schema.returns) != 1:
        raise PassError(f"{call.node} returns more than attention's output ({call.op})")


def _bind(call: AttentionCall, op, params: dict) -> dict:
    """The new op's arguments by name: the call's q, k, v, mask, causality, scale and GQA flag,
    then `params`, each checked against the schema and the op's own checks (a tensor parameter
    stays a tensor here; the caller puts it in the graph)."""
    schema = op._schema
    name = schema.name
    by_name = {a.name: a for a in schema.arguments}
    roles = {}
    for role, names in (("q", _Q), ("k", _K), ("v", _V)):
        arg = next((n for n in names if n in by_name), None)
        if arg is None:
            raise PassError(f"{name} has no {names[0]} argument")
        roles[arg] = getattr(call, role)
    mask_arg = next((m for m in _MASKS if m in by_name), None)
    for key in params:
        if key not in by_name:
            raise PassError(
                f"{name} has no parameter {key!r} (it takes {', '.join(by_name)})"
            )
        if key in roles or key == mask_arg:
            raise PassError(f"{key!r} cannot be set: the call keeps the site's q, k, v and mask")
    vals: dict[str, Any] = dict(roles)
    if call.mask is not None:
        if mask_arg is None:
            raise PassError(f"{call.node} has a {call.mask_kind} mask, which {name} cannot take")
        if call.score != "none" and mask_arg != "attn_mask":
            raise PassError(
                f"{call.node} adds a {call.score} score in its mask, which {name} would drop"
            )
        val = call.mask.meta.get("val")
        rank = val.dim() if isinstance(val, torch.Tensor) else None
        if mask_arg != call.mask_arg and rank == 2:  # (Sq, Skv) for SDPA, (B, Skv) for the rest
            raise PassError(f"{call.node}'s 2-D {call.mask_arg} would be read differently as "
                            f"{name}'s {mask_arg}")
        vals[mask_arg] = call.mask
    full_mask = mask_arg == "attn_mask" and call.mask is not None
    causal = call.is_causal if full_mask else call.causal  # a full mask keeps its own causality
    if full_mask and call.mask_arg == "key_padding_mask" and call.is_causal:
        if not call.causal_mask:
            raise PassError(f"{call.node}: {name} cannot take both a causal flag and its mask")
        causal = False  # the mask itself is causal (capture's mask analysis)
    inherit = {"is_causal": causal, "scale": call.scale_arg, "enable_gqa": call.enable_gqa}
    for key, value in inherit.items():
        if key in by_name and key not in params:
            a = by_name[key]
            if isinstance(a.type, torch._C.ListType):  # one flag per grid axis
                value = [bool(value)] * len(params.get("grid") or [None])
            vals[key] = value
    for key, value in params.items():
        vals[key] = _param(name, by_name[key], value)
    for a in schema.arguments:
        if a.name not in vals and not a.has_default_value():
            raise PassError(f"{name} needs the parameter {a.name!r} ({a.type})")
    _check_op(name, vals, call)
    return vals


def _param(op_name_: str, arg, value: Any) -> Any:
    if isinstance(value, tuple):
        value = list(value)
    if not _fits(arg.type, value):
        shown = f"a tensor {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
        raise PassError(f"{op_name_}: {arg.name}={shown} does not fit its type {arg.type}")
    return value


def _tensor_param(gm: GraphModule, node: Node, key: str, value: torch.Tensor, added: list) -> Node:
    """A tensor parameter (a block layout) as a buffer of `gm`, read by a get_attr node."""
    base = f"attnc_{key}_{node.name}"
    attr, i = base, 0
    while hasattr(gm, attr):
        i += 1
        attr = f"{base}_{i}"
    gm.register_buffer(attr, value.detach().clone())
    with gm.graph.inserting_before(node):
        get = gm.graph.get_attr(attr)
    added.append(get)
    mode = _fake_mode(node)
    if mode is not None:
        get.meta["val"] = mode.from_tensor(getattr(gm, attr), static_shapes=True)
    return get


def _fits(t, value: Any) -> bool:
    """Whether `value` is of schema type `t` (a graph node fits a tensor)."""
    C = torch._C
    if isinstance(t, C.OptionalType):
        return value is None or _fits(t.getElementType(), value)
    if isinstance(t, C.ListType):
        return isinstance(value, (list, tuple)) and all(_fits(t.getElementType(), x) for x in value)
    if isinstance(t, C.TensorType):
        return isinstance(value, (torch.Tensor, Node))
    if isinstance(t, C.BoolType):
        return isinstance(value, bool)
    if isinstance(t, (C.IntType, C.SymIntType)):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(t, C.FloatType):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


def _hint(x: Any) -> int | None:
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        return x.node.hint
    return None


def _check_op(name: str, vals: dict, call: AttentionCall) -> None:
    """The op's own argument checks (`attnc.kernels`), at the example lengths."""
    import attnc.kernels.block_sparse as bs
    import attnc.kernels.neighborhood as na
    import attnc.kernels.sliding_window as sw

    qv, kv = call.q.meta.get("val"), call.k.meta.get("val")
    sq = _hint(qv.shape[-2]) if isinstance(qv, torch.Tensor) else None
    skv = _hint(kv.shape[-2]) if isinstance(kv, torch.Tensor) else None
    reason = None
    if name == "attnc::sliding_window_attention":
        reason = sw.can_use_sliding_window(
            vals["window"], vals.get("num_sinks", 0), vals.get("head_windows"), call.num_heads
        )
    elif name == "attnc::neighborhood_attention" and sq is not None:
        n = len(vals["grid"])
        reason = na.can_use_neighborhood(
            sq, vals["grid"], vals["kernel_size"], vals["dilation"], vals["stride"],
            vals["is_causal"], vals.get("num_global", 0), vals.get("head_kernel_size"),
            call.num_heads,
        )
        if reason is None and any(len(vals[k]) != n for k in ("kernel_size", "dilation",
                                                                 "stride", "is_causal")):
            reason = f"grid has {n} axes; kernel_size, dilation, stride, is_causal need {n} each"
    elif name == "attnc::block_sparse_attention" and sq is not None and skv is not None:
        layout = vals["layout"]
        t = layout.meta.get("val") if isinstance(layout, Node) else layout
        if isinstance(t, torch.Tensor):
            reason = bs.can_use_block_sparse(t, vals["block_size"], sq, skv)
    if reason is not None:
        raise PassError(f"{name}: {reason}")


def _layout(op, vals: dict) -> tuple[tuple, dict]:
    """Positional args up to the last one that is set (as torch.export writes calls), kwargs
    for keyword-only ones that differ from their default."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    pos = [a for a in op._schema.arguments if not a.kwarg_only]
    last = max((i for i, a in enumerate(pos) if a.name in vals and not _is_default(a, vals)),
               default=-1)
    for a in pos[: last + 1]:
        args.append(vals.get(a.name, a.default_value))
    for a in op._schema.arguments:
        if a.kwarg_only and a.name in vals and not _is_default(a, vals):
            kwargs[a.name] = vals[a.name]
    return tuple(args), kwargs


def _is_default(a, vals: dict) -> bool:
    v = vals[a.name]
    return a.has_default_value() and not isinstance(v, Node) and v == a.default_value and (
        type(v) is type(a.default_value) or v is None
    )


def _fake_mode(node: Node):
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in node.all_input_nodes]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def _fake_value(op, args: tuple, kwargs: dict):
    """The op's output on the inputs' fake tensors (its `register_fake` kernel), or None when
    the graph carries no fake values."""
    nodes: list[Node] = []
    map_arg((args, kwargs), lambda n: nodes.append(n) or n)
    if not all(isinstance(n.meta.get("val"), torch.Tensor) for n in nodes):
        return None
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([n.meta["val"] for n in nodes])
    if mode is None:
        return None
    fa, fk = map_arg((args, kwargs), lambda n: n.meta["val"])
    with mode, torch.no_grad():
        return op(*fa, **fk)


__all__ = ["replace_attention", "replace_attention_node"]
