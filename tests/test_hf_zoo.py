"""The architecture zoo (tests/hf_zoo.py): every Hugging Face kind attnc must handle, plus the
hand-written models, saved as a Hugging Face folder and given to attnc as a user would.

test_inspect: attnc loads and captures it (the program computes what the model does) and finds one
site per attention call the config declares; test_inspect_cli does so through `attnc inspect
FOLDER --json` for one architecture of each kind.
test_llm_drop: an llm-drop build dropping one attention sublayer succeeds, its model.onnx passes the
checker and matches torch in ONNX Runtime (<= 1e-4), the weights removed are that sublayer's own,
and the result equals the original with that attention branch zeroed.

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
XFAIL_INSPECT: dict[str, str] = {}
XFAIL_DROP: dict[str, str] = {}


def _params(names, xfails, slow=False):
    out = []
    for name in names:
        # one worker per architecture (`--dist loadgroup` in the test command): its session
        # capture serves test_inspect and the build tests without being made twice
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
def test_llm_drop(name, zoo_spec, zoo_root, captured):
    spec = zoo_spec(name)
    try:
        loaded, program = captured(name)
        res = zt.check_drop(name, spec, zoo_root / name / "drop", loaded, program)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(_clean(exc))
    assert (res.out_dir / "model.onnx").exists()
    assert res.ort_max_abs_diff <= zt.ORT_TOL
    assert res.branch_max_abs_diff <= zt.BRANCH_TOL
    assert len(res.report["sites_after"]) == hf_zoo.declared_sites(name) - 1
    assert res.removed or hf_zoo.ZOO[name].shared_weights
