"""End to end in ONNX Runtime: the long-context byte LM (examples/models/attnc-long-llama)
rewritten by the `sparse` pass priced for onnxruntime-cpu at 2048 tokens, against its
unmodified export, timed interleaved in one run (`attnc bench`: model.onnx of the build against
original.pt2 exported again, medians; ORT CPU provider with its default threads = the machine's
cores).

Variants (recipe examples/recipes/long_llm_sparse.yaml, with `backend: onnxruntime-cpu` and
`target_length: 2048`):
  default-ort the default rule (min_mass 0.95, mean+tail, granularity head) at
              `min_speedup: 1.1`: what a user asking for an ORT CPU build gets
              (examples/recipes/long_llm_sparse_ort.yaml);
  recipe      min_speedup 0 (every head that keeps the mass rewritten, whatever the cost
              model predicts);
  local-512   candidate windows up to 512 (+ 4 sinks), min_mass 0.8, one window per site
              (granularity site: no dense head, so the blocked form applies), min_speedup 1.1;
  local-512-mm90  the same at min_mass 0.9.
Fidelity: the build's own verification (held-out calibration rows, bits/byte against the
original, the recipe's bound: within 2 %) and, with `--eval-samples N`, `attnc eval` on
examples/data/long_llm_eval.jsonl (torch CPU: slow for sparse builds). `uptime` is recorded
around each timing (this machine is shared).

    python benchmarks/onnx_e2e.py [--variants default-ort local-512] [--repeats 7]
        [--ort-threads 1 2] [--torch] [--eval-samples 16]

Writes benchmarks/results/onnx_e2e-<device>.json (speed-ups, fidelity, the ONNX form per site),
merged with the runs already in that file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = "examples/models/attnc-long-llama"
RECIPE = ROOT / "examples/recipes/long_llm_sparse.yaml"
CALIB = ROOT / "examples/data/long_llm_calib.jsonl"
EVAL = ROOT / "examples/data/long_llm_eval.jsonl"
VARIANTS = {
    "default-ort": {"min_speedup": 1.1},
    "recipe": {},
    "local-512": {"windows": [64, 128, 256, 512], "min_mass": 0.8, "granularity": "site",
                  "min_speedup": 1.1},
    "local-512-mm90": {"windows": [64, 128, 256, 512], "min_mass": 0.9, "granularity": "site",
                       "min_speedup": 1.1},
}


def ort_threads(n: int) -> None:
    """attnc bench's ORT sessions with `n` intra-op threads (its default: the machine's cores)."""
    from attnc.check import bench

    def session(path: str):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = n
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        return lambda *args: sess.run(None, {k: a.numpy() for k, a in zip(names, args,
                                                                            strict=False)})

    bench._ort_session = session


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def evaluate(build_dir: Path, samples: int) -> dict:
    """`attnc eval BUILD` on held-out rows against the build's original.pt2 (torch CPU)."""
    cmd = [str(ROOT / ".venv/bin/attnc"), "eval", str(build_dir), "--data", str(EVAL),
           "--max-length", "2048", "--samples", str(samples), "--json"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        return {"rc": r.returncode, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout)["metrics"]


def build(name: str, out: Path, tmp: Path) -> dict:
    recipe = yaml.safe_load(RECIPE.read_text())
    step = next(p for p in recipe["passes"] if p["id"] == "sparse")
    step.update({"backend": "onnxruntime-cpu", "target_length": 2048, **VARIANTS[name]})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [str(ROOT / ".venv/bin/attnc"), "optimize", SPEC, "--recipe", str(path), "--calib",
           str(CALIB), "-o", str(out), "--no-bench", "--force"]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    rec = {"command": " ".join(cmd), "rc": r.returncode, "seconds": round(time.perf_counter() - t)}
    if r.returncode:
        rec["error"] = (r.stderr.strip().splitlines() or ["?"])[-1]
        return rec
    rep = json.loads((out / "report.json").read_text())
    sparse = next((p for p in rep.get("passes", []) if p["pass_id"] == "sparse"), {})
    rec["sites"] = [{"site": d.get("site"), "action": d.get("action"),
                     "labels": d.get("metrics", {}).get("labels"),
                     "predicted_speedup": d.get("metrics", {}).get("predicted_speedup"),
                     "runs_as": d.get("metrics", {}).get("runs_as"),
                     "min_mass_used": d.get("metrics", {}).get("min_mass_used"),
                     "reason": d.get("reason")}
                    for d in sparse.get("decisions", [])]
    onnx = rep.get("onnx") or {}
    rec["target_length"] = onnx.get("target_length")
    rec["attention_forms"] = onnx.get("attention_forms")
    rec["fidelity"] = rep.get("fidelity")
    rec["verification"] = rep.get("verification")
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=["default-ort", "local-512"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--eval-samples", type=int, default=0)
    ap.add_argument("--ort-threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--torch", action="store_true", help="also time model.pt2 in torch CPU")
    a = ap.parse_args()

    import torch

    from attnc.check.bench import BenchConfig, bench_folder, device_name

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = {}
    with tempfile.TemporaryDirectory(prefix="attnc-e2e-") as tmp:
        for name in a.variants:
            out = Path(tmp) / name
            print(f"· {name}: building", flush=True)
            rec = build(name, out, Path(tmp))
            if "error" not in rec:
                rec["timings"], rec["onnx_speedup"] = {}, {}
                for n in a.ort_threads:
                    ort_threads(n)
                    print(f"· {name}: timing, ORT {n} thread(s) ({uptime()})", flush=True)
                    before = uptime()
                    res = bench_folder(out, BenchConfig(shapes=((1, 2048),), repeats=a.repeats,
                                                        runtimes=("onnxruntime",)))
                    t = [dataclasses.asdict(x) for x in res.timings]
                    rec["timings"][f"ort_threads={n}"] = {"uptime_before": before,
                                                          "uptime_after": uptime(), "timings": t}
                    rec["onnx_speedup"][f"ort_threads={n}"] = t[0]["speedup"] if t else None
                if a.torch:
                    print(f"· {name}: timing, torch ({uptime()})", flush=True)
                    before = uptime()
                    res = bench_folder(out, BenchConfig(shapes=((1, 2048),), repeats=a.repeats,
                                                        runtimes=("torch",)))
                    t = [dataclasses.asdict(x) for x in res.timings]
                    rec["timings"]["torch"] = {"uptime_before": before, "uptime_after": uptime(),
                                               "threads": torch.get_num_threads(), "timings": t}
                    rec["torch_speedup"] = t[0]["speedup"] if t else None
                if a.eval_samples:
                    print(f"· {name}: attnc eval", flush=True)
                    rec["eval"] = evaluate(out, a.eval_samples)
            rows[name] = rec
            print(json.dumps({k: rec.get(k) for k in ("rc", "onnx_speedup", "torch_speedup",
                                                      "error")}),
                  flush=True)
    dev = device_name()
    import onnxruntime

    slug = "".join(c if c.isalnum() else "-" for c in dev.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    path = ROOT / "benchmarks" / "results" / f"onnx_e2e-{slug}.json"
    old = json.loads(path.read_text())["runs"] if path.is_file() else {}
    out = {"benchmark": "onnx_e2e", "model": SPEC, "shape": "1x2048", "device": dev,
           "ort_threads": a.ort_threads, "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(),
           "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
           "variants": VARIANTS, "runs": {**old, **rows}}
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
