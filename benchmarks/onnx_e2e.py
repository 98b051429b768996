"""End to end in ONNX Runtime: the long-context byte LM (examples/models/attnc-long-llama)
rewritten by the `sparse` pass priced for onnxruntime-cpu at 2048 tokens, against its
unmodified export, timed interleaved in one run (`attnc bench`: model.onnx of the build against
original.pt2 exported again, medians; ORT CPU provider with its default threads = the machine's
cores).

Variants (recipe examples/recipes/long_llm_sparse.yaml, with `backend: onnxruntime-cpu`):
  recipe      as it is (min_mass 0.95, every head that keeps the mass rewritten);
  local-512   candidate windows up to 512 (+ 4 sinks), min_mass 0.8, one window per site
              (granularity site: no dense head, so the blocked form applies), min_speedup 1.1.

    python benchmarks/onnx_e2e.py [--variants recipe local-512] [--repeats 10]

Writes benchmarks/results/onnx_e2e-<device>.json (speed-ups, fidelity, the ONNX form per site).
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
VARIANTS = {
    "recipe": {},
    "local-512": {"windows": [64, 128, 256, 512], "min_mass": 0.8, "granularity": "site",
                  "min_speedup": 1.1},
}


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
                     "predicted_speedup": d.get("metrics", {}).get("predicted_speedup")}
                    for d in sparse.get("decisions", [])]
    onnx = rep.get("onnx") or {}
    rec["target_length"] = onnx.get("target_length")
    rec["attention_forms"] = onnx.get("attention_forms")
    rec["fidelity"] = rep.get("fidelity")
    rec["verification"] = rep.get("verification")
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--repeats", type=int, default=10)
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
                print(f"· {name}: timing", flush=True)
                res = bench_folder(out, BenchConfig(shapes=((1, 2048),), repeats=a.repeats,
                                                    runtimes=("onnxruntime",)))
                rec["timings"] = [dataclasses.asdict(t) for t in res.timings]
                rec["onnx_speedup"] = res.timings[0].speedup if res.timings else None
            rows[name] = rec
            print(json.dumps({k: rec.get(k) for k in ("rc", "onnx_speedup", "error")}),
                  flush=True)
    dev = device_name()
    import onnxruntime

    out = {"benchmark": "onnx_e2e", "model": SPEC, "shape": "1x2048", "device": dev,
           "ort_threads": "default (the machine's cores)", "cpu_count": os.cpu_count(),
           "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
           "variants": VARIANTS, "runs": rows}
    slug = "".join(c if c.isalnum() else "-" for c in dev.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    path = ROOT / "benchmarks" / "results" / f"onnx_e2e-{slug}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
