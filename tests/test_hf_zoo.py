"""The architecture zoo (tests/hf_zoo.py): every Hugging Face kind attnc must handle, plus the
hand-written models, saved as a Hugging Face folder and given to attnc as a user would.

test_inspect: attnc loads and captures it (the program computes what the model does) and finds one
site per attention call the config declares; test_inspect_cli does so through `attnc inspect
FOLDER --json` for one architecture of each kind.
test_llm_drop: an llm-drop build dropping one attention sublayer succeeds, its model.onnx passes the
checker and matches torch in ONNX Runtime (<= 1e-4), the weights removed are that sublayer's own,
and the result equals the original with that attention branch zeroed. For the architectures in
ONNX_IN_MATRIX and ONNX_IN_MOE_MQA the build skips the ONNX export (most of a build's time):
tests/test_matrix.py exports the same class at the same tiny size after the same llm-drop
(attention, count 1) and checks it in ONNX Runtime at two shapes; tests/test_export_moe_mqa.py
exports the same MoE / multi-query class (one layer) and checks it at three shapes, and the
post-drop ONNX of those families is still checked here (qwen2_moe) and there (falcon, sequential).
test_onnx_elsewhere_is_covered fails if any of that stops being so.

Architectures attnc does not handle yet are strict xfails whose reason is the stage and error
tests/zoo_triage.py prints: a fix flips them to XPASS, which fails the suite until the mark goes.
"""

from __future__ import annotations

from pathlib import Path

import hf_zoo
import pytest
import zoo_triage as zt

from attnc.errors import AttncError

# Architectures attnc refuses, with the one-line error that names why (never an internal error,
# never a silent wrong model): name -> (stage, the error's text)
REFUSED_INSPECT: dict[str, tuple[str, str]] = {
    # torch.export cannot trace Longformer's data-dependent global-attention bookkeeping
    "longformer": ("capture", "torch.export failed"),
    # exported, PaliGemma's image-prefix mask differs from eager mode's: the capture parity
    # check refuses a program that computes another model
    "paligemma": ("capture", "torch.export changed what"),
}
REFUSED_DROP: dict[str, tuple[str, str]] = {
    **REFUSED_INSPECT,
}
# zoo name -> test_matrix's architecture of the same class and size (tests/hf_models.py or the
# same hand-written factory): its llm-drop ONNX export and ONNX Runtime parity are tested there
ONNX_IN_MATRIX: dict[str, str] = {
    "llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "gpt2": "gpt2", "bert": "bert",
    "vit": "vit", "clip_vision": "clip", "llava": "llava", "nanogpt": "nanogpt",
    "gpt_fast": "gpt_fast", "manual_gqa": "manual_gqa", "tiny_encoder": "tiny_encoder",
    "tiny_vlm": "tiny_vlm",
}
# zoo name -> test_export_moe_mqa's architecture of the same class and attention form
ONNX_IN_MOE_MQA: dict[str, str] = {
    "mixtral": "mixtral", "olmoe": "olmoe", "falcon": "falcon", "gpt_bigcode": "gpt_bigcode",
}
XFAIL_INSPECT: dict[str, str] = {}
XFAIL_DROP: dict[str, str] = {}


def _params(names, xfails, slow=False):
    out = []
    for name in names:
        # one worker per architecture (`--dist loadgroup` in the test command): its session
        # capture serves test_inspect and test_refused_cleanly_at_build without being made twice
        marks = [pytest.mark.xdist_group(f"zoo-{name}")]
        if slow:
            marks.append(pytest.mark.slow)
        if name in xfails:
            marks.append(pytest.mark.xfail(reason=xfails[name], strict=True))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.fixture(scope="session")
def zoo_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def zoo_spec(zoo_root):
    """name -> what attnc is given: a saved HF folder (written once), or a factory spec."""
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            folder = None
            if not hf_zoo.ZOO[name].handwritten:
                folder = hf_zoo.save(name, zoo_root / name / "hf")
            made[name] = hf_zoo.spec(name, folder)
        return made[name]

    return get


def _clean(exc: BaseException) -> str:
    """A failure's one line; a crash that is not an AttncError fails as an internal error."""
    if isinstance(exc, zt.StageFailure):
        assert not exc.internal, f"internal error at {exc.stage}: {exc.message}"
        return f"{exc.stage}: {exc.message}"
    assert isinstance(exc, AttncError), f"internal error: {zt.first_line(exc)}"
    line = exc.one_line()
    assert "\n" not in line
    return line


def test_zoo_covers_every_kind():
    kinds = {a.kind for a in hf_zoo.ZOO.values()}
    assert {"causal-lm", "encoder", "vision", "speech", "seq2seq", "vlm", "custom"} <= kinds
    traits = {t for a in hf_zoo.ZOO.values() for t in a.traits}
    for t in ("gqa", "mqa", "qk-norm", "sliding-window", "soft-capping", "alibi",
              "parallel-residual", "moe", "relative-position", "disentangled", "shared-weights",
              "local-global", "relative-bias", "windowed", "cross-attention"):
        assert t in traits, t
    assert len(hf_zoo.HF) >= 32


def test_onnx_elsewhere_is_covered():
    """The zoo builds of ONNX_IN_MATRIX skip ONNX only because test_matrix exports the same
    class, at the same size, after the same llm-drop (and an MLP drop with it), and checks it in
    ONNX Runtime; those of ONNX_IN_MOE_MQA because test_export_moe_mqa exports the same class
    with the same experts / K/V-head form, and a post-drop ONNX of each family is still checked."""
    import hf_models
    import test_export_moe_mqa as moe
    import test_matrix

    assert not set(ONNX_IN_MATRIX) & set(ONNX_IN_MOE_MQA)
    assert "qwen2_moe" not in ONNX_IN_MOE_MQA  # the post-drop MoE export stays here
    for name, other in ONNX_IN_MOE_MQA.items():
        assert other in moe.MOE_ARCHS + moe.MQA_ARCHS and other != moe.FACTORY, name
        zoo, ref = hf_zoo.ZOO[name], moe._config(other)
        assert ref.architectures == [zoo.model_class], name
        cfg = zoo.config()
        for key in ("multi_query", "parallel_attn", "alibi", "new_decoder_architecture"):
            assert getattr(cfg, key, None) == getattr(ref, key, None), (name, key)
        assert (name in moe.MOE_ARCHS) == ("moe" in zoo.traits), name

    drop = ("llm-drop", {"target": "attention", "count": 1}, 1)
    assert drop in test_matrix.PASS_SETTINGS
    for name, other in ONNX_IN_MATRIX.items():
        assert other in test_matrix.ARCHS, name
        zoo = hf_zoo.ZOO[name]
        if zoo.handwritten:
            assert other == name and other in test_matrix.HANDWRITTEN, name
            continue
        cfg, ref = zoo.config(), hf_models._cfg(other)
        assert ref.architectures == [zoo.model_class], name
        for c in (cfg, ref):  # a VLM's sizes are its text and vision configs'
            c.sub = [getattr(c, k) for k in ("text_config", "vision_config") if hasattr(c, k)]
        for a, b in zip([cfg, *cfg.sub], [ref, *ref.sub], strict=True):
            for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "n_embd", "n_layer", "n_head", "image_size",
                        "patch_size"):
                assert getattr(a, key, None) == getattr(b, key, None), (name, key)


@pytest.fixture(scope="session")
def captured(zoo_spec):
    """name -> (loaded, program), loaded and captured once per session (a failure is not kept:
    each test that needs it reports it)."""
    done: dict[str, tuple] = {}

    def get(name: str):
        if name not in done:
            done[name] = zt.check_inspect(name, zoo_spec(name))
        return done[name]

    return get


@pytest.mark.parametrize(
    "name", _params([n for n in hf_zoo.ZOO if n not in REFUSED_INSPECT], XFAIL_INSPECT)
)
def test_inspect(name, captured):
    """Loads, captures to a program that computes what the model does, one site per attention
    call the config declares."""
    try:
        _, program = captured(name)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(_clean(exc))
    sites = program.sites
    assert len(sites) == hf_zoo.declared_sites(name), [s.module for s in sites]
    assert all(s.num_heads >= 1 and s.head_dim >= 1 for s in sites)


# one architecture of each kind through the command line
CLI_NAMES = ["llama", "bert", "vit", "wav2vec2", "t5", "llava", "tiny_encoder"]


@pytest.mark.parametrize("name", _params(CLI_NAMES, XFAIL_INSPECT))
def test_inspect_cli(name, zoo_spec):
    try:
        payload = zt.inspect_cli(zoo_spec(name))
    except Exception as exc:  # noqa: BLE001
        pytest.fail(_clean(exc))
    sites = payload["sites"]
    assert len(sites) == hf_zoo.declared_sites(name), [s["module"] for s in sites]
    assert payload["inputs"]


@pytest.mark.parametrize("name", _params(sorted(REFUSED_INSPECT), {}))
def test_refused_cleanly_at_capture(name, captured):
    """What attnc cannot handle is a one-line AttncError naming why, never a wrong model."""
    stage, text = REFUSED_INSPECT[name]
    with pytest.raises(zt.StageFailure) as info:
        captured(name)
    failure = info.value
    assert not failure.internal and failure.stage == stage, failure
    assert text in failure.message and "\n" not in failure.message


@pytest.mark.slow
@pytest.mark.parametrize("name", _params(sorted(set(REFUSED_DROP) - set(REFUSED_INSPECT)), {}))
def test_refused_cleanly_at_build(name, zoo_spec, zoo_root, captured):
    stage, text = REFUSED_DROP[name]
    loaded, program = captured(name)
    with pytest.raises(zt.StageFailure) as info:
        zt.check_drop(name, zoo_spec(name), zoo_root / name / "drop", loaded, program)
    failure = info.value
    assert not failure.internal and failure.stage == stage, failure
    assert text in failure.message and "\n" not in failure.message
    assert not (zoo_root / name / "drop" / "out").exists()  # nothing half-written


@pytest.mark.parametrize(
    "name",
    _params([n for n in hf_zoo.ZOO if n not in REFUSED_DROP], XFAIL_DROP, slow=True),
)
def test_llm_drop(name, zoo_spec, zoo_root):
    # the edit is checked against the model the build loaded and the program it captured (the
    # folder's load + capture and its parity with the model: test_inspect, the other tier)
    spec = zoo_spec(name)
    onnx = name not in ONNX_IN_MATRIX and name not in ONNX_IN_MOE_MQA
    try:
        res = zt.check_drop(name, spec, zoo_root / name / "drop", onnx=onnx)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(_clean(exc))
    assert (res.out_dir / "model.onnx").exists() == onnx
    if onnx:
        assert res.ort_max_abs_diff <= zt.ORT_TOL
    assert res.branch_max_abs_diff <= zt.BRANCH_TOL
    assert len(res.report["sites_after"]) == hf_zoo.declared_sites(name) - 1
    assert res.removed or hf_zoo.ZOO[name].shared_weights
