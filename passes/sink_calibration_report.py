"""sink-calibration's section of report.md: the search (objective, baselines, trials and their
cost), per head its single-head objective change and whether it was kept and why, the combined
change on the held-apart batches, and the trail of every trial."""

from __future__ import annotations

from attnc.report.section import PassSection, ReportPart, table

MAX_TRAIL_ROWS = 200


def render(section: PassSection) -> ReportPart:
    ds = section.decisions
    s = next((d.metrics["search"] for d in ds if d.metrics.get("search")), None)
    if s is None:
        rows = [[d.site, d.action, d.reason] for d in ds]
        return ReportPart("no eligible attention site.\n\n" + table(["site", "action",
                                                                      "reason"], rows))
    chosen = s["selected"]
    lower = "NLL" in s["objective"]
    direction = "negative is better" if lower else "positive is better"
    out = [
        f"objective: {s['objective']} ({s['mode']} heads, beta {s['beta']}, threshold "
        f"{s['threshold']}); {s['trials']} trial(s) of a budget of {s['budget']}, "
        f"{s['seconds_per_trial']} s per trial, on {s['search_batches']} search batch(es) and "
        f"{s['check_batches']} held-apart check batch(es).",
        "",
        (f"selected {len(chosen)} head(s): {', '.join(chosen)}; combined change on the "
         f"held-apart batches {s['combined_change']:+.6g} ({s['combined_relative']:+.3%} "
         f"relative; {direction}) from a baseline of {s['baseline_check']:.6g}.")
        if chosen else
        ("selected no heads: no head improved the objective on the calibration data (a correct "
         "outcome: the model is left as it was).")
        if s["mode"] == "auto" else "no head listed.",
        "",
    ]
    rows = []
    for d in ds:
        for h in d.metrics.get("heads", []):
            rows.append([d.site, h["name"], h["single_change"] if h["single_change"] is not None
                         else "", h["single_relative"] if h["single_relative"] is not None
                         else "", "yes" if h["kept"] else "no", h["why"]])
    out.append(table(["site", "head", f"single-head change ({direction})", "relative", "kept",
                      "why"], rows))
    skipped = [[d.site, d.reason] for d in ds if d.action == "skip"]
    if skipped:
        out += ["", "sites left alone:", "", table(["site", "reason"], skipped)]
    trail = s.get("trail", [])
    if trail:
        keys = ["trial", "name", "split", "score", "change", "batches", "seconds", "pruned",
                "note"]
        cut = f", first {MAX_TRAIL_ROWS}" if len(trail) > MAX_TRAIL_ROWS else ""
        out += ["", f"trail ({len(trail)} trial(s){cut}):", "",
                table(keys, [[t.get(k, "") for k in keys] for t in trail[:MAX_TRAIL_ROWS]])]
    return ReportPart("\n".join(out))
