"""The sparse pass's acceptance rule: whether a candidate pattern keeps enough of a head's
attention, from the kept-mass statistics of `attnc.graph.stats` (mean, low quantile, density per
head). The rule is described in passes/sparse.py's docstring; `rule_text` says it in words for
the report's reasons."""

from __future__ import annotations

import numpy as np

TAIL_FACTOR = 5.0  # mean+tail: the quantile query may lose this many times 1 - min_mass


def tail_floor(cfg) -> float | None:
    """The floor on the low quantile of the kept mass (mean+tail), or None."""
    if cfg.statistic != "mean+tail":
        return None
    if cfg.tail_mass is not None:
        return cfg.tail_mass
    return max(0.0, 1.0 - TAIL_FACTOR * (1.0 - cfg.min_mass))


def rule_text(cfg) -> str:
    """The acceptance rule in words, for reasons and the report."""
    q = f"{100 * cfg.quantile:g}th percentile"
    if cfg.statistic == "quantile":
        return f"{q} of kept mass >= {cfg.min_mass:g}"
    if cfg.statistic == "mean":
        return f"mean kept mass >= {cfg.min_mass:g}"
    return f"mean kept mass >= {cfg.min_mass:g} and {q} >= {tail_floor(cfg):.3g}"


def stat(pm, cfg) -> np.ndarray:
    """The figure compared with min_mass (and plotted): the quantile or the mean."""
    return pm.quantile if cfg.statistic == "quantile" else pm.mean


def stat_name(cfg) -> str:
    return "quantile" if cfg.statistic == "quantile" else "mean"


def accepts(pm, h: int, cfg) -> bool:
    """Whether pattern mass `pm` is kept enough for head h under the rule."""
    if not stat(pm, cfg)[h] >= cfg.min_mass:
        return False
    floor = tail_floor(cfg)
    if floor is not None and not pm.quantile[h] >= floor:
        return False
    return cfg.min_mass < 1 or pm.density[h] >= 1 - 1e-9  # 1.0: exact patterns only
