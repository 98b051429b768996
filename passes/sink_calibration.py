"""sink-calibration: ACT, "Unveiling and Harnessing Hidden Attention Sinks" (arXiv 2406.15765;
spec in shared/specs/sink_calibration.md). The one pass here that aims to make a model better.

On selected heads, keys that soak up attention (mean attention received per query that can see
them above `threshold`), except the first such key, get their attention scaled by `beta` and the
freed mass goes back to the rest of the row (`attnc::sink_calibrated_attention`, fused: the
output with the recalibration folded in; heads not selected are bit-identical).

Heads: `auto` searches with the core's trial runner (`PassContext.trials`): every eligible site
becomes the fused op with all heads off; its per-head `enable` buffer is the knob. Each head
alone is scored on the search half of the calibration batches (single-head screening, as in the
paper); the heads that improve the objective are then added greedily, best first, on the other
half held apart, keeping each only if the set still improves there. No head improves: none is
selected, and the report says so. An explicit `heads: {layer: [heads]}` skips the search.

Objective: `auto` is next-token NLL on the calibration text for causal LMs (an improvement, not
fidelity to the original). Any other model needs `objective: path/to/file.py:fn` with
`fn(outputs, batch) -> float` (higher is better, e.g. accuracy on labelled calibration data;
return a loss negated): naming a file in the recipe is the user's explicit choice to run that
file's code. Without either the pass refuses with a one-line error.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from attnc.errors import PassError, RecipeError
from attnc.graph.calls import bind, read_call
from attnc.graph.replace import replace_attention_node
from attnc.graph.sites import find_sites
from attnc.kernels.patterns import site_reason
from attnc.recipe.manager import Decision, PassInfo, register_pass
from attnc.recipe.selectors import Selector
from attnc.recipe.trials import Objective

from .sink_calibration_report import render as render_report

log = logging.getLogger(__name__)
OP = "attnc::sink_calibrated_attention"




@dataclass(frozen=True)
class SinkCalibrationConfig:
    beta: float = 0.4
    threshold: float = 0.1
    heads: str | dict = "auto"  # auto, or {layer: [heads]}
    objective: str = "auto"  # auto (next-token NLL, causal LMs) or path/to/file.py:fn
    max_trials: int = 512
    min_gain: float = 0.0  # relative improvement a head must bring to be kept
    layers: str | int | tuple[str | int, ...] | None = None
    modules: tuple[str, ...] = field(default=())

    def validate(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise RecipeError(f"sink-calibration beta must be in [0, 1], got {self.beta}")
        if not self.threshold > 0:
            raise RecipeError(f"sink-calibration threshold must be > 0, got {self.threshold}")
        if self.max_trials < 1:
            raise RecipeError(f"sink-calibration max_trials must be >= 1, got {self.max_trials}")
        if self.min_gain < 0:
            raise RecipeError(f"sink-calibration min_gain must be >= 0, got {self.min_gain}")
        explicit_heads(self.heads)
        if self.objective != "auto" and ":" not in self.objective:
            raise RecipeError(f"sink-calibration objective must be auto or file.py:fn, got "
                              f"{self.objective!r}")
        Selector.parse(self.layers, self.modules)


def explicit_heads(heads: Any) -> dict[int, list[int]] | None:
    """{layer: [heads]} from the recipe, or None for auto."""
    if heads == "auto":
        return None
    if not isinstance(heads, dict):
        raise RecipeError(f"sink-calibration heads must be auto or {{layer: [heads]}}, got "
                          f"{heads!r}")
    out: dict[int, list[int]] = {}
    for layer, hs in heads.items():
        hs = [hs] if isinstance(hs, int) else hs
        try:
            out[int(layer)] = sorted({int(h) for h in hs})
        except (TypeError, ValueError):
            raise RecipeError(f"sink-calibration heads: {layer!r}: {hs!r} is not a list of "
                              f"head indices") from None
    return out


# ------------------------------------------------------------------------------ objective


def _logits(out: Any) -> torch.Tensor:
    from attnc.check.fidelity import _first

    return _first(out).float()


def next_token_nll(out: Any, batch) -> tuple[float, float]:
    """(summed NLL in nats, number of predicted real tokens) of one batch."""
    logits = _logits(out)[:, :-1]  # (B, S-1, V)
    ids = batch.args[0]
    mask = batch.token_mask if batch.token_mask is not None else torch.ones_like(ids)
    valid = (mask[:, 1:] * mask[:, :-1]).bool()  # (B, S-1)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                          reduction="none").reshape(valid.shape)
    return float(nll[valid].sum()), float(valid.sum())


def load_objective(spec: str, kind: str) -> Objective:
    if spec == "auto":
        if kind != "causal-lm":
            raise PassError(
                f"sink-calibration needs an objective that measures improvement: next-token NLL "
                f"works for causal LMs only; for this {kind} model give objective: file.py:fn "
                f"(fn(outputs, batch) -> float, higher is better) with labelled calibration data")
        return Objective(next_token_nll, "next-token NLL (nats/token)", higher_is_better=False)
    path, _, name = spec.rpartition(":")
    p = Path(path).expanduser()
    if not p.is_file():
        raise RecipeError(f"sink-calibration objective file {path!r} does not exist")
    mod_spec = importlib.util.spec_from_file_location(f"attnc_objective_{p.stem}", p)
    mod = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(mod)  # the recipe named this file: the user's choice
    except Exception as exc:  # noqa: BLE001
        raise RecipeError(f"sink-calibration objective {spec!r} failed to load: {exc}") from exc
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise RecipeError(f"sink-calibration objective: {path} has no function {name!r}")
    return Objective(fn, f"{p.name}:{name} (higher is better)", higher_is_better=True)


# ----------------------------------------------------------------------------------- plan


def _key(site) -> str:
    return site.module or site.node


def _skip_reason(site, sel: Selector) -> str | None:
    if not sel.matches(site.layer, site.module):
        return "not selected by layers/modules"
    if site.pattern != "dense":
        return f"already {site.pattern}"
    return site_reason(site, "sink calibration", self_only=True, causal=site.causal)


def calibrated_program(program, sites, cfg: SinkCalibrationConfig,
                       enable: dict[str, list[float]] | None = None):
    """(a copy of `program` whose `sites` run the fused op, knob name -> its enable buffer):
    every head off unless `enable` (site node -> per-head 0/1) says otherwise."""
    out = program.clone()
    nodes = {n.name: n for n in out.gm.graph.nodes}
    knobs: dict[str, torch.Tensor] = {}
    for site in sites:
        H = site.num_heads
        en = torch.tensor((enable or {}).get(site.node, [0.0] * H), dtype=torch.float32)
        new = replace_attention_node(out.gm, nodes[site.node], OP, enable=en,
                                     beta=torch.full((H,), float(cfg.beta)),
                                     threshold=torch.full((H,), float(cfg.threshold)))
        knobs[site.node] = getattr(out.gm, bind(new)["enable"].target)
    out.gm.graph.lint()
    out.gm.recompile()
    return out, knobs


def _head_name(site, h: int) -> str:
    return f"L{site.layer}.h{h}" if site.layer is not None else f"{_key(site)}.h{h}"


def plan(program, cfg: SinkCalibrationConfig, ctx) -> list[Decision]:
    sel = Selector.parse(cfg.layers, cfg.modules)
    listed = explicit_heads(cfg.heads)
    decisions: dict[int, Decision] = {}
    eligible = []
    for site in program.sites:
        reason = _skip_reason(site, sel)
        if reason is None and listed is not None and site.layer not in listed:
            reason = "no heads listed for this layer"
        base = {"index": site.index, "node": site.node, "layer": site.layer}
        if reason is not None:
            decisions[site.index] = Decision(_key(site), "skip", reason, base)
        else:
            eligible.append(site)
    if listed is not None:
        _check_listed(listed, eligible, program.sites)
    if not eligible:
        return [decisions[i] for i in sorted(decisions)]
    objective = load_objective(cfg.objective, program.kind)
    work, knobs = calibrated_program(program, eligible, cfg)
    runner = ctx.trials(work, objective, knobs, budget=cfg.max_trials, prune_after=1,
                        prune_margin=0.02, patience=None)
    onehot = {}
    for site in eligible:
        for h in range(site.num_heads):
            v = [0.0] * site.num_heads
            v[h] = 1.0
            onehot[(site.node, h)] = (_head_name(site, h), {site.node: v})
    wanted = [k for k in onehot if listed is None or k[1] in listed.get(_layer(k, eligible), [])]
    singles = runner.screen([onehot[k] for k in wanted], "search")
    single = {k: t for k, t in zip(wanted, singles, strict=False)}
    rel = {k: t.gain / max(abs(t.baseline), 1e-12) for k, t in single.items()}
    if listed is None:
        good = sorted((k for k in single if not single[k].pruned and rel[k] > cfg.min_gain),
                      key=lambda k: -rel[k])
    else:
        good = [k for k in wanted if k in single]
    if listed is None:
        kept, checks = runner.greedy([onehot[k] for k in good], _combine, "check",
                                     min_gain=cfg.min_gain)
        chosen = {k for k in good if onehot[k][0] in set(kept)}
        combined = next((t for t in reversed(checks) if t.note == "kept"), None)
    else:  # the recipe's list is kept as it is; the check only measures it
        chosen = set(good)
        setting: dict = {}
        for k in good:
            setting = _combine(setting, onehot[k][1])
        runner.prune_after = None
        combined = runner.run("listed heads", setting, "check") if setting else None
    sign = 1.0 if objective.higher_is_better else -1.0
    summary = {
        "objective": objective.name, "mode": "auto" if listed is None else "explicit",
        "beta": cfg.beta, "threshold": cfg.threshold,
        "baseline_search": round(sign * runner.baseline("search"), 6),
        "baseline_check": round(sign * runner.baseline("check"), 6),
        "combined_change": round(sign * combined.gain, 6) if combined else 0.0,
        "combined_relative": round(sign * combined.gain / max(abs(combined.baseline), 1e-12),
                                   6) if combined else 0.0,
        "search_batches": len(runner.search), "check_batches": len(runner.check),
        "trials": len(runner.trials), "budget": cfg.max_trials,
        "seconds_per_batch_run": round(runner.per_trial_seconds(), 4),
        "seconds_per_trial": round(sum(t.seconds for t in runner.trials)
                                   / max(len(runner.trials), 1), 3),
        "cpu_seconds_per_trial": round(sum(t.cpu_seconds for t in runner.trials)
                                       / max(len(runner.trials), 1), 3),
        "selected": sorted(onehot[k][0] for k in chosen),
        "trail": runner.trail(),
    }
    for i, site in enumerate(eligible):
        heads = []
        for h in range(site.num_heads):
            k = (site.node, h)
            t = single.get(k)
            heads.append({"head": h, "name": onehot[k][0],
                          "single_change": round(sign * t.gain, 6) if t else None,
                          "single_relative": round(sign * rel[k], 6) if t else None,
                          "kept": k in chosen, "why": _why(k, t, rel, good, chosen, cfg,
                                                           listed, wanted)})
        en = [1.0 if (site.node, h) in chosen else 0.0 for h in range(site.num_heads)]
        m = {"index": site.index, "node": site.node, "layer": site.layer, "heads": heads,
             "enable": en, "beta": cfg.beta, "threshold": cfg.threshold}
        if i == 0:
            m["search"] = summary
        n = int(sum(en))
        if n:
            reason = f"calibrate head(s) {[h for h in range(len(en)) if en[h]]}"
        else:
            reason = "no head of this site improves the objective"
        decisions[site.index] = Decision(_key(site), "calibrate" if n else "keep", reason, m)
    log.info("sink-calibration: %d trial(s), selected %s", len(runner.trials),
             summary["selected"] or "no heads")
    return [decisions[i] for i in sorted(decisions)]


def _layer(k, eligible) -> int | None:
    return next(s.layer for s in eligible if s.node == k[0])


def _check_listed(listed: dict[int, list[int]], eligible, sites) -> None:
    by_layer = {s.layer: s for s in eligible}
    for layer, hs in listed.items():
        if layer not in by_layer:
            known = sorted({s.layer for s in sites if s.layer is not None})
            raise RecipeError(f"sink-calibration heads: layer {layer} has no eligible attention "
                              f"site (layers: {known})")
        bad = [h for h in hs if not 0 <= h < by_layer[layer].num_heads]
        if bad:
            raise RecipeError(f"sink-calibration heads: layer {layer} has no head {bad[0]} "
                              f"({by_layer[layer].num_heads} heads)")


def _why(k, t, rel, good, chosen, cfg, listed, wanted) -> str:
    if listed is not None:
        return "listed in the recipe" if k in wanted else "not listed"
    if t is None:
        return "not tried: the trial budget ran out"
    if t.pruned:
        return "single-head trial stopped early: clearly worse"
    if k not in good:
        return f"alone it does not improve the objective (relative {rel[k]:+.4g})"
    if k in chosen:
        return "improves alone and together with the heads kept before it (held-apart batches)"
    return "improves alone, but not on top of the better heads (held-apart batches)"


def _combine(a: dict, b: dict) -> dict:
    out = {k: list(v) for k, v in a.items()}
    for k, v in b.items():
        out[k] = [max(x, y) for x, y in zip(out.get(k, [0.0] * len(v)), v, strict=True)]
    return out


# ---------------------------------------------------------------------------------- apply


def apply(program, decisions: list[Decision], cfg: SinkCalibrationConfig):
    todo = [d for d in decisions if d.action == "calibrate"]
    if not todo:
        return program
    sites = {s.node: s for s in program.sites}
    chosen = [sites[d.metrics["node"]] for d in todo]
    out, _ = calibrated_program(program, chosen, cfg, {d.metrics["node"]: d.metrics["enable"]
                                                       for d in todo})
    got = find_sites(out.gm)
    for d in todo:
        i = d.metrics["index"]
        if i >= len(got) or got[i].pattern != "sink_calibrated":
            raise PassError(f"sink-calibration: site {d.site} does not read back as calibrated")
        call = read_call(next(n for n in out.gm.graph.nodes if n.name == got[i].node))
        if call is None:
            raise PassError(f"sink-calibration: site {d.site} is gone after the rewrite")
    return out


register_pass(
    PassInfo(
        id="sink-calibration",
        config_cls=SinkCalibrationConfig,
        plan=plan,
        apply=apply,
        exact=False,
        summary="ACT: scale down hidden attention sinks on the heads where that improves the "
                "objective (next-token NLL, or a user's metric), searched by trials",
        paper="ACT (arXiv 2406.15765)",
        report=render_report,
    )
)
