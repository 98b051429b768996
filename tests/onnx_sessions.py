"""One ONNX file in ONNX Runtime with graph optimizations off and on: the ops it holds and a
CPU session per optimization level (the export tests run every form under both)."""

from __future__ import annotations

from pathlib import Path


def ort_sessions(path: Path | str) -> tuple[set[str], list]:
    import onnx
    import onnxruntime as ort

    ops = set(op_types(onnx.load(str(path)).graph))
    sessions = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        sessions.append(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))
    return ops, sessions


def op_types(graph):
    """Every node's op type in `graph` and in the subgraphs its nodes hold (a Loop's body)."""
    for n in graph.node:
        yield n.op_type
        for a in n.attribute:
            for g in [a.g] if a.HasField("g") else list(a.graphs):
                yield from op_types(g)
