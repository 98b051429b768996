"""Attention sites and the residual structure around them, read off the ATen graph.

A site is one attention op (SDPA or an `attnc::` op). Around it we find the residual add that
brings its output back into the stream, the norm before it (pre-norm) or after the add
(post-norm), and likewise the MLP sublayer that follows. Block style is read from the graph,
never from the model's name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch.fx import GraphModule, Node

if TYPE_CHECKING:
    from attnc.graph.calls import Pattern

SDPA = torch.ops.aten.scaled_dot_product_attention.default
ADD_OPS = {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
NORM_OPS = {torch.ops.aten.layer_norm.default, torch.ops.aten.rms_norm.default}
PASSTHROUGH_OPS = {
    torch.ops.aten._assert_tensor_metadata.default,
}

# "additive-bias": a learned or relative-position bias in the mask; "alibi": a per-head linear
# bias; "soft-cap": tanh(s / c) * c (an attention region, not SDPA); "other": another score
# function (a region)
ScoreKind = Literal["none", "additive-bias", "alibi", "soft-cap", "other"]
# on the P@V node of hand-written attention that cannot become SDPA (attnc.capture.regions)
REGION_META = "attnc_attention_region"


@dataclass(frozen=True)
class AttentionSite:
    index: int
    layer: int | None
    module: str
    node: str
    kind: Literal["self", "cross"]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    mask: Literal["none", "bool", "float"]
    scale: float
    window: int | None
    pattern: Pattern | str  # calls.Pattern (name + parameters); equals its name
    q_proj: str | None
    k_proj: str | None
    v_proj: str | None
    o_proj: str | None
    residual_add: str | None
    norm: str | None
    block_style: Literal["pre-norm", "post-norm", "parallel", "unknown"]
    score: ScoreKind = "none"  # the score function: what is added to or applied on q·kᵀ
    softcap: float | None = None  # c of a soft-cap score tanh(s / c) * c

    def row(self) -> dict:
        """The site as plain values (the pattern as text: `sliding_window(window=64, ...)`)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["pattern"] = str(self.pattern)
        return out


def is_attention(node: Node) -> bool:
    """SDPA, an `attnc::` attention op (any op with a reader in `attnc.graph.calls`, and an
    `attnc::` op named like attention without one, which `read_call` then refuses loudly), or
    the output of a marked attention region."""
    if node.op != "call_function":
        return False
    if node.target is SDPA or REGION_META in node.meta:
        return True
    if not hasattr(node.target, "_schema"):
        return False
    from attnc.graph import calls

    return calls.registered(node) or calls.unregistered_attnc_attention(node)


def attention_args(node: Node) -> dict:
    """An attention node's call (`attnc.graph.calls.read_call`) under SDPA's argument names:
    query, key, value, attn_mask (the op's mask, a pattern op's key padding mask, a region's),
    dropout_p, is_causal (the op's flag), scale (as passed), enable_gqa, plus `mask_kind` and
    `mask_inverted`."""
    from attnc.graph.calls import read_call

    call = read_call(node)
    if call is None:
        raise KeyError(f"{node.name} is not an attention node")
    return {
        "query": call.q,
        "key": call.k,
        "value": call.v,
        "attn_mask": call.mask,
        "dropout_p": call.dropout_p,
        "is_causal": call.is_causal,
        "scale": call.scale_arg,
        "enable_gqa": call.enable_gqa,
        "mask_kind": call.mask_kind,
        "mask_inverted": call.mask_inverted,
    }


def module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _clean(path)


def _clean(path: str) -> str:
    path = re.sub(r"^L__self__[._]?", "", path)
    return path[len("model.") :] if path.startswith("model.") else path


def module_type(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    t = list(stack.values())[-1][1]
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def layer_index(path: str) -> int | None:
    nums = re.findall(r"\.(\d+)(?:\.|$)", "." + path)
    return int(nums[-1]) if nums else None


def _shape(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _dtype(node):
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def ancestors(node: Node, limit: int = 100000) -> set[Node]:
    seen: set[Node] = set()
    stack = [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _walk_back_linear(node: Node, depth: int = 30) -> Node | None:
    """The nearest aten.linear / addmm / mm upstream through shape ops (q/k/v projection)."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n.op == "call_function" and n.target in (
                torch.ops.aten.linear.default,
                torch.ops.aten.addmm.default,
                torch.ops.aten.mm.default,
                torch.ops.aten.matmul.default,
            ):
                return n
            nxt.extend(a for a in n.all_input_nodes if a.op == "call_function")
        frontier = nxt
        if not frontier:
            return None
    return None


SHAPE_OPS = {
    torch.ops.aten.reshape.default,
    torch.ops.aten.view.default,
    torch.ops.aten.expand.default,
    torch.ops.aten.clone.default,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten.repeat_interleave.self_int,
    torch.ops.aten.contiguous.default,
    torch.ops.aten._unsafe_view.default,
}


def kv_heads(k: Node) -> int:
    """Heads of k before a GQA expand (unsqueeze → expand → reshape, or repeat_interleave):
    the fewest heads among the 4-D (B, H, S, D) tensors on the shape-only path back from k.
    The one implementation: the canonicaliser records it on SDPA nodes too."""
    shp = _shape(k)
    if not shp or len(shp) != 4:
        return 0
    heads = [shp[1]]
    n = k
    for _ in range(8):
        if n.op != "call_function" or n.target not in SHAPE_OPS or not n.all_input_nodes:
            break
        n = n.args[0]
        s = _shape(n)
        if s and len(s) == 4 and s[-1] == shp[-1] and isinstance(s[1], int):
            heads.append(s[1])
        if s and len(s) == 5 and isinstance(s[1], int):
            heads.append(s[1])
    return int(min(heads))


def sdpa_args(node: Node) -> dict:
    """The arguments an SDPA node passes, by SDPA's schema (defaults not filled in); for another
    attention op, `attention_args` (its call under SDPA's names)."""
    from attnc.graph.calls import bind

    if node.op == "call_function" and node.target is SDPA:
        return bind(node, defaults=False)
    return attention_args(node)


@dataclass(frozen=True)
class Residual:
    add: Node
    stream: Node  # the residual operand (the sublayer's input stream)
    branch: Node  # the sublayer's output, before the add
    out: Node  # the stream after the sublayer: the add (pre-norm), the norm after it
    # (post-norm), or the block's whole sum (parallel)
    style: Literal["pre-norm", "post-norm", "parallel"]


def _users(node: Node) -> list[Node]:
    return [u for u in node.users if not (u.op == "call_function" and u.target in PASSTHROUGH_OPS)]


def _is_norm(node: Node) -> bool:
    if node.op != "call_function":
        return False
    return node.target in NORM_OPS or "norm" in module_type(node).lower()


def find_residual(start: Node, max_steps: int = 200) -> Residual | None:
    """Where the attention call `start` joins the residual stream: its own sum (in a parallel
    block, the sum with its sibling branch, not the block's final add), the stream entering the
    block, and the stream after it (`attnc.graph.residual` reads the sums)."""
    from attnc.graph.residual import find_attention_branch

    br = find_attention_branch(start, max_steps)
    if br is None:
        return None
    return Residual(br.join, br.stream, br.branch, br.out, br.style)


def _classify(add: Node, stream: Node, branch: Node, style: str | None = None) -> Residual:
    """Post-norm when everything the add feeds goes through one norm module whose only exit is
    its output; pre-norm when the raw sum also flows on (Llama's RMSNorm casts count as inside)."""
    out = _post_norm_output(add)
    if style is None:
        style = "post-norm" if out is not None else "pre-norm"
    if style == "post-norm" and out is not None:
        return Residual(add, stream, branch, out, "post-norm")
    return Residual(add, stream, branch, add, "pre-norm")


def _post_norm_output(add: Node) -> Node | None:
    users = _users(add)
    if not users or not all(_is_norm(u) for u in users):
        return None
    path = module_path(users[0])
    if not path:
        return users[0] if len(users) == 1 and users[0].target in NORM_OPS else None
    if any(module_path(u) != path for u in users):
        return None
    region: set[Node] = set()
    stack = list(users)
    while stack:
        n = stack.pop()
        if n in region:
            continue
        region.add(n)
        stack.extend(u for u in _users(n) if module_path(u) == path)
    outs = [n for n in region if any(module_path(u) != path for u in _users(n)) or not _users(n)]
    if len(outs) != 1:
        return None
    return outs[0]


ALIAS_OPS = {
    torch.ops.aten.to.dtype,
    torch.ops.aten.to.dtype_layout,
    torch.ops.aten.clone.default,
    torch.ops.aten.contiguous.default,
    torch.ops.aten.alias.default,
}


def _aliases(node: Node) -> list[Node]:
    """`node` and same-shape casts/copies of it (Llama's norm casts the stream to float32)."""
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(
            u
            for u in _users(n)
            if u.op == "call_function" and u.target in ALIAS_OPS and _shape(u) == _shape(node)
        )
    return out


def find_mlp_residual(stream: Node, style: str | None = None) -> Residual | None:
    """The MLP sublayer whose residual operand is `stream` or an alias of it (`style`: the
    block's)."""
    for alias, u in ((a, u) for a in _aliases(stream) for u in _users(a)):
        if u.op == "call_function" and u.target in ADD_OPS and len(u.args) >= 2:
            if alias not in u.args[:2]:
                continue
            stream = alias
            other = u.args[1] if u.args[0] is stream else u.args[0]
            if isinstance(other, Node) and other is not stream and stream in ancestors(other):
                if any(is_attention(a) for a in ancestors(other) - ancestors(stream)):
                    continue
                return _classify(u, stream, other, style)
    return None


def norm_before(node: Node) -> Node | None:
    lin = _walk_back_linear(node)
    if lin is None:
        return None
    src = lin.args[0] if lin.target != torch.ops.aten.addmm.default else lin.args[1]
    for _ in range(6):
        if isinstance(src, Node) and _is_norm(src):
            return src
        if isinstance(src, Node) and src.all_input_nodes:
            src = src.all_input_nodes[0]
    return None


def find_sites(gm: GraphModule) -> list[AttentionSite]:
    """Every attention call of the graph as a site, in graph order, read afresh each time."""
    from attnc.graph.calls import read_call

    sites: list[AttentionSite] = []
    for node in gm.graph.nodes:
        call = read_call(node) if is_attention(node) else None
        if call is not None:
            sites.append(_site(len(sites), node, call))
    return sites


def _site(index: int, node: Node, call=None) -> AttentionSite:
    """The site of attention node `node`, derived from its call (`attnc.graph.calls`)."""
    from attnc.graph.calls import read_call

    call = call if call is not None else read_call(node)
    q, k, v = call.q, call.k, call.v
    q_lin, k_lin, v_lin = (_walk_back_linear(x) if x is not None else None for x in (q, k, v))
    self_attn = (
        q_lin is not None
        and k_lin is not None
        and q_lin.all_input_nodes[:1] == k_lin.all_input_nodes[:1]
    )
    res = find_residual(node)
    o_lin = None
    if res is not None:
        o_lin = _walk_back_linear(res.branch)
    path = module_path(node)
    norm = None
    if res is not None:
        norm = res.out if res.style == "post-norm" else norm_before(q)
    return AttentionSite(
        index=index,
        layer=layer_index(path),
        module=path,
        node=node.name,
        kind="self" if self_attn or q_lin is None else "cross",
        num_heads=call.num_heads,
        num_kv_heads=call.num_kv_heads,
        head_dim=call.head_dim,
        causal=call.causal,
        mask=call.mask_kind,
        scale=float(call.scale),
        window=node.meta.get("attnc_window"),
        pattern=call.pattern,
        q_proj=q_lin.name if q_lin else None,
        k_proj=k_lin.name if k_lin else None,
        v_proj=v_lin.name if v_lin else None,
        o_proj=o_lin.name if o_lin else None,
        residual_add=res.add.name if res else None,
        norm=norm.name if norm is not None else None,
        block_style=res.style if res else "unknown",
        score=call.score,
        softcap=call.softcap,
    )


def node_by_name(gm: GraphModule, name: str) -> Node:
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    raise KeyError(name)
