"""report.json (machine-readable), report.md (a person's view) and a per-layer similarity plot
(SVG, no plotting dependency)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.6g}"
    return str(v)


def similarity_svg(rows: list[tuple[str, float, bool]], title: str) -> str:
    """Horizontal bars of similarity per sublayer; dropped ones drawn in red."""
    if not rows:
        return ""
    vals = [v for _, v, _ in rows if not math.isnan(v)]
    lo = min(0.0, min(vals)) if vals else 0.0
    width, bar_h, left, right = 760, 18, 300, 90
    height = 40 + bar_h * len(rows) + 20
    span = (1.0 - lo) or 1.0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="monospace" font-size="11">',
        f'<text x="10" y="20" font-size="13">{html.escape(title)}</text>',
    ]
    for i, (label, v, dropped) in enumerate(rows):
        y = 35 + i * bar_h
        frac = 0.0 if math.isnan(v) else (v - lo) / span
        w = max(1.0, frac * (width - left - right))
        color = "#d62728" if dropped else "#1f77b4"
        out.append(f'<text x="10" y="{y + 12}">{html.escape(label[:44])}</text>')
        out.append(
            f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h - 4}" fill="{color}"/>'
        )
        out.append(f'<text x="{left + w + 5:.1f}" y="{y + 12}">{_fmt(v)}</text>')
    out.append(f'<text x="{left}" y="{height - 5}">red: dropped; axis from {lo:.2f} to 1.0</text>')
    out.append("</svg>")
    return "\n".join(out)


def write_report(report: dict, folder: Path) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    rows = []
    for p in report.get("passes", []):
        for d in p["decisions"]:
            cos = d["metrics"].get("cosine")
            if cos is not None:
                rows.append((d["site"], float(cos), d["action"] == "drop"))
    svg = similarity_svg(rows, "input/output cosine similarity per sublayer (calibration)")
    if svg:
        (folder / "similarity.svg").write_text(svg)
    (folder / "report.md").write_text(render_markdown(report, has_plot=bool(svg)))


def _json_default(o: Any):
    if isinstance(o, float) and math.isinf(o):
        return "inf"
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(r: dict, has_plot: bool) -> str:
    m = r["model"]
    out = [
        "# attnc build report",
        "",
        f"- model: `{m['source']}` ({m['kind']}), inputs {m['inputs']}, "
        f"dynamic dims {m['dynamic_dims']}",
        f"- parameters: {m['params_before']:,} → {m['params_after']:,}",
        f"- attention sites: {len(r['sites_before'])} → {len(r['sites_after'])}",
        f"- calibration: {r['calibration']['source']}, {r['calibration']['calib_batches']} "
        f"calibration + {r['calibration']['holdout_batches']} held-out batches",
        f"- build time: {r['seconds']:.1f} s; versions: "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        "",
        "## Attention sites (before)",
        "",
        _table(
            [
                "#",
                "layer",
                "module",
                "heads",
                "kv",
                "dim",
                "causal",
                "window",
                "mask",
                "block",
                "pattern",
            ],
            [
                [
                    s["index"],
                    s["layer"],
                    s["module"],
                    s["num_heads"],
                    s["num_kv_heads"],
                    s["head_dim"],
                    s["causal"],
                    s.get("window") or "",
                    s["mask"],
                    s["block_style"],
                    s["pattern"],
                ]
                for s in r["sites_before"]
            ],
        ),
    ]
    if r.get("candidates"):
        out += ["", "Hand-written attention candidates not matched:", ""]
        out += [f"- `{c['node']}` in `{c['module']}`: {c['reason']}" for c in r["candidates"]]
    for p in r.get("passes", []):
        out += [
            "",
            f"## Pass `{p['pass_id']}` ({p['seconds']:.1f} s)",
            "",
            f"config: `{p['config']}`",
            "",
        ]
        out.append(
            _table(
                ["site", "action", "reason"],
                [[d["site"], d["action"], d["reason"]] for d in p["decisions"]],
            )
        )
        trail = next(
            (
                d["metrics"].get("auto_trail")
                for d in p["decisions"]
                if d["metrics"].get("auto_trail")
            ),
            None,
        )
        if trail:
            keys = [k for k in trail[0] if k != "count"]
            out += ["", "automatic count search:", ""]
            out.append(
                _table(["count", *keys], [[t["count"], *[t[k] for k in keys]] for t in trail])
            )
    if has_plot:
        out += ["", "![similarity per sublayer](similarity.svg)"]
    v = r["verification"]
    out += ["", "## Verification (held-out calibration batches)", ""]
    rows = [
        [name, *[_fmt(res.get(k, "")) for k in ("max_abs_diff", "cosine", "sqnr_db", "top1")]]
        for name, res in v["comparisons"].items()
    ]
    out.append(_table(["comparison", "max abs diff", "cosine", "SQNR dB", "top-1"], rows))
    if r.get("fidelity"):
        out += ["", "Task-level fidelity (`attnc eval` metrics, held-out batches):", ""]
        out.append(_table(["metric", "value"], [[k, val] for k, val in r["fidelity"].items()]))
    bound = {k: b for k, b in v["bound"].items() if b is not None}
    src = v.get("bound_source", "recipe")
    out += ["", f"fidelity bound ({src}): `{bound}` → **{'met' if v['ok'] else 'MISSED'}**"]
    q = r.get("quantization")
    if q:
        out += ["", f"## Quantization ({q['mode']}, {', '.join(q['op_types'])})", "",
                f"- {q['bytes_before'] / 1e6:.1f} MB → {q['bytes_after'] / 1e6:.1f} MB",
                "- its cost, measured apart from the passes' (ONNX Runtime, held-out batches):",
                ""]
        out.append(_table(["metric", "value"], [[k, val] for k, val in q["fidelity"].items()]))
    b = r.get("bench")
    if b:
        out += ["", "## Speed (same run, interleaved medians)", "",
                f"{b['device']}, {b['threads']} threads.", ""]
        rows = [
            [t["runtime"], " ".join(dict.fromkeys("x".join(map(str, s)) for s in t["shape"])),
             f"{t['original_ms']:.2f}", f"{t['optimized_ms']:.2f}", f"{t['speedup']:.2f}×",
             t["runs"]]
            for t in b["timings"]
        ]
        out.append(_table(["runtime", "shapes", "original ms", "optimized ms", "speed-up",
                           "runs"], rows))
    if r.get("onnx"):
        o = r["onnx"]
        out += [
            "",
            "## ONNX",
            "",
            f"- opset {o['opset']}, {o['nodes']} nodes, {o['attention_nodes']} Attention nodes, "
            f"{o['initializer_bytes'] / 1e6:.1f} MB of weights; inputs {o['inputs']}",
            f"- ONNX Runtime providers: {o.get('providers')}",
        ]
    out += ["", "## Artifacts", ""] + [f"- `{a}`" for a in r["artifacts"]]
    return "\n".join(out) + "\n"
