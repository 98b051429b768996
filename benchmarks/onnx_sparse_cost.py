"""Calibration of passes/sparse_cost.py for onnxruntime-cpu at the long-context LM's attention
shape (B=1, H=4, Hkv=2, D=48, causal, S=2048 by default): every ONNX form a `sparse` site can
export as, timed interleaved with the dense opset-23 `Attention` the unmodified model runs.

  dense        SDPA(is_causal, GQA) exported: `Attention`;
  masked:<ws>  the op with per-head windows <ws> (-1: a dense head) where the export emits the
               masked-dense form (a dense head, or the blocked rule says no at S);
  blocked:<ws> the op's blocked form (kernels/window_blocked.py), forced (exported at an unknown
               length, where the rule always picks it for windowed heads);
  split-est:<ws>  a head-split estimate: dense `Attention` on the dense heads' slice plus the
               blocked form on the windowed heads' slice, timed as two sessions (sum), without
               the Gather/Concat a real graph adds;
  split:<ws>   the op's head-split form (kernels/window_split.py), exported at S.

    python benchmarks/onnx_sparse_cost.py [--seq 2048] [--threads 1] [--runs 7]

Writes benchmarks/results/onnx_sparse_cost-<device>-s<S>-h<H>d<D>-t<threads>.json (ms, ratios
vs dense, what the cost model predicts for each form); `sparse_cost_fit.fit_ort` fits the
onnxruntime-cpu constants of the blocked form from these files.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from llm_drop import cpu_name, session  # noqa: E402

H, HKV, D, SINKS = 4, 2, 48, 4
CASES = {  # per-head windows (-1: dense head); label -> (form, windows)
    "masked:-1,1024,1024,-1": ("masked", [-1, 1024, 1024, -1]),
    "masked:1024x4": ("masked", [1024] * 4),
    "blocked:1024x4": ("blocked", [1024] * 4),
    "blocked:512x4": ("blocked", [512] * 4),
    "blocked:256x4": ("blocked", [256] * 4),
    "blocked:128x4": ("blocked", [128] * 4),
    "blocked:1024,1024,256,32": ("blocked", [1024, 1024, 256, 32]),
    "split-est:-1,-1,256,256": ("split-est", [-1, -1, 256, 256]),
    "split-est:-1,-1,512,512": ("split-est", [-1, -1, 512, 512]),
    "split:-1,-1,256,256": ("split", [-1, -1, 256, 256]),
    "split:1024,1024,256,32": ("split", [1024, 1024, 256, 32]),
    "split:512,16,1024,1024": ("split", [512, 16, 1024, 1024]),
    "blocked:256x8": ("blocked", [256] * 8),  # onnx_window's shape: --heads 8 --kv 8 --dim 64
}


def export(fn, path: Path, hint, heads: int, kv: int) -> None:
    import torch

    import attnc.kernels
    from attnc.kernels import window_blocked

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return fn(q, k, v)

    s = torch.export.Dim("S", min=2, max=65536)
    xs = (torch.randn(1, heads, 80, D), torch.randn(1, kv, 80, D), torch.randn(1, kv, 80, D))
    with warnings.catch_warnings(), window_blocked.onnx_seq_hint(hint):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(M(), xs, dynamo=True, opset_version=23,
                                 custom_translation_table=attnc.kernels.translation_table(),
                                 dynamic_shapes=({2: s},) * 3, verbose=False)
    prog.save(str(path))


def window_fn(ws: list[int]):
    import torch

    def f(q, k, v):
        return torch.ops.attnc.sliding_window_attention(q, k, v, max(ws), SINKS, True, None, None,
                                                        ws if len(set(ws)) > 1 else None)
    return f


def dense_fn(q, k, v):
    import torch

    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                            enable_gqa=q.shape[1] != k.shape[1])


def predicted(ws: list[int], seq: int, form: str) -> float:
    sys.path.insert(0, str(ROOT))
    from attnc.kernels import window_blocked as wb
    from attnc.kernels.sliding_window import onnx_form
    from attnc.passes import sparse_cost as cost

    shape = cost.SiteShape(seq, H, D, True, 1, False)
    f = onnx_form(max(ws), SINKS, True, True, len(set(ws)) == 1, seq=None if form == "blocked"
                  else seq, head_windows=ws)
    pc = cost.window_cost(ws, SINKS, True, f, True)
    rule = wb.blocked_pays
    if form == "blocked":  # forced: priced as the blocked form whatever the rule says at S
        wb.blocked_pays = lambda *a, **k: True
    try:
        return cost.predict("onnxruntime-cpu", shape, pc).speedup
    finally:
        wb.blocked_pays = rule


def main() -> None:
    global H, HKV, D
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--cases", nargs="*", default=[c for c in CASES if not c.endswith("x8")])
    ap.add_argument("--heads", type=int, default=H)
    ap.add_argument("--kv", type=int, default=HKV)
    ap.add_argument("--dim", type=int, default=D)
    a = ap.parse_args()
    H, HKV, D = a.heads, a.kv, a.dim
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    sessions, feeds = {}, {}
    rng = np.random.default_rng(0)
    full = {"q": rng.standard_normal((1, H, a.seq, D), dtype=np.float32),
            "k": rng.standard_normal((1, HKV, a.seq, D), dtype=np.float32),
            "v": rng.standard_normal((1, HKV, a.seq, D), dtype=np.float32)}

    def feed(sess, hq, hkv, h0=0):
        names = [i.name for i in sess.get_inputs()]
        g = H // HKV
        return dict(zip(names, [full["q"][:, h0:h0 + hq], full["k"][:, h0 // g:h0 // g + hkv],
                                full["v"][:, h0 // g:h0 // g + hkv]], strict=True))

    with tempfile.TemporaryDirectory() as tmp:
        def add(name, fn, hint, hq, hkv, h0=0):
            p = Path(tmp) / f"{len(sessions)}.onnx"
            export(fn, p, hint, hq, hkv)
            sessions[name] = session(str(p), a.threads)
            feeds[name] = feed(sessions[name], hq, hkv, h0)

        add("dense", dense_fn, a.seq, H, HKV)
        for label in a.cases:
            form, ws = CASES[label]
            if form == "split-est":
                nd = sum(w < 0 for w in ws)
                add(label + "/dense", dense_fn, a.seq, nd, max(1, nd * HKV // H))
                wins = [w for w in ws if w >= 0]
                add(label + "/blocked", window_fn(wins), None, len(wins),
                    max(1, len(wins) * HKV // H), nd)
            else:
                add(label, window_fn(ws), None if form == "blocked" else a.seq, H, HKV)
        for s in sessions.values():  # warm-up
            s.run(None, feeds[next(k for k in sessions if sessions[k] is s)])
        times = {k: [] for k in sessions}
        for _ in range(a.runs):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append(time.perf_counter() - t)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    parts = {k: round(v, 3) for k, v in ms.items() if "/" in k}
    print(json.dumps(parts), flush=True)
    for label in list(a.cases):
        if CASES[label][0] == "split-est":
            ms[label] = ms.pop(label + "/dense") + ms.pop(label + "/blocked")
    rows = []
    for label in ["dense", *a.cases]:
        form, ws = CASES.get(label, ("dense", None))
        row = {"case": label, "ms": round(ms[label], 3),
               "speedup_vs_dense": round(ms["dense"] / ms[label], 3)}
        if ws is not None and form != "split-est":
            row["predicted"] = round(predicted(ws, a.seq, form), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    load = os.getloadavg()
    out = {"benchmark": "onnx_sparse_cost", "device": cpu_name(), "threads": a.threads,
           "runs": a.runs, "shape": {"B": 1, "H": H, "Hkv": HKV, "D": D, "S": a.seq,
                                     "sinks": SINKS, "causal": True},
           "loadavg_after": [round(x, 2) for x in load], "rows": rows,
           "split_parts_ms": parts}
    slug = "".join(c if c.isalnum() else "-" for c in cpu_name().lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    name = f"onnx_sparse_cost-{slug}-s{a.seq}-h{H}d{D}-t{a.threads}.json"
    path = ROOT / "benchmarks" / "results" / name
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
