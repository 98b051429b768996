"""The architecture matrix: every supported architecture × every available pass at a small
setting → capture → passes (each setting through the pass manager and its own recipe, applied in
turn to the same program; each must fire) → ONNX export → ONNX Runtime parity with the torch
program, graph optimizations on and off, at a second shape where the export kept dims dynamic.
One export per architecture carries every pass's edit (an export costs ~10 s). A new pass joins
by adding a line to PASS_SETTINGS."""

from __future__ import annotations

import hf_models
import pytest
import torch

from attnc.capture.program import capture
from attnc.check.fidelity import ort_runner
from attnc.export.artifacts import export_onnx
from attnc.load.calibration import CalibrationConfig, CalibrationData, conform, generated_batches
from attnc.load.models import load_model, wrap_hf
from attnc.recipe.manager import PassContext, run_passes
from attnc.recipe.schema import parse_recipe

HANDWRITTEN = ["nanogpt", "gpt_fast", "manual_gqa", "tiny_encoder", "tiny_vlm"]
ARCHS = hf_models.ARCHS + HANDWRITTEN

# (pass id, small config, how many attention sites it removes)
PASS_SETTINGS = [
    ("llm-drop", {"target": "attention", "count": 1}, 1),
    ("llm-drop", {"target": "mlp", "count": 1}, 0),
]


def _load(arch, root):
    if arch in HANDWRITTEN:
        return load_model(f"{root / 'tests' / 'models.py'}:make_{arch}")
    return wrap_hf(hf_models.build(arch), arch, None, None)


def _other_shape(loaded, program):
    """Inputs at a new batch and sequence size for text models exported with a dynamic seq."""
    if "seq" not in str(program.dynamic_dims) or loaded.kind == "vlm":
        return None
    if any(t.is_floating_point() for t in loaded.example_args):
        return None
    seq = loaded.example_args[0].shape[1] + 5
    def make(n, t):
        if "mask" in n:
            return torch.ones(3, seq, dtype=t.dtype)
        if "token_type" in n:
            return torch.zeros(3, seq, dtype=t.dtype)
        return torch.randint(0, 100, (3, seq))

    return tuple(make(n, t) for n, t in zip(loaded.input_names, loaded.example_args, strict=True))


_CAPTURED: dict[str, tuple] = {}


def _captured(arch, root):
    """(loaded, program) captured once per architecture and worker: each setting's passes run
    on a clone (`run_passes(program.clone(), ...)`), so the captured program is never edited."""
    if arch not in _CAPTURED:
        loaded = _load(arch, root)
        _CAPTURED[arch] = (loaded, capture(loaded))
    return _CAPTURED[arch]


@pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=pytest.mark.xdist_group(f"matrix-{a}")) for a in ARCHS]
)
def test_matrix(arch, root, tmp_path):
    loaded, program = _captured(arch, root)
    n_sites = len(program.sites)
    batches = generated_batches(
        loaded.example_args, loaded.input_names, CalibrationConfig(samples=8, batch_size=4)
    )
    data = conform(
        CalibrationData(batches, batches[:1], "generated"),
        loaded.input_names,
        loaded.example_args,
        program.dynamic_dims,
    )
    ctx = PassContext(calibration=data)
    out = program.clone()
    for pass_id, config, removes in PASS_SETTINGS:  # each setting its own recipe, in turn
        recipe = parse_recipe({"version": 1, "passes": [{"id": pass_id, **config}]})
        before = len(out.sites)
        out, results = run_passes(out, recipe.passes, ctx)
        assert sum(d.fired for d in results[0].decisions) >= 1, (pass_id, config)  # it fired
        assert len(out.sites) == before - removes
    assert len(out.sites) == n_sites - sum(r for _, _, r in PASS_SETTINGS)
    info = export_onnx(out, tmp_path / "m.onnx")
    assert info["attention_nodes"] == len(out.sites)
    inputs = [loaded.example_args]
    other = _other_shape(loaded, program)
    if other is not None:
        inputs.append(other)
    for optimize in (True, False):
        run = ort_runner(str(tmp_path / "m.onnx"), program.input_names, optimize=optimize)
        for args in inputs:
            with torch.no_grad():
                ref = out(*args)
            got = run(*args)
            assert got.shape == ref.shape
            assert (got - ref).abs().max().item() <= 1e-4
