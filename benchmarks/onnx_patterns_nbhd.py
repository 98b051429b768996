"""The neighborhood ONNX forms in ONNX Runtime CPU, each a ratio against dense `Attention` timed
interleaved in the same run (onnx_patterns.run_case: export, exactness against the plain
reference, median of `--runs`, `--threads` intra-op threads), B=1, H=8, D=64:
  nbhd64x64  2-D, 64x64 grid, 13x13 window: `chosen` (what the export emits: the Min-capped
             halo tiles in Loop steps, kernels/neighborhood_blocked_onnx.py), `flat` (the same
             chain over every tile at once, no Loop), `fused` (the halo tiles as heads of a
             fused `Attention` with a -1e9 bias, the form with a padding mask), `masked`
             (masked dense);
  na1d       1-D, S = 4096, kernel 169 (as many keys as 13x13): `chosen` (the 1-D blocked form,
             kernels/neighborhood1d_blocked.py) and `masked` (masked dense).
Every case runs twice: plain sessions, then every session (dense too) with ORT's
`session.set_denormal_as_zero` (a masked key's exp(-1e9) and P @ V over denormals take microcode
assists on Intel CPUs; the flag flushes them).

    nice python benchmarks/onnx_patterns_nbhd.py [--runs 7] [--threads 2] [--no-daz] [--repeat 1]

Writes benchmarks/results/onnx_patterns_nbhd2-<device>.json (`uptime` per row: the machine is
shared). Not onnx_patterns-*.json: tests/test_sparse_cost.py and the ORT cost fit read the nbhd*
rows of those, all priced as one form label (neighborhood_blocked.FORM), and these rows hold two
forms under it plus denormal-as-zero sessions; the 1-D case is named na1d, not nbhd*."""

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

_forced, _masked = op_bench.forced, op_bench.masked_only


@contextlib.contextmanager
def fused_forced():
    """The 2-D halo tiles as the heads of the fused `Attention` (the form before the Min cap)."""
    from attnc.kernels import neighborhood_blocked_onnx as nbo

    saved = nbo.blocked_onnx

    def fused(q, k, v, grid, heads, dilation, stride, is_causal, scale=None, padding=None,
              num_global=0, padding_is_bool=True, tiles=None):
        return nbo.fused_onnx(q, k, v, grid, heads, dilation, stride, is_causal, scale, padding,
                              num_global, padding_is_bool, tiles)

    nbo.blocked_onnx = fused
    try:
        with _forced():
            yield
    finally:
        nbo.blocked_onnx = saved


@contextlib.contextmanager
def flat_chain():
    """The Min-capped tiles as one flat chain over every tile (no Loop steps: the form before,
    and what bf16/fp16 get)."""
    from attnc.kernels import neighborhood_blocked_onnx as nbo

    saved, nbo.LOOP = nbo.LOOP, False
    try:
        yield
    finally:
        nbo.LOOP = saved


@contextlib.contextmanager
def masked_all():
    """Masked dense for the 2-D/3-D and the 1-D neighborhood."""
    from attnc.kernels import neighborhood1d_blocked as nb1d

    saved = nb1d.onnx_form
    nb1d.onnx_form = lambda *a, **k: None
    try:
        with _masked():
            yield
    finally:
        nb1d.onnx_form = saved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-daz", action="store_true", help="skip the denormal-as-zero pass")
    ap.add_argument("--repeat", type=int, default=1, help="whole passes (the machine is shared: "
                    "the targets take the median over them)")
    ap.add_argument("--no-spin", action="store_true", help="every session without ORT's "
                    "intra-op thread spinning (interleaved sessions: a finished run's spinning "
                    "pool takes the cores the next session's run needs)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    op_bench.SPIN = not a.no_spin

    import torch
    import torch.nn.functional as F

    import attnc.kernels  # noqa: F401
    from attnc.kernels import neighborhood1d_blocked as nb1d
    from attnc.kernels import neighborhood_blocked, reference

    torch.set_num_threads(a.threads)
    op_bench.forced, op_bench.masked_only = fused_forced, masked_all
    na = torch.ops.attnc.neighborhood_attention

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    cases = [("nbhd64x64", [64, 64], [13, 13]), ("na1d", [4096], [169])]
    rows = []
    with tempfile.TemporaryDirectory() as tmpd:
        for rep, daz in itertools.product(range(a.repeat), (False,) if a.no_daz else (False, True)):
            op_bench.DAZ = daz
            for name, grid, ks in cases:
                n = len(grid)
                args = (grid, ks, [1] * n, [1] * n, [False] * n)
                s = int(torch.tensor(grid).prod())

                def nfn(q, k, v, args=args):
                    return na(q, k, v, *args)

                forms = {"dense": (dense, s, False, None), "chosen": (nfn, s, False, None),
                         "masked": (nfn, s, "masked", None)}
                if n == 2:
                    forms["fused"] = (nfn, s, "forced", None)
                    forms["flat"] = (nfn, s, flat_chain, None)
                row = op_bench.run_case(name, s, forms, lambda q, k, v, args=args: reference.
                                        neighborhood_attention_ref(q, k, v, *args), None, a,
                                        Path(tmpd))
                row["grid"], row["window"], row["repeat"] = grid, ks, rep
                row["chosen_form"] = neighborhood_blocked.export_form(
                    s, grid, [ks], [1] * n, [1] * n, [False] * n)
                row["chosen_sparse"] = row["chosen_form"] in (neighborhood_blocked.FORM,
                                                              nb1d.FORM)
                if n == 2:
                    row["cost_model"] = op_bench.cost_model(row)
                rows.append(row)

    def speed(case, daz, form="chosen"):
        got = [x["ort_speedup_vs_dense"][form] for x in rows
               if x["case"] == case and x["denormal_as_zero"] == daz]
        return round(statistics.median(got), 3) if got else None

    def spread(case, daz, form="chosen"):
        return sorted(x["ort_speedup_vs_dense"][form] for x in rows
                      if x["case"] == case and x["denormal_as_zero"] == daz)

    targets = {f"2-D neighborhood 64x64 13x13 >= 5x ({tag})": {
        "measured": speed("nbhd64x64", daz), "runs": spread("nbhd64x64", daz),
        "fused_form": speed("nbhd64x64", daz, "fused"),
        "fused_runs": spread("nbhd64x64", daz, "fused"),
        "flat_chain": speed("nbhd64x64", daz, "flat"),
        "flat_runs": spread("nbhd64x64", daz, "flat"),
        "na1d_blocked": speed("na1d", daz), "na1d_runs": spread("na1d", daz),
        "met": (speed("nbhd64x64", daz) or 0) >= 5.0}
        for daz, tag in ((False, "plain sessions"), (True, "denormal_as_zero on every session"))
        if speed("nbhd64x64", daz) is not None}
    for t, x in targets.items():
        print(f"{t}: {x}")
    dev = cpu_name()
    slug = "".join(c if c.isalnum() else "-" for c in dev.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    path = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / (
        f"onnx_patterns_nbhd2-{slug}.json")
    out = {"benchmark": "onnx_patterns_nbhd", "device": dev, "threads": a.threads,
           "runs": a.runs, "shape": {"B": 1, "H": op_bench.H, "D": op_bench.D},
           "intra_op_spinning": op_bench.SPIN,
           "targets": targets, "note": op_bench.NOTE, "results": rows,
           "versions": {"torch": torch.__version__,
                        "onnxruntime": __import__("onnxruntime").__version__}}
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
