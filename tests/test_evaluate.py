"""Task-level fidelity (`attnc eval`): identity is exact, metrics fall as more is dropped, and the
ONNX artifact of a build is measured by the same code."""

from __future__ import annotations

import json

import hf_models
import pytest

import attnc.passes.llm_drop as D
from attnc.capture.program import capture
from attnc.check.task import evaluate, task_metrics
from attnc.load.calibration import CalibrationConfig, load_calibration
from attnc.load.models import load_model, wrap_hf
from attnc.recipe.manager import PassContext

TINY = "examples/models/attnc-tiny-llama"


@pytest.fixture(scope="module")
def tiny_llm(root):
    path = root / TINY
    if not (path / "model.safetensors").exists():
        pytest.skip("the trained tiny Llama is not in the checkout")
    loaded = load_model(str(path))
    data = load_calibration(
        str(root / "examples/data/tiny_llm_eval.jsonl"),
        names=loaded.input_names,
        example_args=loaded.example_args,
        tokenizer=loaded.tokenizer,
        cfg=CalibrationConfig(samples=16, max_length=96, batch_size=16, holdout=0.0),
    )
    return loaded, data


def test_lm_identity_is_exact_and_drops_cost(tiny_llm):
    loaded, data = tiny_llm
    program = capture(loaded)
    same = task_metrics("causal-lm", program, loaded.module, data.calib, loaded.tokenizer)
    assert same["kl"] == pytest.approx(0.0, abs=1e-9)
    assert same["top1_agreement"] == 1.0 and same["bits_per_byte_delta"] == 0.0
    assert same["bytes"] == same["tokens"]  # byte-level vocabulary
    assert 0.8 < same["bits_per_byte"] < 2.0  # a trained model, far from 8 bits uniform
    order = [
        d.site
        for d in sorted(
            D.plan(program, D.LLMDropConfig(count=4), PassContext(calibration=data)),
            key=lambda d: d.metrics["rank"],
        )
    ]
    res = [
        task_metrics(
            "causal-lm", D.drop_units(program, order[:n]), program, data.calib, loaded.tokenizer
        )
        for n in (1, 2, 4)
    ]
    bpb = [r["bits_per_byte"] for r in res]
    assert same["bits_per_byte"] < bpb[0] < bpb[1] < bpb[2]
    assert res[0]["top1_agreement"] > res[2]["top1_agreement"]
    assert 0 < res[0]["kl"] < res[2]["kl"]


def test_encoder_and_vision_identity():
    loaded = wrap_hf(hf_models.build("bert"), "bert", None, None)
    program = capture(loaded)
    data = load_calibration(
        None,
        names=loaded.input_names,
        example_args=loaded.example_args,
        cfg=CalibrationConfig(samples=16, batch_size=8),
    )
    m = task_metrics("encoder", program, loaded.module, data.calib)
    assert m["embedding_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert m["retrieval_agreement"] == 1.0
    vit = wrap_hf(hf_models.build("vit"), "vit", None, None)
    vprog = capture(vit)
    vdata = load_calibration(
        None,
        names=vit.input_names,
        example_args=vit.example_args,
        cfg=CalibrationConfig(samples=8, batch_size=4),
    )
    vm = task_metrics("vision", vprog, vit.module, vdata.calib)
    assert vm["embedding_cosine"] == pytest.approx(1.0, abs=1e-6)
    dropped = D.drop_units(vprog, ["attention@layers.0"])
    assert task_metrics("vision", dropped, vit.module, vdata.calib)["embedding_cosine"] < 0.9999


@pytest.mark.slow  # a CLI build of the tiny Llama, then eval through torch and ONNX Runtime
def test_eval_cli_on_build_torch_and_onnx(tiny_llm, root, tmp_path, capsys):
    from test_cli import run_cli

    out = tmp_path / "b"
    recipe = tmp_path / "r.yaml"  # the example recipe on less calibration data (test time)
    text = (root / "examples/recipes/tiny_llm_llm_drop.yaml").read_text()
    recipe.write_text(text.replace("samples: 96", "samples: 24").replace("max_length: 256",
                                                                         "max_length: 96"))
    assert recipe.read_text() != text
    code, _, err = run_cli(
        [
            "optimize",
            root / TINY,
            "-r",
            recipe,
            "--calib",
            root / "examples/data/tiny_llm_calib.jsonl",
            "-o",
            out,
            "--no-bench",
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert "bits_per_byte_delta" in report["fidelity"]
    results = {}
    for extra in ([], ["--onnx"]):
        code, stdout, err = run_cli(
            [
                "eval",
                out,
                "--data",
                root / "examples/data/tiny_llm_eval.jsonl",
                "--samples",
                "16",
                "--max-length",
                "128",
                "--json",
                *extra,
            ],
            capsys,
        )
        assert code == 0, err
        results[bool(extra)] = json.loads(stdout)["metrics"]
    t, o = results[False], results[True]
    assert t["bits_per_byte"] > t["bits_per_byte_original"]
    assert o["bits_per_byte"] == pytest.approx(t["bits_per_byte"], rel=1e-4)
    assert o["kl"] == pytest.approx(t["kl"], rel=1e-3, abs=1e-5)
    # evaluating the original against itself through the library is exact
    same = evaluate(
        str(root / TINY),
        str(root / TINY),
        str(root / "examples/data/tiny_llm_eval.jsonl"),
        samples=8,
        max_length=64,
    )
    assert same["metrics"]["kl"] == 0.0 and same["metrics"]["top1_agreement"] == 1.0


def test_eval_needs_data_for_text_models(root, capsys):
    from test_cli import run_cli

    code, _, err = run_cli(
        [
            "eval",
            f"{root}/tests/models.py:make_nanogpt",
            "--against",
            f"{root}/tests/models.py:make_nanogpt",
        ],
        capsys,
    )
    assert code == 2 and "--data" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_pt2_with_attnc_ops_loads_in_a_fresh_process(tmp_path):
    """A sparse/lowered build's model.pt2 calls attnc:: ops: load_model (what `attnc eval` and
    `attnc bench` use) registers them itself, so a process that never imported attnc.kernels
    (the CLI) can read the file."""
    import subprocess
    import sys

    import torch

    import attnc.kernels  # noqa: F401

    class Win(torch.nn.Module):
        def forward(self, x):
            q = x.reshape(1, 2, x.shape[1], 8)
            return torch.ops.attnc.sliding_window_attention(q, q, q, 4, 0, True)

    ep = torch.export.export(Win(), (torch.randn(1, 12, 16),))
    path = tmp_path / "w.pt2"
    torch.export.save(ep, str(path))
    code = ("import sys; from attnc.load.models import load_model; "
            f"m = load_model({str(path)!r}); print(type(m.module).__name__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
