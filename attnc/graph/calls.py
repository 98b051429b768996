"""One reader of attention calls: `read_call(node) -> AttentionCall | None`.

Every attention node (SDPA, an `attnc::` op, a hand-written region marked at capture) is read
through its op's schema (`torch.FunctionSchema`): the node's positional args and kwargs are
bound to the schema's argument names, defaults filled, never by position alone. Its roles (q, k,
v, mask, causal, scale, GQA) come from the schema's names (`query`/`q`, `attn_mask` or
`key_padding_mask`, `is_causal`, `scale`, `enable_gqa`), and its pattern (with parameters) from
the reader registered for the op: a new `attnc::` op registers one with `register_op`.
Sites (`attnc.graph.sites`) are derived from calls after every rewrite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch.fx import Node

from attnc.errors import CaptureError
from attnc.graph.sites import REGION_META, SDPA, ScoreKind, kv_heads

# ---------------------------------------------------------------------------------- patterns


@dataclass(frozen=True, eq=False)
class Pattern:
    """The visibility pattern of an attention call, with its parameters. A pattern equals
    another of its type and fields, and also its own name (`site.pattern == "dense"`)."""

    name = "pattern"

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return other == self.name
        if type(other) is not type(self):
            return NotImplemented
        return self.params() == other.params()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.name)  # equal to its name's hash, as __eq__ requires

    def __str__(self) -> str:
        shown = [f"{k}={_short(v)}" for k, v in self.params().items() if v is not None]
        return f"{self.name}({', '.join(shown)})" if shown else self.name


def _short(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ",".join(_short(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@dataclass(frozen=True, eq=False)
class Dense(Pattern):
    name = "dense"


@dataclass(frozen=True, eq=False)
class SlidingWindowSink(Pattern):
    """Query i sees keys within `window` of it (j <= i when causal) and the first `num_sinks`."""

    name = "sliding_window"
    window: int
    num_sinks: int = 0
    causal: bool = True
    head_windows: tuple[int, ...] | None = None  # one window per query head, -1: dense


@dataclass(frozen=True, eq=False)
class Neighborhood(Pattern):
    """NATTEN neighborhood attention on a 1-D/2-D/3-D token grid after `num_global` tokens."""

    name = "neighborhood"
    grid: tuple[int, ...]
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    causal: tuple[bool, ...]
    num_global: int = 0
    head_kernel_size: tuple[int, ...] | None = None  # heads x ndim, row-major, -1: whole axis


@dataclass(frozen=True, eq=False)
class BlockSparse(Pattern):
    """Query block i sees key block j where `layout[b, h, i, j]` (and j <= i when causal)."""

    name = "block_sparse"
    block_size: int
    causal: bool
    layout: str  # the graph node holding the (B|1, H|1, nq, nk) bool layout
    layout_shape: tuple[int, ...] | None = None
    density: float | None = None  # share of kept blocks, when the layout is a constant


@dataclass(frozen=True, eq=False)
class HeadRouted(Pattern):
    """Dense attention whose query heads are gated per token (`attnc::routed_attention`)."""

    name = "head_routed"


@dataclass(frozen=True, eq=False)
class SinkCalibrated(Pattern):
    """Dense attention with ACT's sink recalibration on some heads (knobs are tensors)."""

    name = "sink_calibrated"


@dataclass(frozen=True, eq=False)
class Region(Pattern):
    """Hand-written attention with a score function SDPA cannot express (`capture.regions`)."""

    name = "region"
    score: str = "other"
    softcap: float | None = None


# ------------------------------------------------------------------------------ the call


@dataclass(frozen=True)
class AttentionCall:
    node: str
    op: str  # "sdpa", "attnc::<op>" or "region"
    q: Node
    k: Node
    v: Node
    mask: Node | None
    mask_arg: str | None  # the schema argument carrying the mask: attn_mask, key_padding_mask
    mask_kind: Literal["none", "bool", "float"]
    mask_inverted: bool  # a region's bool mask whose True marks masked-out entries
    is_causal: bool  # the op's own flag (neighborhood: every axis causal, no global tokens)
    causal: bool  # every query sees only keys j <= i: the flag, or the mask (capture.masks)
    causal_mask: bool  # the mask alone is causal (capture.masks' analysis on the examples)
    scale: float  # the scale applied to q·kᵀ (resolved: 1/sqrt(head_dim) when not given)
    scale_arg: float | None  # the scale as the call passes it
    dropout_p: float
    enable_gqa: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    score: ScoreKind
    softcap: float | None
    pattern: Pattern
    args: tuple[tuple[str, Any], ...]  # every schema argument, bound, defaults filled

    def arguments(self) -> dict[str, Any]:
        return dict(self.args)


PatternReader = Callable[[dict[str, Any], Node], Pattern]
_READERS: dict[str, PatternReader] = {}


def register_op(op: Any, reader: PatternReader) -> None:
    """Make `op` (an OpOverload or its schema name, "attnc::my_attention") an attention call
    whose pattern `reader(bound_args, node)` reads. Registering a name twice is an error."""
    name = op if isinstance(op, str) else op._schema.name
    if name in _READERS and _READERS[name] is not reader:
        raise CaptureError(f"an attention reader for {name} is already registered")
    _READERS[name] = reader


def op_name(target: Any) -> str | None:
    """The schema name of an op ("aten::scaled_dot_product_attention"), else None."""
    schema = getattr(target, "_schema", None)
    return schema.name if schema is not None else None


def is_attention_op(target: Any) -> bool:
    """Whether `target` is an op with a registered attention reader."""
    return op_name(target) in _READERS


def registered(node: Node) -> bool:
    return node.op == "call_function" and is_attention_op(node.target)


def unregistered_attnc_attention(node: Node) -> bool:
    """An `attnc::` op named like attention that no reader was registered for."""
    name = op_name(node.target) if node.op == "call_function" else None
    return bool(name and name.startswith("attnc::") and "attention" in name) and (
        name not in _READERS
    )


def bind(node: Node, *, defaults: bool = True) -> dict[str, Any]:
    """The node's arguments by its op's schema names (with the schema's defaults filled in
    unless `defaults` is False). A keyword the schema lacks, or too many positional
    arguments, raise CaptureError."""
    schema = node.target._schema
    out: dict[str, Any] = {}
    pos = [a for a in schema.arguments if not a.kwarg_only]
    if len(node.args) > len(pos):
        raise CaptureError(f"{node.name}: {len(node.args)} positional args for {schema.name}")
    for a, val in zip(pos, node.args, strict=False):
        out[a.name] = val
    names = {a.name for a in schema.arguments}
    for key, val in node.kwargs.items():
        if key not in names:
            raise CaptureError(f"{node.name}: {schema.name} has no argument {key!r}")
        out[key] = val
    if defaults:
        for a in schema.arguments:
            if a.name not in out and a.has_default_value():
                out[a.name] = a.default_value
    return out


def _role(vals: dict[str, Any], *names: str) -> Any:
    return next((vals[n] for n in names if n in vals), None)


def _shape(node: Any) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _mask_kind(mask: Any) -> Literal["none", "bool", "float"]:
    if mask is None:
        return "none"
    val = mask.meta.get("val") if isinstance(mask, Node) else mask
    return "bool" if getattr(val, "dtype", None) == torch.bool else "float"


def _heads(q: Node, k: Node) -> tuple[int, int, int]:
    qs = _shape(q)
    if not qs or len(qs) < 2:
        return 0, 0, 0
    nh = qs[1] if len(qs) == 4 else 0
    return int(nh), kv_heads(k) if isinstance(k, Node) else 0, int(qs[-1])


def read_call(node: Node) -> AttentionCall | None:
    """The attention call at `node`, or None if it is no attention node."""
    if node.op != "call_function":
        return None
    if REGION_META in node.meta:
        return _read_region(node)
    name = op_name(node.target)
    if name not in _READERS:
        if unregistered_attnc_attention(node):
            raise CaptureError(
                f"{node.name}: no attention reader is registered for {name}",
                "register one with attnc.graph.calls.register_op(op, reader)",
            )
        return None
    vals = bind(node)
    q, k, v = _role(vals, "query", "q"), _role(vals, "key", "k"), _role(vals, "value", "v")
    mask_arg = next((a for a in ("attn_mask", "key_padding_mask") if a in vals), None)
    mask = vals.get(mask_arg) if mask_arg else None
    pattern = _READERS[name](vals, node)
    flag = vals.get("is_causal", False)
    if isinstance(flag, (list, tuple)):  # per-axis (neighborhood): causal if every axis is
        flag = bool(flag) and all(flag) and not vals.get("num_global", 0)
    nh, nkv, hd = _heads(q, k)
    scale_arg = vals.get("scale")
    return AttentionCall(
        node=node.name,
        op="sdpa" if node.target is SDPA else name,
        q=q,
        k=k,
        v=v,
        mask=mask,
        mask_arg=mask_arg if mask is not None else None,
        mask_kind=_mask_kind(mask),
        mask_inverted=False,
        is_causal=bool(flag),
        causal=bool(flag) or bool(node.meta.get("attnc_causal", False)),
        causal_mask=mask is not None and bool(node.meta.get("attnc_causal", False)),
        scale=float(scale_arg) if scale_arg is not None else (hd**-0.5 if hd else 0.0),
        scale_arg=None if scale_arg is None else float(scale_arg),
        dropout_p=float(vals.get("dropout_p", 0.0) or 0.0),
        enable_gqa=bool(vals.get("enable_gqa", False)),
        num_heads=nh,
        num_kv_heads=nkv,
        head_dim=hd,
        score=node.meta.get("attnc_score", "none"),
        softcap=None,
        pattern=pattern,
        args=tuple((a, tuple(x) if isinstance(x, list) else x) for a, x in vals.items()),
    )


def _read_region(node: Node) -> AttentionCall:
    """A region's q, k, v and mask are found upstream by the names recorded at capture."""
    region = node.meta[REGION_META]
    want = {region[r]: r for r in ("q", "k", "v", "mask") if region.get(r)}
    found: dict[str, Node] = {}
    seen, frontier = {node}, [node]
    while frontier and len(found) < len(want) and len(seen) < 20000:  # q, k, v: a few hops up
        nxt = []
        for n in frontier:
            if n.name in want:
                found[want[n.name]] = n
            nxt += [a for a in n.all_input_nodes if a not in seen]
            seen.update(n.all_input_nodes)
        frontier = nxt
    missing = [r for r in want.values() if r not in found]
    if missing:
        raise CaptureError(f"attention region {node.name}: its {missing[0]} node is gone")
    q, k, v = found["q"], found["k"], found["v"]
    nh, nkv, hd = _heads(q, k)
    scale = region.get("scale")
    return AttentionCall(
        node=node.name,
        op="region",
        q=q,
        k=k,
        v=v,
        mask=found.get("mask"),
        mask_arg="region" if found.get("mask") is not None else None,
        mask_kind=region.get("mask_kind", "none"),
        mask_inverted=bool(region.get("mask_inverted", False)),
        is_causal=False,
        causal=bool(node.meta.get("attnc_causal", False)),
        causal_mask=bool(node.meta.get("attnc_causal", False)),
        scale=float(scale) if scale is not None else (hd**-0.5 if hd else 0.0),
        scale_arg=None if scale is None else float(scale),
        dropout_p=0.0,
        enable_gqa=False,
        num_heads=nh,
        num_kv_heads=nkv,
        head_dim=hd,
        score=node.meta.get("attnc_score", region.get("score", "other")),
        softcap=region.get("softcap"),
        pattern=Region(str(region.get("score", "other")), region.get("softcap")),
        args=(),
    )


# ------------------------------------------------------------------- the ops' pattern readers


def _int(x: Any) -> Any:
    return int(x) if isinstance(x, int) else x  # a SymInt node stays as it is


def _ints(xs: Any) -> tuple | None:
    return None if xs is None else tuple(_int(x) for x in xs)


def _dense(vals: dict[str, Any], node: Node) -> Pattern:
    return Dense()


def _sliding_window(vals: dict[str, Any], node: Node) -> Pattern:
    return SlidingWindowSink(
        window=_int(vals["window"]),
        num_sinks=_int(vals["num_sinks"]),
        causal=bool(vals["is_causal"]),
        head_windows=_ints(vals.get("head_windows")),
    )


def _neighborhood(vals: dict[str, Any], node: Node) -> Pattern:
    return Neighborhood(
        grid=_ints(vals["grid"]),
        kernel_size=_ints(vals["kernel_size"]),
        dilation=_ints(vals["dilation"]),
        stride=_ints(vals["stride"]),
        causal=tuple(bool(c) for c in vals["is_causal"]),
        num_global=_int(vals["num_global"]),
        head_kernel_size=_ints(vals.get("head_kernel_size")),
    )


def _block_sparse(vals: dict[str, Any], node: Node) -> Pattern:
    layout = vals["layout"]
    density = None
    if isinstance(layout, Node) and layout.op == "get_attr":
        gm = node.graph.owning_module
        t = _attr(gm, layout.target) if gm is not None else None
        if isinstance(t, torch.Tensor) and t.numel():
            density = round(float(t.float().mean()), 6)
    return BlockSparse(
        block_size=_int(vals["block_size"]),
        causal=bool(vals["is_causal"]),
        layout=layout.name if isinstance(layout, Node) else str(layout),
        layout_shape=_shape(layout),
        density=density,
    )


def _attr(module: torch.nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


register_op("aten::scaled_dot_product_attention", _dense)
register_op("attnc::attention", _dense)
register_op("attnc::attention_colsum", _dense)
register_op("attnc::sliding_window_attention", _sliding_window)
register_op("attnc::neighborhood_attention", _neighborhood)
register_op("attnc::block_sparse_attention", _block_sparse)
# readers here, not in the passes: a saved build must read back in a process that never
# imported the pass that wrote it
register_op("attnc::routed_attention", lambda vals, node: HeadRouted())
register_op("attnc::sink_calibrated_attention", lambda vals, node: SinkCalibrated())


__all__ = [
    "AttentionCall",
    "BlockSparse",
    "Dense",
    "HeadRouted",
    "Neighborhood",
    "Pattern",
    "Region",
    "SinkCalibrated",
    "SlidingWindowSink",
    "bind",
    "is_attention_op",
    "read_call",
    "register_op",
]
