"""Fidelity of the training-free moh pass against the fraction of active heads, on the two
real-weight models, measured by `attnc eval`'s metrics (attnc/check/task.py) on held-out data
against the unmodified model in the same run:

- attnc-tiny-llama (4 heads, 2 KV heads, 4 layers): bits/byte, top-1 agreement, KL;
- all-MiniLM-L6-v2 (12 heads, 6 layers): sentence-embedding cosine, retrieval agreement.

Rows: active in (1.0, 0.875, 0.75, 0.5) x router (query-norm, linear) x distill_steps
(0, DISTILL), binary gates, shared 0.5, shared heads by output norm; plus `importance: loss` at
IMPORTANCE_AT. Each row is written when measured. The tiny Llama (a float16 checkpoint) runs in
float32 (`--dtype float32`: float16 matmuls on CPU are ~30x slower; the training-free 0.75 linear
row measured +20.31 % bits/byte in both). The original's outputs are computed once per model
(`Memo`). No back-off here (no evaluator in the context): each row is the fraction asked.

    OMP_NUM_THREADS=1 python benchmarks/moh_fidelity.py  # results/moh_fidelity-cpu.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "moh_fidelity-cpu.json"
FRACTIONS = (1.0, 0.875, 0.75, 0.5)
ROUTERS = ("query-norm", "linear")
DISTILL = 100
DISTILL_AT = FRACTIONS
IMPORTANCE_AT = (0.75,)  # rows with importance: loss (training-free, both routers)

MODELS = [
    # name, spec, calibration file, eval file, max_length, calib samples, eval samples
    ("attnc-tiny-llama", str(ROOT / "examples/models/attnc-tiny-llama"),
     "examples/data/tiny_llm_calib.jsonl", "examples/data/tiny_llm_eval.jsonl", 256, 64, 48),
    ("all-MiniLM-L6-v2", f"{ROOT / 'examples/minilm.py'}:load",
     "examples/data/minilm_calib.jsonl", "examples/data/minilm_eval.jsonl", 64, 192, 128),
]


def run_model(name, spec, calib_file, eval_file, max_length, n_calib, n_eval, sink,
              done: dict | None = None, distill_phase: bool = False) -> dict:
    import attnc.passes.moh as M
    from attnc.capture.program import capture
    from attnc.check.fidelity import Memo
    from attnc.check.task import task_metrics
    from attnc.load.calibration import CalibrationConfig, load_calibration
    from attnc.load.models import load_model
    from attnc.recipe.manager import PassContext

    loaded = load_model(spec, dtype="float32") if "tiny" in name else load_model(spec)
    program = capture(loaded)
    orig = Memo(program)

    def load(f, n):
        cfg = CalibrationConfig(samples=n, max_length=max_length, batch_size=16, holdout=0.0)
        return load_calibration(str(ROOT / f), names=loaded.input_names,
                                example_args=loaded.example_args, tokenizer=loaded.tokenizer,
                                cfg=cfg)

    calib, held = load(calib_file, n_calib), load(eval_file, n_eval)
    memo: dict = {}  # importance: loss depends on the model and batches only: once per model
    plain = M.loss_importance.__wrapped__ if hasattr(M.loss_importance, "__wrapped__") else \
        M.loss_importance

    def loss_importance(prog, sites, batches, *a, **kw):
        key = tuple(s.node for s in sites)
        if key not in memo:
            memo[key] = plain(prog, sites, batches, *a, **kw)
        return memo[key]

    loss_importance.__wrapped__ = plain
    M.loss_importance = loss_importance
    ctx = PassContext(calibration=calib)
    heads = program.sites[0].num_heads
    entry = {"model": name, "kind": loaded.kind, "heads": heads, "eval_data": eval_file,
             "eval_samples": sum(b.args[0].shape[0] for b in held.calib),
             "calib_samples": n_calib, "rows": list((done or {}).get("rows", []))}
    have = {(r["active"], r["router"], r["distill_steps"], r.get("importance", "output-norm"))
            for r in entry["rows"]}
    sink(entry)
    todo = [(a, r, s, "output-norm") for a in FRACTIONS for r in ROUTERS
            for s in ((DISTILL,) if distill_phase else (0,)) if not s or a in DISTILL_AT]
    if not distill_phase:
        todo += [(a, r, 0, "loss") for a in IMPORTANCE_AT for r in ROUTERS]
    for active, router, steps, importance in todo:
        k, shared = M.head_counts(heads, active, 0.5)
        if k == heads and (router, steps, importance) != (ROUTERS[0], 0, "output-norm"):
            continue  # identity: measured once
        if (active, router, steps, importance) in have:
            continue  # measured by an earlier run (resumed)
        t0 = time.perf_counter()
        cfg = M.MoHConfig(active=active, router=router, distill_steps=steps,
                          importance=importance)
        ds = M.plan(program, cfg, ctx)
        cand = M.apply(program, ds, cfg)
        m = task_metrics(loaded.kind, cand, orig, held.calib, loaded.tokenizer)
        routed = [d for d in ds if d.action == "route"]
        row = {"active": active, "heads_per_token": k, "shared_heads": shared,
               "router": router, "distill_steps": steps, "importance": importance,
               "metrics": {a: round(float(b), 6) for a, b in m.items()},
               "branch_cosine": [d.metrics["branch_cosine"] for d in routed],
               "branch_rel_err": [d.metrics["branch_rel_err"] for d in routed],
               "branch_rel_err_before_distill": [
                   d.metrics["before_distill"]["branch_rel_err"] for d in routed
                   if "before_distill" in d.metrics],
               "shared_by_site": [d.metrics["shared_heads"] for d in routed],
               "seconds": round(time.perf_counter() - t0, 1)}
        entry["rows"].append(row)
        sink(entry)
        key = "bits_per_byte" if loaded.kind == "causal-lm" else "embedding_cosine"
        print(f"{name} active {active} ({k}/{heads}) {router} distill {steps} "
              f"importance {importance}: "
              f"{key} {m[key]:.4f} ({row['seconds']}s)", flush=True)
    return entry


def main() -> None:
    import torch

    torch.set_num_threads(1)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results: list[dict] = []

    # resume: rows already in the results file are kept and not measured again
    before = {e["model"]: e for e in json.loads(OUT.read_text())["models"]} if OUT.exists() else {}

    def sink(entry):
        if entry not in results:
            results.append(entry)
        models = results + [e for k, e in before.items() if k not in {r["model"] for r in results}]
        OUT.write_text(json.dumps({"benchmark": "moh_fidelity", "device": "cpu", "threads": 1,
                                   "torch": torch.__version__, "uptime": uptime,
                                   "note": "2-core machine shared with other jobs (load in "
                                           "uptime); seconds are wall time per row",
                                   "models": models}, indent=1))
    only = sys.argv[1:]
    order = [m for m in MODELS if not only or m[0] in only]
    order.sort(key=lambda m: only.index(m[0]) if only else 0)
    for phase in (False, True):  # every training-free row first, then the distilled ones
        for m in order:
            prev = next((e for e in results if e["model"] == m[0]), None) or before.pop(m[0],
                                                                                     None)
            if prev in results:
                results.remove(prev)
            run_model(*m, sink, prev, distill_phase=phase)
    results.extend(before.values())
    sink(results[0]) if results else None
    print(f"wrote {OUT.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
