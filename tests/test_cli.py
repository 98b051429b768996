"""The command line: the main build on the real MiniLM (and the README's deploy snippet on it),
inspect/passes, every loading form, and every bad input (one-line error, exit 2 or 3, no
traceback, no output folder left behind)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import hf_models
import numpy as np
import pytest
import torch

from cli.main import main as cli_main  # noqa: F401  (import check; run through attnc.cli)


def run_cli(args, capsys):
    from attnc.cli.main import main

    old = sys.argv
    sys.argv = ["attnc", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def write_recipe(path, body):
    path.write_text(body)
    return path


DROP1 = (
    "version: 1\npasses:\n  - id: llm-drop\n    count: 1\n"
    "calibration: {samples: 8, batch_size: 4}\n"
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    hf_models.save("llama", d)
    return d


@pytest.fixture(scope="module")
def factory_file(tmp_path_factory, root):
    d = tmp_path_factory.mktemp("factory")
    f = d / "my_model.py"
    tests_dir = str(root / "tests")
    f.write_text(
        f"import sys\nsys.path.insert(0, {tests_dir!r})\nimport models\n\n"
        "def build():\n    return models.make_tiny_encoder()[0]\n\n"
        "def build_with_inputs():\n    return models.make_tiny_encoder()\n"
    )
    return f


def assert_one_line_error(code, err, expect_code=2, match=None):
    assert code == expect_code, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err
    if match:
        assert match in err, err


README_BLOCK = re.compile(r"<!-- deploy-example -->\s*```python\n(.*?)```", re.S)


def test_optimize_minilm_end_to_end(minilm, root, tmp_path, capsys):
    """The README's main command (with --json), its folder checked, then the README's own deploy
    snippet run on it in a fresh Python that imports only onnxruntime and the tokenizer (one
    MiniLM build serves both)."""
    out = tmp_path / "minilm-build"  # the README's folder name: its snippet reads from it
    code, stdout, err = run_cli(
        [
            "optimize",
            f"{root}/examples/minilm.py:load",
            "--recipe",
            root / "examples/recipes/minilm_llm_drop.yaml",
            "--calib",
            root / "examples/data/minilm_calib.jsonl",
            "-o",
            out,
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads(stdout)
    for name in ("model.onnx", "model.pt2", "model.attnc.json", "report.json", "report.md",
                 "llm-drop-similarity.svg"):
        assert (out / name).exists(), name
    assert len(report["sites_before"]) == 6 and len(report["sites_after"]) == 4
    assert report["onnx"]["attention_nodes"] == 4 and report["verification"]["ok"]
    ort = report["verification"]["comparisons"]["ONNX Runtime vs torch optimized"]
    assert ort["max_abs_diff"] <= 1e-4
    dropped = [d for d in report["passes"][0]["decisions"] if d["action"] == "drop"]
    assert len(dropped) == 2
    md = (out / "report.md").read_text()
    assert "## Pass `llm-drop`" in md and "](llm-drop-similarity.svg)" in md
    # speed and task-level fidelity, side by side, measured in this build
    assert {t["runtime"] for t in report["bench"]["timings"]} == {"onnxruntime-cpu", "torch"}
    assert all(t["speedup"] > 0 for t in report["bench"]["timings"]) and report["bench"]["device"]
    assert 0.9 <= report["fidelity"]["embedding_cosine"] < 1.0
    assert "## Speed" in md and "speed-up" in md
    # the .pt2 is loadable and runs; the folder has nothing half-written beside it
    ep = torch.export.load(str(out / "model.pt2"))
    ids = torch.randint(0, 1000, (2, 9))
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # by name
    kw["token_type_ids"] = torch.zeros_like(ids)
    assert ep.module()(**kw).shape == (2, 9, 384)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["minilm-build"]
    _readme_deploy_snippet_runs(root, tmp_path)


def _readme_deploy_snippet_runs(root, cwd):
    """The README's <!-- deploy-example --> block, run in `cwd` (which holds minilm-build/)."""
    match = README_BLOCK.search((root / "README.md").read_text())
    assert match, "README has no <!-- deploy-example --> python block"
    script = match.group(1) + (
        "\nimport json\n"
        "print(json.dumps({'inputs': sorted(i.name for i in session.get_inputs()),"
        " 'batch': sorted(batch.keys()), 'emb': embedding.tolist()}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["inputs"] == result["batch"] == ["attention_mask", "input_ids", "token_type_ids"]
    emb = np.array(result["emb"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # the pruned model still ranks like the original: the paraphrase pair is the closest
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2]


def test_bound_missed_exits_3_and_writes_nothing(minilm, root, tmp_path, capsys):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        "version: 1\npasses:\n  - id: llm-drop\n"
        "    count: 3\nfidelity: {min_cosine: 0.999}\n"
        "calibration: {samples: 32, max_length: 32}\n",
    )
    out = tmp_path / "out"
    code, _, err = run_cli(
        [
            "optimize",
            f"{root}/examples/minilm.py:load",
            "-r",
            recipe,
            "--calib",
            root / "examples/data/minilm_calib.jsonl",
            "-o",
            out,
        ],
        capsys,
    )
    assert_one_line_error(code, err, 3, "fidelity bound")
    assert list(tmp_path.iterdir()) == [recipe]


def test_inspect_and_passes(llama_dir, root, capsys):
    code, out, _ = run_cli(["inspect", llama_dir, "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["kind"] == "causal-lm" and len(data["sites"]) == 2
    code, out, _ = run_cli(["inspect", f"{root}/tests/models.py:make_nanogpt", "--json"], capsys)
    assert code == 0 and json.loads(out)["sites"][1]["module"] == "h.1.attn"
    code, out, _ = run_cli(["inspect", f"{root}/tests/models.py:make_nanogpt"], capsys)
    assert code == 0 and "2 attention site(s)" in out
    code, out, _ = run_cli(["passes", "--json"], capsys)
    assert code == 0
    passes = {p["id"]: p for p in json.loads(out)}
    assert passes["llm-drop"]["exact"] is False
    assert {"target", "count", "mode"} <= {f["name"] for f in passes["llm-drop"]["config"]}


def test_loading_forms(llama_dir, factory_file, tmp_path, capsys):
    from attnc.load.models import load_model

    assert load_model(str(llama_dir)).kind == "causal-lm"
    assert load_model(f"{factory_file}:build").kind == "custom"
    loaded = load_model(f"{factory_file}:build_with_inputs")
    assert loaded.input_names == ["input_ids", "attention_mask"] and len(loaded.example_args) == 2
    assert load_model("models:make_gpt_fast").kind == "custom"  # package.module:factory
    # state dict + factory, read with weights_only=True
    model = load_model(f"{factory_file}:build").module.model
    torch.save({k: v * 0 + 1 for k, v in model.state_dict().items()}, tmp_path / "sd.pt")
    loaded = load_model(f"{factory_file}:build", weights=str(tmp_path / "sd.pt"))
    assert all(torch.all(p == 1) for p in loaded.module.model.parameters())
    # a .pt2 file round-trips
    ep = torch.export.export(loaded.module, loaded.example_args, strict=False)
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    again = load_model(str(tmp_path / "m.pt2"))
    assert again.example_args[0].shape == loaded.example_args[0].shape
    # a pickled module loads with --trust-pickle only
    torch.save(model, tmp_path / "whole.pt")
    assert load_model(str(tmp_path / "whole.pt"), trust_pickle=True).kind == "custom"
    # --input-shape drives the example inputs
    shaped = load_model(str(llama_dir), input_shape=[3, 12])
    assert shaped.example_args[0].shape == (3, 12)


BAD = {
    "missing model": (["optimize", "nope/none.pt2"], "model not found"),
    "unknown pass": (["optimize", "@LLAMA"], "unknown pass id"),
    "bad recipe key": (["optimize", "@LLAMA"], "unknown key 'colour'"),
    "bad recipe value": (["optimize", "@LLAMA"], "not one of"),
    "bad version": (["optimize", "@LLAMA"], "version must be 1"),
    "malformed yaml": (["optimize", "@LLAMA"], "not valid YAML"),
    "out-of-range count": (["optimize", "@LLAMA"], "out of range"),
    "empty calib": (["optimize", "@LLAMA"], "holds no calibration samples"),
    "malformed calib": (["optimize", "@LLAMA"], "not valid JSON"),
    "text without tokenizer": (["optimize", "@LLAMA"], "has no tokenizer"),
    "no attention": (["optimize", "@NOATTN"], "no attention found"),
    "pickle without flag": (["optimize", "@PICKLE"], "--trust-pickle"),
    "corrupt pt2": (["optimize", "@CORRUPT"], "not a readable .pt2"),
    "truncated safetensors": (["optimize", "@TRUNC"], "cannot load the weights"),
    "unwritable output": (["optimize", "@LLAMA"], "not writable"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_error(case, llama_dir, factory_file, root, tmp_path, capsys):
    args, match = BAD[case]
    recipe = {
        "unknown pass": "version: 1\npasses:\n  - id: no-such-pass\n",
        "bad recipe key": "version: 1\npasses: []\ncolour: blue\n",
        "bad recipe value": "version: 1\npasses:\n  - id: llm-drop\n    target: heads\n",
        "bad version": "version: 7\npasses: []\n",
        "malformed yaml": "version: 1\npasses: [\n",
        "out-of-range count": "version: 1\npasses:\n  - id: llm-drop\n    count: 9\n",
    }.get(case, DROP1)
    rpath = write_recipe(tmp_path / "r.yaml", recipe)
    calib = None
    if case == "empty calib":
        calib = tmp_path / "c.jsonl"
        calib.write_text("\n")
    elif case == "malformed calib":
        calib = tmp_path / "c.jsonl"
        calib.write_text('{"text": "ok"}\n{not json\n')
    elif case == "text without tokenizer":
        calib = tmp_path / "c.jsonl"
        calib.write_text('{"text": "hello there"}\n')
    model = args[1]
    if model == "@LLAMA":
        model = str(llama_dir)
    elif model == "@NOATTN":
        model = f"{root}/tests/models.py:make_no_attention"
    elif model == "@PICKLE":
        import models

        torch.save(models.make_nanogpt()[0], tmp_path / "m.pt")
        model = str(tmp_path / "m.pt")
    elif model == "@CORRUPT":
        (tmp_path / "bad.pt2").write_bytes(b"PK\x03\x04 not really a zip")
        model = str(tmp_path / "bad.pt2")
    elif model == "@TRUNC":
        import shutil

        d = tmp_path / "trunc"
        shutil.copytree(llama_dir, d)
        st = d / "model.safetensors"
        st.write_bytes(st.read_bytes()[:1000])
        model = str(d)
    out = tmp_path / "out"
    if case == "unwritable output":
        out = Path("/proc/attnc-test-out")  # read-only even for root
    argv = ["optimize", model, "-r", rpath, "-o", out, "--no-bench"]
    if calib is not None:
        argv += ["--calib", calib]
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, 2, match)
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_debug_shows_traceback(tmp_path, capsys):
    code, _, err = run_cli(
        ["--debug", "optimize", tmp_path / "missing.pt2", "-r", "x.yaml"], capsys
    )
    assert code == 2 and "Traceback" in err
