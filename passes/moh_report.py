"""moh's section of report.md: per site (layer) the shared heads, the head importance and how it
was measured, the load per head (share of calibration tokens that run it), the gate values and
the local fidelity cost (relative error and cosine of the gated attention branch against the
original on calibration tokens, before and after distillation); then the back-off trail (the
task metrics of each active fraction tried on the calibration batches) and the distillation
trails."""

from __future__ import annotations

from attnc.report.section import PassSection, ReportPart, fmt, table


def _fmt(xs) -> str:
    return " ".join(f"{x:.2f}" for x in xs or [])


def _cost(m: dict) -> str:
    if "branch_rel_err" not in m:
        return ""
    out = f"{m['branch_rel_err']:.4f} (cos {m['branch_cosine']:.4f})"
    if "before_distill" in m:
        out = f"{m['before_distill']['branch_rel_err']:.4f} -> {out}"
    return out


_TASK = ("bits_per_byte_increase", "top1_agreement", "kl", "embedding_cosine",
         "retrieval_agreement", "prediction_agreement", "cosine", "sqnr_db")


def _trail_rows(trail: list[dict]) -> tuple[list[str], list[list]]:
    have = set(dict.fromkeys(k for t in trail for k in t))
    keys = [k for k in _TASK if k in have][:5]
    rows = [[t["active"], t.get("sites", ""), t.get("heads_per_token", ""),
             "meets" if t["ok"] else "misses", *(fmt(t.get(k, "")) for k in keys),
             t.get("next", t.get("note", ""))] for t in trail]
    return ["active", "sites routed", "heads/token", "bound", *keys, "then"], rows


def render(section: PassSection) -> ReportPart:
    routed = [d for d in section.decisions if d.action == "route"]
    cfg = section.config
    first = next((d.metrics for d in section.decisions if d.metrics.get("back_off")), {})
    used = first.get("active_used", cfg.get("active"))
    out = [
        f"{len(routed)} of {len(section.decisions)} site(s) routed: {used} of the heads per "
        f"token (asked {cfg.get('active')}), {cfg.get('shared')} shared by "
        f"{cfg.get('importance', 'output-norm')} importance, router {cfg.get('router')}, gates "
        f"{cfg.get('gates')}, distill_steps {cfg.get('distill_steps')}. Training-free MoH is an "
        f"approximation: the build's fidelity bound is what guards it.",
        "",
        table(
            ["site", "layer", "action", "heads/token", "shared heads", "importance",
             "load per head", "gate values", "branch rel. error (cosine)", "reason"],
            [[d.site, d.metrics.get("layer", ""), d.action, d.metrics.get("active_heads", ""),
              d.metrics.get("shared_heads", ""), _fmt(d.metrics.get("importance")),
              _fmt(d.metrics.get("load")), _fmt(d.metrics.get("gate_values")),
              _cost(d.metrics), d.reason] for d in section.decisions],
        ),
    ]
    loss = next((d.metrics["importance_loss"] for d in routed if "importance_loss" in d.metrics),
                None)
    if loss:
        out += ["", f"importance: rise of {loss['objective']} when one head is masked, over "
                    f"{loss['batches']} calibration batch(es) (baseline {loss['baseline']:g}, "
                    f"{loss['seconds']:g} s)."]
    if first.get("back_off"):
        head, rows = _trail_rows(first["back_off"])
        out += ["", f"back-off on the calibration batches (by {cfg.get('back_off_by', 'sites')}: "
                    f"one step while the recipe's fidelity bound is missed):", "",
                table(head, rows)]
    trails = [(d.site, d.metrics["distill_trail"]) for d in routed
              if d.metrics.get("distill_trail")]
    if trails:
        out += ["", "distillation (relative error of the gated branch, per step):", ""]
        out.append(table(["site", "trail"], [[s, " ".join(f"{t['step']}:{t['rel_err']:.4f}"
                                                         for t in tr)] for s, tr in trails]))
    return ReportPart("\n".join(out))
