"""Bad calibration data and bad recipes: each is refused with one `error:` line of the right class
(exit code 2) naming the file, line or key and the value, before anything is written; and the
fidelity a build verifies is never unbounded ("{}" -> met)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import hf_models
import pytest
import torch

from attnc.errors import AttncError, CalibrationError, RecipeError

ROOT = Path(__file__).resolve().parents[1]
TINY_LLAMA = ROOT / "examples/models/attnc-tiny-llama"
DROP1 = (
    "version: 1\npasses:\n  - id: llm-drop\n    count: 1\n"
    "calibration: {samples: 8, batch_size: 4, max_length: 16}\n"
)


class NotATensor:  # pickled into a .pt: weights_only must refuse it
    pass


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny HF Llama: vocab 512, 256 positions, no tokenizer."""
    return hf_models.save("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return hf_models.save("vit", tmp_path_factory.mktemp("vit"))


def _ids(rows=4, seq=8, hi=512):
    return torch.randint(0, hi, (rows, seq), generator=torch.Generator().manual_seed(0))


def _pt(obj):
    return lambda p: torch.save(obj, p)


def _text(body: str | bytes):
    def write(p: Path):
        if isinstance(body, bytes):
            p.write_bytes(body)
        else:
            p.write_text(body)

    return write


def _jsonl(*rows):
    return _text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


ALIAS_BOMB = "\n".join(
    ["version: 1", "a: &a [x, x, x, x, x, x, x, x, x]"]
    + [f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
       for p, c in zip("abcdefg", "bcdefgh", strict=True)]
    + ["passes: []"]
)

# name: (model, recipe text (None: DROP1), calibration (suffix, writer) or None, class, message)
M, L, V, T = "never-loaded", "llama", "vit", "tiny-llama"
CASES = {
    # ---- calibration files, checked before the model loads (the model path may not exist)
    "calib empty file": (M, None, (".jsonl", _text("")), CalibrationError, "is empty"),
    "calib blank lines": (M, None, (".jsonl", _text("\n \n")), CalibrationError, "no calibration"),
    "calib not json": (
        M, None, (".jsonl", _jsonl({"text": "ok"}, "{oops")), CalibrationError,
        "line 2: not valid JSON",
    ),
    "calib row without text": (
        M, None, (".jsonl", _jsonl({"txt": "hello"})), CalibrationError,
        'line 1: each line needs "text" or "input_ids" (keys here: txt)',
    ),
    "calib row is a list": (
        M, None, (".jsonl", _jsonl([1, 2, 3])), CalibrationError, "expected a JSON object",
    ),
    "calib float id": (
        M, None, (".jsonl", _jsonl({"input_ids": [1, 2.5]})), CalibrationError,
        "holds 2.5, not an integer",
    ),
    "calib negative id": (
        M, None, (".jsonl", _jsonl({"input_ids": [3]}, {"input_ids": [1, -3]})),
        CalibrationError, "line 2: token id -3 is negative",
    ),
    "calib empty text": (
        M, None, (".jsonl", _jsonl({"text": "  "})), CalibrationError, "non-empty string",
    ),
    "calib not utf-8": (M, None, (".jsonl", _text(b'{"text": "\xff\xfe"}\n')), CalibrationError,
                        "not UTF-8"),
    "calib unknown suffix": (M, None, (".csv", _text("a,b\n")), CalibrationError, "'.csv'"),
    "calib is a folder": (M, None, ("/", None), CalibrationError, "is a folder"),
    "calib missing": (M, None, ("?", None), CalibrationError, "calibration file not found"),
    "calib pickle": (
        M, None, (".pt", _pt({"input_ids": _ids(), "x": NotATensor()})), CalibrationError,
        "is a pickle holding more than tensors (test_bad_input.NotATensor)",
    ),
    "calib garbage .pt": (M, None, (".pt", _text(b"\x00garbage")), CalibrationError,
                          "cannot read tensor file"),
    "calib garbage .safetensors": (M, None, (".safetensors", _text(b"\x00garbage")),
                                   CalibrationError, "cannot read tensor file"),
    "calib .pt holds a number": (M, None, (".pt", _pt(5)), CalibrationError, "holds a int"),
    "calib nan pixels": (
        M, None, (".pt", _pt({"pixel_values": torch.tensor([[1.0, float("nan")]])})),
        CalibrationError, "holds 1 NaN/inf value(s), the first at [0, 1]",
    ),
    "calib batch dims differ": (
        M, None,
        (".pt", _pt({"input_ids": _ids(4), "attention_mask": torch.ones(3, 8, dtype=torch.long)})),
        CalibrationError, "batch sizes differ",
    ),
    "calib zero rows": (
        M, None, (".pt", _pt({"input_ids": torch.zeros(0, 8, dtype=torch.long)})),
        CalibrationError, "holds no samples",
    ),
    "calib scalar": (M, None, (".pt", _pt({"input_ids": torch.tensor(3)})), CalibrationError,
                     "is a scalar"),
    # ---- calibration against the model (llama: vocab 512, 256 positions, no tokenizer)
    "id outside vocab": (
        L, None, (".jsonl", _jsonl({"input_ids": [1, 2]}, {"input_ids": [7, 50321]})),
        CalibrationError, "line 2: token id 50321 is outside the vocabulary (0..511)",
    ),
    "row longer than positions": (
        L, None, (".jsonl", _jsonl({"input_ids": [1] * 300})), CalibrationError,
        "line 1: 300 token ids, more than the model's 256 positions",
    ),
    "text without tokenizer": (
        L, None, (".jsonl", _jsonl({"text": "hello"})), CalibrationError,
        "line 1: the model has no tokenizer",
    ),
    ".pt id outside vocab": (
        L, None,
        (".pt", _pt({"input_ids": _ids() + 600, "attention_mask": torch.ones(4, 8).long()})),
        CalibrationError, "token id is outside the vocabulary (0..511)",
    ),
    ".pt 1-D ids": (
        L, None,
        (".pt", _pt({"input_ids": _ids()[0], "attention_mask": torch.ones(8).long()})),
        CalibrationError, "'input_ids' is 1-D (8,); the model takes 2-D (batch, sequence)",
    ),
    ".pt float ids": (
        L, None,
        (".pt", _pt({"input_ids": _ids().float(), "attention_mask": torch.ones(4, 8).long()})),
        CalibrationError, "'input_ids' holds float32 values; it must hold integer token ids",
    ),
    ".pt wrong tensor count": (
        L, None, (".pt", _pt([_ids(), _ids(), _ids()])), CalibrationError,
        "holds 3 tensor(s); the model takes 2 input(s) (input_ids, attention_mask)",
    ),
    ".pt extra tensor": (
        L, None,
        (".pt", _pt({"input_ids": _ids(), "attention_mask": _ids() * 0, "pixels": _ids()})),
        CalibrationError, "'pixels', which is not an input of the model",
    ),
    ".pt labels not one per sample": (  # 'labels' may ride along for eval, as 1-D class ids
        L, None,
        (".pt", _pt({"input_ids": _ids(), "attention_mask": _ids() * 0, "labels": _ids()})),
        CalibrationError, "'labels' must be 1-D integer class ids",
    ),
    ".pt missing mask": (L, None, (".pt", _pt({"input_ids": _ids()})), CalibrationError,
                         "lacks input(s) ['attention_mask']"),
    ".pt longer than positions": (
        L, None,
        (".pt", _pt({"input_ids": _ids(2, 300), "attention_mask": torch.ones(2, 300).long()})),
        CalibrationError, "sequences of 300 tokens, more than the model's 256 positions",
    ),
    ".pt mask not 0/1": (
        L, None, (".pt", _pt({"input_ids": _ids(), "attention_mask": torch.full((4, 8), 2)})),
        CalibrationError, "holds 2; a mask holds 0 or 1",
    ),
    ".pt ids and mask differ": (
        L, None, (".pt", _pt({"input_ids": _ids(), "attention_mask": torch.ones(4, 6).long()})),
        CalibrationError, "token inputs differ in shape",
    ),
    "vision pixels wrong size": (
        V, None, (".pt", _pt({"pixel_values": torch.randn(4, 3, 48, 48)})), CalibrationError,
        "'pixel_values' holds samples of shape (3, 48, 48); the model takes (3, 32, 32)",
    ),
    "vision integer pixels": (
        V, None, (".pt", _pt({"pixel_values": torch.zeros(4, 3, 32, 32, dtype=torch.long)})),
        CalibrationError, "holds int64 values; the model takes floating point",
    ),
    "text model without --calib": (T, None, None, CalibrationError, "pass --calib"),
    "--calib against source generated": (
        M, "version: 1\npasses: []\ncalibration: {source: generated}\n",
        (".jsonl", _jsonl({"input_ids": [1, 2]})), CalibrationError,
        "the recipe says calibration.source: generated",
    ),
    "source file without --calib": (
        M, "version: 1\npasses: []\ncalibration: {source: file}\n", None, CalibrationError,
        "no --calib is given",
    ),
    "bound not measured for the kind": (
        L, DROP1 + "fidelity: {min_embedding_cosine: 0.9}\n", None, RecipeError,
        "fidelity.min_embedding_cosine is not measured for a causal-lm model",
    ),
    # ---- recipes
    "alias bomb": (M, ALIAS_BOMB, None, RecipeError, "YAML anchors (&a) are not allowed"),
    "alias": (M, "version: 1\npasses: []\nname: *x\n", None, RecipeError, "aliases (*x)"),
    "merge key": (
        M, "version: 1\nx: &b {count: 1}\npasses:\n  - {id: llm-drop, <<: *b}\n", None,
        RecipeError, "anchors (&b)",
    ),
    "duplicate key": (
        M, "version: 1\npasses:\n  - id: llm-drop\n    count: 1\n    count: 3\n", None,
        RecipeError, "line 5: key 'count' appears twice",
    ),
    "pass listed twice": (
        M, "version: 1\npasses:\n  - id: llm-drop\n  - id: llm-drop\n", None, RecipeError,
        "pass 'llm-drop' is listed twice (passes[0] and passes[1])",
    ),
    "repeat not a bool": (
        M, "version: 1\npasses:\n  - id: llm-drop\n  - {id: llm-drop, repeat: twice}\n", None,
        RecipeError, "repeat: expected true or false, got 'twice'",
    ),
    "recipe too big": (
        M, "version: 1\npasses: []\n" + "#" * (1 << 20), None, RecipeError,
        "a recipe is at most 1,048,576 bytes",
    ),
    "recipe not utf-8": (M, b"version: 1\nname: \xff\n", None, RecipeError, "not UTF-8 text"),
    "recipe is a folder": (M, "/", None, RecipeError, "is a folder, not a recipe file"),
    "recipe is a list": (M, "- id: llm-drop\n", None, RecipeError, "got a list"),
    "recipe empty": (M, "", None, RecipeError, "got an empty file"),
    "version missing": (M, "passes: []\n", None, RecipeError, "'version' is missing"),
    "version 2": (M, "version: 2\npasses: []\n", None, RecipeError, "version must be 1, got 2"),
    "version string": (M, "version: '1'\npasses: []\n", None, RecipeError, "got '1'"),
    "opset 99": (
        M, "version: 1\npasses: []\nexport: {opset: 99}\n", None, RecipeError,
        "export.opset 99 is outside what the installed exporter writes (18..",
    ),
    "opset 17": (M, "version: 1\npasses: []\nexport: {opset: 17}\n", None, RecipeError,
                 "export.opset 17"),
    "opset 20 with lower_dense": (
        M, "version: 1\npasses: []\nexport: {opset: 20, lower_dense: true}\n", None, RecipeError,
        "needs opset 23",
    ),
    "top-level typo": (M, "version: 1\npasses: []\nfidelty: {}\n", None, RecipeError,
                       "did you mean 'fidelity'?"),
    "pass key typo": (
        M, "version: 1\npasses:\n  - {id: llm-drop, cuont: 2}\n", None, RecipeError,
        "unknown key 'cuont' in passes[0] (llm-drop) (hint: did you mean 'count'?",
    ),
    "bad enum": (
        M, "version: 1\npasses:\n  - {id: llm-drop, target: heads}\n", None, RecipeError,
        "passes[0] (llm-drop).target: 'heads' is not one of attention, mlp, block, all",
    ),
    "bad union": (
        M, "version: 1\npasses:\n  - {id: llm-drop, layers: {a: 1}}\n", None, RecipeError,
        "expected a string or an integer or a list of",
    ),
    "fidelity typo": (M, "version: 1\npasses: []\nfidelity: {max_bpb: 0.1}\n", None, RecipeError,
                      "did you mean 'max_bpb_increase'?"),
    "bound out of range": (
        M, "version: 1\npasses: []\nfidelity: {min_top1: 1.5}\n", None, RecipeError,
        "fidelity.min_top1 is a share: it must be within [0, 1], got 1.5",
    ),
    "negative bpb bound": (
        M, "version: 1\npasses: []\nfidelity: {max_bpb_increase: -0.1}\n", None, RecipeError,
        "fidelity.max_bpb_increase must be 0 or more",
    ),
    "passes not a list": (M, "version: 1\npasses: llm-drop\n", None, RecipeError,
                          "'passes' must be a list, got str"),
    "pass without id": (M, "version: 1\npasses:\n  - count: 1\n", None, RecipeError,
                        "passes[0] needs an 'id'"),
    "pass id not a string": (M, "version: 1\npasses:\n  - id: 5\n", None, RecipeError,
                             "passes[0].id must be a string, got 5"),
    "unknown source": (
        M, "version: 1\npasses: []\ncalibration: {source: random}\n", None, RecipeError,
        "calibration.source: 'random' is not a valid value (expected one of file, generated",
    ),
    "nested too deeply": (M, "version: 1\nx: " + "[" * 100_000, None, RecipeError,
                          "not valid YAML"),
    "python tag": (
        M, "version: 1\npasses: !!python/object/apply:os.system [echo hi]\n", None, RecipeError,
        "not valid YAML",
    ),
}


def _model(key: str, tmp_path: Path, request) -> str:
    if key == M:  # a folder that is no model: every check of these cases runs before loading
        return str(tmp_path / "in")
    if key == T:
        return str(TINY_LLAMA)
    return str(request.getfixturevalue({L: "llama_dir", V: "vit_dir"}[key]))


def _setup(case: str, tmp_path: Path, request):
    model_key, recipe, calib, cls, match = CASES[case]
    inputs = tmp_path / "in"
    inputs.mkdir()
    if recipe == "/":
        rpath = inputs / "recipe-folder"
        rpath.mkdir()
    else:
        rpath = inputs / "r.yaml"
        body = DROP1 if recipe is None else recipe
        rpath.write_bytes(body if isinstance(body, bytes) else body.encode())
    cpath = None
    if calib is not None:
        suffix, writer = calib
        if suffix == "/":
            cpath = inputs / "calib-folder"
            cpath.mkdir()
        elif suffix == "?":
            cpath = inputs / "absent.jsonl"
        else:
            cpath = inputs / f"calib{suffix}"
            writer(cpath)
    model = _model(model_key, tmp_path, request)
    return model, rpath, cpath, cls, match


def _assert_nothing_written(tmp_path: Path, out: Path, before: set[str]) -> None:
    assert not out.exists()
    assert {p.name for p in tmp_path.iterdir()} == {"in"}  # no staging folder left behind
    assert {p.name for p in (tmp_path / "in").iterdir()} == before


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_with_one_line(case, tmp_path, request):
    from attnc.build import build

    model, rpath, cpath, cls, match = _setup(case, tmp_path, request)
    before = {p.name for p in (tmp_path / "in").iterdir()}
    out = tmp_path / "out"
    with pytest.raises(AttncError) as info:
        build(model, str(rpath), None if cpath is None else str(cpath), out)
    exc = info.value
    line = exc.one_line()
    assert isinstance(exc, cls), f"{type(exc).__name__}: {line}"
    assert exc.exit_code == 2 and "\n" not in line and len(line) < 400, line
    assert match in line, line
    if cpath is not None and isinstance(exc, CalibrationError) and "source" not in line:
        assert cpath.name in line  # the error names the file
    _assert_nothing_written(tmp_path, out, before)


CLI_CASES = ["alias bomb", "pass listed twice", "opset 99", "id outside vocab"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_exit_2_one_error_line(case, tmp_path, request):
    model, rpath, cpath, _cls, match = _setup(case, tmp_path, request)
    before = {p.name for p in (tmp_path / "in").iterdir()}
    out = tmp_path / "out"
    argv = [str(Path(sys.executable).parent / "attnc"), "optimize", model, "-r", str(rpath)]
    argv += ["-o", str(out)] + ([] if cpath is None else ["--calib", str(cpath)])
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr
    assert [ln for ln in lines if ln.startswith("error: ")] == lines[-1:], res.stderr
    assert match in lines[-1] and "Traceback" not in res.stderr
    _assert_nothing_written(tmp_path, out, before)


# ----------------------------------------------------------------------------------------------
# what is allowed, and visibly so


def test_max_length_beyond_positions_is_cut_with_a_log_line(tmp_path, caplog):
    from attnc.load.calibration import CalibrationConfig, load_calibration

    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"input_ids": list(range(1, 12))}) + "\n")
    example = (torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with caplog.at_level(logging.WARNING, logger="attnc"):
        data = load_calibration(
            str(f), names=["input_ids", "attention_mask"], example_args=example, vocab=100,
            positions=16, cfg=CalibrationConfig(max_length=64, holdout=0.0),
        )
        assert data.calib[0].args[0].shape == (1, 11)
        packed = load_calibration(
            str(f), names=["idx"], example_args=example[:1], positions=8,
            cfg=CalibrationConfig(max_length=64, holdout=0.0),
        )
    assert packed.calib[0].args[0].shape[1] == 8  # cut to the 8 positions, not 64
    assert "max_length 64 is more than the model's 8 positions" in caplog.text


def test_generated_allowed_when_the_recipe_says_so_or_no_tokenizer():
    from types import SimpleNamespace

    from attnc.load.calibration import CalibrationConfig, refuse_random_text

    text = SimpleNamespace(tokenizer=object(), kind="causal-lm", source="m")
    with pytest.raises(CalibrationError, match="pass --calib"):
        refuse_random_text(None, CalibrationConfig(), text)
    refuse_random_text(None, CalibrationConfig(source="generated"), text)
    for kind, tok in (("custom", None), ("vision", object())):
        refuse_random_text(None, CalibrationConfig(), SimpleNamespace(tokenizer=tok, kind=kind))


def test_repeat_and_empty_passes_and_old_opset_are_allowed(caplog):
    from attnc.recipe.schema import parse_recipe

    r = parse_recipe({"version": 1, "passes": [{"id": "llm-drop"}, {"id": "llm-drop",
                                                                    "repeat": True}]})
    assert [s.repeat for s in r.passes] == [False, True]
    with caplog.at_level(logging.WARNING, logger="attnc"):
        assert parse_recipe({"version": 1, "passes": []}).passes == ()
        assert parse_recipe({"version": 1, "export": {"opset": 20}}).export.opset == 20
    assert "lists no passes: the build is an exact copy" in caplog.text
    assert "predates the ONNX Attention op" in caplog.text


def test_no_bound_is_never_met():
    from attnc.check.fidelity import meets
    from attnc.recipe.bounds import BOUND_KEYS, FidelityBound, resolve_fidelity
    from attnc.recipe.schema import parse_recipe

    approx = parse_recipe({"version": 1, "passes": [{"id": "llm-drop"}]})
    lm = resolve_fidelity(approx, "causal-lm", exact=False)
    assert lm.fidelity == FidelityBound(max_bpb_increase=0.1)
    assert lm.fidelity_source == "default (causal-lm)"
    enc = resolve_fidelity(approx, "encoder", exact=False)
    assert enc.fidelity.set_bounds() == {"min_embedding_cosine": 0.9}
    exact = resolve_fidelity(parse_recipe({"version": 1, "passes": []}), "vision", exact=True)
    assert exact.fidelity.set_bounds() and exact.fidelity_source == "default (exact passes)"
    # a bound whose metric was not measured, or came out NaN, fails instead of passing
    ok, fails = meets({"cosine": 1.0}, FidelityBound(max_kl=0.1))
    assert not ok and "kl was not measured" in fails[0]
    assert not meets({"cosine": float("nan")}, FidelityBound(min_cosine=0.5))[0]
    # the relative bits/byte rise is derived when a runner reports only the absolute figures
    m = {"bits_per_byte": 1.5, "bits_per_byte_original": 1.0}
    assert meets(m, FidelityBound(max_bpb_increase=0.6))[0]
    assert meets(m, FidelityBound(max_bpb_increase=0.4))[1] == [
        "bits_per_byte_increase 0.5 misses max_bpb_increase 0.4"
    ]
    assert set(BOUND_KEYS) == set(vars(FidelityBound()))  # every field is a documented bound


def test_readme_documents_every_bound_key():
    from attnc.recipe.bounds import BOUND_KEYS

    readme = (ROOT / "README.md").read_text()
    missing = [k for k in BOUND_KEYS if f"`{k}`" not in readme]
    assert not missing, missing


def test_shipped_recipes_carry_task_level_bounds():
    from attnc.recipe.schema import load_recipe

    lm = load_recipe(ROOT / "examples/recipes/tiny_llm_llm_drop.yaml").fidelity
    assert lm.max_bpb_increase is not None
    enc = load_recipe(ROOT / "examples/recipes/minilm_llm_drop.yaml").fidelity
    assert enc.min_embedding_cosine is not None


@pytest.mark.parametrize("passes", ["[{id: llm-drop, count: 1}]", "[]"])
def test_build_without_a_bound_verifies_the_default(passes, llama_dir, tmp_path):
    """No `fidelity:` in the recipe: the report names the default bound it was verified against,
    or the build misses it (exit 3) and says it was the default; never "{}" -> met."""
    from attnc.build import BuildOptions, build
    from attnc.errors import VerificationError

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\npasses: {passes}\ncalibration: {{samples: 8, batch_size: 4, max_length: 16}}"
        "\nexport: {onnx: false, pt2: false}\n"
    )
    out = tmp_path / "out"
    try:
        res = build(str(llama_dir), str(recipe), None, out, BuildOptions(save_original=False))
    except VerificationError as exc:
        assert passes != "[]" and "default (causal-lm) fidelity bound" in exc.one_line()
        assert not out.exists()
        return
    v = res.report["verification"]
    bound = {k: b for k, b in v["bound"].items() if b is not None}
    if passes == "[]":
        assert v["bound_source"] == "default (exact passes)" and bound == {"min_cosine": 0.999}
    else:
        assert v["bound_source"] == "default (causal-lm)" and bound == {"max_bpb_increase": 0.1}
        assert "bits_per_byte_increase" in res.report["fidelity"]
    assert v["ok"] and "{}" not in (out / "report.md").read_text()
