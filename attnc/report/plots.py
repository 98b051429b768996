"""Small SVG plots for report sections, with no plotting dependency.

`bar_svg` draws one horizontal bar per row (a score per sublayer, a density per site);
`curve_svg` draws named series of (x, y) points as lines on shared axes (kept mass versus
density per site). Both return the SVG text, or "" when there is nothing finite to draw.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
_HIGHLIGHT, _PLAIN = "#d62728", "#1f77b4"


def _num(v: float) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.4g}"


def _esc(s: str, n: int) -> str:
    return html.escape(s if len(s) <= n else s[: n - 1] + "…")


def _finite(v: float) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def bar_svg(
    rows: Sequence[tuple[str, float] | tuple[str, float, bool]],
    title: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    legend: str = "",
) -> str:
    """Horizontal bars, one per (label, value[, highlighted]) row; highlighted ones in red.

    The axis runs from `lo` (default: min(0, smallest value)) to `hi` (default: largest value);
    a value that is not finite is drawn as a stub and printed as such."""
    norm = [(str(r[0]), float(r[1]), bool(r[2]) if len(r) > 2 else False) for r in rows]
    vals = [v for _, v, _ in norm if _finite(v)]
    if not vals:
        return ""
    lo = min(0.0, min(vals)) if lo is None else lo
    hi = max(vals) if hi is None else hi
    span = (hi - lo) if hi > lo else 1.0
    width, bar_h, left, right = 760, 18, 300, 90
    height = 40 + bar_h * len(norm) + 20
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="monospace" font-size="11">',
        f'<text x="10" y="20" font-size="13">{html.escape(title)}</text>',
    ]
    for i, (label, v, marked) in enumerate(norm):
        y = 35 + i * bar_h
        frac = min(1.0, max(0.0, (v - lo) / span)) if _finite(v) else 0.0
        w = max(1.0, frac * (width - left - right))
        color = _HIGHLIGHT if marked else _PLAIN
        out.append(f'<text x="10" y="{y + 12}">{_esc(label, 44)}</text>')
        out.append(
            f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h - 4}" fill="{color}"/>'
        )
        out.append(f'<text x="{left + w + 5:.1f}" y="{y + 12}">{_num(v)}</text>')
    note = (legend + "; " if legend else "") + f"axis from {_num(lo)} to {_num(hi)}"
    out.append(f'<text x="{left}" y="{height - 5}">{html.escape(note)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _range(vals: list[float], given: tuple[float, float] | None) -> tuple[float, float]:
    if given is not None:
        return given
    lo, hi = min(vals), max(vals)
    if hi <= lo:
        pad = abs(lo) * 0.05 or 0.5
        return lo - pad, hi + pad
    return lo, hi


def curve_svg(
    series: Mapping[str, Sequence[tuple[float, float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    *,
    xlim: tuple[float, float] | None = None,
    ylim: tuple[float, float] | None = None,
    marks: Sequence[tuple[float, float, str]] = (),
) -> str:
    """Lines through each series' (x, y) points (sorted by x, points that are not finite left
    out), a legend with the series names, and optional labelled marks (a chosen point)."""
    clean = {
        name: sorted((float(x), float(y)) for x, y in pts if _finite(x) and _finite(y))
        for name, pts in series.items()
    }
    clean = {k: v for k, v in clean.items() if v}
    if not clean:
        return ""
    xs = [x for pts in clean.values() for x, _ in pts] + [m[0] for m in marks]
    ys = [y for pts in clean.values() for _, y in pts] + [m[1] for m in marks]
    (x0, x1), (y0, y1) = _range(xs, xlim), _range(ys, ylim)
    width, height, left, right, top, bottom = 700, 400, 70, 180, 35, 50
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="monospace" font-size="11">',
        f'<text x="10" y="20" font-size="13">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>',
    ]
    for t in _ticks(x0, x1):
        out.append(f'<line x1="{px(t):.1f}" y1="{top + ph}" x2="{px(t):.1f}" '
                   f'y2="{top + ph + 4}" stroke="#444"/>')
        out.append(f'<text x="{px(t):.1f}" y="{top + ph + 16}" text-anchor="middle">'
                   f"{_num(t)}</text>")
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{left - 4}" y1="{py(t):.1f}" x2="{left}" y2="{py(t):.1f}" '
                   'stroke="#444"/>')
        out.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">'
                   f"{_num(t)}</text>")
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 10}" text-anchor="middle">'
               f"{html.escape(xlabel)}</text>")
    out.append(f'<text x="14" y="{top + ph / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + ph / 2:.1f})">{html.escape(ylabel)}</text>')
    for i, (name, pts) in enumerate(clean.items()):
        color = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2" fill="{color}"/>')
        ly = top + 10 + i * 15
        if ly <= top + ph:
            out.append(f'<line x1="{left + pw + 10}" y1="{ly - 4}" x2="{left + pw + 28}" '
                       f'y2="{ly - 4}" stroke="{color}" stroke-width="2"/>')
            out.append(f'<text x="{left + pw + 32}" y="{ly}">{_esc(name, 20)}</text>')
    shown = max(0, (ph - 10) // 15 + 1)
    if len(clean) > shown:
        out.append(f'<text x="{left + pw + 10}" y="{top + ph + 16}">'
                   f"+{len(clean) - shown} more</text>")
    for x, y, label in marks:
        if _finite(x) and _finite(y):
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="none" '
                       f'stroke="{_HIGHLIGHT}" stroke-width="2"/>')
            out.append(f'<text x="{px(x) + 7:.1f}" y="{py(y) - 7:.1f}" fill="{_HIGHLIGHT}">'
                       f"{_esc(label, 30)}</text>")
    out.append("</svg>")
    return "\n".join(out)
