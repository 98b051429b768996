"""The neighborhood ONNX forms as deployed: each session alone in its own process, against dense
`Attention` timed the same way in the same run, B=1, H=8, D=64, ONNX Runtime CPU.

onnx_patterns.py / onnx_patterns_nbhd.py time every form's session interleaved in one process:
fair against a drifting load, but with ORT's default intra-op spinning a finished run's pool
keeps spinning into the next session's run, which costs a form with many short parallel
sections (the Loop steps) more than dense. Here each (form, spinning) timing is a fresh process
holding one session (median of `--runs` after 2 warm-ups), the forms alternating, `--repeat`
rounds; the ratio is the median dense time over the median form time, with the same spinning.

Cases: nbhd64x64 (2-D 64x64 grid, 13x13), nbhd32x32 (2-D 32x32, 7x7, S = 1024), na1d (1-D,
S = 4096, kernel 169). Forms: dense, chosen (what the export emits: the Loop form in float32),
flat (the same capped chain over every tile at once, no Loop).

    python benchmarks/onnx_patterns_solo.py [--runs 9] [--repeat 2] [--threads 2]

Writes benchmarks/results/onnx_patterns_solo-<device>.json (`uptime` per case)."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import onnx_patterns as op_bench  # noqa: E402
from llm_drop import cpu_name  # noqa: E402

CASES = (("nbhd64x64", [64, 64], [13, 13]), ("nbhd32x32", [32, 32], [7, 7]),
         ("na1d", [4096], [169]))


def child(path: str, spin: str, threads: int, runs: int, s: int) -> None:
    """One session alone: print its median run time in ms."""
    import time

    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    if spin == "0":
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {i.name: rng.standard_normal((1, op_bench.H, s, op_bench.D), dtype=np.float32)
            for i in sess.get_inputs()}
    for _ in range(2):
        sess.run(None, feed)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        ts.append(time.perf_counter() - t)
    print(json.dumps(statistics.median(ts) * 1e3))


@contextlib.contextmanager
def flat_chain():
    from attnc.kernels import neighborhood1d_blocked as nb1d
    from attnc.kernels import neighborhood_blocked_onnx as nbo

    saved = nbo.LOOP, nb1d.LOOP
    nbo.LOOP = nb1d.LOOP = False
    try:
        yield
    finally:
        nbo.LOOP, nb1d.LOOP = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.threads, a.runs, int(a.child[2]))

    import numpy as np
    import onnxruntime as ort
    import torch
    import torch.nn.functional as F

    import attnc.kernels  # noqa: F401
    from attnc.kernels import reference

    na = torch.ops.attnc.neighborhood_attention
    rows = []
    with tempfile.TemporaryDirectory() as tmpd:
        for name, grid, ks in CASES:
            n, s = len(grid), int(torch.tensor(grid).prod())
            args = (grid, ks, [1] * n, [1] * n, [False] * n)
            ex = tuple(torch.randn(1, op_bench.H, s, op_bench.D) for _ in range(3))
            want = reference.neighborhood_attention_ref(*ex, *args).numpy()
            paths, err = {}, {}
            for form, ctx in (("dense", None), ("chosen", contextlib.nullcontext),
                              ("flat", flat_chain)):
                p = Path(tmpd) / f"{name}-{form}.onnx"
                if ctx is None:
                    op_bench.export(lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                                    ex, p, s)
                else:
                    with ctx(), op_bench.forced():
                        op_bench.export(lambda q, k, v, args=args: na(q, k, v, *args), ex, p, s)
                    sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                    feed = dict(zip([i.name for i in sess.get_inputs()],
                                    [x.numpy() for x in ex], strict=True))
                    err[form] = float(np.abs(sess.run(None, feed)[0] - want).max())
                    del sess
                paths[form] = str(p)
            ms: dict[tuple[str, str], list[float]] = {}
            for _ in range(a.repeat):
                for spin in ("1", "0"):
                    for form, p in paths.items():
                        out = subprocess.run(
                            [sys.executable, __file__, "--runs", str(a.runs), "--threads",
                             str(a.threads), "--child", p, spin, str(s)],
                            capture_output=True, text=True, check=True).stdout
                        ms.setdefault((spin, form), []).append(
                            json.loads(out.strip().splitlines()[-1]))
            row = {"case": name, "S": s, "grid": grid, "window": ks, "uptime": op_bench.uptime(),
                   "max_abs_err": err}
            for spin, tag in (("1", "spinning"), ("0", "no_spinning")):
                med = {f: statistics.median(ms[(spin, f)]) for f in paths}
                row[f"ms_{tag}"] = {f: round(x, 2) for f, x in med.items()}
                row[f"runs_ms_{tag}"] = {f: [round(x, 2) for x in ms[(spin, f)]] for f in paths}
                row[f"speedup_vs_dense_{tag}"] = {f: round(med["dense"] / x, 3)
                                                  for f, x in med.items()}
            print(name, {k: v for k, v in row.items() if k.startswith("speedup")}, flush=True)
            rows.append(row)
    dev = cpu_name()
    slug = "".join(c if c.isalnum() else "-" for c in dev.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    path = ROOT / "benchmarks" / "results" / f"onnx_patterns_solo-{slug}.json"
    path.write_text(json.dumps({
        "benchmark": "onnx_patterns_solo", "device": dev, "threads": a.threads, "runs": a.runs,
        "repeat": a.repeat, "shape": {"B": 1, "H": op_bench.H, "D": op_bench.D},
        "note": "each session alone in a fresh process (as deployed); ratios against dense "
                "Attention timed the same way in the same run, same spinning setting",
        "results": rows, "versions": {"torch": torch.__version__,
                                      "onnxruntime": ort.__version__}}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
