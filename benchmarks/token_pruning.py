"""token-pruning on the trained tiny LLaVA (examples/models/attnc-tiny-vlm): held-out exact-match
accuracy against keep ratio x debias x padding mask, and prefill latency of the pruned build
against the unpruned one in torch and ONNX Runtime (CPU), timed interleaved in the same run.

    python benchmarks/token_pruning.py [--n-eval 256] [--layer 1] [--latency-only]
writes benchmarks/results/token_pruning-cpu<suffix>.json

Latency: the unpruned program, the scoring alone (torch: the selection subgraph computed and
unused; FX runs every node), scoring plus an identity gather (keep all), and each keep ratio,
interleaved, at each batch size of --batches (the export has dynamic batch and sequence). The
vision tower's share of prefill (eager model, same process) bounds what pruning the decoder can
give: expected speed-up 1 / (1 - decoder_share x (1 - token_layer_ratio)).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from make_vqa import make_batch  # noqa: E402

from attnc.capture.program import capture  # noqa: E402
from attnc.load.calibration import Batch  # noqa: E402
from attnc.load.models import wrap_hf  # noqa: E402
from attnc.passes.token_pruning import TokenPruningConfig, prune_tokens  # noqa: E402
from attnc.recipe.manager import PassContext  # noqa: E402

MODEL = ROOT / "examples" / "models" / "attnc-tiny-vlm"
RATIOS = (0.5, 0.25, 0.125)


def pairs(split: str, n: int):
    """Batches of two (the captured program's batch), each left-padded to its own length."""
    out = []
    for i in range(0, n, 2):
        b = make_batch(split, [i, i + 1])
        out.append(((b["input_ids"], b["attention_mask"], b["pixel_values"]), b["labels"]))
    return out


def accuracy(program, data, ref_pred=None) -> dict:
    hit, agree, n, preds = 0, 0, 0, []
    with torch.no_grad():
        for (args, labels), i in zip(data, range(len(data)), strict=True):
            pred = program(*args)[:, -1].argmax(-1)
            preds.append(pred)
            hit += int((pred == labels).sum())
            if ref_pred is not None:
                agree += int((pred == ref_pred[i]).sum())
            n += len(labels)
    out = {"accuracy": hit / n, "n": n}
    if ref_pred is not None:
        out["agreement_with_unpruned"] = agree / n
    return out, preds


class Calib:
    def __init__(self, n: int, images: str | None = None):
        self.calib = [Batch(a, None) for a, _ in pairs("calib", n)]
        self.holdout, self.source = [], "examples/make_vqa.py calib split (generated)"
        if images:  # real photos (attnc.load.calib_images; examples/make_photo_calib.py)
            from attnc.load.calib_images import image_batches

            self.calib, self.source = image_batches(
                images, ["input_ids", "attention_mask", "pixel_values"], self.calib[0].args,
                tokenizer=None, vocab=None, positions=None, samples=n, batch_size=2,
                model_dir=str(MODEL), pad_id=0)


def timed(fns: dict, args, reps: int) -> dict:
    """Median seconds per call of each fn, interleaved round-robin."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f(*args)
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f(*args)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def ort_fn(program, tmp: Path, name: str):
    import onnxruntime as ort

    from attnc.export.artifacts import export_onnx

    path = tmp / f"{name}.onnx"
    export_onnx(program, path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return lambda *a: sess.run(None, {n: t.numpy() for n, t in zip(names, a, strict=True)})


def uptime() -> str:
    import subprocess

    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def vision_share(model, args_, reps: int) -> float:
    """The vision tower + projector's share of an eager prefill (same process, interleaved)."""
    ids, mask, pix = args_
    with torch.no_grad():
        t = timed({"all": lambda: model(input_ids=ids, attention_mask=mask, pixel_values=pix),
                   "vision": lambda: model.model.get_image_features(pixel_values=pix)}, (), reps)
    return t["vision"] / t["all"]


def scored_only(program, cfg):
    """The program plus the pass's selection, its scores tied to the output as + 0 * sum(score)
    (no runtime folds 0 * x away: NaN semantics), so both torch and ORT compute the scoring."""
    from attnc.graph.gather import Builder
    from attnc.passes.token_pruning import _build, make_plan

    p, _ = make_plan(program, cfg)
    probe, sel = _build(program, p, cfg, keep_n=p.n_img, gather=False)
    gm = probe.gm
    out = next(n for n in gm.graph.nodes if n.op == "output")
    first = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    b = Builder(gm, out, first)
    aten = torch.ops.aten
    zero = b(aten.mul.Tensor, b(aten.sum.default, sel.keep), 0)  # the kept positions: all of it
    zero = b(aten.mul.Scalar, b(aten._to_copy.default, zero, dtype=first.meta["val"].dtype), 0.0)
    tied = b(aten.add.Tensor, first, zero)
    out.args = ((tied, *out.args[0][1:]),) if isinstance(out.args[0], (tuple, list)) \
        else (tied,)
    gm.graph.lint()
    gm.recompile()
    return probe


def measure_latency(model, program, args) -> dict:
    cfg_all = TokenPruningConfig(layer=args.layer, keep=1.0, padding_mask="off")
    fns_t = {"unpruned": program,
             # the selection (scores, top-k, sort) computed and tied to the output by + 0
             "scored_only": scored_only(program, cfg_all),
             # scoring and an identity gather: the whole machinery at keep-all
             "keep_all_scored": prune_tokens(program, cfg_all)[0]}
    for r in ([] if args.overhead_only else RATIOS):
        fns_t[f"keep_{r}"] = prune_tokens(program, TokenPruningConfig(layer=args.layer,
                                                                      keep=r))[0]
    n_layers = len([s for s in program.sites if s.causal])
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        fns_o = {k: ort_fn(f, Path(tmp), k) for k, f in fns_t.items()}
        for bsz in [int(b) for b in args.batches.split(",")]:
            b = make_batch("eval", range(1000, 1000 + bsz))
            probe = (b["input_ids"], b["attention_mask"], b["pixel_values"])
            t_torch = timed(fns_t, probe, args.reps)
            t_ort = timed(fns_o, probe, args.reps)
            share = vision_share(model, probe, args.reps)
            S = probe[0].shape[1]
            rows = {}
            for name in fns_t:
                kept = S if not name.startswith("keep_0") else S - 64 + round(
                    float(name[5:]) * 64)
                ratio = ((args.layer + 1) * S + (n_layers - args.layer - 1) * kept) / (
                    n_layers * S)
                row = {"torch_s": t_torch[name], "torch_speedup": t_torch["unpruned"]
                       / t_torch[name], "tokens_after_layer": kept, "tokens": S,
                       "decoder_token_layers_ratio": ratio,
                       "expected_speedup_if_decoder_scales":
                           1 / (1 - (1 - share) * (1 - ratio))}
                if name in t_ort:
                    row.update(ort_s=t_ort[name], ort_speedup=t_ort["unpruned"] / t_ort[name])
                rows[name] = row
                print(bsz, name, json.dumps(row), flush=True)
            rows["vision_share_of_eager_prefill"] = share
            rows["scoring_overhead_torch"] = t_torch["scored_only"] / t_torch["unpruned"] - 1
            rows["scoring_overhead_ort"] = t_ort["scored_only"] / t_ort["unpruned"] - 1
            rows["keep_all_overhead_torch"] = t_torch["keep_all_scored"] / t_torch["unpruned"] - 1
            rows["keep_all_overhead_ort"] = t_ort["keep_all_scored"] / t_ort["unpruned"] - 1
            out[f"batch_{bsz}"] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-eval", type=int, default=256)
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--latency-only", action="store_true")
    ap.add_argument("--overhead-only", action="store_true", help="latency: no keep ratios")
    ap.add_argument("--batches", default="2", help="batch sizes timed, e.g. 2,8")
    ap.add_argument("--calib-images", help="calibrate on real images: a folder or JSONL "
                    "(examples/make_photo_calib.py); default the generated calib split")
    ap.add_argument("--suffix", default="", help="results file token_pruning-cpu<suffix>.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    model.eval()
    program = capture(wrap_hf(model, str(MODEL), None, None))
    data = pairs("eval", args.n_eval)
    ctx = PassContext(calibration=Calib(args.n_calib, args.calib_images))
    rows = []
    grid = [] if args.latency_only else [(1.0, "none", "auto")] + [
        (r, d, p) for r in RATIOS for d in ("none", "exponential", "cubic") for p in ("auto", "off")
    ]
    if grid:
        base, base_pred = accuracy(program, data)
        rows = [{"keep": 1.0, "debias": "none", "padding_mask": "off", "pruned": False, **base}]
        print(f"unpruned: {base['accuracy']:.3f}", flush=True)
    for keep, debias, pad in grid:
        cfg = TokenPruningConfig(layer=args.layer, keep=keep, debias=debias, padding_mask=pad)
        t0 = time.perf_counter()
        pruned, plan, info = prune_tokens(program, cfg, ctx)
        m, _ = accuracy(pruned, data, base_pred)
        row = {"keep": keep, "keep_tokens": plan.keep_count, "of": plan.n_img, "debias": debias,
               "padding_mask": pad, "pruned": True, **m,
               "build_s": round(time.perf_counter() - t0, 1)}
        if "trend" in info:
            row["trend"] = {k: v for k, v in info["trend"].items() if k != "source"}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "trend"}), flush=True)
    latency = {}
    if not args.skip_latency:
        latency = measure_latency(model, program, args)
    out = {
        "benchmark": "token_pruning", "device": "cpu", "threads": 1,
        "load_average_at_end": os.getloadavg(), "model": "examples/models/attnc-tiny-vlm",
        "layer": args.layer, "n_eval": args.n_eval, "n_calib": args.n_calib,
        "calibration": ctx.calibration.source,
        "accuracy": rows, "latency": latency, "uptime": uptime(),
        "note": "accuracy: exact match of the argmax at the last position on held-out VQA; "
                "agreement: same answer as the unpruned program; latency: median of interleaved "
                "runs per batch size (prefill, full logits), same process, 1 thread, on a "
                "2-core machine shared with other jobs (load in uptime)",
    }
    res = ROOT / "benchmarks" / "results" / f"token_pruning-cpu{args.suffix}.json"
    res.parent.mkdir(parents=True, exist_ok=True)
    res.write_text(json.dumps(out, indent=1))
    print("wrote", res)


if __name__ == "__main__":
    main()
