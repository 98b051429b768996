"""bfloat16 islands an fp32 model computes (Falcon builds its ALiBi slopes in bfloat16) that ONNX
Runtime's CPU build has no kernel for: such a node runs in float32 between Casts.

That is exact for what PyTorch does on the CPU: its bfloat16 elementwise ops and matmuls compute
in float32 and round the result to bfloat16 once, which is what Cast(float32) -> op -> Cast(bf16)
does. Only nodes ONNX Runtime itself names as unimplemented are rewritten, one at a time.
"""

from __future__ import annotations

import logging
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


def _has_bf16(model) -> bool:
    import onnx

    bf16 = onnx.TensorProto.BFLOAT16
    vals = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    return any(v.type.tensor_type.elem_type == bf16 for v in vals) or any(
        t.data_type == bf16 for t in model.graph.initializer
    )


def _types(model) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    out = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    out.update({t.name: t.data_type for t in g.initializer})
    return out


def _wrap(model, node_name: str) -> bool:
    """Run `node_name` in float32 between Casts; False when it has no bfloat16 to widen."""
    import onnx
    from onnx import TensorProto, helper

    types = _types(model)
    graph = model.graph
    idx = next((i for i, n in enumerate(graph.node) if n.name == node_name), None)
    if idx is None:
        return False
    node = graph.node[idx]
    if node.op_type not in _EXACT_IN_FP32:
        return False
    bf16 = TensorProto.BFLOAT16
    new_nodes = []
    widened = False
    for i, name in enumerate(node.input):
        if name and types.get(name) == bf16:
            cast_out = f"{name}__f32_{node_name}"
            new_nodes.append(helper.make_node("Cast", [name], [cast_out], to=TensorProto.FLOAT,
                                              name=f"{node_name}__in{i}_f32"))
            node.input[i] = cast_out
            widened = True
    if not widened:
        return False
    after = []
    for i, name in enumerate(node.output):
        if types.get(name) == bf16:
            wide = f"{name}__f32"
            node.output[i] = wide
            after.append(helper.make_node("Cast", [wide], [name], to=bf16,
                                          name=f"{node_name}__out{i}_bf16"))
    for n in reversed(new_nodes):
        graph.node.insert(idx, n)
    pos = idx + len(new_nodes) + 1
    for n in reversed(after):
        graph.node.insert(pos, n)
    onnx.checker.check_model(model)
    return True


def widen_unsupported_bf16(path: Path, max_rounds: int = 64) -> list[str]:
    """Rewrite, in place, every bfloat16 node ONNX Runtime (CPU) cannot run; returns their
    names. Does nothing (and costs one file scan) for a model without bfloat16."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    if not _has_bf16(model):
        return []
    fixed: list[str] = []
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for _ in range(max_rounds):
        try:
            ort.InferenceSession(model.SerializeToString(), so,
                                 providers=["CPUExecutionProvider"])
            break
        except Exception as exc:  # noqa: BLE001 - only ORT's "no implementation" is ours
            m = _MISSING.search(str(exc))
            if m is None or not _wrap(model, m.group(3)):
                break  # not a bf16 gap: the build's ONNX Runtime check reports it
            fixed.append(m.group(3))
    if fixed:
        log.info("ONNX: %d bfloat16 node(s) run in float32 for ONNX Runtime: %s", len(fixed),
                 fixed[:8])
        onnx.save(model, str(path))
    return fixed
