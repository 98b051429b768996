"""`build()`: the whole pipeline the CLI's `optimize` calls.

load → capture → calibrate → passes → lower → verify (torch) → export (.pt2, ONNX) →
verify (ONNX Runtime) → report. Every artifact is written to a temporary folder beside the
destination and moved into place only when the whole build succeeded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from attnc.capture.program import Program, capture
from attnc.check.fidelity import Memo, compare, meets, ort_runner, reference_outputs
from attnc.errors import CaptureError, UsageError, VerificationError
from attnc.graph.edit import param_count
from attnc.load.calibration import load_calibration
from attnc.load.models import LoadedModel, load_model
from attnc.recipe.manager import PassContext, run_passes
from attnc.recipe.schema import Recipe, load_recipe

log = logging.getLogger(__name__)


@dataclass
class BuildOptions:
    weights: str | None = None
    trust_pickle: bool = False
    input_shape: list[int] | None = None
    dtype: str = "float32"
    progress: Callable[[str], None] | None = None


@dataclass
class BuildResult:
    out_dir: Path
    report: dict
    program: Program


def check_output_dir(out: Path) -> Path:
    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path {out} exists and is not a folder")
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    try:  # a real write, not os.access: root passes access checks on read-only mounts
        tempfile.TemporaryDirectory(dir=probe, prefix=".attnc-probe-").cleanup()
    except OSError:
        raise UsageError(f"output folder {out} is not writable") from None
    return parent


def _vocab(loaded: LoadedModel) -> int | None:
    cfg = loaded.config
    if cfg is None:
        return None
    text = getattr(cfg, "text_config", None)
    return getattr(text or cfg, "vocab_size", None)


def prepare(spec: str, recipe: Recipe, calib: str | None, opts: BuildOptions):
    say = opts.progress or (lambda s: None)
    say(f"loading {spec}")
    loaded = load_model(
        spec,
        weights=opts.weights,
        trust_pickle=opts.trust_pickle,
        input_shape=opts.input_shape,
        dtype=opts.dtype,
    )
    say("capturing with torch.export")
    program = capture(loaded)
    if not program.sites:
        raise CaptureError(
            f"no attention found in {spec}",
            "attnc works on models with scaled_dot_product_attention or matmul-softmax-matmul",
        )
    extra = {}
    if loaded.kind == "vlm" and "pixel_values" in loaded.input_names:
        pix = loaded.example_args[loaded.input_names.index("pixel_values")]
        extra["pixel_values"] = lambda n: torch.randn(n, *pix.shape[1:])
    data = load_calibration(
        calib,
        names=loaded.input_names,
        example_args=loaded.example_args,
        tokenizer=loaded.tokenizer,
        vocab=_vocab(loaded),
        cfg=recipe.calibration,
        extra=extra,
    )
    from attnc.load.calibration import _pad_id, conform

    data = conform(
        data,
        loaded.input_names,
        loaded.example_args,
        program.dynamic_dims,
        _pad_id(loaded.tokenizer),
    )
    return loaded, program, data


def build(
    spec: str,
    recipe_path: str,
    calib: str | None,
    out_dir: str | Path,
    opts: BuildOptions | None = None,
) -> BuildResult:
    opts = opts or BuildOptions()
    say = opts.progress or (lambda s: None)
    t0 = time.perf_counter()
    out = Path(out_dir)
    parent = check_output_dir(out)
    recipe = load_recipe(recipe_path)
    loaded, original, data = prepare(spec, recipe, calib, opts)
    sites_before = [s.row() for s in original.sites]
    params_before = param_count(original.gm)
    top1 = loaded.kind in ("causal-lm", "vlm")

    say("running the original on calibration data")
    orig_run = Memo(original)
    ref_hold = reference_outputs(orig_run, data.holdout)

    def evaluate(candidate: Program) -> dict[str, float]:  # only 'auto' counts need this
        return compare(candidate, data.calib, reference_outputs(orig_run, data.calib), top1)

    ctx = PassContext(
        calibration=data,
        original=original,
        fidelity=recipe.fidelity,
        evaluate=evaluate,
        meets_bound=lambda m: meets(m, recipe.fidelity)[0],
    )
    say(f"running passes: {[s.id for s in recipe.passes]}")
    program, results = run_passes(original.clone(), recipe.passes, ctx)
    lowered = 0
    if recipe.export.lower_dense:
        from attnc.export.artifacts import lower_dense

        lowered = lower_dense(program)

    say("verifying the optimized program against the original")
    opt_run = Memo(program)
    comparisons = {"torch optimized vs original": compare(opt_run, data.holdout, ref_hold, top1)}
    from attnc.check.task import task_metrics

    fidelity = task_metrics(loaded.kind, opt_run, orig_run, data.holdout, loaded.tokenizer)
    ok, fails = meets({**comparisons["torch optimized vs original"], **fidelity}, recipe.fidelity)
    if not ok:
        raise VerificationError(
            "the optimized model misses the recipe's fidelity bound: " + "; ".join(fails),
            "drop less, or loosen the bound in the recipe",
        )

    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.attnc-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the build folder follows the umask
    try:
        artifacts, onnx_info = _write_artifacts(
            program, opt_run, recipe, stage, data, comparisons, say
        )
        report = {
            "attnc_version": _version(),
            "model": {
                "source": loaded.source,
                "kind": loaded.kind,
                "inputs": loaded.input_names,
                "dynamic_dims": {
                    k: {str(a): v for a, v in d.items()} for k, d in program.dynamic_dims.items()
                },
                "params_before": params_before,
                "params_after": param_count(program.gm),
            },
            "recipe": recipe.raw,
            "calibration": {
                "source": data.source,
                "calib_batches": len(data.calib),
                "holdout_batches": len(data.holdout),
                "samples": data.num_samples,
            },
            "sites_before": sites_before,
            "sites_after": [s.row() for s in program.sites],
            "candidates": [asdict(c) for c in original.candidates],
            "passes": [
                {
                    "pass_id": r.pass_id,
                    "config": r.config,
                    "seconds": r.seconds,
                    "decisions": [vars(d) for d in r.decisions],
                }
                for r in results
            ],
            "lowered_dense_sites": lowered,
            "verification": {"comparisons": comparisons, "bound": vars(recipe.fidelity), "ok": ok},
            "fidelity": fidelity,
            "onnx": onnx_info,
            "artifacts": sorted(artifacts),
            "versions": _versions(),
            "seconds": time.perf_counter() - t0,
        }
        from attnc.report.write import write_report

        write_report(report, stage)
        report["artifacts"] = sorted(p.name for p in stage.iterdir())
        write_report(report, stage)
        _move_into_place(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return BuildResult(out, report, program)


def _write_artifacts(program, opt_run, recipe, stage, data, comparisons, say):
    from attnc.export.artifacts import export_onnx, save_pt2

    artifacts = []
    if recipe.export.pt2:
        say("saving model.pt2")
        save_pt2(program, stage / "model.pt2")
        meta = {"kind": program.kind, "inputs": program.input_names, "source": program.source}
        (stage / "model.attnc.json").write_text(json.dumps(meta, indent=2))
        artifacts += ["model.pt2", "model.attnc.json"]
    onnx_info = None
    if recipe.export.onnx:
        say("exporting model.onnx")
        onnx_info = export_onnx(program, stage / "model.onnx", recipe.export.opset)
        artifacts.append("model.onnx")
        say("verifying ONNX Runtime against the optimized program")
        run = ort_runner(str(stage / "model.onnx"), program.input_names)
        onnx_info["providers"] = run.providers
        ref = reference_outputs(opt_run, data.holdout)  # already computed: memoised
        m = compare(run, data.holdout, ref, top1=False)
        comparisons["ONNX Runtime vs torch optimized"] = m
        if not m["max_abs_diff"] <= recipe.export.onnx_max_abs_diff:
            raise VerificationError(
                f"ONNX Runtime differs from the torch program by {m['max_abs_diff']:.3g} "
                f"(allowed {recipe.export.onnx_max_abs_diff:g})"
            )
    return artifacts, onnx_info


def _move_into_place(stage: Path, out: Path) -> None:
    """Swap the finished folder in; an older build there is replaced only at the very end."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        stage.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _version() -> str:
    from attnc import __version__

    return __version__


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
