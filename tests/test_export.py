"""ONNX export details: dropped attention and its weights leave the file, dynamic dims survive,
and the lowered attnc::attention op exports and saves (the per-architecture parity is in
test_matrix.py). One export of the whole (lowered) model serves both tests as the reference."""

from __future__ import annotations

import hf_models
import pytest
import torch

import attnc.passes.llm_drop as D
from attnc.capture.program import capture
from attnc.check.fidelity import ort_runner
from attnc.export.artifacts import export_onnx, lower_dense, save_pt2
from attnc.load.models import wrap_hf

# the module's export (`whole`) is made once: both tests on one worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_export")]


@pytest.fixture(scope="module")
def captured():
    loaded = wrap_hf(hf_models.build("qwen2"), "qwen2", None, None)
    return loaded, capture(loaded)


@pytest.fixture(scope="module")
def whole(captured, tmp_path_factory):
    """The whole model with its dense attention lowered to attnc::attention, exported to ONNX:
    (lowered program, the export's summary, its path)."""
    loaded, program = captured
    lowered = program.clone()
    assert lower_dense(lowered) == 2
    path = tmp_path_factory.mktemp("whole") / "m.onnx"
    return lowered, export_onnx(lowered, path), path


def test_original_export_has_more_attention_nodes(captured, whole, tmp_path):
    _, program = captured
    _, full, _ = whole  # lowering leaves the weights and the attention count as they are
    dropped = export_onnx(D.drop_units(program, ["attention@model.layers.0"]), tmp_path / "d.onnx")
    assert full["attention_nodes"] == 2 and dropped["attention_nodes"] == 1
    assert dropped["initializer_bytes"] < full["initializer_bytes"]
    for info in (full, dropped):
        assert info["inputs"]["input_ids"][1] == info["inputs"]["attention_mask"][1]  # symbolic
        assert isinstance(info["inputs"]["input_ids"][1], str)


def test_lowered_dense_op_exports_and_saves(captured, whole, tmp_path):
    loaded, _ = captured
    program, info, path = whole
    targets = [str(n.target) for n in program.gm.graph.nodes if n.op == "call_function"]
    assert sum("attnc.attention" in t for t in targets) == 2
    with torch.no_grad():
        ref = loaded.module(*loaded.example_args)
        torch.testing.assert_close(program(*loaded.example_args), ref, atol=1e-5, rtol=0)
    assert info["attention_nodes"] == 2
    run = ort_runner(str(path), program.input_names)
    assert (run(*loaded.example_args) - ref).abs().max().item() <= 1e-4
    save_pt2(program, tmp_path / "m.pt2")
    ep = torch.export.load(str(tmp_path / "m.pt2"))
    with torch.no_grad():
        kw = dict(zip(loaded.input_names, loaded.example_args, strict=True))  # by name
        torch.testing.assert_close(ep.module()(**kw), ref, atol=1e-5, rtol=0)
