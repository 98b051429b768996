"""Query-tile shapes and graph variants of the blocked 2-D neighborhood ONNX form, ORT CPU.

The graphs are built directly (onnx.helper) from kernels/neighborhood_blocked.py's plan (no
globals, no padding, MHA), each checked against the plain reference and timed interleaved with
dense opset-23 `Attention` in one loop (median of `--runs`, `--threads` intra-op threads):
  matmul     what `blocked_onnx` emits: Gather Q tiles and K/V halos, MatMul (fused with the
             transpose and scale by ORT), Add of the in-tile -inf bias, Softmax, MatMul, Gather
             back to grid order;
  attention  the same tiles as the heads of one opset-23 `Attention` (batch B*H, heads = tiles,
             the in-tile mask as a float bias): no transposes, ORT's fused kernel;
  split<c>   the matmul form in c independent head chains (smaller intermediates).

    nice python benchmarks/onnx_patterns_tiles.py --grid 64x64 --window 13x13 \\
        --forms matmul:8x8,matmul:4x8,attention:8x8 [--runs 9] [--threads 2]

Prints a line per form and adds the case to benchmarks/results/onnx_patterns-tiles-<device>.json
(with the load average: the machine is shared). B=1, H=8, D=64.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from llm_drop import cpu_name  # noqa: E402

H, D = 8, 64


def _model(nodes, inits, s):
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", H, s, D]) for n in "qkv"]
    g = helper.make_graph(nodes, "g", io, [helper.make_tensor_value_info("o", TensorProto.FLOAT,
                                                                         None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])


def _c(name, arr):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(arr), name)


def _plan(grid, win, tiles):
    import torch  # noqa: F401

    from attnc.kernels import neighborhood_blocked as nb

    p = nb.plan(grid, (win,), (1, 1), (1, 1), (False, False), 0, tiles)
    vis = nb.axis_product(p.axis_vis)[0].numpy()  # (nt, T, K)
    return p, vis, np.where(vis, 0, -np.inf).astype("f4")


def dense(s):
    from onnx import helper

    return _model([helper.make_node("Attention", ["q", "k", "v"], ["o"])], [], s)


def matmul(grid, win, tiles, chains=1):
    from onnx import helper as h

    p, _, bias = _plan(grid, win, tiles)
    s, hc = int(np.prod(grid)), H // chains
    inits = [_c("qt", p.qtok.numpy()), _c("kt", p.keys.numpy()), _c("inv", p.inv.numpy()),
             _c("bias", bias[None, None]), _c("sc", np.array(D ** -0.5, "f4")),
             _c("sh", np.array([0, hc, -1, D])), _c("spl", np.array([hc] * chains))]
    nodes = [h.make_node("Split", [x, "spl"], [f"{x}{i}" for i in range(chains)], axis=1)
             for x in "qkv"]
    for i in range(chains):
        z = f"_{i}"
        nodes += [h.make_node("Gather", [f"q{i}", "qt"], ["qb" + z], axis=2),
                  h.make_node("Gather", [f"k{i}", "kt"], ["kw" + z], axis=2),
                  h.make_node("Gather", [f"v{i}", "kt"], ["vw" + z], axis=2),
                  h.make_node("Mul", ["qb" + z, "sc"], ["qs" + z]),
                  h.make_node("Transpose", ["kw" + z], ["kT" + z], perm=[0, 1, 2, 4, 3]),
                  h.make_node("MatMul", ["qs" + z, "kT" + z], ["s" + z]),
                  h.make_node("Add", ["s" + z, "bias"], ["sb" + z]),
                  h.make_node("Softmax", ["sb" + z], ["pr" + z], axis=-1),
                  h.make_node("MatMul", ["pr" + z, "vw" + z], ["ob" + z]),
                  h.make_node("Reshape", ["ob" + z, "sh"], ["o2" + z]),
                  h.make_node("Gather", ["o2" + z, "inv"], ["o3" + z], axis=2)]
    nodes.append(h.make_node("Concat", [f"o3_{i}" for i in range(chains)], ["o"], axis=1))
    return _model(nodes, inits, s)


def attention(grid, win, tiles):
    from onnx import helper as h

    p, _, bias = _plan(grid, win, tiles)
    nt, t = p.qtok.shape
    kk, s = p.keys.shape[1], int(np.prod(grid))
    inits = [_c("qt", p.qtok.numpy()), _c("kt", p.keys.numpy()), _c("inv", p.inv.numpy()),
             _c("bias", bias[None]), _c("qs", np.array([-1, nt, t, D])),
             _c("ks", np.array([-1, nt, kk, D])), _c("os", np.array([-1, H, nt * t, D]))]
    nodes = [h.make_node("Gather", ["q", "qt"], ["qg"], axis=2),  # (B, H, nt, T, D)
             h.make_node("Reshape", ["qg", "qs"], ["qa"]),  # (B H, nt, T, D)
             h.make_node("Gather", ["k", "kt"], ["kg"], axis=2),
             h.make_node("Reshape", ["kg", "ks"], ["ka"]),
             h.make_node("Gather", ["v", "kt"], ["vg"], axis=2),
             h.make_node("Reshape", ["vg", "ks"], ["va"]),
             h.make_node("Attention", ["qa", "ka", "va", "bias"], ["oa"]),
             h.make_node("Reshape", ["oa", "os"], ["ob"]),
             h.make_node("Gather", ["ob", "inv"], ["o"], axis=2)]
    return _model(nodes, inits, s)


def main() -> None:
    import onnxruntime as ort
    import torch

    from attnc.kernels import reference

    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", default="64x64")
    ap.add_argument("--window", default="13x13")
    ap.add_argument("--forms", default="matmul:8x8,matmul:4x8,matmul:8x16,matmul:16x16,"
                    "matmul:4x4,attention:8x8,split8:8x8")
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    grid = tuple(int(x) for x in a.grid.split("x"))
    win = tuple(int(x) for x in a.window.split("x"))
    s = int(np.prod(grid))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, s, D) for _ in range(3))
    want = reference.neighborhood_attention_ref(q, k, v, list(grid), list(win), [1, 1], [1, 1],
                                                [False, False]).numpy()
    feed = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = a.threads, 1, 3
    models = {"dense": dense(s)}
    for spec in a.forms.split(","):
        kind, ts = spec.split(":")
        tiles = tuple(int(x) for x in ts.split("x"))
        if kind == "matmul":
            models[spec] = matmul(grid, win, tiles)
        elif kind.startswith("split"):
            models[spec] = matmul(grid, win, tiles, int(kind[5:]))
        else:
            models[spec] = attention(grid, win, tiles)
    sess = {f: ort.InferenceSession(m.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"]) for f, m in models.items()}
    err = {f: float(np.abs(x.run(None, feed)[0] - want).max()) for f, x in sess.items()
           if f != "dense"}
    times: dict[str, list[float]] = {f: [] for f in sess}
    for _ in range(a.runs):
        for f, x in sess.items():
            t0 = time.perf_counter()
            x.run(None, feed)
            times[f].append(time.perf_counter() - t0)
    ms = {f: statistics.median(x) * 1e3 for f, x in times.items()}
    for f, x in ms.items():
        print(f"{a.grid} {a.window} {f:16s} {x:8.1f} ms {ms['dense'] / x:5.2f}x", flush=True)
    dev = cpu_name()
    slug = "-".join("".join(c if c.isalnum() else " " for c in dev.lower()).split())
    path = ROOT / "benchmarks" / "results" / f"onnx_patterns-tiles-{slug}.json"
    out = json.loads(path.read_text()) if path.exists() else {
        "benchmark": "onnx_patterns_tiles", "device": dev, "threads": a.threads,
        "shape": {"B": 1, "H": H, "D": D}, "cases": {}}
    out["cases"][f"{a.grid} window {a.window}"] = {
        "load_avg": [round(x, 2) for x in os.getloadavg()], "runs": a.runs,
        "ort_ms": {f: round(x, 2) for f, x in ms.items()},
        "speedup_vs_dense": {f: round(ms["dense"] / x, 3) for f, x in ms.items()},
        "max_abs_err": err}
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
