"""The 1-D blocked neighborhood ONNX form's in-tile masks (kernels/neighborhood1d_blocked.py,
module doc): `mul` (scores shifted to own key + 40, times the 0/1 mask), `min` (scores shifted to
own key, Min with the cap), each in Loop steps (`_loop`, float32's default) and as one flat
chain (`_flat`), `old_add_inf` (an Add of Where(vis, 0, -inf), the form before) and
dense `Attention` (ORT CPU, B=1, H=8, D=64, S=4096, kernel 169: the na1d case of
onnx_patterns_nbhd.py). Each form is exported once (onnx_patterns.export, target length 4096)
and checked against the plain reference; then per pass, thread count (`--threads`, default 2
and 1) and session kind (plain, then `session.set_denormal_as_zero` on every session, dense too)
the four are timed interleaved (onnx_patterns.interleaved, median of `--runs`). `--profile`: ORT's
per-op profile of each form at 1 thread (median ms per run).

`--ops` also times the masking step alone on the form's score tensor (1, 8, 1, 1, 64, 64, 232)
at 1 and 2 threads: the old Add(s, Where(vis, 0, -inf)), Min(s, Where(vis, 3e38, -40)),
Mul(s, Cast(vis)), Where(vis, s, -40) (exact after the own-key shift too), and Add/Max with a
finite bias (not exact: their speed only), each alone and followed by the Softmax. ORT's Min and
Max (variadic: UntypedBroadcastVariadic) run on one thread; Add/Mul/Sub/Div split over the pool.

    nice python benchmarks/onnx_na1d_min.py [--runs 9] [--threads 2,1] [--repeat 2] [--ops]
        [--profile] [--no-daz] [--out PATH]

Writes benchmarks/results/onnx_na1d_min-<device>.json (`uptime` per row: the machine is shared).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import onnx_patterns as op_bench  # noqa: E402
from llm_drop import cpu_name  # noqa: E402

SHAPE, VIS = [1, 8, 1, 1, 64, 64, 232], [1, 1, 1, 64, 64, 232]  # na1d's (B, Hkv, g, d, nb, BQ, K)
MASKS = {  # name -> (bias Where's (true, false) values, the op on (scores, bias))
    "old_add_where_-inf": ((0.0, float("-inf")), "Add"),
    "min_cap": ((3e38, -40.0), "Min"),
    "mul_mask": (None, "Mul"),
    "where_scores": (None, "Where"),
    "add_-40(not exact)": ((0.0, -40.0), "Add"),
    "max(not exact)": ((-40.0, 3e38), "Max"),
}


@contextlib.contextmanager
def mask_form(mask: str, loop: bool = True):
    """The 1-D blocked form exported with in-tile mask `mask` and `loop`
    (neighborhood1d_blocked.MASK, .LOOP)."""
    from attnc.kernels import neighborhood1d_blocked as nb1d

    saved, nb1d.MASK, nb1d.LOOP = (nb1d.MASK, nb1d.LOOP), mask, loop
    try:
        yield
    finally:
        nb1d.MASK, nb1d.LOOP = saved


def _mask_model(name: str, softmax: bool) -> bytes:
    from onnx import TensorProto as T
    from onnx import helper as h

    vals, kind = MASKS[name]
    nodes = [h.make_node("Constant", [], ["m40"], value=h.make_tensor("m40", T.FLOAT, [], [-40.]))]
    if kind == "Where":
        nodes.append(h.make_node("Where", ["vis", "s", "m40"], ["y"]))
    elif kind == "Mul":
        nodes += [h.make_node("Cast", ["vis"], ["c"], to=T.FLOAT),
                  h.make_node("Mul", ["s", "c"], ["y"])]
    else:
        for n, x in zip(("a", "b"), vals, strict=True):
            nodes.append(h.make_node("Constant", [], [n], value=h.make_tensor(n, T.FLOAT, [], [x])))
        nodes += [h.make_node("Where", ["vis", "a", "b"], ["c"]),
                  h.make_node(kind, ["s", "c"], ["y"])]
    if softmax:
        nodes.append(h.make_node("Softmax", ["y"], ["z"], axis=-1))
    g = h.make_graph(nodes, "mask", [h.make_tensor_value_info("s", T.FLOAT, SHAPE),
                                     h.make_tensor_value_info("vis", T.BOOL, VIS)],
                     [h.make_tensor_value_info("z" if softmax else "y", T.FLOAT, SHAPE)])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 23)])
    m.ir_version = 10
    return m.SerializeToString()


def time_masks(runs: int) -> list[dict]:
    """The masking step alone (and with its Softmax) on na1d's score shape, 1 and 2 threads."""
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feed = {"s": rng.standard_normal(SHAPE).astype(np.float32), "vis": rng.random(VIS) < 0.73}
    rows = []
    for threads, softmax in itertools.product((1, 2), (False, True)):
        sess = {}
        for name in MASKS:
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            so.log_severity_level = 3
            sess[name] = ort.InferenceSession(_mask_model(name, softmax), so,
                                              providers=["CPUExecutionProvider"])
        ms = op_bench.interleaved({n: (lambda s=s: s.run(None, feed)) for n, s in sess.items()},
                                  runs)
        rows.append({"threads": threads, "with_softmax": softmax, "uptime": op_bench.uptime(),
                     "ms": {n: round(x, 2) for n, x in ms.items()}})
        print(f"mask ops, {threads} thread(s), softmax {softmax}: "
              + " ".join(f"{n}={x:.1f}ms" for n, x in ms.items()), flush=True)
    return rows


def session(path: str, threads: int, no_spin: bool):
    """onnx_patterns.session, optionally with the intra-op pool's spinning off."""
    import onnxruntime as ort

    if not no_spin:
        return op_bench.session(path, threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if op_bench.DAZ:
        so.add_session_config_entry("session.set_denormal_as_zero", "1")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def op_profile(path: str, feed: dict, threads: int, runs: int) -> dict[str, float]:
    """ORT's per-node profile of one session: median ms per run of each op type."""
    import collections
    import os

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    so.enable_profiling, so.profile_file_prefix = True, path + ".prof"
    if op_bench.DAZ:
        so.add_session_config_entry("session.set_denormal_as_zero", "1")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        sess.run(None, feed)
    prof = sess.end_profiling()
    ev = json.loads(Path(prof).read_text())
    os.remove(prof)
    bounds = sorted((e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("name") == "model_run")[1:]
    per: dict[str, list[float]] = collections.defaultdict(lambda: [0.0] * len(bounds))
    for e in ev:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            for r, (t0, t1) in enumerate(bounds):
                if t0 <= e["ts"] <= t1:
                    per[e["args"]["op_name"]][r] += e["dur"] / 1e3
    top = sorted(((k, statistics.median(v)) for k, v in per.items()), key=lambda x: -x[1])
    return {k: round(v, 2) for k, v in top[:10]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--threads", default="2,1", help="comma list of intra-op thread counts")
    ap.add_argument("--repeat", type=int, default=1, help="whole passes (the machine is shared)")
    ap.add_argument("--no-daz", action="store_true", help="skip the denormal-as-zero passes")
    ap.add_argument("--ops", action="store_true", help="also time the masking step alone")
    ap.add_argument("--profile", action="store_true", help="ORT per-op profile, 1 thread")
    ap.add_argument("--no-spin", action="store_true", help="every session (dense too) with "
                    "session.intra_op.allow_spinning 0: on a shared machine, spinning pool "
                    "threads of one session take the cores the next one needs")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F

    import attnc.kernels  # noqa: F401
    from attnc.kernels import neighborhood1d_blocked as nb1d
    from attnc.kernels import reference

    threads = [int(x) for x in a.threads.split(",")]
    torch.set_num_threads(max(threads))
    na = torch.ops.attnc.neighborhood_attention
    args = ([4096], [169], [1], [1], [False])
    forms = {"dense": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), None),
             **{f"{m}_{lp}": (lambda q, k, v: na(q, k, v, *args), (m, lp == "loop"))
                for m in ("mul", "min") for lp in ("loop", "flat")},
             "old_add_inf": (lambda q, k, v: na(q, k, v, *args), ("add", False))}
    capped = [f for f in forms if f[:3] in ("mul", "min")]
    g = torch.Generator().manual_seed(4096)
    q, k, v = (torch.randn(1, op_bench.H, 4096, op_bench.D, generator=g) for _ in range(3))
    ex = tuple(torch.randn(1, op_bench.H, 4096, op_bench.D, generator=g) for _ in range(3))
    want = reference.neighborhood_attention_ref(q, k, v, *args).numpy()
    rows, err, profile = [], {}, {}
    with tempfile.TemporaryDirectory() as tmpd:
        paths = {}
        for f, (fn, mask) in forms.items():  # one export per form (target length 4096)
            paths[f] = str(Path(tmpd) / f"na1d-{f}.onnx")
            with mask_form(*(mask or (nb1d.MASK, nb1d.LOOP))):
                op_bench.export(fn, ex, Path(paths[f]), 4096)
        names = {f: [i.name for i in op_bench.session(p, 1).get_inputs()] for f, p in paths.items()}
        feeds = {f: dict(zip(names[f], (x.numpy() for x in (q, k, v)), strict=True))
                 for f in forms}
        for rep, th, daz in itertools.product(range(a.repeat), threads,
                                              (False,) if a.no_daz else (False, True)):
            op_bench.DAZ = daz
            sess = {f: session(p, th, a.no_spin) for f, p in paths.items()}
            if not err:
                err = {f: float(np.abs(sess[f].run(None, feeds[f])[0] - want).max())
                       for f in forms if f != "dense"}
                assert max(err.values()) <= 1e-4, err
            ms = op_bench.interleaved({f: (lambda s=s, fd=feeds[f]: s.run(None, fd))
                                       for f, s in sess.items()}, a.runs)
            rows.append({"threads": th, "denormal_as_zero": daz, "repeat": rep,
                         "load_avg": op_bench.load(), "uptime": op_bench.uptime(),
                         "ort_ms": {f: round(x, 2) for f, x in ms.items()},
                         "speedup_vs_dense": {f: round(ms["dense"] / x, 3) for f, x in ms.items()},
                         "vs_old": {f: round(ms["old_add_inf"] / ms[f], 3) for f in capped},
                         "mul_ms_over_min_ms": {lp: round(ms[f"mul_{lp}"] / ms[f"min_{lp}"], 3)
                                                for lp in ("loop", "flat")}})
            print(f"{th} thread(s) daz={daz}: " + " ".join(
                f"{f}={x:.1f}ms ({ms['dense'] / x:.2f}x)" for f, x in ms.items()), flush=True)
        if a.profile:
            for daz in (False,) if a.no_daz else (False, True):
                op_bench.DAZ = daz
                profile["daz" if daz else "plain"] = {
                    f: op_profile(paths[f], feeds[f], 1, a.runs) for f in forms if f != "dense"}

    def summary(th, daz):
        sel = [x for x in rows if x["denormal_as_zero"] == daz and x["threads"] == th]
        if not sel:
            return None
        return {f: round(statistics.median(x["speedup_vs_dense"][f] for x in sel), 3)
                for f in [*capped, "old_add_inf"]} | {
            f"{f}_vs_old": round(statistics.median(x["vs_old"][f] for x in sel), 3)
            for f in capped} | {"passes": len(sel)}

    out = {"benchmark": "onnx_na1d_min", "device": cpu_name(), "threads": threads,
           "intra_op_spinning": not a.no_spin,
           "default": {"mask": nb1d.MASK, "loop": nb1d.LOOP, "step_scores": nb1d.STEP_SCORES},
           "runs": a.runs,
           "shape": {"B": 1, "H": op_bench.H, "D": op_bench.D, "S": 4096, "kernel": 169},
           "max_abs_err_vs_reference": err,
           "speedup_vs_dense_median": {f"{th}_threads_{'daz' if daz else 'plain'}": summary(th, daz)
                                       for th in threads for daz in (False, True)},
           "note": "2 cores shared with other sessions: see each row's uptime/load_avg.",
           "results": rows, "op_profile_1_thread_ms": profile or None,
           "mask_ops": time_masks(a.runs) if a.ops else None,
           "versions": {"torch": torch.__version__,
                        "onnxruntime": __import__("onnxruntime").__version__}}
    print(json.dumps(out["speedup_vs_dense_median"], indent=1))
    slug = "-".join("".join(c if c.isalnum() else " " for c in out["device"].lower()).split())
    path = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"onnx_na1d_min-{slug}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
