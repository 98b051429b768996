"""moh's back-off: check the routed program against the recipe's fidelity bound on the
calibration batches (the build's `ctx.evaluate` / `ctx.meets_bound`, as the sparse pass's
back-off does; the held-out batches stay for the build's verification) and, while it misses,
back off one step, `back_off` steps at most; past that every site runs all heads. A step is
- `back_off_by: sites` (default): the routed site with the largest branch error on calibration
  tokens runs all its heads again; the others keep the asked fraction (per-layer fractions, as
  MoH's own configs use);
- `back_off_by: active`: `active` rises to 1 - (1 - active) / 2 on every site, decided again from
  the same statistics.
The trail (task metrics of each step) goes into each decision's metrics."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from attnc.passes.sparse_backoff import with_trail
from attnc.recipe.manager import Decision

log = logging.getLogger("passes.moh")


def _unroute(decided: list[Decision], dense: set[str], why: dict[str, str]) -> list[Decision]:
    return [_keep(d, why[d.site]) if d.action == "route" and d.site in dense else d
            for d in decided]


def back_off(program, decide, cfg, ctx, apply) -> list[Decision]:
    decided = decide(cfg)
    evaluate, meets_bound = getattr(ctx, "evaluate", None), getattr(ctx, "meets_bound", None)
    if cfg.back_off == 0 or evaluate is None or meets_bound is None:
        return decided
    bound = getattr(getattr(ctx, "fidelity", None), "set_bounds", dict)()
    trail: list[dict[str, Any]] = []
    c, dense, why = cfg, set(), {}
    for step in range(cfg.back_off + 1):
        routed = [d for d in decided if d.action == "route"]
        if not routed:
            trail.append({"active": c.active, "sites": 0, "ok": True,
                          "note": "every site runs all heads (identity)"})
            break
        metrics = evaluate(apply(program, decided, c))
        ok = bool(meets_bound(metrics))
        trail.append({"active": c.active, "sites": len(routed),
                      "heads_per_token": [d.metrics["active_heads"] for d in routed], "ok": ok,
                      **{k: round(float(v), 6) for k, v in metrics.items()
                         if isinstance(v, (int, float))}})
        log.info("moh: active %g on %d site(s): %s the fidelity bound on calibration", c.active,
                 len(routed), "meets" if ok else "misses")
        if ok:
            break
        if step == cfg.back_off:
            decided = [_keep(d, f"every back-off step tried ({cfg.back_off}, by "
                                f"{cfg.back_off_by}) missed the fidelity bound {bound} on the "
                                f"calibration batches") if d.action == "route" else d
                       for d in decided]
            break
        if cfg.back_off_by == "sites":
            worst = max(routed, key=lambda d: d.metrics["branch_rel_err"])
            dense.add(worst.site)
            why[worst.site] = (f"un-routed by the back-off (step {step + 1}): its branch error "
                               f"{worst.metrics['branch_rel_err']:.4f} was the largest while "
                               f"the build missed the fidelity bound {bound} on calibration")
            trail[-1]["next"] = f"un-route {worst.site}"
            decided = _unroute(decided, dense, why)
        else:
            c = dataclasses.replace(c, active=1.0 - (1.0 - c.active) / 2.0)
            decided = _unroute(decide(c), dense, why)
    note = (f"active raised from {cfg.active:g} to {c.active:g} to meet the fidelity "
            f"bound {bound} on the calibration batches" if c.active != cfg.active else None)
    return with_trail(decided, trail, {"active_used": c.active}, note)


def _keep(d: Decision, reason: str) -> Decision:
    """`d`'s site runs all heads again; its fitted figures stay in the metrics for the report."""
    m = {k: v for k, v in d.metrics.items() if k != "params"}
    if "heads" in m:
        m["routed_heads_tried"], m["active_heads"] = m.get("active_heads"), m["heads"]
        m["load"] = [1.0] * m["heads"]
    return Decision(d.site, "keep", reason, m)
