"""The interface between the report and the passes: a pass renders its own section.

A pass may register a renderer (`PassInfo.report`): it gets a `PassSection` (its config, its
decisions with their metrics, the seconds it took) and returns a `ReportPart`: markdown for its
section of report.md and named files (plots) that the core writes into the build folder. File
names are prefixed by the pass id (`section.file("curve.svg")` gives the name the file will have,
for links in the markdown). A pass without a renderer gets `generic_part`: its decisions as a
table. The core knows no pass by name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from attnc.recipe.manager import Decision


@dataclass(frozen=True)
class ReportPart:
    """A pass's section of report.md and the files (name -> text or bytes) it links to."""

    markdown: str
    files: dict[str, str | bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class PassSection:
    """What a pass's renderer reads: one entry of report.json's "passes", as records."""

    pass_id: str
    config: dict[str, Any]
    seconds: float
    decisions: tuple[Decision, ...]
    prefix: str  # every file the pass returns is written as f"{prefix}{name}"

    @classmethod
    def from_entry(cls, entry: dict[str, Any], prefix: str) -> PassSection:
        decisions = tuple(
            d if isinstance(d, Decision) else Decision(**d) for d in entry.get("decisions", ())
        )
        return cls(entry["pass_id"], dict(entry.get("config") or {}),
                   float(entry.get("seconds", 0.0)), decisions, prefix)

    def file(self, name: str) -> str:
        """The name `name` (a key of `ReportPart.files`) has in the build folder."""
        return f"{self.prefix}{name}"


def fmt(v: Any) -> str:
    """A table cell: floats to 6 significant digits, inf as "inf"."""
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.6g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _scalar(v: Any) -> bool:
    if isinstance(v, str):
        return len(v) <= 40
    return isinstance(v, (int, float, bool))


def decisions_table(section: PassSection, metrics: Sequence[str] | None = None) -> str:
    """Site, action and reason per decision, plus metric columns: `metrics`, or by default every
    metric that is a scalar in each decision that has it (in order of first appearance)."""
    if metrics is None:
        seen: dict[str, None] = {}
        for d in section.decisions:
            for k, v in d.metrics.items():
                if _scalar(v):
                    seen.setdefault(k)
        bad = {k for d in section.decisions for k, v in d.metrics.items() if not _scalar(v)}
        metrics = [k for k in seen if k not in bad]
    rows = [[d.site, d.action, d.reason, *[d.metrics.get(k, "") for k in metrics]]
            for d in section.decisions]
    return table(["site", "action", "reason", *metrics], rows)


def generic_part(section: PassSection) -> ReportPart:
    """The section of a pass that renders nothing of its own: its decisions as a table."""
    if not section.decisions:
        return ReportPart("no decisions.")
    return ReportPart(decisions_table(section))
