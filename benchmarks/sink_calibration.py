"""sink-calibration (ACT) on the trained tiny Llama: the head search's cost, the held-out bits/byte
change of what it chose (with a bootstrap confidence interval over the eval texts), two
diagnostic head sets, and ONNX Runtime latency of a calibrated export against the unmodified one.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sink_calibration.py [--seq 512] [--boot 2000]

Search: the pass's own plan (single-head screening on half of the calibration batches, greedy
check on the other half) on examples/data/tiny_llm_calib.jsonl (96 windows of 256 bytes, as the
example recipe). Held-out: examples/data/tiny_llm_eval.jsonl (128 texts of 256 bytes, disjoint),
each variant against the original in the same run. Variants: `chosen` (the search's heads),
`helped_alone` (every head whose single-head trial lowered the search NLL), `all_heads`.
Latency: ORT CPU, batch 1, `--seq` tokens, the `all_heads` export (every site calibrated: the
worst case) and the `chosen` one when it is not the original, interleaved medians.
Writes benchmarks/results/sink_calibration-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "models" / "attnc-tiny-llama"
CALIB = ROOT / "examples" / "data" / "tiny_llm_calib.jsonl"
EVAL = ROOT / "examples" / "data" / "tiny_llm_eval.jsonl"


def recipe(samples: int, holdout: float):
    from attnc.recipe.schema import parse_recipe

    return parse_recipe({"version": 1, "passes": [{"id": "sink-calibration"}],
                         "calibration": {"samples": samples, "max_length": 256,
                                         "batch_size": 16, "holdout": holdout}})


def per_text_nll(program, batches, tokenizer):
    """Per text: (summed next-token NLL in nats, predicted bytes)."""
    from attnc.check.task import _n_bytes
    from attnc.passes.sink_calibration import _logits

    nll, nbytes = [], []
    with torch.no_grad():
        for b in batches:
            ids = b.args[0]
            mask = b.token_mask if b.token_mask is not None else torch.ones_like(ids)
            logp = torch.log_softmax(_logits(program(*b.args))[:, :-1], -1)
            tgt = ids[:, 1:]
            valid = (mask[:, 1:] * mask[:, :-1]).bool()
            tok = -logp.gather(-1, tgt[..., None])[..., 0]
            for row, v, t in zip(tgt, valid, tok, strict=True):
                nll.append(float(t[v].sum()))
                nbytes.append(_n_bytes(tokenizer, row[v].tolist()))
    return np.array(nll), np.array(nbytes, dtype=np.float64)


def bpb_change(nll_o, nll_c, nbytes, boot: int, seed: int = 0) -> dict:
    ln2 = math.log(2)
    base = nll_o.sum() / ln2 / nbytes.sum()
    delta = (nll_c.sum() - nll_o.sum()) / ln2 / nbytes.sum()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(nll_o), size=(boot, len(nll_o)))
    d = (nll_c[idx].sum(1) - nll_o[idx].sum(1)) / ln2 / nbytes[idx].sum(1)
    lo, hi = np.percentile(d, [2.5, 97.5])
    return {"bits_per_byte_original": round(float(base), 5),
            "bits_per_byte_delta": round(float(delta), 6),
            "relative": round(float(delta / base), 6),
            "ci95_delta": [round(float(lo), 6), round(float(hi), 6)],
            "texts_improved": int((nll_c < nll_o).sum()), "texts": len(nll_o)}


def ort_latency(orig, calibrated, seq: int, tmp: Path, tag: str) -> dict:
    from attnc.check.bench import _ort_session, inputs_at, time_pair
    from attnc.export.artifacts import export_onnx

    paths = {}
    for name, prog in (("original", orig), (tag, calibrated)):
        paths[name] = tmp / f"{name}.onnx"
        export_onnx(prog, paths[name], seq_hint=seq)
    args = inputs_at(orig.example_args, orig.input_names, 1, seq, 256)
    ro, rc = _ort_session(str(paths["original"])), _ort_session(str(paths[tag]))
    diff = float(np.abs(rc(*args)[0] - calibrated(*args).float().numpy()).max())
    t_c, t_o = time_pair(rc, ro, args, repeats=15, warmup=3)
    mc, mo = float(np.median(t_c)) * 1e3, float(np.median(t_o)) * 1e3
    return {"shape": [1, seq], "original_ms": round(mo, 3), "calibrated_ms": round(mc, 3),
            "slowdown": round(mc / mo, 4), "runs": len(t_c),
            "ort_vs_torch_max_abs_diff": round(diff, 6)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dtype", default="float32", help="float32: a CPU deployment (the saved "
                    "weights are float16, which ORT's CPU build cannot run)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from attnc.build import BuildOptions, prepare
    from attnc.check.bench import device_name
    from attnc.passes import sink_calibration as P
    from attnc.recipe.manager import PassContext

    res: dict = {"device": device_name(), "threads": torch.get_num_threads(),
                 "python": platform.python_version(), "torch": torch.__version__,
                 "model": "examples/models/attnc-tiny-llama", "dtype": a.dtype,
                 "seq_latency": a.seq,
                 "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    r = recipe(96, 0.25)
    cfg = r.passes[0].config
    loaded, program, data = prepare(str(MODEL), r, str(CALIB), BuildOptions(dtype=a.dtype))
    ctx = PassContext(calibration=data, original=program)
    t0, c0 = time.perf_counter(), time.process_time()
    ds = P.plan(program, cfg, ctx)
    search_s, search_cpu = time.perf_counter() - t0, time.process_time() - c0
    s = next(d.metrics["search"] for d in ds if d.metrics.get("search"))
    heads = [(d, h) for d in ds for h in d.metrics.get("heads", [])]
    res["search"] = {k: v for k, v in s.items() if k != "trail"}
    res["search"]["seconds"] = round(search_s, 2)
    res["search"]["cpu_seconds"] = round(search_cpu, 2)  # 1 thread: the uncontended cost
    res["search"]["single_head"] = {h["name"]: h["single_change"] for _, h in heads}
    res["trail"] = s["trail"]
    print(f"search {search_s:.1f}s ({search_cpu:.1f}s CPU), {s['trials']} trials, "
          f"{s['seconds_per_trial']}s per trial, "
          f"selected {s['selected'] or 'no heads'}", flush=True)

    _, _, ev = prepare(loaded, recipe(128, 0.0), str(EVAL), BuildOptions(dtype=a.dtype))
    batches = ev.calib  # holdout 0: the loader's holdout repeats the same batches
    sites = {d.metrics["node"]: d for d, _ in heads}
    all_sites = [x for x in program.sites if x.node in sites]

    def enable(pick):
        return {node: [1.0 if pick(h) else 0.0 for h in d.metrics["heads"]]
                for node, d in sites.items()}

    variants = {"chosen": enable(lambda h: h["kept"]),
                "helped_alone": enable(lambda h: (h["single_change"] or 0) < 0),
                "all_heads": enable(lambda h: True)}
    nll_o, nbytes = per_text_nll(program, batches, loaded.tokenizer)
    res["heldout"] = {}
    progs = {}
    for name, en in variants.items():
        n = int(sum(sum(v) for v in en.values()))
        if n == 0:
            res["heldout"][name] = {"heads": 0, "note": "no heads: the model is the original, "
                                    "change exactly 0"}
            continue
        prog, _ = P.calibrated_program(program, all_sites, cfg, en)
        progs[name] = prog
        nll_c, _ = per_text_nll(prog, batches, loaded.tokenizer)
        res["heldout"][name] = {"heads": n, **bpb_change(nll_o, nll_c, nbytes, a.boot)}
        print(name, res["heldout"][name], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        res["ort"] = {}
        for name in ("all_heads", "chosen"):
            if name not in progs:
                continue
            for seq in dict.fromkeys((a.seq, 256)):  # 256: the model's trained context
                try:
                    res["ort"][name] = ort_latency(program, progs[name], seq, Path(tmp), name)
                    break
                except Exception as exc:  # noqa: BLE001 - recorded, then the shorter length
                    res["ort"][f"{name}_error_at_{seq}"] = str(exc).splitlines()[0][:300]
            print("ort", name, res["ort"].get(name), flush=True)
    res["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]  # a shared machine
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"sink_calibration-{dev}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    sys.exit(main())
