"""ONNX past the protobuf limit: with a tiny limit forced, the build writes model.onnx plus
model.onnx.data, keeps the weights out of the graph file through every later edit (metadata,
verification figures), and the pair runs in ONNX Runtime like the torch program."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from attnc.build import BuildOptions, build
from attnc.errors import ExportError
from attnc.export import external_data as ext


def _tiny_llama(path, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(path)
    return path


RECIPE = {
    "version": 1,
    "passes": [{"id": "llm-drop", "target": "attention", "count": 1}],
    "fidelity": {"min_cosine": 0.0},
    "calibration": {"samples": 8, "max_length": 16, "batch_size": 4, "source": "generated"},
    "export": {"pt2": False},
}


@pytest.mark.slow
def test_forced_external_data_builds_and_runs_in_ort(tmp_path, monkeypatch):
    monkeypatch.setenv(ext.LIMIT_ENV, "1000")  # any model passes 1000 bytes of weights
    src = _tiny_llama(tmp_path / "src")
    out = tmp_path / "build"
    res = build(str(src), RECIPE, None, out, BuildOptions(save_original=False))
    files = sorted(p.name for p in out.iterdir())
    assert "model.onnx" in files and "model.onnx.data" in files
    report = json.loads((out / "report.json").read_text())
    lay = report["onnx"]["layout"]
    assert lay["external_data"] and set(lay["files"]) == {"model.onnx", "model.onnx.data"}
    assert lay["files"]["model.onnx.data"] == (out / "model.onnx.data").stat().st_size
    assert "model.onnx.data" in report["artifacts"]
    marker = json.loads((out / ".attnc-build").read_text())
    assert "model.onnx.data" in marker["files"]  # a rebuild may replace the folder
    # the weights stay in the data file after the metadata edits: none inline in the graph
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    weights = ext.weight_bytes(res.program.gm)
    assert ext.external_files(model) == {"model.onnx.data": pytest.approx(weights, rel=0.2)}
    inline = sum(len(t.raw_data) for t in model.graph.initializer)
    assert inline < weights / 20  # at most small constants stay in the graph file
    assert "attnc.verification" in {p.key for p in model.metadata_props}
    onnx.checker.check_model(str(out / "model.onnx"))
    # ONNX Runtime reads the pair by path and computes what the torch program computes
    ids = torch.randint(0, 97, (2, 11))
    mask = torch.ones_like(ids)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    want = res.program(ids, mask)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)
    ver = report["verification"]["comparisons"]["ONNX Runtime vs torch optimized"]
    assert ver["max_abs_diff"] <= 1e-3


def test_limit_and_request(monkeypatch):
    gm = torch.nn.Linear(8, 8)  # 288 bytes
    monkeypatch.setenv(ext.LIMIT_ENV, "1000")
    assert not ext.wanted(gm, None)
    assert ext.wanted(gm, True)
    monkeypatch.setenv(ext.LIMIT_ENV, "100")
    assert ext.wanted(gm, None) and not ext.wanted(gm, False)
    monkeypatch.setenv(ext.LIMIT_ENV, "lots")
    with pytest.raises(ExportError, match="not a number"):
        ext.limit()


def test_page_out_keeps_values(tmp_path):
    """Weights memory-mapped from safetensors, paged out, read back the same bytes."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file({"w": torch.randn(64, 1024), "b": torch.randn(1024)}, tmp_path / "w.safetensors")
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        ts = [f.get_tensor(k) for k in ("w", "b")]
    before = [t.clone() for t in ts]
    ext.page_out(ts + [torch.ones(3)])  # an anonymous tensor is skipped
    assert all(torch.equal(a, b) for a, b in zip(ts, before, strict=True))
