"""sparse: rewrite attention sites to a sparse pattern op where the calibration data shows the
pattern keeps `min_mass` of the attention and the cost model predicts a speed-up at the build's
target length (spec: shared/specs/sparse_patterns.md; DuoAttention / MInference-style offline
per-head selection, training-free).

Per site (and per head with `granularity: head`), the kept mass of every candidate pattern is
measured on the calibration batches (`attnc.graph.stats`, padding masked): for each real query,
the share m_i of its attention the pattern keeps. The default rule (`statistic: mean+tail`)
accepts a pattern for a head when both hold:

- the mean of m_i over the calibration queries is at least `min_mass` (on average each query
  keeps `min_mass`: the mass the rewrite drops is at most 1 - min_mass per query, averaged), and
- the low quantile (`quantile`, 0.05) of m_i is at least `tail_mass`, by default
  1 - 5 (1 - min_mass) (0.75 at min_mass 0.95; `sparse_rule.TAIL_FACTOR`): 95% of the queries
  lose at most 5 times the average allowance, so the loss is not concentrated on a few queries.
  The quantile comes from a histogram that never overstates the kept mass.

`statistic: quantile` asks the 5th percentile itself to reach `min_mass` (95% of the queries
keep min_mass each: on real weights it rewrites almost nothing, see benchmarks/sparse_fidelity.py);
`statistic: mean` drops the tail floor. The mean, the quantile and the floor are all reported.
`min_mass: 1.0` accepts only patterns that keep every key (exact).

Per family of candidates (one op with shared parameters: windows with n sinks, 1-D/2-D/3-D
neighborhoods, block layouts; `sparse_candidates.py`), each head gets the sparsest member that
keeps `min_mass` (or stays dense: window -1), or with `granularity: site` all heads one member.
The site takes the family with the lowest density at the target length whose predicted
speed-up (`sparse_cost.py`) is at least `min_speedup`; otherwise it stays dense, with the reason.
Back-off: the chosen rewrite is then run on the calibration batches and checked against the
recipe's fidelity bound (the build's default bound when the recipe sets none; the held-out
batches stay for the build's own verification). While it misses, min_mass is raised to
1 - (1 - min_mass) / 2 (0.95, 0.975, 0.9875, ...) and the heads are chosen again from the same
statistics, `back_off` times at most (4); past that every site stays dense. The trail (min_mass,
heads, metrics, met) is in each decision and the report. Kept mass is a proxy: on an
undertrained classifier with small margins, 5% of the mass dropped in every head flips
predictions that the bound catches (benchmarks/sparse_fidelity.py, the ViT).

`apply` swaps each chosen call for the pattern op (`attnc.graph.replace`), carrying the site's
mask as the op's key padding mask, then reads the sites back and checks each shows its pattern.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from attnc.errors import PassError, RecipeError
from attnc.graph.calls import read_call
from attnc.graph.replace import replace_attention_node
from attnc.graph.sites import find_sites
from attnc.graph.stats_collect import StatsSpec, collect_site_stats
from attnc.kernels import masks
from attnc.kernels.patterns import site_reason
from attnc.kernels.sliding_window import onnx_form
from attnc.recipe.manager import Decision, PassInfo, register_pass
from attnc.recipe.selectors import Selector

from . import sparse_cost as cost
from .sparse_backoff import back_off
from .sparse_candidates import (
    PATTERN_NAMES,
    Family,
    SiteInfo,
    families,
    read_layout_file,
    vision_grid,
)
from .sparse_report import render as render_report
from .sparse_rule import accepts as _accepts
from .sparse_rule import rule_text, tail_floor
from .sparse_rule import stat as _stat
from .sparse_rule import stat_name as _name

log = logging.getLogger(__name__)

OPS = {"window": "attnc::sliding_window_attention",
       "neighborhood": "attnc::neighborhood_attention",
       "block": "attnc::block_sparse_attention"}
READ_BACK = {"window": "sliding_window", "neighborhood": "neighborhood", "block": "block_sparse"}


@dataclass(frozen=True)
class SparseConfig:
    min_mass: float = 0.95
    patterns: str | tuple[str, ...] = "auto"
    granularity: Literal["site", "head"] = "head"
    target_length: int | None = None
    backend: Literal["auto", "onnxruntime-cpu", "cuda", "torch-cpu"] = "auto"
    min_speedup: float = 1.1
    statistic: Literal["mean+tail", "quantile", "mean"] = "mean+tail"
    quantile: float = 0.05
    tail_mass: float | None = None  # mean+tail: the quantile's floor (None: from min_mass)
    sinks: int = 4
    windows: tuple[int | float, ...] = ()
    block_size: int | None = None
    layout_file: str | None = None
    grid: tuple[int, ...] = ()
    layers: str | int | tuple[str | int, ...] | None = None
    modules: tuple[str, ...] = ()
    back_off: int = 4  # times min_mass may be raised to meet the fidelity bound (0: never)

    def validate(self) -> None:
        if not 0.0 < self.min_mass <= 1.0:
            raise RecipeError(f"sparse min_mass must be in (0, 1], got {self.min_mass}")
        pats = (self.patterns,) if isinstance(self.patterns, str) else self.patterns
        if pats != ("auto",):
            bad = [p for p in pats if p not in PATTERN_NAMES]
            if bad or not pats:
                raise RecipeError(f"sparse patterns: unknown pattern {bad[0] if bad else '[]'!r}",
                                  f"auto, or a list of {', '.join(PATTERN_NAMES)}")
            if "layout" in pats and not self.layout_file:
                raise RecipeError("sparse patterns lists 'layout' but no layout_file is given")
        if self.target_length is not None and self.target_length < 2:
            raise RecipeError(f"sparse target_length must be at least 2, got {self.target_length}")
        if not (self.min_speedup >= 0 and math.isfinite(self.min_speedup)):
            raise RecipeError(f"sparse min_speedup must be a number >= 0, got {self.min_speedup}")
        if not 0.0 < self.quantile < 1.0:
            raise RecipeError(f"sparse quantile must be in (0, 1), got {self.quantile}")
        if self.tail_mass is not None and not 0.0 <= self.tail_mass <= 1.0:
            raise RecipeError(f"sparse tail_mass must be in [0, 1], got {self.tail_mass}")
        if self.back_off < 0:
            raise RecipeError(f"sparse back_off must be >= 0, got {self.back_off}")
        if self.sinks < 0:
            raise RecipeError(f"sparse sinks must be >= 0, got {self.sinks}")
        for w in self.windows:
            if (isinstance(w, float) and not 0 < w <= 1) or (isinstance(w, int) and w < 1):
                raise RecipeError(f"sparse windows: {w!r} is neither a size >= 1 nor a fraction "
                                  f"in (0, 1] of the target length")
        if self.block_size is not None and self.block_size < 1:
            raise RecipeError(f"sparse block_size must be >= 1, got {self.block_size}")
        if self.grid and (not 1 <= len(self.grid) <= 3 or min(self.grid) < 1):
            raise RecipeError(f"sparse grid {list(self.grid)} needs 1-3 positive sizes")
        if self.layout_file:
            read_layout_file(self.layout_file, self.block_size)
        Selector.parse(self.layers, self.modules)


# ------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Option:
    family: Family
    choice: tuple[int | None, ...]  # member per head, None: dense head
    pred: cost.Prediction
    params: dict[str, Any]  # JSON-able op parameters (a block layout as its recipe)


def _key(site) -> str:
    return site.module or site.node


def _skip_reason(site, sel: Selector) -> str | None:
    if not sel.matches(site.layer, site.module):
        return "not selected by layers/modules"
    if site.pattern != "dense":
        return f"already {site.pattern}"
    if site.window is not None:
        return f"already has a causal window of {site.window}"
    return site_reason(site, "a sparse pattern", self_only=True, causal=site.causal)


def _site_info(program, site, batches, cfg) -> SiteInfo:
    node = next(n for n in program.gm.graph.nodes if n.name == site.node)
    sq = read_call(node).q.meta["val"].shape[-2]
    if isinstance(sq, int):
        note = ""
        if cfg.target_length and cfg.target_length != sq:
            note = f"target_length {cfg.target_length} ignored: the site's length is fixed at {sq}"
        grid, g = None, 0
        if cfg.grid:
            if math.prod(cfg.grid) <= sq:
                grid, g = tuple(cfg.grid), sq - math.prod(cfg.grid)
            else:
                note = f"grid {list(cfg.grid)} holds more than the site's {sq} tokens"
        else:
            found = vision_grid(program, sq)
            if found is not None:
                grid, g = found
        return SiteInfo(sq, sq, True, grid, g, note)
    calib = 0
    for name, dims in program.dynamic_dims.items():
        for axis, label in dims.items():
            if "seq" in str(label) and name in program.input_names:
                i = program.input_names.index(name)
                calib = max([calib] + [int(b.args[i].shape[axis]) for b in batches])
    calib = calib or int(sq.node.hint)
    return SiteInfo(calib, cfg.target_length or calib, False)


def plan(program, cfg: SparseConfig, ctx) -> list[Decision]:
    data = getattr(ctx, "calibration", None)
    if data is None or not data.calib:
        raise PassError("sparse needs calibration data", "give --calib, or calibration: in the "
                        "recipe (source: generated for random inputs)")
    backend = cost.resolve_backend(cfg.backend)
    layout = read_layout_file(cfg.layout_file, cfg.block_size) if cfg.layout_file else None
    sel = Selector.parse(cfg.layers, cfg.modules)
    decisions: dict[int, Decision] = {}
    work: dict[str, tuple[Any, SiteInfo, list[Family]]] = {}
    for site in program.sites:
        base = {"index": site.index, "node": site.node, "layer": site.layer}
        reason = _skip_reason(site, sel)
        if reason is None:
            info = _site_info(program, site, data.calib, cfg)
            fams = families(site, info, cfg, layout)
            if fams:
                work[site.node] = (site, info, fams)
                continue
            reason = f"no candidate pattern fits sequence {info.target} (calibrated at " \
                     f"{info.calib}: windows must be shorter than what calibration saw)"
        decisions[site.index] = Decision(_key(site), "skip", reason, base)
    if not work:
        return [decisions[i] for i in sorted(decisions)]
    spec = StatsSpec(candidates=lambda s: [m.cand for f in work[s.node][2] for m in f.members],
                     quantile=cfg.quantile)
    stats = collect_site_stats(program, [w[0] for w in work.values()], data.calib, spec)

    def decide(c: SparseConfig) -> list[Decision]:
        out = dict(decisions)
        for node, (site, info, fams) in work.items():
            out[site.index] = _decide(site, info, fams, stats[node], c, backend)
        return [out[i] for i in sorted(out)]

    return back_off(program, decide, cfg, ctx, apply)


def _decide(site, info: SiteInfo, fams: list[Family], st, cfg, backend: str) -> Decision:
    H = site.num_heads
    shape = cost.SiteShape(info.target, H, site.head_dim, site.causal, 1, site.mask != "none")
    options, sparsest, curves = [], [], {}
    best = (-1.0, "", 0.0)
    for fam in fams:
        pms = [st.kept[m.cand.name] for m in fam.members]
        dens = [float(np.nanmean(pm.density)) for pm in pms]
        order = sorted(range(len(pms)), key=lambda i: dens[i])
        curves[fam.name] = [[round(dens[i], 5), round(float(np.nanmean(_stat(pms[i], cfg))), 5)]
                            for i in order]
        for i in order:
            if dens[i] < 1 and float(np.nanmean(_stat(pms[i], cfg))) > best[0]:
                best = (float(np.nanmean(_stat(pms[i], cfg))), fam.members[i].label,
                        float(np.nanmean(pms[i].quantile)))

        def ok(i, h, pms=pms):
            return _accepts(pms[i], h, cfg)

        if cfg.granularity == "head":
            choice = tuple(next((i for i in order if ok(i, h)), None) for h in range(H))
        else:
            pick = next((i for i in order if all(ok(i, h) for h in range(H))), None)
            choice = (pick,) * H
        sparsest.append(_option(site, info, fam, (order[0],) * H, backend, shape))
        if any(c is not None for c in choice):
            opt = _option(site, info, fam, choice, backend, shape)
            opt.params["kept"] = [round(float(_stat(pms[c], cfg)[h]), 5) if c is not None
                                  else 1.0 for h, c in enumerate(choice)]
            opt.params["kept_mean"] = [round(float(pms[c].mean[h]), 5) if c is not None
                                       else 1.0 for h, c in enumerate(choice)]
            opt.params["kept_tail"] = [round(float(pms[c].quantile[h]), 5) if c is not None
                                       else 1.0 for h, c in enumerate(choice)]
            opt.params["density_calib"] = round(float(np.mean(
                [pms[c].density[h] if c is not None else 1.0 for h, c in enumerate(choice)])), 5)
            options.append(opt)
    m: dict[str, Any] = {"index": site.index, "node": site.node, "layer": site.layer,
                         "heads": H, "calibration_length": info.calib,
                         "target_length": info.target, "backend": backend,
                         "statistic": cfg.statistic, "min_mass": cfg.min_mass,
                         "quantile": cfg.quantile, "tail_mass": tail_floor(cfg),
                         "rule": rule_text(cfg), "curves": curves}
    if info.note:
        m["note"] = info.note
    fast = [o for o in options if o.pred.speedup >= cfg.min_speedup]
    if fast:
        o = min(fast, key=lambda o: (o.pred.density, -o.pred.speedup))
        return _chosen(site, o, m, cfg)
    pool = options or sparsest
    top = max(pool, key=lambda o: o.pred.speedup)
    m.update(top.pred.metrics())
    if options or top.pred.speedup < cfg.min_speedup:
        return Decision(_key(site), "keep", f"sequence {info.target}: dense is cheaper "
                        f"(predicted {cost.fmt_speedup(top.pred.speedup)} on {backend}"
                        f" for {top.family.name})", m)
    tail = f", {100 * cfg.quantile:g}th percentile {best[2]:.3f}" if cfg.statistic != "quantile" \
        else ""
    return Decision(_key(site), "keep", f"no candidate keeps {cfg.min_mass:g} of the mass "
                    f"({rule_text(cfg)}; best: {best[1]} keeps {best[0]:.3f} ({_name(cfg)}){tail}, "
                    f"mean over heads)", m)


def _chosen(site, o: Option, m: dict, cfg) -> Decision:
    p = {k: v for k, v in o.params.items()
         if k not in ("kept", "kept_mean", "kept_tail", "density_calib")}
    dense_heads = sum(c is None for c in o.choice)
    m.update(o.pred.metrics())
    m.update({"op": o.family.kind, "pattern": o.family.name, "params": p,
              "density_calib": o.params["density_calib"],
              "kept_mass": round(float(np.mean(o.params["kept"])), 5),
              "kept_mass_min": round(float(np.min(o.params["kept"])), 5),
              "kept_mass_mean": round(float(np.mean(o.params["kept_mean"])), 5),
              "kept_mass_tail_min": round(float(np.min(o.params["kept_tail"])), 5),
              "kept_heads": o.params["kept"], "dense_heads": dense_heads,
              "labels": [o.family.members[c].label if c is not None else "dense"
                         for c in o.choice]})
    shown = sorted({lab for lab in m["labels"]})
    tail = (f", {100 * cfg.quantile:g}th percentile >= {m['kept_mass_tail_min']:.3f}"
            if cfg.statistic == "mean+tail" else "")
    reason = (f"{o.family.name}: {', '.join(shown)}; keeps >= {m['kept_mass_min']:.3f} "
              f"({_name(cfg)}{tail}; {rule_text(cfg)}), density {o.pred.density:.3f} at "
              f"{m['target_length']}, "
              f"predicted {cost.fmt_speedup(o.pred.speedup)} on {m['backend']}")
    return Decision(_key(site), "sparse", reason, m)


def _option(site, info: SiteInfo, fam: Family, choice, backend: str, shape) -> Option:
    H = site.num_heads
    vals = [fam.members[c].value if c is not None else None for c in choice]
    extras = site.mask != "none" or len(set(vals)) > 1 or None in vals
    if fam.kind == "window":
        ws = [v if v is not None else -1 for v in vals]
        ns, causal = fam.shared["num_sinks"], fam.shared["causal"]
        per_head = len(set(ws)) > 1
        params = {"window": max(ws), "num_sinks": ns, "is_causal": causal,
                  "head_windows": ws if per_head else None}
        # the form the export emits at the build's target length (attnc/build.py hands it on)
        form = onnx_form(max(ws), ns, causal, True, site.mask == "none" and not per_head,
                         seq=info.target, head_windows=ws)
        pc = cost.window_cost(ws, ns, causal, form, extras)
    elif fam.kind == "neighborhood":
        nd = len(fam.shared["grid"])
        ks = [list(v) if v is not None else [-1] * nd for v in vals]
        per_head = len({tuple(k) for k in ks}) > 1
        first = next(k for k in ks if k[0] != -1)
        params = {**fam.shared, "kernel_size": first,
                  "head_kernel_size": [x for k in ks for x in k] if per_head else None}
        pc = cost.neighborhood_cost(fam.shared["grid"], ks, fam.shared["dilation"],
                                    fam.shared["stride"], fam.shared["is_causal"],
                                    fam.shared["num_global"], extras or params["num_global"] > 0,
                                    seq=info.target, mask_rank=_mask_rank(site))
    else:
        lay = block_layout(fam, vals, H)
        params = {"block_size": fam.shared["block_size"], "is_causal": fam.shared["causal"],
                  "layout": {"layout": fam.shared["layout"], "heads": _jsonable(vals)}}
        pc = cost.block_cost(lay, fam.shared["block_size"], fam.shared["causal"], extras, H,
                             mask_rank=_mask_rank(site))
    return Option(fam, tuple(choice), cost.predict(backend, shape, pc), params)


def _mask_rank(site) -> int | None:
    """The rank of the mask the op gets (the site's SDPA attn_mask: 4-D), for the ONNX form."""
    return None if site.mask == "none" else 4


def _jsonable(v):
    return [_jsonable(x) for x in v] if isinstance(v, (list, tuple)) else v


def block_layout(fam: Family, vals, heads: int) -> torch.Tensor:
    """(1, H|1, n, n) bool: each head's member layout, all blocks for a dense head."""
    layouts = [fam.layouts[v if not isinstance(v, list) else tuple(v)] if v is not None
               else None for v in vals]
    n = next(x for x in layouts if x is not None).shape[-1]
    full = torch.ones(n, n, dtype=torch.bool)
    per = [lay.reshape(-1, n, n) if lay is not None else full[None] for lay in layouts]
    if all(torch.equal(per[0], p) for p in per) and per[0].shape[0] == 1:
        return per[0][None]
    return torch.cat([p if p.shape[0] == 1 else p[h:h + 1] for h, p in enumerate(per)])[None]


# ------------------------------------------------------------------------------------ apply


def apply(program, decisions: list[Decision], cfg: SparseConfig):
    todo = [d for d in decisions if d.action == "sparse"]
    if not todo:
        return program
    out = program.clone()
    nodes = {n.name: n for n in out.gm.graph.nodes}
    layout_file = read_layout_file(cfg.layout_file, cfg.block_size) if cfg.layout_file else None
    for d in todo:
        params = dict(d.metrics["params"])
        if d.metrics["op"] == "block":
            params["layout"] = _rebuild_layout(params["layout"], params["block_size"],
                                               params["is_causal"], d.metrics["target_length"],
                                               d.metrics["heads"], layout_file)
        replace_attention_node(out.gm, nodes[d.metrics["node"]], OPS[d.metrics["op"]], **params)
    out.gm.graph.lint()
    out.gm.recompile()
    _check_read_back(out, todo)
    return out


def _rebuild_layout(spec: dict, bs: int, causal: bool, target: int, heads: int,
                    layout_file) -> torch.Tensor:
    n = -(-target // bs)
    layouts = {}
    for v in spec["heads"]:
        if v is None:
            continue
        if spec["layout"] == "power":
            layouts[v] = masks.power_attention_layout(n, v, 1)[0, 0]
        elif spec["layout"] == "local-stride":
            layouts[tuple(v)] = masks.local_stride_layout(n, v[0], v[1], causal)[0, 0]
        else:
            layouts[v] = layout_file[0][:, :, :n, :n]
    fam = Family("", "block", {}, (), layouts=layouts)
    return block_layout(fam, spec["heads"], heads)


def _check_read_back(program, todo: list[Decision]) -> None:
    sites = find_sites(program.gm)
    for d in todo:
        i, want = d.metrics["index"], READ_BACK[d.metrics["op"]]
        got = sites[i].pattern if i < len(sites) else None
        p = d.metrics["params"]
        fields = {"window": ("window", "num_sinks", "head_windows"),
                  "neighborhood": ("kernel_size", "num_global"),
                  "block": ("block_size",)}[d.metrics["op"]]
        same = got is not None and got == want and all(
            _jsonable(getattr(got, f)) == _jsonable(p[f]) for f in fields)
        if not same:
            raise PassError(f"sparse: site {d.site} reads back as {got}, not the chosen {want} "
                            f"{ {f: p[f] for f in fields} }")


register_pass(
    PassInfo(
        id="sparse",
        config_cls=SparseConfig,
        plan=plan,
        apply=apply,
        exact=False,
        summary="rewrite attention to sliding-window / neighborhood / block-sparse patterns "
                "that keep the calibrated attention mass where the cost model predicts a gain",
        paper="NATTEN (arXiv 2403.04690), StreamingLLM (2309.17453), PowerAttention (2503.03588)",
        report=render_report,
    )
)
