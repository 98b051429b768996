"""ONNX export of graphs the stock exporter cannot translate: mixture-of-experts grouped matmuls
and attention whose key/value heads (or batch) broadcast against the query's.

Two parts, both applied by `export_onnx`:

- `translations()`: ONNX translations for the grouped matmul that Hugging Face experts modules
  call (`transformers::grouped_mm_fallback`, and `aten::_grouped_mm` with offsets, which torchlib
  rejects). Exact: each expert's rows are gathered and multiplied by that expert's weight alone.
- `prepare_for_onnx(program)`: rewrites on a copy of the graph. SDPA with one key/value head
  broadcast against many query heads becomes SDPA with `enable_gqa=True` (the ONNX `Attention`
  op's own query/key-value head counts); other broadcasts (batch, query heads) are expanded
  explicitly; `enable_gqa` with equal head counts is dropped (torchlib refuses it); `histc` over
  integer expert ids (the CUDA capture) counts them as float32, which torchlib can translate; a
  complex `unsqueeze` (complex RoPE) goes through the real view, as torchlib has no complex form.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import Node

from attnc.capture.program import Program
from attnc.errors import ExportError
from attnc.graph.sites import SDPA, sdpa_args

log = logging.getLogger(__name__)

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _grouped_mm_onnx(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    """`out[r] = mat_a[r] @ mat_b[g(r)]` for rows sorted by group, `offs` the groups' cumulative
    ends: one `Gather` + `MatMul` per group (the group count is static), then one `Concat`."""
    from onnxscript import opset18 as op

    if offs is None:  # a plain batched matmul: what torchlib's own translation does
        result = op.MatMul(mat_a, mat_b)
        result = op.Add(result, bias) if bias is not None else result
        return op.Cast(result, to=out_dtype) if out_dtype not in (None, -1) else result
    if len(mat_a.shape) != 2 or len(mat_b.shape) != 3:
        raise ExportError(
            "ONNX export of a grouped matmul supports only (rows, K) x (groups, K, N) with offsets"
        )
    groups = mat_b.shape[0]
    if not isinstance(groups, int):
        raise ExportError("ONNX export of a grouped matmul needs a static number of experts")
    axis0 = op.Constant(value_ints=[0])
    one = op.Constant(value_int=1)
    ends = op.Cast(offs, to=7)  # INT64
    if groups > 1:
        ends = op.Split(ends, axis=0, num_outputs=groups)
        weights = op.Split(mat_b, axis=0, num_outputs=groups)
        biases = op.Split(bias, axis=0, num_outputs=groups) if bias is not None else None
    else:
        ends, weights, biases = [ends], [mat_b], [bias] if bias is not None else None
    outs = []
    start = op.Constant(value_int=0)
    for g in range(groups):
        end = op.Squeeze(ends[g], axis0)
        rows = op.Gather(mat_a, op.Range(start, end, one), axis=0)  # (n_g, K)
        out = op.MatMul(rows, op.Squeeze(weights[g], axis0))  # (n_g, N)
        if biases is not None:
            out = op.Add(out, op.Squeeze(biases[g], axis0))
        outs.append(out)
        start = end
    # rows past offs[-1] (expert-parallel sentinels) are zeros, as in transformers' fallback
    tail = op.Sub(op.Shape(mat_a, start=0, end=1), op.Reshape(start, op.Constant(value_ints=[1])))
    zeros = op.ConstantOfShape(op.Concat(tail, op.Shape(mat_b, start=2, end=3), axis=0))
    outs.append(op.CastLike(zeros, outs[0]))
    result = op.Concat(*outs, axis=0)
    if out_dtype is not None and out_dtype != -1:
        result = op.Cast(result, to=out_dtype)
    return result


def translations() -> dict[Any, Callable[..., Any]]:
    """Extra entries for `torch.onnx.export`'s custom translation table."""
    table: dict[Any, Callable[..., Any]] = {torch.ops.aten._grouped_mm.default: _grouped_mm_onnx}
    # registered when transformers' MoE integration is imported (always, for a graph that uses it)
    with contextlib.suppress(AttributeError, RuntimeError):
        table[torch.ops.transformers.grouped_mm_fallback.default] = _grouped_mm_onnx
    return table


def prepare_for_onnx(program: Program) -> Program:
    """A copy of `program` with the rewrites above applied (the same program when none apply)."""
    if not any(_needs_fix(n) for n in program.gm.graph.nodes):
        return program
    program = program.clone()
    graph = program.gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == SDPA:
            _fix_sdpa_broadcast(graph, node)
        elif node.target == torch.ops.aten.histc.default:
            _fix_int_histc(graph, node)
        elif node.target == torch.ops.aten.unsqueeze.default:
            _fix_complex_unsqueeze(graph, node)
    graph.lint()
    program.gm.recompile()
    return program


def _val(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _needs_fix(node: Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target == torch.ops.aten.histc.default:
        val = _val(node.args[0])
        return val is not None and val.dtype in _INT_DTYPES
    if node.target == torch.ops.aten.unsqueeze.default:
        val = _val(node.args[0])
        return val is not None and val.is_complex()
    if node.target != SDPA:
        return False
    return _sdpa_plan(node) is not None


def _static(d: Any) -> int | None:
    return d if isinstance(d, int) else None


_QKV = ("query", "key", "value")


def _sdpa_plan(node: Node) -> tuple[bool, dict[str, tuple[str | None, int | None]]] | None:
    """(enable_gqa, {arg: (arg whose batch it takes or None, heads to expand to or None)}) when
    this SDPA needs rewriting; None when it exports as is."""
    a = sdpa_args(node)
    vals = [_val(a.get(k)) for k in _QKV]
    if any(v is None or v.dim() != 4 for v in vals):
        return None
    gqa = bool(a.get("enable_gqa", False))
    expand: dict[str, tuple[str | None, int | None]] = {}
    # batch: a static 1 against a batch that is not a static 1 broadcasts
    wide = next((n for n, v in zip(_QKV, vals, strict=True) if _static(v.shape[0]) != 1), None)
    if wide is not None:
        for name, v in zip(_QKV, vals, strict=True):
            if _static(v.shape[0]) == 1:
                expand[name] = (wide, None)
    heads = [_static(v.shape[1]) for v in vals]
    if None in heads:
        return (gqa, expand) if expand else None
    hq, hk, hv = heads
    new_gqa = gqa
    if gqa:
        if hq == hk == hv:
            new_gqa = False  # torchlib's translation refuses enable_gqa with equal head counts
        elif not (hk == hv and hk > 0 and hq % hk == 0):
            return None  # torch itself rejects it; nothing to export
    elif hk == hv == 1 and hq > 1:
        new_gqa = True  # one K/V head broadcast over every query head is GQA with one group
    elif len(set(heads)) > 1:
        top = max(heads)
        if any(h not in (1, top) for h in heads):
            return None  # not a broadcast torch accepts
        for name, h in zip(_QKV, heads, strict=True):
            if h == 1:
                expand[name] = (expand.get(name, (None, None))[0], top)
    if new_gqa == gqa and not expand:
        return None
    return new_gqa, expand


def _fix_sdpa_broadcast(graph: torch.fx.Graph, node: Node) -> None:
    plan = _sdpa_plan(node)
    if plan is None:
        return
    gqa, expand = plan
    a = sdpa_args(node)
    for name, (batch_from, heads) in expand.items():
        shape: list[Any] = [-1, heads if heads is not None else -1, -1, -1]
        with graph.inserting_before(node):
            if batch_from is not None:
                shape[0] = graph.call_function(torch.ops.aten.sym_size.int, (a[batch_from], 0))
            wide = graph.call_function(torch.ops.aten.expand.default, (a[name], shape))
        _set_arg(node, _QKV.index(name), wide)
    kwargs = dict(node.kwargs)
    if gqa:
        kwargs["enable_gqa"] = True
    else:
        kwargs.pop("enable_gqa", None)
    node.kwargs = kwargs
    log.debug("SDPA %s: enable_gqa=%s, expanded %s for ONNX", node.name, gqa, sorted(expand))


def _set_arg(node: Node, index: int, new: Node) -> None:
    if index < len(node.args):
        args = list(node.args)
        args[index] = new
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, _QKV[index]: new}


def _fix_int_histc(graph: torch.fx.Graph, node: Node) -> None:
    src = node.args[0]
    val = _val(src)
    if val is None or val.dtype not in _INT_DTYPES:
        return
    with graph.inserting_before(node):
        cast = graph.call_function(
            torch.ops.aten._to_copy.default, (src,), {"dtype": torch.float32}
        )
    node.replace_input_with(src, cast)
    # histc returns its input's dtype: cast the counts back for the nodes that read them
    with graph.inserting_after(node):
        back = graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": val.dtype})
    node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)


def _fix_complex_unsqueeze(graph: torch.fx.Graph, node: Node) -> None:
    """torchlib has no complex `unsqueeze` (complex RoPE, as in DeepSeek-V2, unsqueezes its
    frequencies): unsqueeze the (..., 2) real view instead."""
    src, dim = node.args[0], node.args[1]
    val = _val(src)
    if val is None or not val.is_complex():
        return
    dim = dim if dim >= 0 else dim + val.dim() + 1  # a dim of the result, before the pair axis
    with graph.inserting_before(node):
        real = graph.call_function(torch.ops.aten.view_as_real.default, (src,))
        wide = graph.call_function(torch.ops.aten.unsqueeze.default, (real, dim))
        cplx = graph.call_function(torch.ops.aten.view_as_complex.default, (wide,))
    cplx.meta.update(node.meta)
    node.replace_all_uses_with(cplx)
    graph.erase_node(node)
