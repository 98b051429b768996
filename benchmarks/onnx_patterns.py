"""Sparse pattern ops in ONNX Runtime CPU and torch CPU, every figure a ratio against dense.

Each case exports the dense baseline (torch SDPA -> opset-23 `Attention`) and the pattern op
(under `onnx_seq_hint(S)`, the length a build targets: the form the op's cost rule picks, and
where it differs the forced sparse form) with a dynamic batch, checks each against the plain
reference, and times them interleaved in one loop (median of `--runs`, ORT CPU provider with
`--threads` intra-op threads). The torch rows time the op as a `.pt2` runs it off CUDA (the
blocked/gathered torch form when its cost rule picks it, else the reference) against torch SDPA.
B=1, H=8, D=64:
  window    causal sliding window 256 + 4 sinks, S = 256, 1024, 4096, 16384 (window_blocked.py);
            and ORT GroupQueryAttention(local_window_size) without sinks, where it applies;
  nbhd      2-D neighborhood, 64x64 grid, 13x13 window (neighborhood_blocked.py), and the cost
            rule at small grids (16x16 and 32x32, 7x7 window);
  block     block-sparse, S = 4096, block 64, 90% sparse: 6 of 64 key blocks per query block
            (the diagonal + 5 random, per head), and a ragged random layout of density 0.1;
            the cost rule at S = 128, 256 and 1024, rows listing one block / half the blocks
            (block_sparse_gather.py).

    nice python benchmarks/onnx_patterns.py [--runs 7] [--threads 2] [--quick]
        [--cases window,nbhd,block] [--window-sizes 16384] [--merge] [--denormal-as-zero]

Prints a line per case and writes benchmarks/results/onnx_patterns-<device>.json (or `--out`;
`--merge`: the measured rows replace those of the same case and S, the others stay; `uptime` is
kept per row, and the sparse pass's cost-model prediction per nbhd/block row). Above S = 4096
the reference runs one head at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from llm_drop import cpu_name  # noqa: E402

H, D = 8, 64
DENSE_SPLIT = 2  # heads per dense ORT run above S = 4096 (run_case)
NOTE = ("2 shared cores: each row's load_avg says how busy; rows at S <= 256 (a few ms) are "
        "noise-dominated there. The *_half block rows list half the key blocks per row: "
        "neither form beats dense there at S = 1024 (such a site is better left dense).")


DAZ = False  # --denormal-as-zero: every session (dense too) flushes denormals
SPIN = True  # --no-spin: every session (dense too) without ORT's intra-op thread spinning


def session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    if DAZ:
        so.add_session_config_entry("session.set_denormal_as_zero", "1")
    if not SPIN:  # idle pool threads sleep instead of spinning into the next session's run
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def uptime() -> str:
    import os

    return os.popen("uptime").read().strip()  # the machine is shared: how loaded it was


def cost_model(row: dict) -> dict | None:
    """The sparse pass's onnxruntime-cpu prediction for a nbhd/block row: the form it prices
    (the export's own selection) and the speed-up; `keeps_sparse` where it clears the pass's
    default min_speedup."""
    from attnc.passes import sparse_cost as c
    from attnc.passes import sparse_cost_fit as fit
    from attnc.passes.sparse import SparseConfig

    got = fit.pattern_row(row, H, D)
    if got is None:
        return None
    pred = c.predict("onnxruntime-cpu", *got)
    return {"form": pred.form, "predicted_speedup": round(pred.speedup, 3),
            "keeps_sparse": pred.speedup >= SparseConfig().min_speedup}


def export(fn, inputs, path: Path, hint: int | None) -> str:
    import onnx
    import torch

    import attnc.kernels
    from attnc.kernels import window_blocked

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return fn(q, k, v)

    b = torch.export.Dim("B", min=1, max=64)
    with warnings.catch_warnings(), window_blocked.onnx_seq_hint(hint):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(M(), inputs, dynamo=True, opset_version=23,
                                 custom_translation_table=attnc.kernels.translation_table(),
                                 dynamic_shapes=({0: b},) * 3, verbose=False)
    prog.save(str(path))
    return ",".join(sorted({n.op_type for n in onnx.load(str(path)).graph.node} & {
        "Attention", "GroupQueryAttention", "Gather", "GatherND", "TopK", "Softmax"}))


def interleaved(fns: dict, runs: int) -> dict[str, float]:
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


@contextlib.contextmanager
def forced():
    """Export the blocked/gathered form whatever the cost rules say."""
    from attnc.kernels import block_sparse_gather, neighborhood_blocked

    saved = (neighborhood_blocked.blocked_pays, block_sparse_gather.gather_pays,
             block_sparse_gather.onnx_pays)
    neighborhood_blocked.blocked_pays = block_sparse_gather.gather_pays = (
        block_sparse_gather.onnx_pays) = lambda *a, **k: True
    try:
        yield
    finally:
        (neighborhood_blocked.blocked_pays, block_sparse_gather.gather_pays,
         block_sparse_gather.onnx_pays) = saved


@contextlib.contextmanager
def masked_only():
    """Export the masked-dense form of the 2-D/3-D neighborhood and block-sparse ops."""
    from attnc.kernels import block_sparse_gather, neighborhood_blocked

    saved = neighborhood_blocked.translate, block_sparse_gather.translate
    neighborhood_blocked.translate = block_sparse_gather.translate = lambda *a, **k: None
    try:
        yield
    finally:
        neighborhood_blocked.translate, block_sparse_gather.translate = saved


def run_case(name: str, s: int, forms: dict, ref, torch_op, a, tmp: Path) -> dict:
    """forms: name -> (fn, hint, mode, reference fn or None), mode None, "masked" (the
    masked-dense form), "forced" (the sparse form) or a context manager factory to export
    under; 'dense' is the baseline."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(1, H, s, D, generator=g) for _ in range(3))
    ex = tuple(torch.randn(1, H, s, D, generator=g) for _ in range(3))  # distinct from q, k, v
    feed = [q.numpy(), k.numpy(), v.numpy()]
    sessions, ops, err, feeds = {}, {}, {}, {}
    want = per_head(ref, q, k, v).numpy()
    # above S = 4096 the dense baseline runs DENSE_SPLIT heads at a time (sum of the runs): ORT's
    # Attention holds H x S x S fp32 scores (8.6 GB at S = 16384, H = 8), more than is free here
    hs = H if s <= 4096 else DENSE_SPLIT
    for f, (fn, hint, mo, fref) in forms.items():
        p = tmp / f"{name}-{s}-{f}.onnx"
        ctx = mo if callable(mo) else {"masked": masked_only, "forced": forced}.get(
            mo, contextlib.nullcontext)  # mode: a name, or a context manager of the caller's
        with ctx():
            ops[f] = export(fn, tuple(x[:, :hs] for x in ex) if f == "dense" else ex, p, hint)
        sessions[f] = session(str(p), a.threads)
        names = [i.name for i in sessions[f].get_inputs()]
        if f == "dense":
            feeds[f] = [dict(zip(names, (np.ascontiguousarray(x[:, h:h + hs])
                                                   for x in feed), strict=True))
                        for h in range(0, H, hs)]
            continue
        feeds[f] = [dict(zip(names, feed, strict=True))]
        w = want if fref is None else per_head(fref, q, k, v).numpy()
        err[f] = float(np.abs(sessions[f].run(None, feeds[f][0])[0] - w).max())
    runs = a.runs if s <= 4096 else max(3, a.runs // 2)
    ms = interleaved({f: (lambda ss=sess, fds=feeds[f]: [ss.run(None, fd) for fd in fds])
                      for f, sess in sessions.items()}, runs)
    del sessions
    row = {"case": name, "S": s, "load_avg": load(), "uptime": uptime(), "runs": runs,
           "denormal_as_zero": DAZ, "intra_op_spinning": SPIN,
           "dense_heads_per_run": hs,
           "ort_ms": {f: round(x, 3) for f, x in ms.items()},
           "ort_speedup_vs_dense": {f: round(ms["dense"] / x, 3) for f, x in ms.items()},
           "ort_max_abs_err": err, "onnx_graph_ops": ops}
    if torch_op is not None:
        op_fn, sdpa_causal = torch_op
        with torch.inference_mode():
            t = interleaved({"sdpa": lambda: F.scaled_dot_product_attention(
                q, k, v, is_causal=sdpa_causal), "op": lambda: op_fn(q, k, v)},
                max(3, runs // 2))
            row["torch_max_abs_err"] = float((op_fn(q, k, v) - torch.from_numpy(want)).abs().max())
        row["torch_ms"] = {x: round(y, 3) for x, y in t.items()}
        row["torch_speedup_vs_sdpa"] = round(t["sdpa"] / t["op"], 3)
    print(f"{name:8s} S={s:6d} " + " ".join(f"{f}={ms['dense'] / x:.2f}x" for f, x in ms.items())
          + (f" | torch op {row['torch_speedup_vs_sdpa']:.2f}x" if torch_op else ""), flush=True)
    return row


def per_head(ref, q, k, v):
    """ref(q, k, v), one head at a time above S = 4096 (the reference holds H x S x S)."""
    import torch

    if q.shape[2] <= 4096:
        return ref(q, k, v)
    return torch.cat([ref(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1])
                      for h in range(q.shape[1])], 1)


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages (`uptime`): the machine is shared."""
    import os

    return [round(x, 2) for x in os.getloadavg()]


def per_row_layout(n: int, keep: int, heads: int, seed: int = 0):
    """(1, heads, n, n): each query block keeps its diagonal + keep - 1 random key blocks."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lay = torch.zeros(1, heads, n, n, dtype=torch.bool)
    for h in range(heads):
        for i in range(n):
            others = [j for j in torch.randperm(n, generator=g).tolist() if j != i][:keep - 1]
            lay[0, h, i, [i, *others]] = True
    return lay


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="skip S = 16384")
    ap.add_argument("--cases", default="window,nbhd,block", help="comma list of case groups")
    ap.add_argument("--window-sizes", default=None, help="comma list of window S (default "
                    "256,1024,4096[,16384])")
    ap.add_argument("--merge", action="store_true",
                    help="keep the JSON's rows of cases not measured in this run")
    ap.add_argument("--out", default=None, help="JSON path (default: per device)")
    ap.add_argument("--denormal-as-zero", action="store_true", help="ORT session option "
                    "session.set_denormal_as_zero on every session, the dense baseline's too")
    ap.add_argument("--no-spin", action="store_true", help="ORT session option "
                    "session.intra_op.allow_spinning 0 on every session, the dense baseline's too")
    a = ap.parse_args()
    global DAZ, SPIN
    DAZ, SPIN = a.denormal_as_zero, not a.no_spin
    cases = set(a.cases.split(","))

    import torch
    import torch.nn.functional as F

    import attnc.kernels  # noqa: F401
    from attnc.kernels import (
        block_sparse_gather,
        masks,
        neighborhood_blocked,
        reference,
        sliding_window,
        window_blocked,
    )

    torch.set_num_threads(a.threads)
    rows = []
    sw = torch.ops.attnc.sliding_window_attention
    na = torch.ops.attnc.neighborhood_attention
    bsa = torch.ops.attnc.block_sparse_attention

    def dense(causal):
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        # ---- causal sliding window 256 + 4 sinks
        w, ns = 256, 4
        wsizes = ([int(x) for x in a.window_sizes.split(",")] if a.window_sizes else
                  [256, 1024, 4096] + ([] if a.quick else [16384]))
        for s in wsizes if "window" in cases else []:
            forms = {"dense": (dense(True), s, False, None),
                     "chosen": (lambda q, k, v: sw(q, k, v, w, ns, True), s, False, None)}
            chosen = sliding_window.onnx_form(w, ns, True, seq=s)
            if chosen != sliding_window.BLOCKED_FORM:
                forms["blocked"] = (lambda q, k, v: sw(q, k, v, w, ns, True), 1 << 20, False,
                                    None)
            ref0 = (lambda q, k, v: reference.sliding_window_attention_ref(q, k, v, w, 0, True))
            if s <= 4096:  # GQA's CPU kernel holds S x S probabilities
                forms["gqa_nosink"] = (lambda q, k, v: sw(q, k, v, w, 0, True), None, False,
                                       ref0)
                forms["blocked_nosink"] = (lambda q, k, v: sw(q, k, v, w, 0, True), 1 << 20,
                                           False, ref0)
            row = run_case("window", s, forms, lambda q, k, v: reference.
                           sliding_window_attention_ref(q, k, v, w, ns, True),
                           (lambda q, k, v: sw(q, k, v, w, ns, True), True), a, tmp)
            row["chosen_form"] = chosen
            row["chosen_sparse"] = chosen == sliding_window.BLOCKED_FORM
            row["torch_op_runs"] = ("blocked" if window_blocked.blocked_pays(s, [w], True)
                                    else "reference")
            rows.append(row)
        # ---- 2-D neighborhood
        for grid, ks in (((64, 64), (13, 13)), ((16, 16), (7, 7)), ((32, 32), (7, 7))
                         ) if "nbhd" in cases else ():
            s = grid[0] * grid[1]
            args = (list(grid), list(ks), [1, 1], [1, 1], [False, False])

            def nfn(q, k, v, args=args):
                return na(q, k, v, *args)

            pays = neighborhood_blocked.blocked_pays(s, grid, [ks], [1, 1], [1, 1],
                                                     [False, False])
            forms = {"dense": (dense(False), s, False, None), "chosen": (nfn, s, False, None)}
            if pays:
                forms["masked"] = (nfn, s, "masked", None)
            else:  # the blocked form the rule avoided
                forms["blocked"] = (nfn, s, "forced", None)
            row = run_case(f"nbhd{grid[0]}x{grid[1]}", s, forms, lambda q, k, v, args=args:
                           reference.neighborhood_attention_ref(q, k, v, *args),
                           (nfn, False), a, tmp)
            row["chosen_form"] = neighborhood_blocked.FORM if pays else "masked dense"
            row["chosen_sparse"] = pays
            row["grid"], row["window"] = list(grid), list(ks)
            row["cost_model"] = cost_model(row)
            row["torch_op_runs"] = "blocked" if pays else "reference"
            rows.append(row)
        # ---- block-sparse
        bs = 64
        for s, lay, tag in ((4096, per_row_layout(64, 6, H), "block90"),
                            (4096, masks.random_layout(64, 64, 0.1, heads=H), "block_rand10"),
                            (256, per_row_layout(4, 1, H), "block_s256"),
                            (1024, per_row_layout(16, 2, H), "block_s1024"),
                            (128, per_row_layout(2, 1, H), "block_s128"),
                            (256, per_row_layout(4, 2, H), "block_s256_half"),
                            (1024, per_row_layout(16, 8, H), "block_s1024_half")
                            ) if "block" in cases else ():
            def bfn(q, k, v, lay=lay):
                return bsa(q, k, v, lay, bs)

            pays = block_sparse_gather.onnx_form(s, bs) is not None
            forms = {"dense": (dense(False), s, False, None), "chosen": (bfn, s, False, None)}
            forms["masked" if pays else "gathered"] = (bfn, s, "masked" if pays else "forced",
                                                       None)
            row = run_case(tag, s, forms, lambda q, k, v, lay=lay: reference.
                           block_sparse_attention_ref(q, k, v, lay, bs), (bfn, False), a, tmp)
            row["density"] = round(float(lay.float().mean()), 4)
            row["max_blocks_per_row"] = int(lay.sum(-1).max())
            row["chosen_form"] = block_sparse_gather.FORM if block_sparse_gather.onnx_form(
                s, bs) else "masked dense"
            row["torch_op_runs"] = ("gathered" if block_sparse_gather.gather_pays(
                s, bs, int(lay.sum(-1).max())) else "reference")
            row["chosen_sparse"] = row["chosen_form"] == block_sparse_gather.FORM
            row["block_size"] = bs
            row["cost_model"] = cost_model(row)
            rows.append(row)

    dev = cpu_name()
    slug = "".join(c if c.isalnum() else "-" for c in dev.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    path = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"onnx_patterns-{slug}.json"
    if a.merge and path.exists():
        new = {(r["case"], r["S"]) for r in rows}
        rows = [r for r in json.loads(path.read_text())["results"]
                if (r["case"], r["S"]) not in new] + rows

    def speed(case, s, form="chosen"):
        r = next((x for x in rows if x["case"] == case and x["S"] == s), None)
        return None if r is None else r["ort_speedup_vs_dense"].get(form)

    targets = [("window 256+4 sinks S=4096 >= 4x", speed("window", 4096), 4.0),
               ("window 256+4 sinks S=16384 >= 10x", speed("window", 16384), 10.0),
               ("2-D neighborhood 64x64 13x13 >= 5x", speed("nbhd64x64", 4096), 5.0),
               ("block-sparse 90% S=4096 block 64 >= 3x", speed("block90", 4096), 3.0)]
    verdict = {t: {"measured": m, "met": m is not None and m >= x} for t, m, x in targets}
    gqa = {f"window S={r['S']}": {"blocked_nosink_vs_gqa": round(
        r["ort_ms"]["gqa_nosink"] / r["ort_ms"]["blocked_nosink"], 3)}
        for r in rows if r["case"] == "window" and "gqa_nosink" in r["ort_ms"]}
    never_slower = {f"{r['case']} S={r['S']}": {
        "chosen": r["chosen_form"], "speedup": r["ort_speedup_vs_dense"]["chosen"],
        "met": r["ort_speedup_vs_dense"]["chosen"] >= 1.0}
        for r in rows if r["chosen_sparse"] and (r.get("cost_model") or {}).get(
            "keeps_sparse", True)}  # where the sparse pass's cost model keeps the site sparse
    chosen_all = {f"{r['case']} S={r['S']}": {
        "chosen": r["chosen_form"], "speedup": r["ort_speedup_vs_dense"]["chosen"]}
        for r in rows}
    for t, x in verdict.items():
        print(f"{t}: {x['measured']} {'met' if x['met'] else 'MISSED'}")
    out = {"benchmark": "onnx_patterns", "device": dev, "threads": a.threads, "runs": a.runs,
           "shape": {"B": 1, "H": H, "D": D}, "targets": verdict, "note": NOTE,
           "gqa_local_window": gqa, "never_slower_where_sparse_chosen": never_slower,
           "chosen_form_vs_dense": chosen_all,
           "results": rows,
           "versions": {"torch": torch.__version__,
                        "onnxruntime": __import__("onnxruntime").__version__}}
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
