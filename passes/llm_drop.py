"""llm-drop: remove attention (or MLP, or whole-block) sublayers whose output barely changes the
residual stream (He et al., "What Matters in Transformers? Not All Attention is Needed",
arXiv 2406.15786; spec in shared/specs/llm_drop.md).

Score of a sublayer = mean over real calibration tokens of cos(x_t, y_t) in float32, with x the
residual stream entering it and y the stream leaving it: `x + A(LN(x))` in a pre-norm block,
`LN(x + A(x))` in a post-norm block (the norm stays there when the sublayer goes). The most
similar (least important) sublayers are dropped. Dropping is a graph edit: the sublayer's branch
leaves the residual sum (in a parallel block `x + attn(ln(x)) + mlp(ln(x))` only that branch: the
MLP keeps its input and the shared norm), and the sublayer, its own norm and their weights leave
the graph. Every drop is checked to remove exactly its sublayer's parameters (a PassError if
not); each decision reports what it removed. In a parallel block the score of a branch b is
cos(x, x + b).

Iterative mode re-scores on the partially dropped program each round, running every kept
sublayer of a partly dropped layer (the reference's bug skipped the whole layer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from attnc.errors import PassError, RecipeError
from attnc.graph.sublayers import Removal, Sublayer, drop_sublayer, find_sublayers, resolve
from attnc.graph.taps import CosineStat, run_taps
from attnc.recipe.manager import Decision, PassInfo, register_pass
from attnc.recipe.selectors import Selector

from .llm_drop_report import render as render_report

log = logging.getLogger(__name__)

Target = Literal["attention", "mlp", "block", "all"]


@dataclass(frozen=True)
class LLMDropConfig:
    target: Target = "attention"
    count: int | str = 1
    mode: Literal["one-shot", "iterative"] = "one-shot"
    step: int = 1
    max_count: int | None = None
    layers: str | int | tuple[str | int, ...] | None = None
    modules: tuple[str, ...] = ()

    def validate(self) -> None:
        if isinstance(self.count, str) and self.count != "auto":
            raise RecipeError(f"llm-drop count must be a number or 'auto', got {self.count!r}")
        if isinstance(self.count, int) and self.count < 0:
            raise RecipeError(f"llm-drop count must be 0 or more, got {self.count}")
        if self.step < 1:
            raise RecipeError(f"llm-drop step must be at least 1, got {self.step}")
        Selector.parse(self.layers, self.modules)


Unit = Sublayer  # a droppable sublayer: attention call, MLP, or whole block


def find_units(gm) -> list[Unit]:
    """Attention, MLP and block units, keyed by call site (see `attnc.graph.sublayers`)."""
    return find_sublayers(gm)


_KINDS = {
    "attention": {"attention"},
    "mlp": {"mlp"},
    "block": {"block"},
    "all": {"attention", "mlp"},
}


def _eligible(units: list[Unit], cfg: LLMDropConfig) -> list[Unit]:
    kinds = _KINDS[cfg.target]
    sel = Selector.parse(cfg.layers, cfg.modules)
    return [u for u in units if u.kind in kinds and sel.matches(u.layer, u.block)]


class ResidualCosineStat(CosineStat):
    """cos(x, x + branch): a parallel block's sublayer has no node holding x + its output alone."""

    def update(self, x, y, mask):
        super().update(x, x.float() + y.float(), mask)


def _taps(gm, units: list[Unit]) -> dict[str, dict[str, tuple[str, str]]]:
    """Per statistic, the (x, y) nodes of each unit as the graph stands now (a unit of a partly
    dropped block is found again through its branch; a unit that is gone is left out)."""
    groups: dict[str, dict[str, tuple[str, str]]] = {"plain": {}, "residual": {}}
    for u in units:
        where = resolve(gm, u)
        if where is None:
            continue
        stream, out, brs = where
        if u.kind != "block" and u.style == "parallel":
            groups["residual"][u.key] = (stream.name, brs[0].branch.name)
        else:
            groups["plain"][u.key] = (stream.name, out.name)
    return groups


def score_units(program, units: list[Unit], ctx) -> dict[str, float]:
    if ctx.calibration is None:
        raise PassError("llm-drop needs calibration data (--calib)")
    scores: dict[str, float] = {}
    stats = {"plain": CosineStat, "residual": ResidualCosineStat}
    for kind, taps in _taps(program.gm, units).items():
        if taps:
            scores.update(run_taps(program.gm, ctx.calibration.calib, taps, stats[kind]))
    return scores


def drop_report(program, keys: list[str]) -> tuple[object, dict[str, Removal]]:
    """A copy of `program` with the units named by `keys` removed (blocks first), and what each
    drop removed. Every drop is checked to remove exactly its own parameters (PassError if not)."""
    out = program.clone()
    by_key = {u.key: u for u in find_units(program.gm)}
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise PassError(f"llm-drop: no sublayer {missing[0]!r} in the graph")
    units = sorted((by_key[k] for k in keys), key=lambda u: u.kind != "block")
    dropped_blocks = [u for u in units if u.kind == "block"]
    report: dict[str, Removal] = {}
    for u in units:
        if u.kind != "block" and any(set(u.branches) <= set(b.branches) for b in dropped_blocks):
            report[u.key] = Removal(u.key, 0, 0, ())  # went with its block
            continue
        report[u.key] = drop_sublayer(out.gm, u)
    n = sum(r.tensors for r in report.values())
    log.info("llm-drop removed %d sublayer(s) and %d weight tensor(s)", len(keys), n)
    return out, report


def drop_units(program, keys: list[str]):
    """A copy of `program` with the units named by `keys` removed from the graph."""
    return drop_report(program, keys)[0]


def _rank(scores: dict[str, float]) -> list[str]:
    return sorted(scores, key=lambda k: (-scores[k], k))


def plan(program, cfg: LLMDropConfig, ctx) -> list[Decision]:
    units = find_units(program.gm)
    eligible = _eligible(units, cfg)
    if not units:
        raise PassError("llm-drop found no attention sublayer with a residual connection")
    n_max = len(eligible)
    if isinstance(cfg.count, int) and cfg.count > n_max:
        raise RecipeError(
            f"llm-drop count {cfg.count} is out of range: the model has {n_max} eligible "
            f"{cfg.target} sublayer(s)"
        )
    scores = score_units(program, eligible, ctx)
    order = _rank(scores)
    if cfg.mode == "iterative":
        target = n_max if cfg.count == "auto" else cfg.count
        if cfg.max_count is not None:
            target = min(target, cfg.max_count)
        order, scores = _iterative_order(program, eligible, target, cfg.step, ctx, scores)
    chosen, trail = _choose(program, order, cfg, ctx, n_max)
    rank = {k: i + 1 for i, k in enumerate(order)}
    # the drop is checked here (exactly each sublayer's own parameters leave), and reported
    removals = drop_report(program, [k for k in order if k in chosen])[1] if chosen else {}
    decisions = []
    eligible_keys = {u.key for u in eligible}
    for u in units:
        if u.kind not in _KINDS[cfg.target]:
            continue
        if u.key not in eligible_keys:
            decisions.append(Decision(u.key, "skip", "not selected by layers/modules", {}))
            continue
        m = {"cosine": round(scores[u.key], 6), "rank": rank[u.key]}
        if u.key in removals:
            m.update(removals[u.key].metrics())
        verdict = "dropped" if u.key in chosen else "kept"
        reason = f"similarity {scores[u.key]:.4f}, rank {rank[u.key]} of {n_max}: {verdict}"
        decisions.append(Decision(u.key, "drop" if u.key in chosen else "keep", reason, m))
    if trail:
        decisions[0].metrics["auto_trail"] = trail
    return decisions


def _iterative_order(program, eligible, target, step, ctx, first_scores):
    """Drop `step` per round, re-scoring the remaining sublayers on the dropped program."""
    order: list[str] = []
    scores = dict(first_scores)
    current = program
    remaining = [u.key for u in eligible]
    while len(order) < target and remaining:
        if order:
            units = [u for u in eligible if u.key in remaining]  # found again by branch
            scores.update(score_units(current, units, ctx))
        ranked = [k for k in _rank({k: scores[k] for k in remaining})]
        take = ranked[: min(step, target - len(order))]
        order.extend(take)
        remaining = [k for k in remaining if k not in take]
        current = drop_units(program, order)
    order.extend(_rank({k: scores[k] for k in remaining}))
    return order, scores


def _choose(program, order, cfg, ctx, n_max):
    if cfg.count != "auto":
        return set(order[: cfg.count]), []
    if ctx.evaluate is None or ctx.meets_bound is None:
        raise PassError("llm-drop count 'auto' needs a fidelity bound in the recipe")
    cap = n_max if cfg.max_count is None else min(cfg.max_count, n_max)
    best, trail = 0, []
    for n in range(1, cap + 1):
        metrics = ctx.evaluate(drop_units(program, order[:n]))
        ok = ctx.meets_bound(metrics)
        trail.append({"count": n, **{k: round(float(v), 6) for k, v in metrics.items()}, "ok": ok})
        if not ok:
            break
        best = n
    return set(order[:best]), trail


def apply(program, decisions: list[Decision], cfg: LLMDropConfig):
    keys = [d.site for d in decisions if d.action == "drop"]
    if not keys:
        return program
    return drop_units(program, keys)


register_pass(
    PassInfo(
        id="llm-drop",
        config_cls=LLMDropConfig,
        plan=plan,
        apply=apply,
        exact=False,
        summary="drop redundant attention / MLP / block sublayers by input-output cosine",
        paper="arXiv 2406.15786",
        report=render_report,
    )
)
