"""moh: multi-head attention as Mixture-of-Head attention, training-free (Jin et al., "MoH:
Multi-Head Attention as Mixture-of-Head Attention", arXiv 2410.11842; spec shared/specs/moh.md).

Per token, `shared` heads always run and the top routed heads fill up to `active` of all heads;
head outputs are gated before the output projection (`attnc.graph.gate`), and the attention
call becomes `attnc::routed_attention`, whose CUDA kernel skips (head, query block) pairs no
token of the block uses. This is the calibration-only APPROXIMATION of MoH (the paper trains
100B+ tokens): shared heads are the most important ones by calibrated contribution norm
||H^h W_O^h||, the router is LLaMA3-MoH's parameter-free query norm or a linear router fitted on
calibration data, gates are binary (as the published LLaMA3 model) or weighted (least-squares
per-head scale), and `distill_steps` optionally fits router and gate values for minutes on CPU
against the original attention-branch outputs (`moh_fit`). Keys, values and the model's weights
are never changed. `active: 1.0` leaves every site as it is (exact). Shared heads are chosen by
output norm or by the calibration loss's rise when a head is masked (`importance: loss`,
`moh_importance`). When the routed program misses the recipe's fidelity bound on the calibration
batches, the pass backs off step by step (`moh_backoff`: un-route the costliest site, or raise
`active`), and the trail is in the decisions.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch

from attnc.errors import PassError, RecipeError
from attnc.graph.calls import read_call
from attnc.graph.edit import prune
from attnc.graph.gate import add_buffer, add_node, fuse_head_gate, insert_head_gate, topk_head_gate
from attnc.recipe.manager import Decision, PassInfo, register_pass
from attnc.recipe.selectors import Selector

from .moh_backoff import back_off
from .moh_calib import anchors, calibrate
from .moh_fit import fit_site
from .moh_importance import loss_importance
from .moh_report import render as render_report

log = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass(frozen=True)
class MoHConfig:
    active: float = 0.75  # fraction of query heads each token uses
    shared: float = 0.5  # fraction of heads always on (the most important ones)
    # linear: measured better than query-norm on both bundled models (benchmarks/moh_fidelity.py)
    router: Literal["query-norm", "linear"] = "linear"
    gates: Literal["binary", "weighted"] = "binary"
    distill_steps: int = 0
    # shared heads = the most important: mean contribution norm through the output projection
    # (output-norm) or the rise of the calibration loss when the head is masked (loss)
    importance: Literal["output-norm", "loss"] = "output-norm"
    # while the routed program misses the recipe's fidelity bound on the calibration batches,
    # back off one step, at most this many times (then every site runs all heads): un-route the
    # site with the largest branch error (sites), or raise active to 1 - (1 - active) / 2 (active)
    back_off: int = 3
    back_off_by: Literal["sites", "active"] = "sites"
    lr: float = 0.05  # Adam's step size for distill_steps (relative to each tensor's scale)
    max_tokens: int = 4096  # calibration tokens per site kept for the fits
    fuse: bool = True  # one attnc::routed_attention per site (else a plain gate after the call)
    layers: str | int | tuple[str | int, ...] | None = None
    modules: tuple[str, ...] = ()

    def validate(self) -> None:
        if not 0.0 < self.active <= 1.0:
            raise RecipeError(f"moh active must be in (0, 1], got {self.active}")
        if not 0.0 <= self.shared <= 1.0:
            raise RecipeError(f"moh shared must be in [0, 1], got {self.shared}")
        if self.router not in ("query-norm", "linear"):
            raise RecipeError(f"moh router must be query-norm or linear, got {self.router!r}")
        if self.gates not in ("binary", "weighted"):
            raise RecipeError(f"moh gates must be binary or weighted, got {self.gates!r}")
        if self.importance not in ("output-norm", "loss"):
            raise RecipeError(f"moh importance must be output-norm or loss, got "
                              f"{self.importance!r}")
        if self.back_off_by not in ("sites", "active"):
            raise RecipeError(f"moh back_off_by must be sites or active, got "
                              f"{self.back_off_by!r}")
        if self.back_off < 0:
            raise RecipeError(f"moh back_off must be 0 or more, got {self.back_off}")
        if self.distill_steps < 0:
            raise RecipeError(f"moh distill_steps must be 0 or more, got {self.distill_steps}")
        if self.max_tokens < 16:
            raise RecipeError(f"moh max_tokens must be at least 16, got {self.max_tokens}")
        Selector.parse(self.layers, self.modules)


def head_counts(heads: int, active: float, shared: float) -> tuple[int, int]:
    """(heads each token runs, always-on heads): ceil(active x H) (never fewer heads than the
    fraction asked), round(shared x H) capped at that."""
    k = min(heads, max(1, math.ceil(active * heads - 1e-9)))
    return k, min(k, int(math.floor(shared * heads + 0.5)))


def _skip_reason(gm, site, sel: Selector) -> str | None:
    if not sel.matches(site.layer, site.module):
        return "not selected by layers/modules"
    if site.pattern != "dense":
        return f"already {site.pattern}"
    if site.kind != "self":
        return "cross-attention"
    if site.num_heads < 2:
        return "one head"
    call = read_call(next(n for n in gm.graph.nodes if n.name == site.node))
    if call.op == "region" or call.dropout_p:
        return "not a plain attention call"
    found = anchors(gm, site)
    return found if isinstance(found, str) else None


def plan(program, cfg: MoHConfig, ctx) -> list[Decision]:
    cfg.validate()
    sites = program.sites
    if not sites:
        raise PassError("moh found no attention site")
    sel = Selector.parse(cfg.layers, cfg.modules)
    reasons = {s.node: _skip_reason(program.gm, s, sel) for s in sites}
    # statistics once, for the sites that any active fraction up to 1 could route
    cand = [s for s in sites if reasons[s.node] is None
            and head_counts(s.num_heads, cfg.active, cfg.shared)[0] < s.num_heads]
    cals, imp_info = {}, None
    if cand:
        if ctx is None or ctx.calibration is None:
            raise PassError("moh needs calibration data (--calib)")
        cals = calibrate(program, cand, ctx.calibration.calib, cfg.max_tokens)
        if cfg.importance == "loss":
            imp, imp_info = loss_importance(program, cand, ctx.calibration.calib)
            cals = {k: dataclasses.replace(c, importance=imp[k]) for k, c in cals.items()}

    def decide(c: MoHConfig) -> list[Decision]:
        out = []
        for i, s in enumerate(sites):
            k, n_shared = head_counts(s.num_heads, c.active, c.shared)
            if reasons[s.node] is not None:
                out.append(Decision(s.node, "skip", reasons[s.node], {}))
                continue
            if k == s.num_heads:
                out.append(Decision(s.node, "keep",
                                    f"active {c.active:g}: all {k} heads run (identity)",
                                    {"active_heads": k}))
                continue
            p = fit_site(cals[s.node], n_shared, k, c.router, c.gates, c.distill_steps, c.lr,
                         seed=i)
            m = {"node": s.node, "layer": s.layer, "router": c.router, "gates": c.gates,
                 "importance_by": c.importance, "params": p.params, **p.metrics}
            if imp_info:
                m["importance_loss"] = imp_info
            reason = (f"{k} of {s.num_heads} heads per token, shared {p.shared}, routed by "
                      f"{c.router}; branch cosine {p.metrics['branch_cosine']:.4f}")
            out.append(Decision(s.node, "route", reason, m))
        return out

    return back_off(program, decide, cfg, ctx, apply)


def _router_scores(gm, attn, x, q, d: Decision, H: int):
    """The (B, H, S) router score node of a site, before the attention call."""
    p, tag = d.metrics["params"], f"attnc_moh_{attn.name}"
    if d.metrics["router"] == "query-norm":
        qf = add_node(gm, aten._to_copy.default, (q,), {"dtype": torch.float32}, before=attn,
                      like=attn)
        s = add_node(gm, aten.linalg_vector_norm.default, (qf, 2.0, [-1]), before=attn,
                     like=attn)  # (B, H, S)
        a, c = torch.tensor(p["a"]), torch.tensor(p["c"])
        if bool((a != 1).any()) or bool((c != 0).any()):
            ab = add_buffer(gm, f"{tag}_a", a.reshape(1, H, 1), before=attn, like=attn)
            cb = add_buffer(gm, f"{tag}_c", c.reshape(1, H, 1), before=attn, like=attn)
            s = add_node(gm, aten.mul.Tensor, (s, ab), before=attn, like=attn)
            s = add_node(gm, aten.add.Tensor, (s, cb), before=attn, like=attn)
        return s
    w = add_buffer(gm, f"{tag}_router_w", torch.tensor(p["w"]), before=attn, like=attn)
    b = add_buffer(gm, f"{tag}_router_b", torch.tensor(p["b"]), before=attn, like=attn)
    xf = add_node(gm, aten._to_copy.default, (x,), {"dtype": torch.float32}, before=attn,
                  like=attn)
    s = add_node(gm, aten.linear.default, (xf, w, b), before=attn, like=attn)  # (B, S, H)
    return add_node(gm, aten.transpose.int, (s, 1, 2), before=attn, like=attn)  # (B, H, S)


def apply(program, decisions: list[Decision], cfg: MoHConfig):
    todo = [d for d in decisions if d.action == "route"]
    if not todo:
        return program
    out = program.clone()
    gm = out.gm
    by_name = {s.node: s for s in out.sites}
    for d in todo:
        site = by_name.get(d.metrics["node"])
        if site is None:
            raise PassError(f"moh: site {d.metrics['node']} is gone from the graph")
        found = anchors(gm, site)
        if isinstance(found, str):
            raise PassError(f"moh: site {site.node}: {found}")
        attn, x, q, _ = found
        H = site.num_heads
        shared = torch.zeros(H, dtype=torch.bool)
        shared[d.metrics["shared_heads"]] = True
        scores = _router_scores(gm, attn, x, q, d, H)
        dtype = attn.meta["val"].dtype
        gate = topk_head_gate(gm, scores, shared, int(d.metrics["active_heads"]),
                              torch.tensor(d.metrics["params"]["gate"]), before=attn, like=attn,
                              dtype=dtype, prefix=f"attnc_moh_{attn.name}")
        if cfg.fuse:
            fuse_head_gate(gm, attn, gate)
        else:
            insert_head_gate(gm, attn, gate)
    prune(gm)
    return out


register_pass(
    PassInfo(
        id="moh",
        config_cls=MoHConfig,
        plan=plan,
        apply=apply,
        exact=False,
        summary="Mixture-of-Head: per token, shared + top-k routed query heads, gated",
        paper="arXiv 2410.11842",
        report=render_report,
    )
)
