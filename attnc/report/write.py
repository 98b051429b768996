"""report.json (machine-readable), report.md (a person's view) and the passes' plots.

The report knows no pass: each pass's section (and its plot files) comes from the renderer the
pass registered (`PassInfo.report`, see `attnc.report.section`), or a table of its decisions.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from attnc.errors import AttncError, PassError, RecipeError
from attnc.recipe.manager import get_pass
from attnc.report.section import PassSection, ReportPart, generic_part, table

log = logging.getLogger(__name__)

_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _prefixes(entries: list[dict]) -> list[str]:
    """File-name prefix per pass entry: its id, and its occurrence when it runs again."""
    seen: dict[str, int] = {}
    out = []
    for p in entries:
        n = seen[p["pass_id"]] = seen.get(p["pass_id"], 0) + 1
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", p["pass_id"])
        out.append(f"{stem}-" if n == 1 else f"{stem}-{n}-")
    return out


def render_pass(entry: dict, prefix: str) -> tuple[PassSection, ReportPart]:
    """The section of one entry of report["passes"], by the pass's renderer or the generic one."""
    section = PassSection.from_entry(entry, prefix)
    try:
        renderer = get_pass(section.pass_id).report
    except RecipeError:
        log.warning("pass %r is not registered: its report section is a plain decisions table",
                    section.pass_id)
        renderer = None
    if renderer is None:
        return section, generic_part(section)
    where = f"while rendering the report section of pass {section.pass_id!r}"
    try:
        part = renderer(section)
    except AttncError as exc:
        raise type(exc)(f"{exc.message} ({where})", exc.hint) from exc
    except Exception as exc:  # noqa: BLE001 - a renderer's bug is reported as a PassError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PassError(f"{first} {where}") from exc
    if not isinstance(part, ReportPart):
        raise PassError(f"the report renderer of pass {section.pass_id!r} returned "
                        f"{type(part).__name__}, not a ReportPart")
    for name, data in part.files.items():
        if not _FILE_NAME.fullmatch(name):
            raise PassError(f"pass {section.pass_id!r} names a report file {name!r}",
                            "a plain file name: letters, digits, '.', '_' and '-'")
        if not isinstance(data, (str, bytes)):
            raise PassError(f"pass {section.pass_id!r} gives report file {name!r} as "
                            f"{type(data).__name__}, not text or bytes")
    return section, part


def render_passes(report: dict) -> list[tuple[PassSection, ReportPart]]:
    entries = report.get("passes") or []
    return [render_pass(p, pre) for p, pre in zip(entries, _prefixes(entries), strict=True)]


def write_report(report: dict, folder: Path) -> None:
    """report.json, report.md and each pass's files (named `<pass id>-<name>`) into `folder`."""
    parts = render_passes(report)
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    for section, part in parts:
        for name, data in part.files.items():
            path = folder / section.file(name)
            if isinstance(data, bytes):
                path.write_bytes(data)
            else:
                path.write_text(data)
    (folder / "report.md").write_text(render_markdown(report, parts))


def _json_default(o: Any):
    if isinstance(o, float) and math.isinf(o):
        return "inf"
    if isinstance(o, Path):
        return str(o)
    return str(o)


def render_markdown(r: dict, parts: list[tuple[PassSection, ReportPart]] | None = None) -> str:
    if parts is None:
        parts = render_passes(r)
    m = r["model"]
    out = [
        "# attnc build report",
        "",
        f"- model: `{m['source']}` ({m['kind']}), inputs {m['inputs']}, "
        f"dynamic dims {m['dynamic_dims']}",
        f"- parameters: {m['params_before']:,} → {m['params_after']:,}",
        f"- attention sites: {len(r['sites_before'])} → {len(r['sites_after'])}",
        f"- calibration: {r['calibration']['source']}, {r['calibration']['calib_batches']} "
        f"calibration + {r['calibration']['holdout_batches']} held-out batches"
        + (f"; images: {r['calibration']['images']}" if r["calibration"].get("images") else ""),
        f"- build time: {r['seconds']:.1f} s; versions: "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        "",
        "## Attention sites (before)",
        "",
        table(
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
    for section, part in parts:
        out += [
            "",
            f"## Pass `{section.pass_id}` ({section.seconds:.1f} s)",
            "",
            f"config: `{section.config}`",
            "",
            part.markdown.rstrip("\n"),
        ]
    v = r["verification"]
    out += ["", "## Verification (held-out calibration batches)", ""]
    rows = [
        [name, *[res.get(k, "") for k in ("max_abs_diff", "cosine", "sqnr_db", "top1")]]
        for name, res in v["comparisons"].items()
    ]
    out.append(table(["comparison", "max abs diff", "cosine", "SQNR dB", "top-1"], rows))
    if r.get("fidelity"):
        out += ["", "Task-level fidelity (`attnc eval` metrics, held-out batches):", ""]
        out.append(table(["metric", "value"], [[k, val] for k, val in r["fidelity"].items()]))
    bound = {k: b for k, b in v["bound"].items() if b is not None}
    src = v.get("bound_source", "recipe")
    out += ["", f"fidelity bound ({src}): `{bound}` → **{'met' if v['ok'] else 'MISSED'}**"]
    q = r.get("quantization")
    if q:
        out += ["", f"## Quantization ({q['mode']}, {', '.join(q['op_types'])})", "",
                f"- {q['bytes_before'] / 1e6:.1f} MB → {q['bytes_after'] / 1e6:.1f} MB",
                "- its cost, measured apart from the passes' (ONNX Runtime, held-out batches):",
                ""]
        out.append(table(["metric", "value"], [[k, val] for k, val in q["fidelity"].items()]))
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
        out.append(table(["runtime", "shapes", "original ms", "optimized ms", "speed-up",
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
    out += _stages_md(r)
    out += ["", "## Artifacts", ""] + [f"- `{a}`" for a in r["artifacts"]]
    return "\n".join(out) + "\n"


def _stages_md(r: dict) -> list[str]:
    """Wall time and resident memory per build stage, and where the peak was reached: the
    stages that run the whole model hold all its weights resident."""
    stages = [s for s in r.get("stages") or [] if s.get("rss_bytes") is not None]
    if not stages:
        return []
    gb = lambda n: f"{n / 1e9:.2f}" if n is not None else ""  # noqa: E731
    out = ["", "## Time and memory per stage", "",
           table(["stage", "seconds", "resident after (GB)", "peak so far (GB)"],
                 [[s["stage"], f"{s['seconds']:.1f}", gb(s["rss_bytes"]),
                   gb(s.get("peak_rss_bytes"))] for s in stages])]
    peaks = [s for s in stages if s.get("peak_rss_bytes")]
    if not peaks:
        return out
    top = max(peaks, key=lambda s: s["peak_rss_bytes"])  # the first stage at the peak
    w = (r.get("model") or {}).get("weights_bytes")
    of = f" ({top['peak_rss_bytes'] / w:.2f}× the {gb(w)} GB of weights)" if w else ""
    out += ["", f"Peak resident memory {gb(top['peak_rss_bytes'])} GB{of}, first reached in "
            f"`{top['stage']}`. Capture, calibration and verification (torch and ONNX Runtime) "
            "run the whole model, so every weight is resident during them (weights "
            "memory-mapped from safetensors count here, though the kernel can drop and reread "
            "them under memory pressure)."]
    return out
