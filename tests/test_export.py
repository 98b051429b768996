"""ONNX export details: dropped attention and its weights leave the file, dynamic dims survive,
and the lowered attnc::attention op exports and saves (the per-architecture parity is in
test_matrix.py)."""

from __future__ import annotations

import hf_models
import pytest
import torch

import attnc.passes.llm_drop as D
from attnc.capture.program import capture
from attnc.check.fidelity import ort_runner
from attnc.export.artifacts import export_onnx, lower_dense, save_pt2
from attnc.load.models import wrap_hf


@pytest.mark.slow  # two ONNX exports
def test_original_export_has_more_attention_nodes(tmp_path):
    program = capture(wrap_hf(hf_models.build("llama"), "llama", None, None))
    full = export_onnx(program, tmp_path / "full.onnx")
    dropped = export_onnx(D.drop_units(program, ["attention@model.layers.0"]), tmp_path / "d.onnx")
    assert full["attention_nodes"] == 2 and dropped["attention_nodes"] == 1
    assert dropped["initializer_bytes"] < full["initializer_bytes"]
    assert full["inputs"]["input_ids"][1] == full["inputs"]["attention_mask"][1]  # symbolic seq
    assert isinstance(full["inputs"]["input_ids"][1], str)


@pytest.mark.slow  # an ONNX export and a .pt2 save
def test_lowered_dense_op_exports_and_saves(tmp_path):
    loaded = wrap_hf(hf_models.build("qwen2"), "qwen2", None, None)
    program = capture(loaded)
    assert lower_dense(program) == 2
    targets = [str(n.target) for n in program.gm.graph.nodes if n.op == "call_function"]
    assert sum("attnc.attention" in t for t in targets) == 2
    with torch.no_grad():
        ref = loaded.module(*loaded.example_args)
        torch.testing.assert_close(program(*loaded.example_args), ref, atol=1e-5, rtol=0)
    info = export_onnx(program, tmp_path / "m.onnx")
    assert info["attention_nodes"] == 2
    run = ort_runner(str(tmp_path / "m.onnx"), program.input_names)
    assert (run(*loaded.example_args) - ref).abs().max().item() <= 1e-4
    save_pt2(program, tmp_path / "m.pt2")
    ep = torch.export.load(str(tmp_path / "m.pt2"))
    with torch.no_grad():
        kw = dict(zip(loaded.input_names, loaded.example_args, strict=True))  # by name
        torch.testing.assert_close(ep.module()(**kw), ref, atol=1e-5, rtol=0)
