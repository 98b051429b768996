"""moh's section of report.md: per routed site the shared heads, the load per head (share of
calibration tokens that run it), the gate values and the local fidelity cost (cosine of the
gated attention branch against the original on calibration tokens)."""

from __future__ import annotations

from attnc.report.section import PassSection, ReportPart, table


def _fmt(xs) -> str:
    return " ".join(f"{x:.2f}" for x in xs or [])


def render(section: PassSection) -> ReportPart:
    routed = [d for d in section.decisions if d.action == "route"]
    cfg = section.config
    out = [
        f"{len(routed)} of {len(section.decisions)} site(s) routed: {cfg.get('active')} of the "
        f"heads per token, {cfg.get('shared')} shared, router {cfg.get('router')}, gates "
        f"{cfg.get('gates')}, distill_steps {cfg.get('distill_steps')}. Training-free MoH is an "
        f"approximation: the build's fidelity bound is what guards it.",
        "",
        table(
            ["site", "action", "heads/token", "shared", "load per head", "gate values",
             "branch cosine", "reason"],
            [[d.site, d.action, d.metrics.get("active_heads", ""),
              d.metrics.get("shared_heads", ""), _fmt(d.metrics.get("load")),
              _fmt(d.metrics.get("gate_values")), d.metrics.get("branch_cosine", ""),
              d.reason] for d in section.decisions],
        ),
    ]
    trails = [(d.site, d.metrics["distill_trail"]) for d in routed
              if d.metrics.get("distill_trail")]
    if trails:
        out += ["", "distillation (relative error of the gated branch, per step):", ""]
        out.append(table(["site", "trail"], [[s, " ".join(f"{t['step']}:{t['rel_err']:.4f}"
                                                         for t in tr)] for s, tr in trails]))
    return ReportPart("\n".join(out))
