"""The Python API (attnc.optimize / inspect / evaluate), the build's speed step and `attnc bench`,
and INT8 quantization as a verified, bounded export step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import pytest
import torch

import attnc
from attnc.check.bench import BenchConfig, inputs_at, parse_shapes, time_pair
from attnc.errors import RecipeError, UsageError, VerificationError

sys.path.insert(0, str(Path(__file__).parent))
import models  # noqa: E402

GENERATED = {"source": "generated", "samples": 16, "batch_size": 8, "max_length": 16}


def _recipe(**export) -> dict:
    return {
        "version": 1,
        "passes": [{"id": "llm-drop", "target": "attention", "count": 1}],
        "fidelity": {"min_cosine": 0.0},
        "calibration": GENERATED,
        "export": {"opset": 23, **export},
    }


def test_time_pair_interleaves_and_orders_fairly():
    calls = []
    a = lambda: calls.append("a")  # noqa: E731
    b = lambda: calls.append("b")  # noqa: E731
    ta, tb = time_pair(a, b, (), repeats=4, warmup=1)
    assert len(ta) == len(tb) == 4
    # warm-up a b, then a b / b a / a b / b a: neither side always runs first
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]


def test_time_pair_sees_a_real_difference():
    x = torch.randn(256, 256)
    slow = lambda x: [x @ x for _ in range(8)]  # noqa: E731
    fast = lambda x: x @ x  # noqa: E731
    t_fast, t_slow = time_pair(fast, slow, (x,), repeats=5, warmup=1)
    assert sorted(t_fast)[2] < sorted(t_slow)[2]


@pytest.mark.parametrize("text", ["8", "1x", "axb", "0x4", "1x2x3"])
def test_bad_shapes_are_one_line_usage_errors(text):
    with pytest.raises(UsageError):
        parse_shapes(text)


def test_inputs_at_shapes_follow_the_request():
    ex = (torch.randint(0, 50, (2, 7)), torch.ones(2, 7, dtype=torch.long))
    ids, mask = inputs_at(ex, ["input_ids", "attention_mask"], 3, 11, vocab=50)
    assert ids.shape == mask.shape == (3, 11) and int(ids.max()) < 50 and bool(mask.all())


def test_optimize_takes_a_module_and_a_recipe_dict(tmp_path):
    # model.onnx only: no model.pt2 / original.pt2 (a re-export each; the API's full folder, with
    # both, is test_build_bench_step_and_bench_command's)
    model, (ids,) = models.make_gpt_fast()
    res = attnc.optimize(model, _recipe(pt2=False), out=tmp_path / "b", example_inputs=(ids,),
                         bench=False, save_original=False)
    assert res.out_dir == tmp_path / "b" and res.paths["onnx"].is_file()
    assert sorted(p.name for p in (tmp_path / "b").glob("*.pt2")) == []
    assert len(res.report["sites_after"]) == len(res.report["sites_before"]) - 1
    assert res.report["bench"] is None
    # the program is the optimized one: one attention fewer than the original
    orig = attnc.inspect(model, example_inputs=(ids,))
    assert len(orig["sites"]) == len(res.report["sites_before"])
    with torch.no_grad():
        out = res.program(ids)
    assert out.shape == model(ids).shape


def test_optimize_without_out_keeps_nothing_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    model, example = models.make_gpt_fast()
    res = attnc.optimize(model, _recipe(), example_inputs=example, bench=False)
    assert res.out_dir is None and res.report["artifacts"]
    assert list(tmp_path.iterdir()) == []


def test_optimize_rejects_unknown_options_and_bad_models():
    with pytest.raises(UsageError, match="unknown option"):
        attnc.optimize("x.pt2", _recipe(), benchmark=True)
    with pytest.raises(UsageError, match="nn.Module"):
        attnc.optimize(42, _recipe())
    with pytest.raises(RecipeError):
        model, example = models.make_gpt_fast()
        attnc.optimize(model, {"version": 1, "passes": [{"id": "nope"}]},
                       example_inputs=example)


@pytest.mark.slow
def test_build_bench_step_and_bench_command(tmp_path):
    """The build times itself against the original in the same run; `attnc bench` re-times the
    folder from its files alone (original.pt2: no code runs)."""
    model, example = models.make_gpt_fast()
    res = attnc.optimize(model, _recipe(), out=tmp_path / "b", example_inputs=example,
                         bench_shapes=((1, 24),), bench_repeats=3)
    bench = res.report["bench"]
    assert bench["device"] and bench["threads"] >= 1
    assert bench["ort_intra_op_spinning"] is False
    runtimes = {t["runtime"] for t in bench["timings"]}
    assert runtimes == {"onnxruntime-cpu", "torch"}
    assert len(bench["timings"]) == 4  # 2 shapes x 2 runtimes
    for t in bench["timings"]:
        assert t["optimized_ms"] > 0 and t["original_ms"] > 0
        assert t["speedup"] == pytest.approx(t["original_ms"] / t["optimized_ms"])
    assert not (tmp_path / "b" / ".bench").exists()
    on_disk = json.loads((tmp_path / "b" / "report.json").read_text())
    assert on_disk["bench"]["timings"][0]["runtime"] == "onnxruntime-cpu"

    from typer.testing import CliRunner

    from attnc.cli.main import app

    r = CliRunner().invoke(app, ["bench", str(tmp_path / "b"), "--shapes", "2x9", "--repeats",
                                 "3", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert [t["shape"][0] for t in got["timings"]] == [[2, 9], [2, 9]]
    assert not any(p.name.startswith(".attnc-bench") for p in tmp_path.iterdir())


def test_bench_of_a_folder_that_is_not_a_build(tmp_path):
    from attnc.check.bench import bench_folder

    with pytest.raises(UsageError, match="not an attnc build"):
        bench_folder(tmp_path, BenchConfig())


@pytest.mark.slow
def test_int8_dynamic_is_verified_bounded_and_reported(tmp_path):
    # no model.pt2 / original.pt2 (a re-export each): quantization works on model.onnx alone
    model, example = models.make_gpt_fast()
    res = attnc.optimize(model, _recipe(quantize="int8-dynamic", pt2=False), out=tmp_path / "q",
                         example_inputs=example, bench=False, save_original=False)
    assert not (tmp_path / "q" / "model.pt2").exists()
    q = res.report["quantization"]
    assert q["mode"] == "int8-dynamic" and q["bytes_after"] < q["bytes_before"]
    comp = res.report["verification"]["comparisons"]["ONNX Runtime int8-dynamic vs original"]
    assert 0.5 < comp["cosine"] < 1.0  # approximate, and measured against the original
    m = onnx.load(str(tmp_path / "q" / "model.onnx"))
    ops = {n.op_type for n in m.graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
    assert "QAttention" not in ops  # ORT's quantizer must leave the Attention op alone
    # a bound the int8 file misses fails the build (exit 3), nothing written
    bad = _recipe(quantize="int8-dynamic", pt2=False)
    bad["fidelity"] = {"min_cosine": 0.0, "min_sqnr_db": 200.0}
    with pytest.raises(VerificationError):
        attnc.optimize(model, {**bad, "passes": []}, out=tmp_path / "q2",
                       example_inputs=example, bench=False)
    assert not (tmp_path / "q2").exists()


def test_quantize_needs_onnx():
    from attnc.recipe.schema import parse_recipe

    with pytest.raises(RecipeError, match="quantize"):
        parse_recipe({"version": 1, "passes": [],
                      "export": {"onnx": False, "quantize": "int8-dynamic"}})


def test_bench_ort_sessions_do_not_spin(tmp_path, monkeypatch):
    """The bench interleaves two ORT sessions; each is made without intra-op spinning (a
    spinning pool slows the other session's runs), and still runs the file."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from attnc.check import bench as B

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx")
    seen = []
    real = ort.InferenceSession

    def spy(path, so, **kw):
        seen.append(so.get_session_config_entry("session.intra_op.allow_spinning"))
        return real(path, so, **kw)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    run = B._ort_session(str(tmp_path / "m.onnx"))
    assert seen == ["0"]
    assert np.array_equal(run(torch.tensor([1.0, -2.0]))[0], np.array([-1.0, 2.0], np.float32))
