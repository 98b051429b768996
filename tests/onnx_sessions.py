"""One ONNX file in ONNX Runtime with graph optimizations off and on: the ops it holds and a
CPU session per optimization level (the export tests run every form under both)."""

from __future__ import annotations

from pathlib import Path


def ort_sessions(path: Path | str) -> tuple[set[str], list]:
    import onnx
    import onnxruntime as ort

    from attnc.export.artifacts import op_types

    ops = set(op_types(onnx.load(str(path)).graph))  # a Loop body's nodes too
    sessions = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        sessions.append(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))
    return ops, sessions

