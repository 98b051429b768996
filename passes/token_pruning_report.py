"""token-pruning's section of report.md: the pruning layer, the keep count, the scorer, the debias
fit and its parameters, the padding mask, what the selection keeps on the calibration images
(and whether those images were real or generated), and a plot of the trend weights
(`<prefix>trend.svg`) when a trend was fitted."""

from __future__ import annotations

from attnc.report.plots import curve_svg
from attnc.report.section import PassSection, ReportPart, fmt, table

PLOT = "trend.svg"


def _fit_rows(trend: dict) -> list[list]:
    rows = []
    for k in ("b", "c", "coefficients", "floored", "raw_cv", "residual_cv",
              "calibration_sequences", "positions_fitted"):
        if k in trend:
            v = trend[k]
            rows.append([k, ", ".join(fmt(x) for x in v) if isinstance(v, list) else v])
    return rows


def _stat(s: dict) -> str:
    return f"{s['mean']:.4g} (min {s['min']}, max {s['max']})"


def render(section: PassSection) -> ReportPart:
    d = next((d for d in section.decisions if d.action in ("prune", "keep")), None)
    if d is None:
        return ReportPart("no scoring layer chosen.")
    m = d.metrics
    verb = "pruned" if d.action == "prune" else "kept every token (no-op)"
    out = [
        f"{verb}: {d.reason}.",
        "",
        table(["setting", "value"], [
            ["layer (prune after)", f"{m.get('layer')} (`{m.get('node')}`)"],
            ["image tokens kept", f"{m.get('keep')} of {m.get('image_tokens')} "
                                  f"({m.get('keep', 0) / max(m.get('image_tokens', 1), 1):.3g})"],
            ["image token id", m.get("image_token_id")],
            ["scorer", f"{m.get('scorer')} (scores: {m.get('score_op')})"],
            ["debias", m.get("debias")],
            ["padding mask", m.get("padding_mask")],
            ["outputs", m.get("output")],
            ["calibration images", m.get("calibration_images")],
        ]),
    ]
    trend = m.get("trend")
    if trend:
        out += ["", f"trend fit ({m.get('debias')}; the score of image token i is multiplied "
                    "by w_i = trend(0) / trend(i), so the trend is divided out):", "",
                table(["parameter", "value"], _fit_rows(trend))]
    kept = m.get("kept_on_calibration")
    if kept:
        quarters = ", ".join(f"{q:.3f}" for q in kept["kept_share_by_row_quarter"])
        out += ["", f"on {kept['sequences']} calibration sequence(s) "
                    f"(images: {m.get('calibration_images')}):", "",
                table(["statistic", "value"], [
                    ["valid (non-padding) image tokens", _stat(kept["valid_image_tokens"])],
                    ["kept image tokens (live)", _stat(kept["kept_image_tokens"])],
                    ["kept padding tokens", _stat(kept["kept_padding_tokens"])],
                    ["kept share per quarter of image rows (top to bottom)", quarters],
                    ["mean kept raster index / (n - 1) (0.5: centred)",
                     kept["kept_index_mean"] if kept["kept_index_mean"] is not None else ""],
                    ["scorer's image attention held by kept tokens",
                     kept["attention_mass_kept"] if kept["attention_mass_kept"] is not None
                     else ""],
                ])]
    elif m.get("calibration_images") == "none":
        out += ["", "no calibration data: no kept-token statistics."]
    files: dict[str, str | bytes] = {}
    weights = m.get("trend_weights")
    if weights:
        svg = curve_svg({"w_i": list(enumerate(weights))},
                        f"{m.get('debias')} trend weights (fitted on calibration)",
                        "image token index (raster order)", "weight")
        if svg:
            files[PLOT] = svg
            out += ["", f"![trend weights]({section.file(PLOT)})"]
    return ReportPart("\n".join(out), files)
