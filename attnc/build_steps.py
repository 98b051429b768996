"""The artifact steps of `build()` (attnc/build.py): write and verify `model.pt2` and
`model.onnx` (ONNX Runtime against the torch program, the sentence-embedding output, metadata),
the optional INT8 quantization with its own bound check, and the in-build speed step."""

from __future__ import annotations

import json
import shutil

from attnc import progress
from attnc.check.fidelity import Memo, compare, meets, ort_runner, reference_outputs
from attnc.errors import VerificationError
from attnc.load.models import LoadedModel
from attnc.recipe.schema import Recipe


def bound_name(recipe: Recipe) -> str:
    return "recipe's" if recipe.fidelity_source == "recipe" else recipe.fidelity_source



def vocab_size(loaded: LoadedModel) -> int | None:
    cfg = loaded.config
    if cfg is None:
        return None
    text = getattr(cfg, "text_config", None)
    return getattr(text or cfg, "vocab_size", None)



def write_artifacts(program, opt_run, recipe, stage, data, comparisons, say, loaded, results):
    from attnc.export import deploy
    from attnc.export.artifacts import export_onnx, save_pt2

    artifacts = deploy.write_deploy_files(loaded, stage)  # tokenizer/processor files, config
    if recipe.export.pt2:
        say("saving model.pt2")
        progress.stage("save model.pt2")
        save_pt2(program, stage / "model.pt2")
        meta = {"kind": program.kind, "inputs": program.input_names, "source": program.source}
        (stage / "model.attnc.json").write_text(json.dumps(meta, indent=2))
        artifacts += ["model.pt2", "model.attnc.json"]
    onnx_info = None
    if recipe.export.onnx:
        say("exporting model.onnx")
        progress.stage("export onnx")
        pooling = deploy.resolve_sentence_embedding(
            recipe.export.sentence_embedding, loaded, program
        )
        meta = deploy.build_metadata(recipe.raw, results, comparisons, program.kind)
        onnx_info = export_onnx(
            program,
            stage / "model.onnx",
            recipe.export.opset,
            metadata=meta,
            sentence_embedding=pooling,
            seq_hint=target_length(results, program, data.calib),
            external_data=recipe.export.external_data,
        )
        onnx_info["sentence_embedding"] = vars(pooling) if pooling else None
        artifacts += ["model.onnx", *list(onnx_info["layout"]["files"])[1:]]
        took = progress.stage_seconds("verify torch")  # the estimate: the same batches in torch
        say("verifying ONNX Runtime against the optimized program"
            + (f" ({len(data.holdout)} held-out batches; torch ran them in {took:.0f} s)"
               if took is not None and took >= 10 else ""))
        progress.stage("verify onnx runtime")
        from attnc.check.fidelity import onnx_tolerance, ort_check_file

        onnx_file, optimize = ort_check_file(stage / "model.onnx", onnx_info)
        if onnx_info["layout"]["external_data"]:  # big: ORT is about to load its own copy
            from attnc.export.external_data import page_out

            page_out([*program.gm.parameters(), *loaded.module.parameters()])  # torch's, mapped
        # the float32-compute copy (unoptimized): each weight cast when its layer runs
        # big (external data) or the float32-compute copy: no prepacked weights, low memory
        run = ort_runner(str(onnx_file), program.input_names, optimize=optimize,
                         low_memory=not optimize or onnx_info["layout"]["external_data"])
        onnx_info["providers"] = run.providers
        onnx_info["verified_file"] = onnx_file.name
        ref = reference_outputs(opt_run, data.holdout)  # already computed: memoised
        m = compare(run, data.holdout, ref, top1=False)
        del run  # the session's weights
        import gc

        gc.collect()  # measured: a cycle kept the session (a weights' copy) until a later stage
        if onnx_file.name != "model.onnx":
            onnx_file.unlink()
        comparisons["ONNX Runtime vs torch optimized"] = m
        allowed = onnx_tolerance(recipe, program, ref)
        onnx_info["max_abs_diff_allowed"] = allowed
        if not m["max_abs_diff"] <= allowed:
            raise VerificationError(
                f"ONNX Runtime differs from the torch program by {m['max_abs_diff']:.3g} "
                f"(allowed {allowed:g})"
            )
        if pooling is not None:
            onnx_file = stage / "model.onnx"
            m = deploy.check_sentence_embedding(onnx_file, program, data.holdout, pooling)
            comparisons["ONNX Runtime sentence_embedding vs torch optimized"] = m
            if not m["max_abs_diff"] <= recipe.export.onnx_max_abs_diff:
                raise VerificationError(
                    f"ONNX Runtime's sentence_embedding differs from the torch program's by "
                    f"{m['max_abs_diff']:.3g} (allowed {recipe.export.onnx_max_abs_diff:g})"
                )
        meta = deploy.build_metadata(recipe.raw, results, comparisons, program.kind)
        verification = {"attnc.verification": meta["attnc.verification"]}
        deploy.add_metadata(stage / "model.onnx", verification)  # now with ONNX Runtime's figures
        from attnc.export.external_data import layout

        onnx_info["layout"] = layout(stage / "model.onnx")  # the sizes as written
    return artifacts, onnx_info


def target_length(results, program, batches) -> int | None:
    """The sequence length the ONNX forms are chosen for: a pass's `target_length` (the sparse
    pass records it per site), else the longest calibration sequence, else None (unknown)."""
    lens = [d.metrics.get("target_length") for r in results for d in r.decisions]
    lens = [int(x) for x in lens if isinstance(x, int)]
    if lens:
        return max(lens)
    for name, dims in program.dynamic_dims.items():
        for axis, label in dims.items():
            if "seq" in str(label) and name in program.input_names:
                i = program.input_names.index(name)
                return max((int(b.args[i].shape[axis]) for b in batches), default=None)
    return None



def quantize_step(stage, program, recipe, data, ref_hold, orig_run, loaded, say) -> dict:
    """INT8-quantize model.onnx in place, then verify it against the original and bound it like
    a pass; the figures are kept apart from the passes' so the report shows each cost."""
    from attnc.check.task import task_metrics
    from attnc.export.quantize import quantize_in_place

    mode = recipe.export.quantize
    say(f"quantizing model.onnx ({mode})")
    progress.stage("quantize")
    feeds = [dict(zip(program.input_names, b.args, strict=True)) for b in data.calib]
    info = quantize_in_place(stage / "model.onnx", mode, feeds)
    say("verifying the quantized ONNX file against the original")
    run = Memo(ort_runner(str(stage / "model.onnx"), program.input_names))
    top1 = loaded.kind in ("causal-lm", "vlm")
    m = compare(run, data.holdout, ref_hold, top1)
    task = task_metrics(loaded.kind, run, orig_run, data.holdout, loaded.tokenizer)
    ok, fails = meets({**m, **task}, recipe.fidelity)
    if not ok:
        raise VerificationError(
            f"the {mode} ONNX file misses the {bound_name(recipe)} fidelity bound: "
            + "; ".join(fails),
            "quantize less (export.quantize: none), or loosen the bound",
        )
    return {**info, "fidelity": task, "comparisons": {f"ONNX Runtime {mode} vs original": m}}


def bench_step(stage, program, original, recipe, data, loaded, opts, say) -> dict:
    """The build's own speed step: optimized vs original in one interleaved run, at the
    calibration shape and any shapes the user asked for; the scratch ONNX file of the original
    lives in the staging folder and leaves with it."""
    from attnc.check.bench import BenchConfig, bench_in_build, inputs_at

    # the calibration shape, at most 8 rows: a short step, not a benchmark suite
    batch = tuple(a[:8] for a in (data.holdout or data.calib)[0].args)
    args_list = [batch]
    for b, sq in opts.bench_shapes:
        args_list.append(
            inputs_at(loaded.example_args, loaded.input_names, b, sq, vocab=vocab_size(loaded))
        )
    cfg = BenchConfig(
        shapes=tuple(opts.bench_shapes), repeats=opts.bench_repeats, warmup=2, max_seconds=8.0
    )
    onnx_path = stage / "model.onnx" if recipe.export.onnx else None
    scratch = stage / ".bench"
    scratch.mkdir()
    say("timing the build against the original (same run, interleaved)")
    progress.stage("bench")
    try:
        res = bench_in_build(
            program, original, onnx_path, args_list, cfg, recipe.export.opset, scratch
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out = res.as_dict()
    out["shapes"] = [[int(a.shape[0]), int(a.shape[1]) if a.dim() > 1 else 1] for a in
                     (x[0] for x in args_list)]
    return out

