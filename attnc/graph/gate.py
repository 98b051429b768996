"""Per-head, per-token gates between an attention call's output and its output projection.

An attention call returns (B, H, S, Dv); the output projection reads it head-major, so a gate
`g` (B, H, S) scaling head h of token t before the projection is the Mixture-of-Head sum
`sum_h g[h, t] H^h_t W_O^h`. Two edits put a gate there:

- `insert_head_gate(gm, attn, gate)`: a plain `out * gate[..., None]` after any attention call
  (any pattern op; standard ops only);
- `fuse_head_gate(gm, attn, gate)`: a dense call becomes `attnc::routed_attention(q, k, v, gate,
  ...)`, whose CUDA kernel skips (head, query block) pairs that no token uses.

`topk_head_gate` builds a routing gate from per-head scores: heads marked always-on plus, per
token, the top scoring others, `k_total` heads in all, each with its own gate value. Every node
these edits add copies the attention node's `nn_module_stack`, gets a fake-tensor `meta["val"]`
(symbolic batch and sequence stay symbolic), and new tensors are buffers read by get_attr.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from attnc.errors import PassError
from attnc.graph.calls import HeadRouted, read_call

aten = torch.ops.aten
ROUTED_OP = "attnc::routed_attention"
_KEEP_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn")




def _fake_mode(vals: list[Any]):
    from torch._guards import detect_fake_mode

    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def add_node(gm: GraphModule, target: Any, args: tuple, kwargs: dict | None = None, *,
             before: Node, like: Node) -> Node:
    """Insert `target(*args, **kwargs)` before `before`, with `like`'s module stack and a fake
    value computed from its inputs' fake values (when the graph carries them)."""
    kwargs = kwargs or {}
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(target, args, kwargs)
    node.meta.update({k: like.meta[k] for k in _KEEP_META if k in like.meta})
    ins = node.all_input_nodes
    if ins and all(isinstance(n.meta.get("val"), torch.Tensor) for n in ins):
        mode = _fake_mode([n.meta["val"] for n in ins])
        if mode is not None:
            fa, fk = map_arg((args, kwargs), lambda n: n.meta["val"])
            with mode, torch.no_grad():
                node.meta["val"] = target(*fa, **fk)
    return node


def add_buffer(gm: GraphModule, name: str, value: torch.Tensor, *, before: Node,
               like: Node) -> Node:
    """Register `value` as a buffer of `gm` (a free name from `name`) and read it before
    `before`."""
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    attr, i = base, 0
    while hasattr(gm, attr):
        i += 1
        attr = f"{base}_{i}"
    gm.register_buffer(attr, value.detach().clone())
    with gm.graph.inserting_before(before):
        get = gm.graph.get_attr(attr)
    get.meta.update({k: like.meta[k] for k in _KEEP_META if k in like.meta})
    mode = _fake_mode([n.meta.get("val") for n in like.all_input_nodes])
    if mode is not None:
        get.meta["val"] = mode.from_tensor(getattr(gm, attr), static_shapes=True)
    return get


def _heads_of(attn: Node) -> int:
    val = attn.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 4:
        raise PassError(f"{attn.name}: a head gate needs a (B, H, S, D) attention output")
    return int(val.shape[1])


def insert_head_gate(gm: GraphModule, attn: Node, gate: Node) -> Node:
    """Every reader of the attention output `attn` (B, H, S, Dv) reads `attn * gate[..., None]`
    instead (`gate` (B, H, S)); returns the gated node. The caller recompiles `gm`."""
    _heads_of(attn)
    after = attn.next
    g = add_node(gm, aten.unsqueeze.default, (gate, -1), before=after, like=attn)  # (B, H, S, 1)
    val = attn.meta.get("val")
    if isinstance(val, torch.Tensor) and isinstance(g.meta.get("val"), torch.Tensor) and (
        g.meta["val"].dtype != val.dtype
    ):
        g = add_node(gm, aten._to_copy.default, (g,), {"dtype": val.dtype}, before=after,
                     like=attn)
    users = list(attn.users)
    out = add_node(gm, aten.mul.Tensor, (attn, g), before=after, like=attn)  # (B, H, S, Dv)
    for u in users:
        u.replace_input_with(attn, out)
    return out


def fuse_head_gate(gm: GraphModule, attn: Node, gate: Node) -> Node:
    """The dense attention call `attn` becomes `attnc::routed_attention` with `gate` (B, H, S)
    fused: same q, k, v, mask, causality and scale. Returns the new node."""
    import attnc.kernels.routed_attention  # noqa: F401  (registers the op)
    from attnc.graph.replace import replace_attention_node

    call = read_call(attn)
    if call is None or call.pattern != "dense" or call.op == "region":
        raise PassError(f"{attn.name} is not a dense attention call; use insert_head_gate")
    return replace_attention_node(gm, attn, torch.ops.attnc.routed_attention.default,
                                  gate=gate)


def topk_head_gate(gm: GraphModule, scores: Node, always_on: torch.Tensor, k_total: int,
                   value: torch.Tensor, *, before: Node, like: Node, dtype: torch.dtype,
                   prefix: str) -> Node:
    """A (B, H, S) gate from router `scores` (B, H, S): per token the `k_total` heads of highest
    score, the `always_on` heads (H,) bool first, each kept head gated by `value[h]` (H,),
    the others 0. Ties at the k-th score keep every tied head."""
    H = int(always_on.numel())
    if not 0 < k_total <= H or int(always_on.sum()) > k_total:
        raise PassError(f"a head gate keeps {k_total} of {H} heads with {int(always_on.sum())} "
                        f"always on")
    bias = torch.where(always_on, float("inf"), 0.0).reshape(1, H, 1)  # (1, H, 1)
    b = add_buffer(gm, f"{prefix}_always_on", bias, before=before, like=like)
    s = add_node(gm, aten._to_copy.default, (scores,), {"dtype": torch.float32}, before=before,
                 like=like)
    s = add_node(gm, aten.add.Tensor, (s, b), before=before, like=like)  # (B, H, S)
    top = add_node(gm, aten.topk.default, (s, k_total, 1), before=before, like=like)
    vals = add_node(gm, operator.getitem, (top, 0), before=before, like=like)  # (B, k, S)
    kth = add_node(gm, aten.slice.Tensor, (vals, 1, k_total - 1, k_total), before=before,
                   like=like)  # (B, 1, S)
    keep = add_node(gm, aten.ge.Tensor, (s, kth), before=before, like=like)  # (B, H, S) bool
    g = add_node(gm, aten._to_copy.default, (keep,), {"dtype": dtype}, before=before, like=like)
    if bool((value != 1).any()):
        v = add_buffer(gm, f"{prefix}_gate_value", value.to(dtype).reshape(1, H, 1),
                       before=before, like=like)
        g = add_node(gm, aten.mul.Tensor, (g, v), before=before, like=like)
    return g


__all__ = ["HeadRouted", "add_buffer", "add_node", "fuse_head_gate", "insert_head_gate",
           "topk_head_gate"]
