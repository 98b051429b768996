"""Real model sizes: synthetic Llama configs of about 0.3 B, 0.7 B and 1.1 B parameters, saved as
Hugging Face folders in float32 and bfloat16 (under /tmp, never in the repo), each built with a
one-drop llm-drop recipe in its own subprocess (`/usr/bin/time -v` where present, else the
child's getrusage). Per size and dtype: wall time per stage, peak resident memory as a multiple
of the weights' bytes (whole build and per stage), the ONNX file layout and ONNX Runtime parity.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py --sizes 0.3 --dtypes float32,bfloat16

Writes benchmarks/results/scale-<device>.json (merged with earlier runs of other sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("ATTNC_SCALE_DIR", "/tmp/attnc-scale"))

# TinyLlama's shape for 1.1 B; the smaller two keep its vocab and GQA, fewer/narrower layers
CONFIGS = {
    "0.3": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20,
                num_attention_heads=16, num_key_value_heads=8),
    "0.7": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, num_key_value_heads=8),
    "1.1": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4),
}
RECIPE = {
    "version": 1,
    "passes": [{"id": "llm-drop", "target": "attention", "count": 1}],
    "fidelity": {"min_cosine": 0.0},  # random weights: the drop's cost is not the question here
    "calibration": {"samples": 8, "max_length": 64, "batch_size": 4, "holdout": 0.5,
                    "source": "generated"},
}

MAKE = """
import sys, torch
torch.set_num_threads(int(sys.argv[4]))
from transformers import LlamaConfig, LlamaForCausalLM
import json
cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, **json.loads(sys.argv[1]))
torch.manual_seed(0)
with torch.device("cpu"):
    m = LlamaForCausalLM(cfg).to(getattr(torch, sys.argv[3]))
m.save_pretrained(sys.argv[2], max_shard_size="20GB")
print(sum(p.numel() for p in m.parameters()))
"""

BUILD = """
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from attnc.build import BuildOptions, build
t = time.perf_counter()
res = build(sys.argv[1], json.loads(sys.argv[2]), None, sys.argv[3],
            BuildOptions(dtype="auto", force=True, progress=lambda s: print(s, flush=True)))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("ATTNC_RESULT " + json.dumps({"seconds": time.perf_counter() - t, "peak_rss": peak}))
"""


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               TRANSFORMERS_DISABLE_TORCH_CHECK="1")
    return env


def _run(cmd: list[str], threads: int, log: Path) -> tuple[int, str, dict]:
    """Run `cmd` niced; returns (exit code, its output, /usr/bin/time -v figures)."""
    timer = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    full = ["nice", "-n", "10", *([timer, "-v"] if timer else []), *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(full, env=_env(threads), capture_output=True, text=True, cwd=ROOT)
    out = proc.stdout
    log.write_text(proc.stdout + proc.stderr)
    tv = {"wall_seconds": time.perf_counter() - t0}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if m:
        tv["max_rss_bytes"] = int(m.group(1)) * 1024
    return proc.returncode, out, tv


def make_model(size: str, dtype: str, threads: int, logs: Path) -> tuple[Path, int]:
    folder = WORK / f"llama-{size}b-{dtype}"
    if (folder / "attnc-params.json").exists() and any(folder.glob("*.safetensors")):
        params = json.loads((folder / "attnc-params.json").read_text())["params"]
        return folder, params
    shutil.rmtree(folder, ignore_errors=True)
    rc, out, _ = _run([sys.executable, "-c", MAKE, json.dumps(CONFIGS[size]), str(folder), dtype,
                       str(threads)], threads, logs / f"make-{size}-{dtype}.log")
    if rc != 0:
        raise SystemExit(f"making the {size} B {dtype} model failed:\n{out[-2000:]}")
    params = int(out.strip().splitlines()[-1])
    (folder / "attnc-params.json").write_text(json.dumps({"params": params}))
    return folder, params


def build_one(size: str, dtype: str, threads: int, logs: Path) -> dict:
    folder, params = make_model(size, dtype, threads, logs)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    out = WORK / f"build-{size}b-{dtype}"
    rc, text, tv = _run([sys.executable, "-c", BUILD, str(folder), json.dumps(RECIPE), str(out),
                         str(threads)], threads, logs / f"build-{size}-{dtype}.log")
    row: dict = {"size": f"{size}B", "dtype": dtype, "params": params,
                 "weights_bytes": weights, "ok": rc == 0, "commit": _commit(), **tv}
    if "max_rss_bytes" in tv:
        row["peak_x_weights"] = round(tv["max_rss_bytes"] / weights, 2)
    if rc != 0:
        err = (logs / f"build-{size}-{dtype}.log").read_text().strip().splitlines()
        row["error"] = next((ln for ln in reversed(err) if "Error" in ln), f"exit {rc}")[:400]
        return row
    res = json.loads(text.split("ATTNC_RESULT ", 1)[1].splitlines()[0])
    row["build_seconds"] = round(res["seconds"], 1)
    row.setdefault("max_rss_bytes", res["peak_rss"])
    row.setdefault("peak_x_weights", round(res["peak_rss"] / weights, 2))
    report = json.loads((out / "report.json").read_text())
    row["stages"] = [
        {"stage": s["stage"], "seconds": s["seconds"],
         "peak_x_weights": round((s["peak_rss_bytes"] or 0) / weights, 2),
         "rss_x_weights_after": round((s["rss_bytes"] or 0) / weights, 2)}
        for s in report.get("stages", [])
    ]
    onnx = report.get("onnx") or {}
    row["onnx_layout"] = onnx.get("layout")
    row["onnx_verified_file"] = onnx.get("verified_file")
    comps = report["verification"]["comparisons"]
    row["onnx_parity"] = comps.get("ONNX Runtime vs torch optimized")
    row["onnx_max_abs_diff_allowed"] = onnx.get("max_abs_diff_allowed")
    row["artifacts"] = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    shutil.rmtree(out, ignore_errors=True)  # the disk is shared
    return row


def _commit() -> str:
    """The checkout's commit, with '+dirty' when files differ from it."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain",
                                                                    "-uno") else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.3", help="comma list of 0.3, 0.7, 1.1")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep-models", action="store_true", help="keep the HF folders in /tmp")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    logs = ROOT / "benchmarks" / "results" / "scale-logs"
    logs.mkdir(parents=True, exist_ok=True)
    device = "cpu"
    path = ROOT / "benchmarks" / "results" / f"scale-{device}.json"
    doc = json.loads(path.read_text()) if path.exists() else {"runs": []}
    for size in args.sizes.split(","):
        for dtype in args.dtypes.split(","):
            print(f"== {size} B {dtype}", flush=True)
            row = build_one(size, dtype, args.threads, logs)
            print(json.dumps({k: v for k, v in row.items() if k != "stages"}), flush=True)
            doc["runs"] = [r for r in doc["runs"]
                           if not (r["size"] == row["size"] and r["dtype"] == dtype)] + [row]
            doc.update(device=f"{device} ({platform.processor() or platform.machine()})",
                       threads=args.threads, recipe=RECIPE,
                       note="shared 2-core machine with other jobs running: wall times are "
                            "noisy; peak memory is the build process's own")
            path.write_text(json.dumps(doc, indent=1) + "\n")
            if not args.keep_models:
                shutil.rmtree(WORK / f"llama-{size}b-{dtype}", ignore_errors=True)


if __name__ == "__main__":
    main()
