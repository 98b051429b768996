"""sparse's section of report.md: per site the chosen pattern, its density and predicted
speed-up, the reason for every site kept dense, and per site a plot of kept attention mass
against density for every candidate family (`<prefix>mass-<i>.svg`, the chosen point marked)."""

from __future__ import annotations

import re

from attnc.report.plots import curve_svg
from attnc.report.section import PassSection, ReportPart, table

MAX_PLOTS = 64


def _name(i: int, site: str) -> str:
    return f"mass-{i:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', site)[:60]}.svg"


def _stat(m: dict) -> str:
    return "quantile" if m.get("statistic") == "quantile" else "mean"


def render(section: PassSection) -> ReportPart:
    ds = section.decisions
    fired = [d for d in ds if d.action == "sparse"]
    m0 = next((d.metrics for d in ds if d.metrics.get("backend")), {})
    rule = m0.get("rule") or f"{m0.get('statistic', 'quantile')} >= {m0.get('min_mass', '')}"
    head = (f"rewrote {len(fired)} of {len(ds)} site(s); a head takes a pattern whose kept "
            f"attention mass per calibration query has {rule}; speed-ups are the cost "
            f"model's predictions for {m0.get('backend', '?')} at the target length, batch 1, "
            f"not measurements.")
    rows = []
    for d in ds:
        m = d.metrics
        rows.append([d.site, d.action, m.get("pattern", ""), m.get("density", ""),
                     m.get("kept_mass_min", ""), m.get("predicted_speedup", ""),
                     m.get("target_length", ""), d.reason])
    out = [head, "", table(["site", "action", "pattern", "density", "kept mass (min head)",
                            "predicted speed-up", "target length", "reason"], rows)]
    trail = next((d.metrics["back_off"] for d in ds if d.metrics.get("back_off")), None)
    if trail:
        keys = [k for k in trail[0] if k not in ("min_mass", "sites", "heads", "ok")][:6]
        out += ["", "Back-off: each setting checked against the fidelity bound on the "
                "calibration batches (min_mass raised while it misses):", "",
                table(["min_mass", "sites", "heads", "meets bound", *keys],
                      [[r["min_mass"], r["sites"], r["heads"], "yes" if r["ok"] else "no",
                        *[r.get(k, "") for k in keys]] for r in trail])]
    files: dict[str, str | bytes] = {}
    plotted = 0
    for i, d in enumerate(ds):
        curves = d.metrics.get("curves")
        if not curves or plotted >= MAX_PLOTS:
            continue
        marks = []
        if d.action == "sparse":
            marks.append((float(d.metrics["density_calib"]), float(d.metrics["kept_mass"]),
                          "chosen"))
        svg = curve_svg({k: [tuple(p) for p in v] for k, v in curves.items()},
                        f"{d.site}: kept attention mass vs density (calibration, "
                        f"{d.metrics.get('calibration_length')} tokens)",
                        "density (share of the site's keys kept)",
                        f"kept mass ({_stat(d.metrics)}, mean over heads)",
                        xlim=(0.0, 1.0), marks=marks)
        if svg:
            name = _name(i, d.site)
            files[name] = svg
            out += ["", f"![{d.site}]({section.file(name)})"]
            plotted += 1
    return ReportPart("\n".join(out), files)
