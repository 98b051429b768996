"""A bf16 model verified in ONNX Runtime's CPU build: through its float32-compute copy, whose
bf16 weights (external data) each feed a Cast to float32 that ORT runs when the weight's layer
runs (no constant folding, nodes in the file's order), so only about one layer's float32 weights
are alive at once, and the parity check still uses the bf16 tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from test_external_data import RECIPE, _tiny_llama

from attnc.build import BuildOptions, build
from attnc.export import external_data as ext


def _live_casts(events: list[str]) -> int:
    """The most float32 copies made by the copy's Casts (`<node>__in<i>_f32`) alive at once, in
    the order ORT ran the nodes: one lives from its Cast until its consumer `<node>` runs."""
    live: set[str] = set()
    most = 0
    for name in events:
        if "__in" in name and name.endswith("_f32"):
            live.add(name)
            most = max(most, len(live))
        live = {c for c in live if not c.startswith(name + "__in")}
    return most


@pytest.mark.slow
def test_bf16_verified_with_weights_cast_at_run_time(tmp_path, monkeypatch):
    monkeypatch.setenv(ext.LIMIT_ENV, "1000")  # external data, as at real sizes
    seen: list = []

    class Recording(ort.InferenceSession):  # the verification session, profiled
        def __init__(self, path, so=None, *a, **k):
            if str(path).endswith(".cpu-fp32-compute.onnx"):
                so.enable_profiling = True
                so.profile_file_prefix = str(tmp_path / "ort-profile")
                seen.append((so.graph_optimization_level, so.execution_order,
                             so.enable_cpu_mem_arena, so.enable_mem_pattern))
            super().__init__(path, so, *a, **k)
            if str(path).endswith(".cpu-fp32-compute.onnx"):
                seen.append(self)

    monkeypatch.setattr(ort, "InferenceSession", Recording)
    out = tmp_path / "build"
    build(str(_tiny_llama(tmp_path / "src", torch.bfloat16)), RECIPE, None, out,
          BuildOptions(save_original=False))
    report = json.loads((out / "report.json").read_text())
    onnx_info = report["onnx"]
    assert onnx_info["layout"]["external_data"]
    assert onnx_info["verified_file"] == "model.cpu-fp32-compute.onnx"
    assert not (out / "model.cpu-fp32-compute.onnx").exists()  # removed after the check
    par = report["verification"]["comparisons"]["ONNX Runtime vs torch optimized"]
    assert 0.0 < onnx_info["max_abs_diff_allowed"] <= 0.5  # the bf16 tolerance, not a blank
    assert par["max_abs_diff"] <= onnx_info["max_abs_diff_allowed"] and par["cosine"] > 0.99
    # what ORT ran: unoptimized (no folded float32 copy), file order, no arena or pattern
    opts, sess = seen
    assert opts == (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                    ort.ExecutionOrder.PRIORITY_BASED, False, False)
    events = json.loads(Path(sess.end_profiling()).read_text())
    ran = [e["name"].removesuffix("_kernel_time") for e in events
           if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    casts = [n for n in ran if "__in" in n and n.endswith("_f32")]
    assert len(casts) > 20  # every weight (and bf16 activation) is cast at run time
    assert _live_casts(ran) <= 3  # each float32 copy is consumed before the next is made
