"""Real model sizes: synthetic Llama configs of about 0.3 B, 0.7 B and 1.1 B parameters, saved as
Hugging Face folders in float32 and bfloat16 (under /tmp, never in the repo), each built with a
one-drop llm-drop recipe in its own subprocess. The parent samples the resident memory of the
build's process tree every 0.1 s (all of it, and its anonymous part), per build stage (the child
prints each stage as it starts), and kills a build whose resident memory passes --limit-gib (a
failed row, not an out-of-memory machine shared with others). Per size and dtype: wall time per
stage, peak memory as a multiple of the weights' bytes (whole build and per stage), the ONNX file
layout and ONNX Runtime parity. `--sequential` measures layer-by-layer calibration alone
(`attnc.load.sequential`: one block's weights resident).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py --sizes 0.3 --dtypes float32,bfloat16

Writes benchmarks/results/scale-<device>.json (merged with earlier runs of other sizes) and one
row file per build in benchmarks/results/scale-logs/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("ATTNC_SCALE_DIR", "/tmp/attnc-scale"))
NICE = 10  # --nice: the builds yield to other jobs on a shared machine by default

# TinyLlama's shape for 1.1 B; the smaller two keep its vocab and GQA, fewer/narrower layers
CONFIGS = {
    "0.3": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20,
                num_attention_heads=16, num_key_value_heads=8),
    "0.7": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, num_key_value_heads=8),
    "1.1": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4),
    # the fixed runtime floor: the same pipeline on a 4 M-parameter Llama (vocab 32000)
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
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
import attnc.progress as progress
from attnc.build import BuildOptions, build
_stage = progress.stage
def stage(name):  # the parent attributes its RSS samples to the stage printed last
    _stage(name)
    print("ATTNC_STAGE " + json.dumps(name), flush=True)
progress.stage = stage
t = time.perf_counter()
opts = json.loads(sys.argv[5])
res = build(sys.argv[1], json.loads(sys.argv[2]), None, sys.argv[3],
            BuildOptions(dtype="auto", force=True, progress=lambda s: print(s, flush=True), **opts))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("ATTNC_RESULT " + json.dumps({"seconds": time.perf_counter() - t, "peak_rss": peak}))
"""
SEQUENTIAL = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
from attnc.load.calibration import Batch
from attnc.load.sequential import attention_cosines
g = torch.Generator().manual_seed(0)
batches = []
for _ in range(2):  # the recipe's calibration share: 2 batches of 4 x 64 tokens
    ids = torch.randint(0, 32000, (4, 64), generator=g)
    batches.append(Batch((ids, torch.ones_like(ids)), torch.ones_like(ids)))
t = time.perf_counter()
scores = attention_cosines(sys.argv[1], batches, ["input_ids", "attention_mask"])
print("ATTNC_RESULT " + json.dumps({"seconds": time.perf_counter() - t, "layers": len(scores)}))
"""


def sequential_one(size: str, dtype: str, threads: int, logs: Path, limit: int | None) -> dict:
    """Layer-by-layer calibration alone (attnc.load.sequential): llm-drop's attention scores
    with one block's weights resident, its peak memory over the weights."""
    folder, params = make_model(size, dtype, threads, logs, limit)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    rc, text, tv = _run([sys.executable, "-c", SEQUENTIAL, str(folder), str(threads)], threads,
                        logs / f"sequential-{size}-{dtype}.log", limit)
    tv.pop("sampled_stages")
    row = {"size": f"{size}B", "dtype": dtype, "params": params, "weights_bytes": weights,
           "ok": rc == 0, "commit": _commit(), "wall_seconds": tv["wall_seconds"],
           "peak_x_weights": round(tv["sampled_peak_rss_bytes"] / weights, 2),
           "peak_anon_x_weights": round(tv["sampled_peak_anon_bytes"] / weights, 2)}
    if rc == 0:
        row.update(json.loads(text.split("ATTNC_RESULT ", 1)[1].splitlines()[0]))
    return row


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               TRANSFORMERS_DISABLE_TORCH_CHECK="1")
    return env


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _mem(pids: list[int]) -> tuple[int, int]:
    """(resident bytes, anonymous resident bytes) summed over `pids`; file-backed pages (the
    memory-mapped safetensors and ONNX data) count in the first only."""
    rss = anon = 0
    for p in pids:
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) * 1024
            elif line.startswith("RssAnon:"):
                anon += int(line.split()[1]) * 1024
    return rss, anon


def _run(cmd: list[str], threads: int, log: Path, limit: int | None = None,
         cap=None) -> tuple[int, str, dict]:
    """Run `cmd` niced, sampling the resident memory of its process tree every 0.1 s (per stage
    when the child prints `ATTNC_STAGE "name"` lines) and killing it when the tree's resident
    memory passes `limit` bytes (the watchdog: a failed row, not an out-of-memory machine).
    Returns (exit code, its output, figures)."""
    timer = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    full = ["nice", "-n", str(NICE), *([timer, "-v"] if timer else []), *cmd]
    if cap is not None:  # a memcap.Cap: the whole tree inside its memory cgroup
        full = cap.wrap(full)
    t0 = time.perf_counter()
    err_path = log.with_suffix(".stderr")
    with open(err_path, "w") as err:
        proc = subprocess.Popen(full, env=_env(threads), stdout=subprocess.PIPE, stderr=err,
                                text=True, cwd=ROOT)
        lines: list[str] = []
        state = {"stage": None}

        def reader() -> None:
            assert proc.stdout is not None
            with open(log, "w") as live:  # followable while the build runs
                for line in proc.stdout:
                    lines.append(line)
                    live.write(f"[{time.perf_counter() - t0:7.1f} s] {line}")
                    live.flush()
                    if line.startswith("ATTNC_STAGE "):
                        state["stage"] = json.loads(line.split(" ", 1)[1]) or "end"

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        stages: dict[str, dict] = {}
        peak = peak_anon = 0
        killed = None
        while proc.poll() is None:
            rss, anon = _mem(_tree(proc.pid))
            peak, peak_anon = max(peak, rss), max(peak_anon, anon)
            name = state["stage"] or "startup"
            st = stages.setdefault(name, {"peak_rss": 0, "peak_anon": 0})
            st["peak_rss"], st["peak_anon"] = max(st["peak_rss"], rss), max(st["peak_anon"], anon)
            if limit is not None and rss > limit and killed is None:
                killed = name
                for p in reversed(_tree(proc.pid)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGKILL)
            time.sleep(0.1)
        th.join(timeout=5)
    out = "".join(lines)
    with open(log, "a") as f:
        f.write(err_path.read_text())
    err_path.unlink()
    tv: dict = {"wall_seconds": round(time.perf_counter() - t0, 1),
                "sampled_peak_rss_bytes": peak, "sampled_peak_anon_bytes": peak_anon,
                "sampled_stages": stages}
    if killed is not None:
        tv["killed"] = f"watchdog: resident memory passed {limit / 2**30:.0f} GiB in {killed!r}"
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text())
    if m:
        tv["max_rss_bytes"] = int(m.group(1)) * 1024
    return proc.returncode, out, tv


def make_model(size: str, dtype: str, threads: int, logs: Path,
               limit: int | None = None) -> tuple[Path, int]:
    folder = WORK / f"llama-{size}b-{dtype}"
    if (folder / "attnc-params.json").exists() and any(folder.glob("*.safetensors")):
        params = json.loads((folder / "attnc-params.json").read_text())["params"]
        return folder, params
    shutil.rmtree(folder, ignore_errors=True)
    rc, out, _ = _run([sys.executable, "-c", MAKE, json.dumps(CONFIGS[size]), str(folder), dtype,
                       str(threads)], threads, logs / f"make-{size}-{dtype}.log", limit)
    if rc != 0:
        raise SystemExit(f"making the {size} B {dtype} model failed:\n{out[-2000:]}")
    params = int(out.strip().splitlines()[-1])
    (folder / "attnc-params.json").write_text(json.dumps({"params": params}))
    return folder, params


def build_one(size: str, dtype: str, threads: int, logs: Path, limit: int | None,
              opts: dict, cap_x: float | None = None) -> dict:
    folder, params = make_model(size, dtype, threads, logs, limit)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    out = WORK / f"build-{size}b-{dtype}"
    load_before = _uptime()
    cmd = [sys.executable, "-c", BUILD, str(folder), json.dumps(RECIPE), str(out), str(threads),
           json.dumps(opts)]
    log = logs / f"build-{size}-{dtype}{'-cap' if cap_x else ''}.log"
    if cap_x:  # the build inside a memory cgroup of cap_x times the weights (memcap.py)
        import memcap

        dropped = memcap.drop_page_cache()
        with memcap.Cap(int(cap_x * weights)) as cap:
            rc, text, tv = _run(cmd, threads, log, limit, cap)
        tv["cap"] = {"x_weights": cap_x, "page_cache_dropped_first": dropped, **cap.stats}
    else:
        rc, text, tv = _run(cmd, threads, log, limit)
    x = lambda n: round((n or 0) / weights, 2)  # noqa: E731
    sampled = tv.pop("sampled_stages")
    row: dict = {"size": _label(size), "dtype": dtype, "params": params,
                 "weights_bytes": weights, "ok": rc == 0 and "killed" not in tv,
                 "commit": _commit(), "build_options": opts, "python": sys.executable, **tv,
                 "uptime_before": load_before, "uptime_after": _uptime(),
                 "peak_x_weights": x(tv.get("sampled_peak_rss_bytes")),
                 "peak_anon_x_weights": x(tv.get("sampled_peak_anon_bytes"))}
    if "max_rss_bytes" in tv:
        row["time_v_peak_x_weights"] = x(tv["max_rss_bytes"])  # the largest single process
    row["stage_peaks"] = [{"stage": k, "peak_x_weights": x(v["peak_rss"]),
                           "peak_anon_x_weights": x(v["peak_anon"])} for k, v in sampled.items()]
    if not row["ok"]:
        err = log.read_text().strip().splitlines()
        row["error"] = tv.get("killed") or next(
            (ln for ln in reversed(err) if "Error" in ln), f"exit {rc}")[:400]
        shutil.rmtree(out, ignore_errors=True)
        return row
    res = json.loads(text.split("ATTNC_RESULT ", 1)[1].splitlines()[0])
    row["build_seconds"] = round(res["seconds"], 1)
    row["build_seconds_per_gparam"] = round(res["seconds"] / (params / 1e9), 1)
    report = json.loads((out / "report.json").read_text())
    row["stages"] = [
        {"stage": s["stage"], "seconds": s["seconds"],
         "peak_x_weights": x((sampled.get(s["stage"]) or {}).get("peak_rss")),
         "peak_anon_x_weights": x((sampled.get(s["stage"]) or {}).get("peak_anon")),
         "rss_x_weights_after": x(s["rss_bytes"]),
         "heap_released_x_weights": x(s.get("heap_released_bytes"))}
        for s in report.get("stages", [])
    ]
    # the Python/torch/onnx runtime before the model is read (imports), and the peak without it
    base = next((s["rss_bytes"] for s in report.get("stages", []) if s["stage"] == "preflight"), 0)
    row["runtime_rss_bytes"] = base
    row["peak_less_runtime_x_weights"] = x(tv["sampled_peak_rss_bytes"] - (base or 0))
    onnx = report.get("onnx") or {}
    row["onnx_layout"] = onnx.get("layout")
    row["onnx_verified_file"] = onnx.get("verified_file")
    comps = report["verification"]["comparisons"]
    row["onnx_parity"] = comps.get("ONNX Runtime vs torch optimized")
    row["onnx_max_abs_diff_allowed"] = onnx.get("max_abs_diff_allowed")
    row["artifacts"] = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    shutil.rmtree(out, ignore_errors=True)  # the disk is shared
    return row


def _label(size: str) -> str:
    return size if size == "tiny" else f"{size}B"


def _uptime() -> str:
    """`uptime`: the machine's load (shared with other jobs) around a build."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _commit() -> str:
    """The checkout's commit, with '+dirty' when files differ from it."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain",
                                                                    "-uno") else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.3",
                    help="comma list of 0.3, 0.7, 1.1, tiny (the runtime floor)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep-models", action="store_true", help="keep the HF folders in /tmp")
    ap.add_argument("--limit-gib", type=float, default=12.0,
                    help="kill a build whose resident memory passes this (a failed row)")
    ap.add_argument("--sequential", action="store_true",
                    help="only layer-by-layer calibration (attnc.load.sequential), no build")
    ap.add_argument("--no-original", action="store_true",
                    help="build without original.pt2 (BuildOptions.save_original=False)")
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--cap-x", type=float, default=None,
                    help="run each build in a memory cgroup capped at this many times the "
                         "weights (needs root; memcap.py); rows go to 'capped_runs'")
    args = ap.parse_args()
    global NICE
    NICE = args.nice
    WORK.mkdir(parents=True, exist_ok=True)
    logs = ROOT / "benchmarks" / "results" / "scale-logs"
    logs.mkdir(parents=True, exist_ok=True)
    device = "cpu"
    path = ROOT / "benchmarks" / "results" / f"scale-{device}.json"
    if args.sequential:
        for size in args.sizes.split(","):
            for dtype in args.dtypes.split(","):
                row = sequential_one(size, dtype, args.threads, logs, int(args.limit_gib * 2**30))
                print(json.dumps(row), flush=True)
                doc = json.loads(path.read_text()) if path.exists() else {"runs": []}
                doc["sequential_calibration"] = [
                    r for r in doc.get("sequential_calibration", [])
                    if not (r["size"] == row["size"] and r["dtype"] == dtype)] + [row]
                path.write_text(json.dumps(doc, indent=1) + "\n")
        return
    for size in args.sizes.split(","):
        for dtype in args.dtypes.split(","):
            print(f"== {size} B {dtype}", flush=True)
            opts = {"save_original": False} if args.no_original else {}
            row = build_one(size, dtype, args.threads, logs, int(args.limit_gib * 2**30), opts,
                            args.cap_x)
            print(json.dumps({k: v for k, v in row.items() if "stage" not in k}), flush=True)
            tag = "-cap" if args.cap_x else ""
            (logs / f"row-{size}-{dtype}{tag}.json").write_text(json.dumps(row, indent=1) + "\n")
            # read again just before writing: another size may have finished meanwhile
            doc = json.loads(path.read_text()) if path.exists() else {"runs": []}
            key = "capped_runs" if args.cap_x else "runs"
            doc[key] = [r for r in doc.get(key, [])
                        if not (r["size"] == row["size"] and r["dtype"] == dtype)] + [row]
            if row["size"] == "tiny" and row["ok"] and not args.cap_x:  # the floor in every peak
                doc.setdefault("runtime_floor", {})[dtype] = {
                    "peak_rss_bytes": row["sampled_peak_rss_bytes"],
                    "peak_anon_bytes": row["sampled_peak_anon_bytes"],
                    "commit": row["commit"]}
            doc.update(device=f"{device} ({platform.processor() or platform.machine()})",
                       threads=args.threads, recipe=RECIPE,
                       note="shared 2-core machine with other jobs running: wall times are "
                            "noisy. peak_x_weights: the build's process tree's resident memory, "
                            "sampled every 0.1 s, over the safetensors bytes (source dtype); "
                            "peak_anon_x_weights: its anonymous part (without the memory-mapped "
                            "safetensors/ONNX data pages the kernel can drop)")
            path.write_text(json.dumps(doc, indent=1) + "\n")
            if not args.keep_models:
                shutil.rmtree(WORK / f"llama-{size}b-{dtype}", ignore_errors=True)


if __name__ == "__main__":
    main()
