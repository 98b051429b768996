"""The sparse pass's back-off (passes/sparse.py's docstring): check the chosen rewrite against
the recipe's fidelity bound on the calibration batches and raise min_mass while it misses."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from attnc.recipe.manager import Decision

log = logging.getLogger("passes.sparse")


def _heads(decided: list[Decision]) -> int:
    return sum(d.metrics["heads"] - d.metrics["dense_heads"] for d in decided
               if d.action == "sparse")


def back_off(program, decide, cfg, ctx, apply) -> list[Decision]:
    """Check the chosen rewrite against the recipe's fidelity bound on the calibration batches
    (the held-out batches stay for the build's verification); while it misses, raise min_mass
    to 1 - (1 - min_mass) / 2 and decide again from the same statistics, `back_off` times at
    most; past that every site stays dense. The trail goes into each decision's metrics."""
    decided = decide(cfg)
    evaluate, meets_bound = getattr(ctx, "evaluate", None), getattr(ctx, "meets_bound", None)
    if cfg.back_off == 0 or evaluate is None or meets_bound is None:
        return decided
    bound = getattr(getattr(ctx, "fidelity", None), "set_bounds", dict)()
    trail: list[dict[str, Any]] = []
    c = cfg
    for step in range(cfg.back_off + 1):
        if not any(d.action == "sparse" for d in decided):
            break
        metrics = evaluate(apply(program, decided, c))
        ok = bool(meets_bound(metrics))
        trail.append({"min_mass": c.min_mass, "sites": sum(d.action == "sparse" for d in decided),
                      "heads": _heads(decided), "ok": ok,
                      **{k: round(float(v), 6) for k, v in metrics.items()
                         if isinstance(v, (int, float))}})
        log.info("sparse: min_mass %g, %d head(s): %s the fidelity bound on calibration",
                 c.min_mass, trail[-1]["heads"], "meets" if ok else "misses")
        if ok:
            break
        if step == cfg.back_off:
            decided = [_dense(d, f"every setting tried missed the fidelity bound {bound} on the "
                              f"calibration batches (min_mass up to {c.min_mass:g})")
                       if d.action == "sparse" else d for d in decided]
            break
        c = dataclasses.replace(c, min_mass=1.0 - (1.0 - c.min_mass) / 2.0)
        decided = decide(c)
    if not trail:
        return decided
    note = (f"min_mass raised to {c.min_mass:g} to meet the fidelity bound {bound} on "
            f"the calibration batches" if c.min_mass != cfg.min_mass else None)
    return with_trail(decided, trail, {"min_mass_used": c.min_mass}, note, ("sparse",))


def with_trail(decided: list[Decision], trail: list[dict], used: dict, note: str | None,
               note_actions: tuple[str, ...] | None = None) -> list[Decision]:
    """The back-off's record on every decided site (skips untouched): the trail and the
    setting used in the metrics, and `note` before the reason of the sites whose action is in
    `note_actions` (all when None). Shared by the passes that back off (sparse, moh)."""
    out = []
    for d in decided:
        if d.action == "skip":
            out.append(d)
            continue
        reason = d.reason
        if note and (note_actions is None or d.action in note_actions):
            reason = f"{note}; {reason}"
        out.append(Decision(d.site, d.action, reason, {**d.metrics, "back_off": trail, **used}))
    return out


def _dense(d: Decision, reason: str) -> Decision:
    return Decision(d.site, "keep", reason, {k: v for k, v in d.metrics.items()
                                             if k not in ("op", "params")})
