"""`build()`: the whole pipeline the CLI's `optimize` calls.

load → capture → calibrate → passes → lower → verify (torch) → export (.pt2, ONNX) →
verify (ONNX Runtime) → report. Every artifact is written to a temporary folder beside the
destination and moved into place only when the whole build succeeded.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from attnc import progress
from attnc.build_steps import bench_step, bound_name, quantize_step, vocab_size, write_artifacts
from attnc.capture.program import Program, capture
from attnc.check.fidelity import Memo, compare, meets, reference_outputs
from attnc.errors import (
    AttncError,
    CaptureError,
    LoadError,
    RecipeError,
    VerificationError,
)
from attnc.graph.edit import param_count
from attnc.load.calibration import (
    check_source,
    load_calibration,
    model_positions,
    refuse_random_text,
)
from attnc.load.models import LoadedModel, load_model
from attnc.output import (
    check_free_space,
    make_stage,
    os_error_in,
    signals_held,
    source_record,
    spec_paths,
    write_error,
    write_marker,
)
from attnc.output import check_output_dir as _check_output_dir
from attnc.output import move_into_place as _move_into_place
from attnc.recipe.bounds import resolve_fidelity
from attnc.recipe.manager import PassContext, get_pass, run_passes
from attnc.recipe.schema import Recipe, load_recipe, parse_recipe

log = logging.getLogger(__name__)


@dataclass
class BuildOptions:
    weights: str | None = None
    trust_pickle: bool = False
    input_shape: list[int] | None = None
    dtype: str = "auto"  # Hugging Face checkpoints keep their own dtype
    progress: Callable[[str], None] | None = None
    force: bool = False  # -o may replace a folder that is not an earlier attnc build
    save_original: bool = True  # original.pt2 in the build, so that eval never runs code
    # time the build against the original in the same run (the CLI and attnc.optimize turn it
    # on; off by default here so that test builds stay fast)
    bench: bool = False
    bench_shapes: tuple[tuple[int, int], ...] = ()  # (batch, sequence) besides the calib shape
    bench_repeats: int = 10


@dataclass
class BuildResult:
    out_dir: Path
    report: dict
    program: Program


def check_output_dir(
    out: Path, *, force: bool = False, inputs: Iterable[Path] = ()
) -> Path:
    """See attnc.output.check_output_dir: refuse a folder -o must not replace."""
    return _check_output_dir(out, force=force, inputs=inputs)


def supported_opsets() -> tuple[int, int]:
    """The ONNX opsets the installed exporter can write: torch's dynamo exporter converts with
    onnxscript's version converter, and the installed onnx must know the opset."""
    import onnx

    lo, hi = 18, onnx.defs.onnx_opset_version()
    try:
        from onnxscript.version_converter import _version_converter as vc

        lo = max(lo, vc.SUPPORTED_MIN_ONNX_OPSET)
        hi = min(hi, vc.SUPPORTED_MAX_ONNX_OPSET)
    except (ImportError, AttributeError):  # pragma: no cover - another onnxscript layout
        pass
    return lo, hi


def as_recipe(recipe: str | Path | Recipe | dict) -> Recipe:
    """A recipe from a file path, a dict (the YAML's content) or a `Recipe`."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe, "<recipe dict>")
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe)
    raise RecipeError(f"a recipe is a path, a dict or a Recipe, not {type(recipe).__name__}")


def preflight(spec, recipe_path, calib: str | None, out: Path, opts: BuildOptions):
    """Every check that needs no model, before loading it: the model path, the recipe (schema,
    values, opset), the calibration file, the output folder. Returns (recipe, staging parent).
    `spec` is a model spec string or an already loaded model (the Python API)."""
    from attnc.load.models import _looks_like_factory

    spec_is_path = isinstance(spec, str) and not _looks_like_factory(spec)
    if spec_is_path and not Path(spec).expanduser().exists():
        raise LoadError(f"model not found: {spec}")
    recipe = as_recipe(recipe_path)
    if recipe.export.onnx:
        lo, hi = supported_opsets()
        if not lo <= recipe.export.opset <= hi:
            raise RecipeError(
                f"export.opset {recipe.export.opset} is not one the installed exporter writes "
                f"(supported: {lo} to {hi})",
                "23 or newer exports attention as the ONNX Attention op",
            )
    check_source(calib, recipe.calibration)  # --calib vs calibration.source, the file's format
    parent = check_output_dir(out, force=opts.force, inputs=_inputs(spec, recipe_path, calib, opts))
    return recipe, parent


def _inputs(spec, recipe_path, calib: str | None, opts: BuildOptions) -> list[Path]:
    """Everything the build reads: -o must never replace a folder holding one of them."""
    paths = [*spec_paths(spec)] if isinstance(spec, str) else []
    if isinstance(recipe_path, (str, Path)):
        paths.append(Path(recipe_path))
    return paths + [Path(p) for p in (calib, opts.weights) if p and Path(p).exists()]


def prepare(spec, recipe: Recipe, calib: str | None, opts: BuildOptions):
    say = opts.progress or (lambda s: None)
    if isinstance(spec, LoadedModel):
        loaded = spec
    else:
        say(f"loading {spec}")
        progress.stage("load")
        loaded = load_model(
            spec,
            weights=opts.weights,
            trust_pickle=opts.trust_pickle,
            input_shape=opts.input_shape,
            dtype=opts.dtype,
        )
    progress.stage("calibration data")
    refuse_random_text(calib, recipe.calibration, loaded)  # random ids on a text model mislead
    extra = {}
    if loaded.kind == "vlm" and "pixel_values" in loaded.input_names:
        pix = loaded.example_args[loaded.input_names.index("pixel_values")]
        extra["pixel_values"] = lambda n: torch.randn(n, *pix.shape[1:])
    data = load_calibration(
        calib,
        names=loaded.input_names,
        example_args=loaded.example_args,
        tokenizer=loaded.tokenizer,
        vocab=vocab_size(loaded),
        cfg=recipe.calibration,
        extra=extra,
        positions=model_positions(loaded.config),
        model_dir=loaded.source if Path(loaded.source).is_dir() else None,  # image mean/std
    )  # checked against the model before the (slower) capture
    say("capturing with torch.export")
    progress.stage("capture")
    program = capture(loaded)
    if not program.sites:
        raise CaptureError(
            f"no attention found in {spec}",
            "attnc works on models with scaled_dot_product_attention or matmul-softmax-matmul",
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
    spec: str | LoadedModel,
    recipe_path: str | Path | Recipe | dict,
    calib: str | None,
    out_dir: str | Path,
    opts: BuildOptions | None = None,
) -> BuildResult:
    """Build `spec` (a model spec string, or a `LoadedModel`) as the recipe (a path, dict or
    `Recipe`) says into `out_dir`; see the module docstring for the stages."""
    opts = opts or BuildOptions()
    say = opts.progress or (lambda s: None)
    t0 = time.perf_counter()
    out = Path(out_dir).expanduser()
    timeline = progress.start_timeline()
    from attnc.load import distributed

    distributed.init_from_env()  # under torchrun: calibration batches shared across ranks
    progress.stage("preflight")
    recipe, parent = preflight(spec, recipe_path, calib, out, opts)
    loaded, original, data = prepare(spec, recipe, calib, opts)
    recipe = resolve_fidelity(recipe, loaded.kind, all(get_pass(s.id).exact for s in recipe.passes))
    sites_before = [s.row() for s in original.sites]
    params_before = param_count(original.gm)
    weights_bytes = sum(p.numel() * p.element_size() for p in original.gm.parameters())
    top1 = loaded.kind in ("causal-lm", "vlm")

    say("running the original on calibration data")
    progress.stage("original on held-out data")
    orig_run = Memo(original)
    ref_hold = reference_outputs(orig_run, data.holdout)

    def evaluate(candidate: Program) -> dict[str, float]:  # only 'auto' counts need this
        from attnc.check.task import task_metrics

        run = Memo(candidate)  # compare and the task metrics run it once per batch
        m = compare(run, data.calib, reference_outputs(orig_run, data.calib), top1)
        return {**m, **task_metrics(loaded.kind, run, orig_run, data.calib, loaded.tokenizer)}

    ctx = PassContext(
        calibration=data,
        original=original,
        fidelity=recipe.fidelity,
        evaluate=evaluate,
        meets_bound=lambda m: meets(m, recipe.fidelity)[0],
    )
    say(f"running passes: {[s.id for s in recipe.passes]}")
    progress.stage("passes")
    program, results = run_passes(original.clone(), recipe.passes, ctx)
    if distributed.rank() != 0:  # the other ranks helped calibrate; rank 0 writes the build
        return BuildResult(out, {"rank": distributed.rank(), "passes": len(results)}, program)
    lowered = 0
    if recipe.export.lower_dense:
        from attnc.export.artifacts import lower_dense

        lowered = lower_dense(program)

    say("verifying the optimized program against the original")
    progress.stage("verify torch")
    opt_run = Memo(program)
    comparisons = {"torch optimized vs original": compare(opt_run, data.holdout, ref_hold, top1)}
    from attnc.check.task import task_metrics

    fidelity = task_metrics(loaded.kind, opt_run, orig_run, data.holdout, loaded.tokenizer)
    ok, fails = meets({**comparisons["torch optimized vs original"], **fidelity}, recipe.fidelity)
    if not ok:
        raise VerificationError(
            f"the optimized model misses the {bound_name(recipe)} fidelity bound: "
            + "; ".join(fails),
            "make the passes less aggressive, or loosen the bound in the recipe"
            if recipe.fidelity_source == "recipe"
            else "the recipe sets no bound, so the default applies: make the passes less "
            "aggressive, or set fidelity: in the recipe (attnc passes lists the bound keys)",
        )

    check_free_space(parent, _bytes_needed(program, original, recipe, opts))
    stage = None
    try:
        with signals_held():  # a signal right after the folder is made must not strand it
            stage = make_stage(parent, out.name)
        try:
            artifacts, onnx_info = write_artifacts(
                program, opt_run, recipe, stage, data, comparisons, say, loaded, results
            )
            quant = None
            if recipe.export.onnx and recipe.export.quantize != "none":
                quant = quantize_step(stage, program, recipe, data, ref_hold, orig_run, loaded, say)
                comparisons.update(quant.pop("comparisons"))
                onnx_info["layout"] = quant.pop("layout", onnx_info["layout"])
            bench = None
            if opts.bench:
                bench = bench_step(stage, program, original, recipe, data, loaded, opts, say)
            if opts.save_original:
                from attnc.export.artifacts import save_pt2

                say("saving original.pt2 (what `attnc eval` compares against)")
                progress.stage("save original.pt2")
                save_pt2(original, stage / "original.pt2")
                artifacts.append("original.pt2")
            report = {
                "attnc_version": _version(),
                "model": {
                    **(source_record(spec, out) if isinstance(spec, str) else
                   {"source": loaded.source}),
                    "kind": loaded.kind,
                    "attn_implementation": loaded.extra.get("attn_implementation"),
                    "inputs": loaded.input_names,
                    "dynamic_dims": {
                        k: {str(a): v for a, v in d.items()}
                        for k, d in program.dynamic_dims.items()
                    },
                    "params_before": params_before,
                    "params_after": param_count(program.gm),
                    "weights_bytes": weights_bytes,
                },
                "recipe": recipe.raw,
                "calibration": {
                    "source": data.source,
                    "calib_batches": len(data.calib),
                    "holdout_batches": len(data.holdout),
                    "samples": data.num_samples,
                    "images": data.images,  # a VLM's pixels: real files, a tensor file, generated
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
                "verification": {
                    "comparisons": comparisons,
                    "bound": vars(recipe.fidelity),
                    "bound_source": recipe.fidelity_source,
                    "ok": ok,
                },
                "fidelity": fidelity,
                "quantization": quant,
                "bench": bench,
                "onnx": onnx_info,
                "artifacts": sorted(artifacts),
                "versions": _versions(),
                "seconds": time.perf_counter() - t0,
            }
            progress.stage("report")
            report["stages"] = timeline.as_list()  # wall time and memory per stage
            from attnc.report.write import write_report

            write_report(report, stage)
            progress.stage(None)
            report["stages"] = timeline.as_list()
            report["artifacts"] = sorted(p.name for p in stage.iterdir())
            write_report(report, stage)
            write_marker(stage, _version())
            # the folder may have changed during the build: check it again before replacing it
            check_output_dir(out, force=opts.force, inputs=_inputs(spec, recipe_path, calib, opts))
            _move_into_place(stage, out)
        except (OSError, AttncError) as exc:
            cause = os_error_in(exc)
            if cause is None:
                raise
            raise write_error(cause, stage, out) from exc
    except BaseException:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    return BuildResult(out, report, program)



def _bytes_needed(program: Program, original: Program, recipe: Recipe, opts: BuildOptions) -> int:
    """A floor on the bytes the artifacts take: the weights once per file that holds them."""

    def weights(p: Program) -> int:
        return sum(t.numel() * t.element_size() for t in p.gm.state_dict().values())

    n = weights(program) * (int(recipe.export.onnx) + int(recipe.export.pt2))
    if opts.save_original:
        n += weights(original)
    return n + (4 << 20)



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
