"""Causal sliding window + sinks on CPU: the blocked forms against dense attention, same run.

ONNX Runtime (CPU provider, `--threads` intra-op threads): one export per form with a dynamic
batch and sequence, all timed interleaved at each length (median of `--runs`):
  dense     SDPA(is_causal=True) exported: opset-23 `Attention` (what the unmodified model runs);
  masked    the op's masked-dense form: `Attention` + in-graph window mask;
  blocked   the op's blocked form (kernels/window_blocked.py; exported under a long
            `onnx_seq_hint`, the length a build targets);
  gqa       ORT `GroupQueryAttention(local_window_size)`, the window without sinks (reference);
  blocked0  the blocked form without sinks (what GQA competes with);
  blocked_attnop  the blocked form with its blocks as the batch of one opset-23 `Attention`
            (window_blocked.ATTENTION_OP).
torch CPU: the op (blocked when the cost rule picks it, else the reference) against torch SDPA
(is_causal=True). B=1, H=8, D=64, window 256 + 4 sinks by default; above S=4096 the masked
form and the torch reference (S x S) are left out, fewer runs are timed, errors are taken
against the reference computed in query chunks, and dense and GQA run one head at a time (an
H=1 export run H times in a row: ORT keeps their (H, S, S) float scores, 8.6 GB at 16384).

    python benchmarks/onnx_window.py [--runs 15] [--threads 2] [--seqs 256 1024 2048 4096 16384]

Prints a table and writes benchmarks/results/onnx_window-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from llm_drop import cpu_name, session  # noqa: E402

LONG = 4096  # above: no masked-dense ONNX form nor torch reference (S x S), fewer runs


def export(fn, path: Path, hint, d: int, heads: int) -> str:
    import torch

    import attnc.kernels
    from attnc.kernels import window_blocked

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return fn(q, k, v)

    s = torch.export.Dim("S", min=2, max=65536)
    b = torch.export.Dim("B", min=1, max=64)
    xs = tuple(torch.randn(1, heads, 40, d) for _ in range(3))  # distinct: export ties equal ones
    with warnings.catch_warnings(), window_blocked.onnx_seq_hint(hint):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(M(), xs, dynamo=True, opset_version=23,
                                 custom_translation_table=attnc.kernels.translation_table(),
                                 dynamic_shapes=({0: b, 2: s},) * 3, verbose=False)
    prog.save(str(path))
    import onnx

    return ",".join(sorted({n.op_type for n in onnx.load(str(path)).graph.node} &
                           {"Attention", "GroupQueryAttention", "Gather", "Softmax"}))


def chunked_ref(q, k, v, w: int, ns: int, rows: int = 512):
    """reference.sliding_window_attention_ref (causal) computed `rows` queries at a time."""
    import torch

    from attnc.kernels import masks, reference

    j = torch.arange(k.shape[2])[None, :]
    outs = []
    for i0 in range(0, q.shape[2], rows):
        i = torch.arange(i0, min(i0 + rows, q.shape[2]))[:, None]
        vis = masks.sliding_window_visible(i, j, w, ns, True)
        outs.append(reference.masked_attention(q[:, :, i0:i0 + rows], k, v, vis, None)[0])
    return torch.cat(outs, 2)


def interleaved(fns: dict, runs: int, warmup: int = 2) -> dict[str, float]:
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seqs", type=int, nargs="+", default=[256, 1024, 2048, 4096, 16384])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], help="ONNX forms not to time")
    ap.add_argument("--no-torch", action="store_true", help="time ONNX Runtime only")
    a = ap.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F

    import attnc.kernels  # noqa: F401
    from attnc.kernels import reference, sliding_window, window_blocked

    torch.set_num_threads(a.threads)
    w, ns, h, d = a.window, a.sinks, a.heads, a.head_dim
    op = torch.ops.attnc.sliding_window_attention
    forms = {
        "dense": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), 2),
        "masked": (lambda q, k, v: op(q, k, v, w, ns, True), 2),
        "blocked": (lambda q, k, v: op(q, k, v, w, ns, True), 1 << 20),
        "gqa": (lambda q, k, v: op(q, k, v, w, 0, True), 2),
        "blocked0": (lambda q, k, v: op(q, k, v, w, 0, True), 1 << 20),
        "blocked_attnop": (lambda q, k, v: op(q, k, v, w, ns, True), 1 << 20),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sessions, graph_ops = {}, {}
        forms = {n: f for n, f in forms.items() if n not in a.skip or n in ("dense", "gqa")}
        for name, (fn, hint) in forms.items():
            p = Path(tmp) / f"{name}.onnx"
            window_blocked.ATTENTION_OP = name == "blocked_attnop"
            graph_ops[name] = export(fn, p, hint, d, h)
            window_blocked.ATTENTION_OP = False
            sessions[name] = session(str(p), a.threads)
        one = {}  # one head at a time: dense and GQA keep (H, S, S) float scores (8.6 GB)
        for name in ("dense", "gqa"):
            p = Path(tmp) / f"{name}-1.onnx"
            export(forms[name][0], p, forms[name][1], d, 1)
            one[name] = session(str(p), a.threads)
        for s in a.seqs:
            g = torch.Generator().manual_seed(s)
            q, k, v = (torch.randn(1, h, s, d, generator=g) for _ in range(3))
            feed = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
            feeds = {n: {i.name: x for i, x in zip(sess.get_inputs(), feed.values(), strict=True)}
                     for n, sess in sessions.items()}
            want = chunked_ref(q, k, v, w, ns).numpy()
            want0 = chunked_ref(q, k, v, w, 0).numpy()
            err = {n: float(np.abs(sessions[n].run(None, feeds[n])[0] - ref).max())
                   for n, ref in (("masked", want), ("blocked", want), ("gqa", want0),
                                  ("blocked0", want0), ("blocked_attnop", want))
                   if (n not in ("masked", "gqa") or s <= LONG) and n in sessions}
            names = [n for n in sessions if n != "masked" or s <= LONG]  # masked: S x S work
            runs = max(3, min(a.runs, a.runs * 2048 // s))
            fns = {n: (lambda n=n, f=feeds: sessions[n].run(None, f[n])) for n in names}
            if s > LONG:  # dense and GQA head by head (each head's work, summed)
                for n in ("dense", "gqa"):
                    heads = [{i.name: x[:, j:j + 1] for i, x in zip(
                        one[n].get_inputs(), feed.values(), strict=True)} for j in range(h)]
                    fns[n] = lambda n=n, hs=heads: [one[n].run(None, f) for f in hs]
                    if n == "gqa":
                        got = np.concatenate([one[n].run(None, f)[0] for f in heads], 1)
                        err[n] = float(np.abs(got - want0).max())
            ort_ms = interleaved(fns, runs, a.warmup)
            torch_fns = {
                "sdpa": lambda x=(q, k, v): F.scaled_dot_product_attention(*x, is_causal=True),
                "op": lambda x=(q, k, v): op(*x, w, ns, True),
                "blocked": lambda x=(q, k, v): window_blocked.blocked_attention(
                    *x, [w], ns, True, None),
                "reference": lambda x=(q, k, v): reference.sliding_window_attention_ref(
                    *x, w, ns, True),
            }
            if s > LONG:  # the reference's S x S float scores: 8.6 GB at 16384
                del torch_fns["reference"]
            t_ms, t_err = {"sdpa": 1.0}, None
            with torch.inference_mode():
                if not a.no_torch:
                    t_ms = interleaved(torch_fns, max(3, runs // 2), a.warmup)
                if not a.no_torch:
                    t_err = float((window_blocked.blocked_attention(q, k, v, [w], ns, True, None)
                                   - torch.from_numpy(want)).abs().max())
            row = {"S": s, "ort_ms": {k2: round(x, 3) for k2, x in ort_ms.items()},
                   "ort_speedup_vs_dense": {k2: round(ort_ms["dense"] / x, 3)
                                            for k2, x in ort_ms.items()},
                   "ort_max_abs_err": err,
                   "onnx_form_chosen": sliding_window.onnx_form(w, ns, True, seq=s),
                   "torch_ms": {k2: round(x, 3) for k2, x in t_ms.items()},
                   "torch_speedup_vs_sdpa": {k2: round(t_ms["sdpa"] / x, 3)
                                             for k2, x in t_ms.items()},
                   "torch_blocked_max_abs_err": t_err,
                   "torch_op_runs": "blocked" if window_blocked.blocked_pays(s, [w], True)
                   else "reference"}
            rows.append(row)
            print(f"S={s:5d} ORT ms " + " ".join(f"{k2}={x:.2f}" for k2, x in ort_ms.items())
                  + " | torch ms " + " ".join(f"{k2}={x:.2f}" for k2, x in t_ms.items()),
                  flush=True)
    dev = cpu_name()
    out = {"benchmark": "onnx_window", "args": vars(a), "device": dev, "threads": a.threads,
           "runs": a.runs,
           "shape": {"B": 1, "H": h, "D": d, "window": w, "sinks": ns, "causal": True},
           "onnx_graph_ops": graph_ops, "results": rows,
           "versions": {"torch": torch.__version__,
                        "onnxruntime": __import__("onnxruntime").__version__}}
    slug = "".join(c if c.isalnum() else "-" for c in dev.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    path = ROOT / "benchmarks" / "results" / f"onnx_window-{slug}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
