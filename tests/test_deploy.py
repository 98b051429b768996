"""A build folder is deployable: the tokenizer and config beside model.onnx, inputs and outputs
named as the source names them, dims named `batch`/`sequence` and tied, metadata, a `.pt2`
callable by keyword, the same bytes on a rerun, a sentence-transformers model's pooled embedding
as a second output. (The README's deploy snippet runs on the README's main build in
tests/test_cli.py::test_optimize_minilm_end_to_end: one MiniLM build serves both.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hf_models
import numpy as np
import pytest
import torch

from attnc.capture.program import capture
from attnc.errors import RecipeError
from attnc.export import deploy
from attnc.export.artifacts import export_onnx, save_pt2
from attnc.load.models import load_model, wrap_hf

# the module's builds (st_folder, st_builds) are made once: every test here on one worker
pytestmark = pytest.mark.xdist_group("deploy")

WORDS = "the a man woman dog cat eats runs food park is in on with and quickly slowly red".split()  # noqa: SIM905


def run_cli(args) -> int:
    from attnc.cli.main import main

    old = sys.argv
    sys.argv = ["attnc", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old


@pytest.fixture(scope="module")
def st_folder(tmp_path_factory):
    """A tiny BERT saved as a sentence-transformers folder: weights, config, a WordPiece
    tokenizer, modules.json with mean Pooling and Normalize."""
    from transformers import BertTokenizer

    d = tmp_path_factory.mktemp("st-bert")
    hf_models.save("bert", d)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + WORDS + [f"w{i}" for i in range(512 - len(specials) - len(WORDS))]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab_file=str(d / "vocab.txt")).save_pretrained(str(d))
    kinds = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    mods = [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate(kinds)
    ]
    (d / "modules.json").write_text(json.dumps(mods))
    (d / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True}
    (d / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return d


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 10)))) for _ in range(n)]


def _build(folder: Path, tmp: Path, out: Path) -> None:
    recipe = tmp / "r.yaml"
    recipe.write_text(
        "version: 1\npasses:\n  - id: llm-drop\n    count: 1\n"
        "fidelity: {min_cosine: -1}\n"
        "calibration: {samples: 8, batch_size: 4, max_length: 12}\n"
    )
    calib = tmp / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in _sentences(8)))
    # no speed step and no original.pt2: nothing here reads them, and each costs an export of the
    # original per build (test_cli's README build writes both; test_api_bench and
    # test_cli_errors check them)
    args = ["optimize", folder, "--recipe", recipe, "--calib", calib, "-o", out, "--no-bench",
            "--no-save-original"]
    assert run_cli(args) == 0


@pytest.fixture(scope="module")
def st_builds(st_folder, tmp_path_factory):
    """The same build of the tiny sentence-transformers model, twice."""
    tmp = tmp_path_factory.mktemp("st-builds")
    outs = [tmp / "a" / "build", tmp / "b" / "build"]
    for out in outs:
        _build(st_folder, tmp, out)
    return outs


@pytest.mark.slow  # two tiny builds
def test_build_folder_runs_with_onnxruntime_and_its_own_tokenizer(st_builds):
    import onnxruntime as ort
    from transformers import AutoTokenizer

    out = st_builds[0]
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
        "modules.json",
        "1_Pooling/config.json",
    ):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.safetensors"))  # configs and tokenizer only, never weights
    assert not (out / "original.pt2").exists()  # --no-save-original
    tok = AutoTokenizer.from_pretrained(str(out))
    sess = ort.InferenceSession(str(out / "model.onnx"))
    batch = tok(_sentences(3, seed=5), padding=True, return_tensors="np")
    # the tokenizer's own output is the feed: token_type_ids included
    assert sorted(i.name for i in sess.get_inputs()) == sorted(batch.keys())
    assert [o.name for o in sess.get_outputs()] == ["last_hidden_state", "sentence_embedding"]
    hidden, emb = sess.run(None, dict(batch))
    mask = batch["attention_mask"][..., None].astype(np.float32)
    mean = (hidden * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(emb, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5)
    one = tok(["the dog runs"], return_tensors="np")  # batch 1 works too
    assert sess.run(["sentence_embedding"], dict(one))[0].shape == (1, 64)
    # dims named, and tied across the inputs
    for i in sess.get_inputs():
        assert i.shape == ["batch", "sequence"], (i.name, i.shape)
    assert sess.get_outputs()[0].shape == ["batch", "sequence", 64]
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["attnc.version"]
    assert json.loads(meta["attnc.recipe"])["passes"][0]["id"] == "llm-drop"
    passes = json.loads(meta["attnc.passes"])
    assert passes[0]["id"] == "llm-drop"
    assert any(d["action"] == "drop" for d in passes[0]["decisions"])
    figures = json.loads(meta["attnc.verification"])
    assert figures["ONNX Runtime vs torch optimized"]["max_abs_diff"] < 1e-4
    assert figures["ONNX Runtime sentence_embedding vs torch optimized"]["max_abs_diff"] < 1e-4
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["sentence_embedding"] == {"mode": "mean", "normalize": True}


@pytest.mark.slow  # two tiny builds
def test_rerun_writes_identical_model_files(st_builds):
    a, b = st_builds
    for name in ("model.onnx", "model.pt2"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow  # two tiny builds
def test_pt2_takes_keyword_inputs_and_attnc_still_loads_it(st_builds):
    out = st_builds[0]
    ep = torch.export.load(str(out / "model.pt2"))
    ids = torch.randint(5, 500, (3, 7))
    kw = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
    }
    with torch.no_grad():
        by_name = ep.module()(**kw)
    assert by_name.shape == (3, 7, 64)
    with pytest.raises(Exception, match="attention_mask"):  # batch axes are tied
        ep.module()(**{**kw, "attention_mask": torch.ones(2, 7, dtype=torch.long)})
    loaded = load_model(str(out / "model.pt2"))  # attnc itself calls it positionally
    assert loaded.input_names == list(kw)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(*kw.values()), by_name)


def test_sentence_embedding_is_refused_where_the_source_has_no_pooling(tmp_path):
    loaded = wrap_hf(hf_models.build("bert"), str(tmp_path), None, None)
    program = capture(loaded)
    assert deploy.resolve_sentence_embedding(None, loaded, program) is None
    with pytest.raises(RecipeError, match="sentence_embedding"):
        deploy.resolve_sentence_embedding(True, loaded, program)


def test_sentence_transformers_pooling_is_read_and_can_be_switched_off(st_folder, tmp_path):
    loaded = load_model(str(st_folder))
    program = capture(loaded)
    assert program.output_names == ["last_hidden_state"]
    assert deploy.resolve_sentence_embedding(None, loaded, program) == deploy.Pooling("mean", True)
    assert deploy.resolve_sentence_embedding(False, loaded, program) is None
    info = export_onnx(program, tmp_path / "m.onnx")  # no pooling asked: one output
    assert list(info["outputs"]) == ["last_hidden_state"]
    assert info["inputs"]["input_ids"] == ["batch", "sequence"]


def test_causal_lm_pt2_names_logits_and_takes_keywords(tmp_path):
    program = capture(wrap_hf(hf_models.build("llama"), "llama", None, None))
    assert program.output_names == ["logits"]
    save_pt2(program, tmp_path / "model.pt2")
    ep = torch.export.load(str(tmp_path / "model.pt2"))
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    assert names == ["input_ids", "attention_mask"]
    ids = torch.randint(0, 500, (1, 5))  # batch 1: the named dims keep export's 0/1 freedom
    with torch.no_grad():
        got = ep.module()(input_ids=ids, attention_mask=torch.ones_like(ids))
        torch.testing.assert_close(got, program(ids, torch.ones_like(ids)))


def test_unnamed_export_dims_are_renamed_in_the_file(tmp_path):
    program = capture(wrap_hf(hf_models.build("vit"), "vit", None, None))
    program.dim_ranges = {}  # no inferred ranges: the exporter names the dims itself (s0, ...)
    info = export_onnx(program, tmp_path / "m.onnx")
    assert info["inputs"]["pixel_values"][0] == "batch"
    assert info["outputs"]["last_hidden_state"][0] == "batch"
