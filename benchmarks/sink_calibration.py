"""sink-calibration (ACT) on the trained tiny Llama: the head search's cost, the held-out bits/byte
change of what it chose (with a bootstrap confidence interval over the eval texts), two
diagnostic head sets, and ONNX Runtime latency of a calibrated export against the unmodified one.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sink_calibration.py [--case tiny|long]
        [--seq 512] [--boot 2000] [--ort-only] [--ort-threads 2]

Search: the pass's own plan (single-head screening on half of the calibration batches, greedy
check on the other half) on examples/data/tiny_llm_calib.jsonl (96 windows of 256 bytes, as the
example recipe). Held-out: examples/data/tiny_llm_eval.jsonl (128 texts of 256 bytes, disjoint),
each variant against the original in the same run. Variants: `chosen` (the search's heads),
`helped_alone` (every head whose single-head trial lowered the search NLL), `all_heads`.
Latency: ORT CPU, batch 1, `--seq` tokens, the `all_heads` export (every site calibrated: the
worst case) and the `chosen` one when it is not the original, interleaved medians.
`--case long`: the same on the long-context byte Llama (examples/models/attnc-long-llama) with
examples/recipes/long_llm_sink_calibration.yaml (2048-byte windows) and the 64 texts of
examples/data/long_llm_eval.jsonl; no ORT timing. `--ort-only`: the tiny case's ORT timing alone.
Writes benchmarks/results/sink_calibration-<device>.json (the tiny case at the top level, the long
case under `long_llm`; each run keeps the other's entries).
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
EX = ROOT / "examples"
CASES = {  # model, recipe, calibration text, held-out text (its number of texts)
    "tiny": ("attnc-tiny-llama", "tiny_llm_sink_calibration.yaml", "tiny_llm_calib.jsonl",
             "tiny_llm_eval.jsonl", 128),
    "long": ("attnc-long-llama", "long_llm_sink_calibration.yaml", "long_llm_calib.jsonl",
             "long_llm_eval.jsonl", 64),
}


def recipe(case: str, eval_samples: int | None = None):
    """The case's example recipe; `eval_samples`: the same windows, that many rows, no holdout
    (the loader's holdout would repeat the same batches)."""
    from dataclasses import replace

    from attnc.recipe.schema import load_recipe

    r = load_recipe(EX / "recipes" / CASES[case][1])
    if eval_samples is None:
        return r
    return replace(r, calibration=replace(r.calibration, samples=eval_samples, holdout=0.0))


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


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def run(*args: torch.Tensor):
        return sess.run(None, {n: a.numpy() for n, a in zip(names, args, strict=False)})

    return run


def ort_latency(orig, calibrated, seq: int, tmp: Path, tag: str, threads: int) -> dict:
    from attnc.check.bench import inputs_at, time_pair
    from attnc.export.artifacts import export_onnx

    paths = {}
    for name, prog in (("original", orig), (tag, calibrated)):
        paths[name] = tmp / f"{name}.onnx"
        export_onnx(prog, paths[name], seq_hint=seq)
    args = inputs_at(orig.example_args, orig.input_names, 1, seq, 256)
    ro, rc = ort_session(str(paths["original"]), threads), ort_session(str(paths[tag]), threads)
    with torch.no_grad():
        want = calibrated(*args)
    want = (want[0] if isinstance(want, tuple | list) else getattr(want, "logits", want))
    diff = float(np.abs(rc(*args)[0] - want.float().numpy()).max())
    t_c, t_o = time_pair(rc, ro, args, repeats=15, warmup=3)
    mc, mo = float(np.median(t_c)) * 1e3, float(np.median(t_o)) * 1e3
    return {"shape": [1, seq], "ort_threads": threads, "original_ms": round(mo, 3),
            "calibrated_ms": round(mc, 3), "slowdown": round(mc / mo, 4), "runs": len(t_c),
            "ort_vs_torch_max_abs_diff": round(diff, 6)}


def uptime() -> str:
    try:
        return os.popen("uptime").read().strip()
    except OSError:
        return ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=sorted(CASES), default="tiny")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--ort-only", action="store_true", help="tiny case: ORT timing of the "
                    "every-head export alone (no search, no held-out text)")
    ap.add_argument("--ort-threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dtype", default="float32", help="float32: a CPU deployment (the saved "
                    "weights are float16, which ORT's CPU build cannot run)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from attnc.build import BuildOptions, prepare
    from attnc.check.bench import device_name
    from attnc.passes import sink_calibration as P
    from attnc.recipe.manager import PassContext

    mname, rname, cname, ename, n_eval = CASES[a.case]
    res: dict = {"device": device_name(), "threads": torch.get_num_threads(),
                 "python": platform.python_version(), "torch": torch.__version__,
                 "model": f"examples/models/{mname}", "recipe": f"examples/recipes/{rname}",
                 "dtype": a.dtype, "uptime_at_start": uptime()}
    r = recipe(a.case)
    cfg = r.passes[0].config
    loaded, program, data = prepare(str(EX / "models" / mname), r, str(EX / "data" / cname),
                                    BuildOptions(dtype=a.dtype))
    sites = [x for x in program.sites if P._skip_reason(x, P.Selector.parse(None, ())) is None]
    if a.ort_only:
        en = {x.node: [1.0] * x.num_heads for x in sites}
        prog, _ = P.calibrated_program(program, sites, cfg, en)
        with tempfile.TemporaryDirectory() as tmp:
            ort = {"all_heads": ort_latency(program, prog, a.seq, Path(tmp), "all_heads",
                                            a.ort_threads)}
        ort["all_heads"]["heads"] = int(sum(sum(v) for v in en.values()))
        ort["uptime"] = [res["uptime_at_start"], uptime()]
        print("ort", ort, flush=True)
        write(a, {"ort": ort})
        return
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

    _, _, ev = prepare(loaded, recipe(a.case, n_eval), str(EX / "data" / ename),
                       BuildOptions(dtype=a.dtype))
    batches = ev.calib  # holdout 0: the loader's holdout repeats the same batches
    res["heldout_data"] = {"file": f"examples/data/{ename}", "texts": n_eval,
                           "max_length": r.calibration.max_length}
    by_node = {d.metrics["node"]: d for d, _ in heads}
    all_sites = [x for x in program.sites if x.node in by_node]

    def enable(pick):
        return {node: [1.0 if pick(h) else 0.0 for h in d.metrics["heads"]]
                for node, d in by_node.items()}

    variants = {"chosen": enable(lambda h: h["kept"]),
                "helped_alone": enable(lambda h: (h["single_change"] or 0) < 0),
                "all_heads": enable(lambda h: True)}
    t0 = time.perf_counter()
    nll_o, nbytes = per_text_nll(program, batches, loaded.tokenizer)
    res["heldout_seconds_original"] = round(time.perf_counter() - t0, 2)
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
    if a.case == "tiny":
        with tempfile.TemporaryDirectory() as tmp:
            res["ort"] = {}
            for name in ("all_heads", "chosen"):
                if name not in progs:
                    continue
                res["ort"][name] = ort_latency(program, progs[name], a.seq, Path(tmp), name,
                                               a.ort_threads)
                print("ort", name, res["ort"].get(name), flush=True)
    res["uptime_at_end"] = uptime()  # a shared machine
    write(a, res if a.case == "tiny" else {"long_llm": res})


def write(a, update: dict) -> None:
    """Merge `update` into the device's JSON: the tiny case's top-level keys, `long_llm`."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"sink_calibration-{dev}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else {}
    if a.case == "tiny" and not a.ort_only:
        old = {k: v for k, v in old.items() if k == "long_llm"}
    old.update(update)
    out.write_text(json.dumps(old, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    sys.exit(main())
