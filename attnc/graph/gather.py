"""Sequence-changing edits: keep a subset of token positions after a layer, for every later layer.

`gather_tokens(gm, boundary, keep)` inserts `h' = gather(h, keep)` after the residual-stream node
`h` (B, S, C) and rewires every node that depends on `h`: it reads `h'` (B, S', C), and every tensor
it reads from outside that region with a sequence axis (RoPE cos/sin, position ids, the attention
mask's rows and columns) is gathered at the same kept positions, so kept tokens keep their original
positions; every symbolic size equal to S becomes S'. `keep` (B, S') int64 holds sorted positions.
`live` (B, S'), optional, marks kept slots that are real: a slot that only fills the static count
S' (a padding patch, kept because too few valid ones were left) is masked as a key in every later
attention call, so it changes nothing downstream. The outputs that depended on `h` come out with
S' positions (or the last position only, `last_only`).

The sequence length must be symbolic in the graph (capture with a dynamic sequence axis): that is
how the edit tells a sequence axis from any other, and how the export stays dynamic. The count
S' is an expression of S (S minus a fixed number of dropped tokens), never a data-dependent size.

`Builder` inserts ATen nodes with the module stack of a reference node and a fake `meta["val"]`
computed from the inputs' fake values (tensors and SymInts), so shape metadata stays current.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from attnc.errors import PassError
from attnc.graph.calls import is_attention_op, read_call

aten = torch.ops.aten
_KEEP_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn")
KEEP_META = "attnc_keep_index"  # meta flag on the node holding the kept positions


def _fake_mode(vals: list[Any]):
    from torch._guards import detect_fake_mode

    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


class Builder:
    """Insert nodes before `before`, each with `like`'s module stack and a fake value."""

    def __init__(self, gm: GraphModule, before: Node, like: Node):
        self.gm, self.before, self.like = gm, before, like

    def __call__(self, target: Callable, *args: Any, **kwargs: Any) -> Node:
        with self.gm.graph.inserting_before(self.before):
            node = self.gm.graph.call_function(target, args, kwargs)
        node.meta.update({k: self.like.meta[k] for k in _KEEP_META if k in self.like.meta})
        vals = [n.meta.get("val") for n in node.all_input_nodes]
        if all(v is not None for v in vals):
            mode = _fake_mode(vals)
            fa, fk = map_arg((args, kwargs), lambda n: n.meta["val"])
            if mode is not None:
                with mode, torch.no_grad():
                    node.meta["val"] = target(*fa, **fk)
            else:
                node.meta["val"] = target(*fa, **fk)
        return node

    def size(self, x: Node, dim: int) -> Any:
        """x.shape[dim]: an int when static, else a sym_size node."""
        n = x.meta["val"].shape[dim]
        return n if isinstance(n, int) else self(aten.sym_size.int, x, dim)

    def buffer(self, name: str, value: torch.Tensor) -> Node:
        base = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
        attr, i = base, 0
        while hasattr(self.gm, attr):
            i += 1
            attr = f"{base}_{i}"
        self.gm.register_buffer(attr, value.detach().clone())
        with self.gm.graph.inserting_before(self.before):
            get = self.gm.graph.get_attr(attr)
        phs = self.gm.graph.find_nodes(op="placeholder")
        mode = _fake_mode([n.meta.get("val") for n in phs])
        if mode is not None:
            get.meta["val"] = mode.from_tensor(getattr(self.gm, attr), static_shapes=True)
        return get


def same_size(a: Any, b: Any) -> bool:
    """Two sizes (ints or SymInts) are the same symbol/expression (never equal by value alone:
    a static size equal to S is not a sequence axis)."""
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return False


def gather_dim(b: Builder, x: Node, keep: Node, dim: int) -> Node:
    """x gathered at the kept positions along `dim` (x's batch axis 0 is B or 1)."""
    xv, kv = x.meta["val"], keep.meta["val"]
    if dim == 0:
        raise PassError(f"{x.name}: a sequence axis first (no batch axis) cannot be gathered")
    if not same_size(xv.shape[0], kv.shape[0]) and xv.shape[0] != kv.shape[0]:
        if xv.shape[0] != 1:
            raise PassError(f"{x.name}: batch axis {xv.shape[0]} is neither B nor 1")
        x = b(aten.expand.default, x, [b.size(keep, 0)] + [-1] * (xv.dim() - 1))
    idx = keep  # (B, S')
    for _ in range(dim - 1):
        idx = b(aten.unsqueeze.default, idx, 1)
    for _ in range(xv.dim() - 1 - dim):
        idx = b(aten.unsqueeze.default, idx, -1)
    sizes = [-1 if i in (0, dim) else b.size(x, i) for i in range(xv.dim())]
    if any(s != -1 for s in sizes):
        idx = b(aten.expand.default, idx, sizes)  # (B, .., S', ..) as x with S' at dim
    return b(aten.gather.default, x, dim, idx)


def _region(boundary: Node) -> list[Node]:
    """Every node that depends on `boundary`, in graph order."""
    seen: set[Node] = set()
    todo = list(boundary.users)
    while todo:
        n = todo.pop()
        if n in seen or n.op == "output":
            continue
        seen.add(n)
        todo.extend(n.users)
    return [n for n in boundary.graph.nodes if n in seen]


def _live_mask(b: Builder, mask: Node | None, live: Node, causal: bool, q: Node) -> Node:
    """The attention mask with the dead kept slots masked as keys: (B, 1, S', S') bool."""
    col = b(aten.unsqueeze.default, b(aten.unsqueeze.default, live, 1), 1)  # (B, 1, 1, S')
    if mask is None:
        s = b.size(q, 2)
        ones = b(aten.ones.default, [s, s], dtype=torch.bool)
        mask = b(aten.tril.default, ones) if causal else ones  # (S', S')
    mv = mask.meta["val"]
    if mv.dtype == torch.bool:
        return b(aten.logical_and.default, mask, col)
    return b(aten.masked_fill.Scalar, mask, b(aten.logical_not.default, col), float("-inf"))


def gather_tokens(gm: GraphModule, boundary: Node, keep: Node, live: Node | None = None,
                  *, last_only: bool = False) -> Node:
    """In place: every node depending on `boundary` (B, S, C) now sees only the positions in
    `keep` (B, S') (see the module docstring); returns the gathered stream node. The caller
    prunes and recompiles `gm`."""
    hv = boundary.meta.get("val")
    if not isinstance(hv, torch.Tensor) or hv.dim() != 3:
        raise PassError(f"{boundary.name}: token gathering needs a (B, S, C) stream")
    seq = hv.shape[1]
    if not isinstance(seq, torch.SymInt):
        raise PassError(
            "token gathering needs a dynamic sequence axis (the program was captured with a "
            "static sequence length)"
        )
    region = _region(boundary)
    if keep in region or (live is not None and live in region):
        raise PassError("the kept positions depend on the stream they select from")
    keep.meta[KEEP_META] = True
    first = region[0] if region else next(iter(boundary.users))
    b = Builder(gm, first, boundary)
    h2 = gather_dim(b, boundary, keep, 1)  # (B, S', C)
    new_seq = b(aten.sym_size.int, h2, 1)
    memo: dict[Node, Node] = {boundary: h2}

    def outside(a: Node) -> Node:
        if a in memo:
            return memo[a]
        v = a.meta.get("val")
        out = a
        if isinstance(v, torch.SymInt) and same_size(v, seq):
            out = new_seq
        elif isinstance(v, torch.Tensor) and a.op != "get_attr":
            dims = [d for d, n in enumerate(v.shape) if same_size(n, seq)]
            for d in dims:
                out = gather_dim(b, out, keep, d)
        memo[a] = out
        return out

    live_masks: dict[tuple[Node | None, bool], Node] = {}
    in_region = set(region)
    for n in region:
        b.before, b.like = n, n
        for a in list(n.all_input_nodes):
            if a not in in_region:
                n.replace_input_with(a, outside(a))
        if live is not None and n.op == "call_function" and is_attention_op(n.target):
            _mask_dead(b, n, live, live_masks)
    if last_only:
        _last_only(gm, region, b)
    return h2


def _mask_dead(b: Builder, n: Node, live: Node, memo: dict) -> None:
    call = read_call(n)
    if call is None or call.mask_arg not in (None, "attn_mask"):
        raise PassError(f"{n.name}: cannot mask dead kept tokens in this attention call")
    key = (call.mask, call.is_causal)
    if key not in memo:
        memo[key] = _live_mask(b, call.mask, live, call.is_causal, call.q)
    new = memo[key]
    if call.mask is not None:
        n.replace_input_with(call.mask, new)
    elif len(n.args) > 3:
        n.update_arg(3, new)
    else:
        n.update_kwarg("attn_mask", new)
    if call.is_causal:
        if len(n.args) > 5:
            n.update_arg(5, False)
        n.update_kwarg("is_causal", False)


def _last_only(gm: GraphModule, region: list[Node], b: Builder) -> None:
    """Outputs that came from the gathered region keep only their last position."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    in_region = set(region)

    def last(a: Node) -> Node:
        v = a.meta.get("val")
        if a not in in_region or not isinstance(v, torch.Tensor) or v.dim() < 2:
            return a
        b.before, b.like = out, a
        return b(aten.slice.Tensor, a, 1, -1, 9223372036854775807)  # (B, 1, ...)

    out.args = map_arg(out.args, last)


def node_values(gm: GraphModule, args: tuple, want: list[Node]) -> dict[str, torch.Tensor]:
    """Run `gm` on `args` and return the values of the nodes `want` (by name)."""
    names = {n.name for n in want}
    got: dict[str, torch.Tensor] = {}

    class _Grab(torch.fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            if n.name in names:
                got[n.name] = v
            return v

    with torch.no_grad():
        _Grab(gm).run(*args)
    return got


def kept_positions(gm: GraphModule, args: tuple) -> torch.Tensor:
    """The kept positions (B, S') a gathered graph selects for `args`."""
    node = next((n for n in gm.graph.nodes if n.meta.get(KEEP_META)), None)
    if node is None:
        raise PassError("the program keeps every token (no gather in its graph)")
    return node_values(gm, args, [node])[node.name]


__all__ = ["Builder", "gather_dim", "gather_tokens", "kept_positions", "node_values", "same_size"]
