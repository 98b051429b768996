"""llm-drop's section of report.md: what was dropped, the automatic count search, and a plot of
the input/output similarity of every scored sublayer (`<prefix>similarity.svg`)."""

from __future__ import annotations

from attnc.report.plots import bar_svg
from attnc.report.section import PassSection, ReportPart, table

PLOT = "similarity.svg"


def _trail(section: PassSection) -> list[dict]:
    """The count search of `count: auto` (the pass keeps it in its first decision's metrics)."""
    return next((d.metrics["auto_trail"] for d in section.decisions
                 if d.metrics.get("auto_trail")), [])


def render(section: PassSection) -> ReportPart:
    decisions = section.decisions
    dropped = [d for d in decisions if d.action == "drop"]
    scored = [d for d in decisions if d.metrics.get("cosine") is not None]
    removed = sum(int(d.metrics.get("removed_params", 0)) for d in dropped)
    out = [
        f"dropped {len(dropped)} of {len(scored)} scored sublayer(s), "
        f"{removed:,} parameters removed.",
        "",
        table(
            ["site", "action", "reason", "removed params"],
            [[d.site, d.action, d.reason, d.metrics.get("removed_params", "")]
             for d in decisions],
        ),
    ]
    trail = _trail(section)
    if trail:
        keys = [k for k in trail[0] if k != "count"]
        out += ["", "automatic count search:", ""]
        out.append(table(["count", *keys], [[t["count"], *[t.get(k, "") for k in keys]]
                                            for t in trail]))
    files: dict[str, str | bytes] = {}
    svg = bar_svg(
        [(d.site, float(d.metrics["cosine"]), d.action == "drop") for d in scored],
        "input/output cosine similarity per sublayer (calibration)",
        hi=1.0,
        legend="red: dropped",
    )
    if svg:
        files[PLOT] = svg
        out += ["", f"![similarity per sublayer]({section.file(PLOT)})"]
    return ReportPart("\n".join(out), files)
