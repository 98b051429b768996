"""bfloat16 islands an fp32 model computes (Falcon builds its ALiBi slopes in bfloat16) that ONNX
Runtime's CPU build has no kernel for: such a node runs in float32 between Casts.

That is exact for what PyTorch does on the CPU: its bfloat16 elementwise ops and matmuls compute
in float32 and round the result to bfloat16 once, which is what Cast(float32) -> op -> Cast(bf16)
does. Only nodes ONNX Runtime itself names as unimplemented are rewritten, one at a time.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

_MISSING = re.compile(
    r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'"
)
# ops whose float32 form rounds to the bfloat16 result PyTorch's CPU kernels give
_EXACT_IN_FP32 = {
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Pow", "Sqrt", "Reciprocal", "Exp", "Log",
    "Tanh", "Sigmoid", "Erf", "MatMul", "Max", "Min", "Where", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "Softmax", "ReduceMax", "ReduceMin", "Clip", "Floor",
    "Ceil", "Relu",
}


def _has_bf16(model, low: frozenset[int] | None = None) -> bool:
    import onnx

    low = low or frozenset({onnx.TensorProto.BFLOAT16})
    vals = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    return any(v.type.tensor_type.elem_type in low for v in vals) or any(
        t.data_type in low for t in model.graph.initializer
    )


def _types(model) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    out = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    out.update({t.name: t.data_type for t in g.initializer})
    return out


def _wrap(model, node_name: str, types: dict[str, int] | None = None,
          ops: frozenset[str] | set[str] = _EXACT_IN_FP32, check: bool = True,
          low: frozenset[int] | None = None) -> bool:
    """Run `node_name` in float32 between Casts; False when it has no bfloat16 to widen."""
    import onnx
    from onnx import TensorProto, helper

    types = _types(model) if types is None else types
    graph = model.graph
    idx = next((i for i, n in enumerate(graph.node) if n.name == node_name), None)
    if idx is None:
        return False
    node = graph.node[idx]
    if node.op_type not in ops:
        return False
    low = low or frozenset({TensorProto.BFLOAT16})
    new_nodes = []
    widened = False
    for i, name in enumerate(node.input):
        if name and types.get(name) in low:
            cast_out = f"{name}__f32_{node_name}"
            new_nodes.append(helper.make_node("Cast", [name], [cast_out], to=TensorProto.FLOAT,
                                              name=f"{node_name}__in{i}_f32"))
            node.input[i] = cast_out
            widened = True
    if not widened:
        return False
    after = []
    for i, name in enumerate(node.output):
        if types.get(name) in low:
            wide = f"{name}__f32"
            node.output[i] = wide
            after.append(helper.make_node("Cast", [wide], [name], to=types[name],
                                          name=f"{node_name}__out{i}_bf16"))
    for n in reversed(new_nodes):
        graph.node.insert(idx, n)
    pos = idx + len(new_nodes) + 1
    for n in reversed(after):
        graph.node.insert(pos, n)
    if check:
        onnx.checker.check_model(model)
    return True


def _session(model, folder: Path):
    """An ONNX Runtime CPU session of `model` (a proto whose external data, if any, lives in
    `folder`): created from a scratch file there, so external data resolves, with graph
    optimizations off (the check needs only the kernels, not a constant-folded copy)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fd, tmp = tempfile.mkstemp(prefix=".ort-probe-", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        return ort.InferenceSession(tmp, so, providers=["CPUExecutionProvider"])
    finally:
        Path(tmp).unlink(missing_ok=True)


def _fix_rounds(model, folder: Path, max_rounds: int, ops=_EXACT_IN_FP32,
                low: frozenset[int] | None = None) -> list[str]:
    """Widen, one ORT refusal at a time, the nodes ONNX Runtime names as unimplemented."""
    fixed: list[str] = []
    for _ in range(max_rounds):
        try:
            _session(model, folder)
            break
        except Exception as exc:  # noqa: BLE001 - only ORT's "no implementation" is ours
            m = _MISSING.search(str(exc))
            if m is None or not _wrap(model, m.group(3), ops=ops, low=low):
                break  # not a bf16 gap: the build's ONNX Runtime check reports it
            fixed.append(m.group(3))
    return fixed


def widen_unsupported_bf16(path: Path, max_rounds: int = 64) -> list[str]:
    """Rewrite, in place, every bfloat16 node ONNX Runtime (CPU) cannot run; returns their
    names. Does nothing (and costs one file scan) for a model without bfloat16. External data
    stays on disk: only the graph is read and rewritten."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if not _has_bf16(model):
        return []
    fixed = _fix_rounds(model, path.parent, max_rounds)
    if fixed:
        log.info("ONNX: %d bfloat16 node(s) run in float32 for ONNX Runtime: %s", len(fixed),
                 fixed[:8])
        onnx.save(model, str(path))
    return fixed


# data movement and indexing: exact in any float type, so float32 between Casts is exact too
_MOVES = {
    "Expand", "Reshape", "Transpose", "Concat", "Slice", "Gather", "GatherElements", "Squeeze",
    "Unsqueeze", "Identity", "Split", "Tile", "Flatten", "Pad", "Trilu", "ScatterND",
    "ScatterElements", "ConstantOfShape", "ReduceSum", "ReduceMean", "CumSum", "Cos", "Sin",
    "IsNaN", "IsInf", "Not", "And", "Or", "LayerNormalization", "RMSNormalization", "Gemm",
    "Attention", "Einsum", "Range", "Mod", "Sign", "Round",
}
_WIDE_OPS = frozenset(_EXACT_IN_FP32 | _MOVES)


def cpu_compute_copy(path: Path, copy: Path, max_rounds: int = 8) -> list[str] | None:
    """For a model that holds bfloat16 or float16 (weights or compute) and that ONNX Runtime's
    CPU build cannot run, write `copy`: the same graph with every such node computing in float32
    between Casts (each op's result rounded to the low dtype, as PyTorch's CPU kernels do), reading
    the same external data file. Returns the widened nodes, or None when `path` runs as it is
    (nothing written). `path` itself is left unchanged: it keeps the source dtype."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    low = frozenset({onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16})
    if not _has_bf16(model, low):
        return None
    try:
        _session(model, path.parent)
        return None
    except Exception as exc:  # noqa: BLE001
        if _MISSING.search(str(exc)) is None:
            return None  # another failure: the build's ONNX Runtime check names it
    types = _types(model)
    names = [n.name for n in model.graph.node]
    fixed = [n for n in names if _wrap(model, n, types, ops=_WIDE_OPS, check=False, low=low)]
    from attnc.export.ort_lowmem import narrow_weight_casts

    narrow_weight_casts(model)  # the embedding and output projection: less float32 at once
    _float_outputs(model)  # numpy has no bfloat16: the check reads float32 outputs
    fixed += _fix_rounds(model, path.parent, max_rounds, ops=_WIDE_OPS, low=low)
    onnx.save(model, str(copy))
    return fixed


def _float_outputs(model) -> None:
    """Each bfloat16 graph output becomes float32 through a final Cast (exact)."""
    from onnx import TensorProto, helper

    for out in model.graph.output:
        tt = out.type.tensor_type
        if tt.elem_type != TensorProto.BFLOAT16:
            continue
        wide = f"{out.name}__float32"
        model.graph.node.append(
            helper.make_node("Cast", [out.name], [wide], to=TensorProto.FLOAT,
                             name=f"{out.name}__out_f32")
        )
        out.name = wide
        tt.elem_type = TensorProto.FLOAT
