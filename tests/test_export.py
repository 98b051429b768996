"""ONNX export after llm-drop on every architecture: ONNX Runtime (graph optimizations on and off)
matches the torch program, dynamic dims survive, and dropped attention leaves the file."""

from __future__ import annotations

import hf_models
import onnx
import pytest
import torch

import attnc.passes.llm_drop as D
from attnc.export import export_onnx, lower_dense, save_pt2
from attnc.loading import load_model, wrap_hf
from attnc.program import capture
from attnc.verify import ort_runner

HANDWRITTEN = ["nanogpt", "gpt_fast", "manual_gqa", "tiny_encoder", "tiny_vlm"]


def _load(arch, root):
    if arch in HANDWRITTEN:
        return load_model(f"{root / 'tests' / 'models.py'}:make_{arch}")
    return wrap_hf(hf_models.build(arch), arch, None, None)


def _other_shape(loaded):
    """Inputs at a new batch/sequence size, where the export kept those dims dynamic."""
    args = []
    for name, t in zip(loaded.input_names, loaded.example_args, strict=True):
        if name in ("input_ids", "idx") or (not t.is_floating_point() and "mask" not in name
                                           and loaded.kind != "vlm" and name != "pixel_values"):
            args.append(torch.randint(0, 100, (3, t.shape[1] + 5)))
        elif "mask" in name and loaded.kind != "vlm":
            args.append(torch.ones(3, t.shape[1] + 5, dtype=t.dtype))
        else:
            return None
    return tuple(args)


@pytest.mark.parametrize("arch", hf_models.ARCHS + HANDWRITTEN)
def test_onnx_after_llm_drop_matches_torch(arch, root, tmp_path):
    loaded = _load(arch, root)
    program = capture(loaded)
    n_sites = len(program.sites)
    first = D.find_units(program.gm)[0].key
    dropped = D.drop_units(program, [first])
    info = export_onnx(dropped, tmp_path / "m.onnx")
    assert info["attention_nodes"] == n_sites - 1 == len(dropped.sites)
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))
    inputs = [loaded.example_args]
    other = _other_shape(loaded)
    if other is not None and "seq" in str(program.dynamic_dims):
        inputs.append(other)
    for optimize in (True, False):
        run = ort_runner(str(tmp_path / "m.onnx"), program.input_names, optimize=optimize)
        for args in inputs:
            with torch.no_grad():
                ref = dropped(*args)
            got = run(*args)
            assert got.shape == ref.shape
            assert (got - ref).abs().max().item() <= 1e-4


def test_original_export_has_more_attention_nodes(tmp_path):
    program = capture(wrap_hf(hf_models.build("llama"), "llama", None, None))
    full = export_onnx(program, tmp_path / "full.onnx")
    dropped = export_onnx(D.drop_units(program, ["attention@model.layers.0"]), tmp_path / "d.onnx")
    assert full["attention_nodes"] == 2 and dropped["attention_nodes"] == 1
    assert dropped["initializer_bytes"] < full["initializer_bytes"]
    assert full["inputs"]["input_ids"][1] == full["inputs"]["attention_mask"][1]  # symbolic seq
    assert isinstance(full["inputs"]["input_ids"][1], str)


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
        torch.testing.assert_close(ep.module()(*loaded.example_args), ref, atol=1e-5, rtol=0)
