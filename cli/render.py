"""Console rendering of builds and benchmarks (rich); the library returns data, this draws it."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

FIDELITY_LABELS = {
    "bpb_original": "bits/byte, original",
    "bpb_optimized": "bits/byte, optimized",
    "bpb_increase": "bits/byte increase",
    "top1_agreement": "next-token top-1 agreement",
    "kl": "KL(original || optimized)",
    "embedding_cosine": "embedding cosine (pooled output)",
    "embedding_cosine_min": "embedding cosine, worst sample",
    "accuracy_original": "accuracy, original",
    "accuracy_optimized": "accuracy, optimized",
    "accuracy_drop_points": "accuracy drop (points)",
    "prediction_agreement": "prediction agreement",
    "retrieval_agreement": "retrieval agreement",
    "pooled_cosine": "pooled-feature cosine",
}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def fidelity_table(fidelity: dict, title: str) -> Table | None:
    rows = [(FIDELITY_LABELS.get(k, k), _fmt(v)) for k, v in (fidelity or {}).items()
            if isinstance(v, (int, float))]
    if not rows:
        return None
    t = Table(title=title)
    t.add_column("task-level metric")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(k, v)
    return t


def bench_table(bench: dict, title: str = "speed (same run, interleaved medians)") -> Table:
    t = Table(title=f"{title}: {bench['device']}, {bench['threads']} threads")
    for col in ("runtime", "input shapes", "original ms", "optimized ms", "speed-up"):
        t.add_column(col, justify="right" if "ms" in col or col == "speed-up" else "left")
    for tm in bench["timings"]:
        shapes = " ".join(dict.fromkeys("x".join(str(d) for d in s) for s in tm["shape"]))
        t.add_row(
            tm["runtime"],
            shapes,
            f"{tm['original_ms']:.2f}",
            f"{tm['optimized_ms']:.2f}",
            f"{tm['speedup']:.2f}×",
        )
    return t


def render_build(r: dict, out_dir, out: Console) -> None:
    if "rank" in r:  # a helper rank under torchrun: rank 0 verifies and writes the build
        out.print(f"rank {r['rank']}: calibrated its share; rank 0 writes {out_dir}")
        return
    v = r["verification"]["comparisons"]
    t = Table(title=f"attnc build → {out_dir}")
    for col in ("comparison", "max abs diff", "cosine", "SQNR dB", "top-1"):
        t.add_column(col)
    for name, m in v.items():
        t.add_row(
            name,
            *[
                f"{m.get(k, float('nan')):.6g}" if k in m else ""
                for k in ("max_abs_diff", "cosine", "sqnr_db", "top1")
            ],
        )
    out.print(t)
    ft = fidelity_table(r.get("fidelity"), "task-level fidelity (held-out, torch optimized)")
    if ft is not None:
        out.print(ft)
    q = r.get("quantization")
    if q:
        qt = fidelity_table(q.get("fidelity"), f"task-level fidelity after {q['mode']} (ONNX)")
        if qt is not None:
            out.print(qt)
    bound = r["verification"].get("bound") or {}
    set_keys = {k: b for k, b in bound.items() if b is not None}
    src = r["verification"].get("bound_source", "recipe")
    out.print(
        "fidelity bound "
        + (", ".join(f"{k} {b:g}" for k, b in set_keys.items()) or "none")
        + f" ({src}): met",
        markup=False,
        highlight=False,
    )
    if r.get("bench"):
        out.print(bench_table(r["bench"]))
    out.print(
        f"attention sites {len(r['sites_before'])} → {len(r['sites_after'])}, parameters "
        f"{r['model']['params_before']:,} → {r['model']['params_after']:,}, "
        f"{r['seconds']:.1f} s. Artifacts: {', '.join(r['artifacts'])}"
    )
