"""token-pruning on the trained tiny LLaVA (examples/models/attnc-tiny-vlm): held-out exact-match
accuracy against keep ratio x debias x padding mask, and prefill latency of the pruned build
against the unpruned one in torch and ONNX Runtime (CPU), timed interleaved in the same run.

    python benchmarks/token_pruning.py [--n-eval 256] [--layer 1]
writes benchmarks/results/token_pruning-cpu.json
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
    def __init__(self, n: int):
        self.calib = [Batch(a, None) for a, _ in pairs("calib", n)]
        self.holdout, self.source = [], "examples/make_vqa.py calib split (generated)"


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-eval", type=int, default=256)
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--suffix", default="", help="results file token_pruning-cpu<suffix>.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    model.eval()
    program = capture(wrap_hf(model, str(MODEL), None, None))
    data = pairs("eval", args.n_eval)
    ctx = PassContext(calibration=Calib(args.n_calib))
    base, base_pred = accuracy(program, data)
    rows = [{"keep": 1.0, "debias": "none", "padding_mask": "off", "pruned": False, **base}]
    print(f"unpruned: {base['accuracy']:.3f}", flush=True)
    grid = [(1.0, "none", "auto")] + [
        (r, d, p) for r in RATIOS for d in ("none", "exponential", "cubic") for p in ("auto", "off")
    ]
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
        probe = data[0][0]
        fns_t, fns_o = {"unpruned": program}, {}
        with tempfile.TemporaryDirectory() as tmp:
            fns_o["unpruned"] = ort_fn(program, Path(tmp), "unpruned")
            # scoring and an identity gather only: the overhead of the machinery
            keep_all = prune_tokens(program, TokenPruningConfig(
                layer=args.layer, keep=1.0, padding_mask="off"))[0]
            fns_t["keep_all_scored"] = keep_all
            fns_o["keep_all_scored"] = ort_fn(keep_all, Path(tmp), "keep_all")
            for r in RATIOS:
                p = prune_tokens(program, TokenPruningConfig(layer=args.layer, keep=r))[0]
                fns_t[f"keep_{r}"] = p
                fns_o[f"keep_{r}"] = ort_fn(p, Path(tmp), f"keep_{r}")
            t_torch = timed(fns_t, probe, args.reps)
            t_ort = timed(fns_o, probe, args.reps)
        S = probe[0].shape[1]
        n_layers = len([s for s in program.sites if s.causal])
        for name in fns_t:
            kept = S if not name.startswith("keep_0") else S - 64 + round(float(name[5:]) * 64)
            latency[name] = {
                "torch_s": t_torch[name], "ort_s": t_ort[name],
                "torch_speedup": t_torch["unpruned"] / t_torch[name],
                "ort_speedup": t_ort["unpruned"] / t_ort[name],
                "tokens_after_layer": kept, "tokens": S,
                "decoder_token_layers_ratio": ((args.layer + 1) * S + (n_layers - args.layer - 1)
                                               * kept) / (n_layers * S),
            }
            print(name, json.dumps(latency[name]), flush=True)
    out = {
        "benchmark": "token_pruning", "device": "cpu", "threads": 1,
        "load_average_at_end": os.getloadavg(), "model": "examples/models/attnc-tiny-vlm",
        "layer": args.layer, "n_eval": args.n_eval, "n_calib": args.n_calib,
        "accuracy": rows, "latency": latency,
        "note": "accuracy: exact match of the argmax at the last position on held-out VQA; "
                "agreement: same answer as the unpruned program; latency: median of interleaved "
                "runs on one batch of 2 (prefill, full logits), same process",
    }
    res = ROOT / "benchmarks" / "results" / f"token_pruning-cpu{args.suffix}.json"
    res.parent.mkdir(parents=True, exist_ok=True)
    res.write_text(json.dumps(out, indent=1))
    print("wrote", res)


if __name__ == "__main__":
    main()
