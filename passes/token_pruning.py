"""token-pruning: drop visual tokens after a decoder layer of a VLM, ranked by debiased attention
(FastV, arXiv 2403.06764, scored as in "Attention Debiasing for Token Pruning in VLMs",
arXiv 2508.17807; spec in shared/specs/token_pruning.md).

At decoder layer `layer` the attention call becomes `attnc::attention_colsum`, which also returns
the attention mass each key receives from the scorer's query rows (the last token, FastV; or the
text after the image, HiMAP) without an S x S matrix on the kernel path. Image tokens (found at run
time from the image token id) are ranked by that mass averaged over heads, divided by a positional
trend fitted on calibration data (`debias`: exponential or cubic, stored as a buffer), with
letterbox padding patches ranked last (`padding_mask`, from each image's padding bars, in the
graph). The top R = keep x (image tokens) stay; every other image token leaves the sequence of
every later layer (`attnc.graph.gather`), kept tokens keeping their original positions. A kept
slot that is padding (when fewer than R valid tokens exist) is masked as a key, so the kept count
is min(R, valid tokens).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, replace
from typing import Literal

import torch

import attnc.kernels  # noqa: F401  (registers attnc::attention_colsum)
from attnc.errors import PassError, RecipeError
from attnc.graph.calls import read_call
from attnc.graph.edit import prune
from attnc.graph.gather import Builder, gather_tokens
from attnc.graph.sublayers import find_sublayers
from attnc.recipe.manager import Decision, PassInfo, register_pass

from .token_pruning_calib import calibration_images, fit_weights, kept_stats
from .token_pruning_report import render as render_report
from .token_pruning_select import (
    geometry,
    padding_nodes,
    row_colsum_nodes,
    scoring_rows,
    select_nodes,
)

log = logging.getLogger(__name__)
aten = torch.ops.aten
COLSUM = torch.ops.attnc.attention_colsum.default


@dataclass(frozen=True)
class TokenPruningConfig:
    layer: int = 2
    keep: float | int = 0.25
    scorer: Literal["last-token", "text-tokens"] = "last-token"
    debias: Literal["none", "exponential", "cubic"] = "none"
    padding_mask: Literal["auto", "on", "off"] | bool = "auto"
    pad_threshold: float = 0.5
    pad_value: float = 0.0  # the letterbox colour after normalisation (the processor's mean: 0)
    pad_tolerance: float = 0.02
    image_token_id: int | None = None
    output: Literal["kept", "last"] = "kept"
    # rows: scores from the scorer's query rows in plain ATen ops (O(T x S), exports anywhere);
    # colsum: the layer's call becomes attnc::attention_colsum (the Triton kernel on CUDA)
    score_op: Literal["rows", "colsum"] = "rows"
    text_window: int = 32  # text-tokens: at most this many trailing positions score

    def validate(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)):
            raise RecipeError(f"token-pruning keep must be a ratio or a count, got {self.keep!r}")
        if isinstance(self.keep, float) and not 0.0 < self.keep <= 1.0:
            raise RecipeError(f"token-pruning keep ratio must be in (0, 1], got {self.keep}")
        if isinstance(self.keep, int) and self.keep < 1:
            raise RecipeError(f"token-pruning keep count must be 1 or more, got {self.keep}")
        if self.scorer not in ("last-token", "text-tokens"):
            raise RecipeError(f"token-pruning scorer must be last-token or text-tokens, got "
                              f"{self.scorer!r}")
        if self.debias not in ("none", "exponential", "cubic"):
            raise RecipeError(f"token-pruning debias must be none, exponential or cubic, got "
                              f"{self.debias!r}")
        if self.padding not in ("auto", "on", "off"):
            raise RecipeError(f"token-pruning padding_mask must be auto, on or off, got "
                              f"{self.padding_mask!r}")
        if not 0.0 <= self.pad_threshold < 1.0:
            raise RecipeError(f"token-pruning pad_threshold must be in [0, 1), got "
                              f"{self.pad_threshold}")
        if self.output not in ("kept", "last"):
            raise RecipeError(f"token-pruning output must be kept or last, got {self.output!r}")
        if self.score_op not in ("rows", "colsum"):
            raise RecipeError(f"token-pruning score_op must be rows or colsum, got "
                              f"{self.score_op!r}")
        if self.text_window < 1:
            raise RecipeError(f"token-pruning text_window must be 1 or more, got "
                              f"{self.text_window}")
        if self.layer < 0:
            raise RecipeError(f"token-pruning layer must be 0 or more, got {self.layer}")

    @property
    def padding(self) -> str:
        if self.padding_mask is True:
            return "on"
        if self.padding_mask is False:
            return "off"
        return str(self.padding_mask)


@dataclass(frozen=True)
class Plan:
    site: str  # the scoring attention call
    boundary: str  # the stream leaving that decoder layer
    image_token: int
    n_img: int
    keep_count: int
    padding: bool
    weights: torch.Tensor | None


# ------------------------------------------------------------------------------ finding things


def _placeholder(program, name: str):
    phs = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
    if name not in program.input_names:
        return None
    return phs[program.input_names.index(name)]


def _image_token(ids: torch.Tensor, given: int | None) -> tuple[int, int]:
    """The image token id (given, or the id of the longest run of one repeated id, the same in
    every row) and the image tokens per sequence."""
    tok = given
    if tok is None:
        best: dict[int, int] = {}
        for row in ids.tolist():
            run, prev, longest = 0, None, {}
            for t in row:
                run = run + 1 if t == prev else 1
                prev = t
                longest[t] = max(longest.get(t, 0), run)
            t, n = max(longest.items(), key=lambda kv: kv[1])
            best[t] = best.get(t, 0) + (n >= 4)
        hits = [t for t, c in best.items() if c == ids.shape[0]]
        if len(hits) != 1:
            raise PassError("token-pruning cannot find the image token id in the example inputs",
                            "set image_token_id in the recipe")
        tok = hits[0]
    counts = (ids == tok).sum(1)
    if int(counts.min()) == 0 or int(counts.min()) != int(counts.max()):
        raise PassError(f"token-pruning needs the same number of image tokens (id {tok}) in every "
                        f"sequence; the example inputs have {sorted(set(counts.tolist()))}")
    return int(tok), int(counts[0])


def _decoder_sites(program):
    return [s for s in program.sites if s.kind == "self" and s.causal]


def _boundary(gm, site_node: str) -> str:
    for sub in find_sublayers(gm):
        if sub.kind == "block" and site_node in sub.calls and sub.out:
            return sub.out
    raise PassError(f"token-pruning cannot find the residual stream leaving {site_node}'s block")


def keep_count(keep: float | int, n_img: int) -> int:
    r = keep if isinstance(keep, int) else int(round(keep * n_img))
    return max(1, min(n_img, r))


# ------------------------------------------------------------------------------ graph building


def _build(program, plan: Plan, cfg: TokenPruningConfig, *, keep_n: int, gather: bool):
    """A copy of `program` with the colsum call and the selection at plan.site; with `gather`,
    later layers see only the kept tokens. Returns (program, Selection)."""
    out = program.clone()
    gm = out.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    node, boundary = nodes[plan.site], nodes[plan.boundary]
    call = read_call(node)
    ids = _placeholder(out, "input_ids")
    b = Builder(gm, node, node)
    if cfg.score_op == "rows":
        b.before = boundary.next
        colsum = row_colsum_nodes(b, call, ids, cfg.scorer, plan.image_token, cfg.text_window)
        return _select(out, gm, b, ids, colsum, boundary, plan, cfg, keep_n, gather)
    rows = scoring_rows(b, ids, cfg.scorer, plan.image_token)
    kwargs = {"attn_mask": call.mask, "is_causal": call.is_causal, "scale": call.scale_arg}
    both = b(COLSUM, call.q, call.k, call.v, rows, **kwargs)
    attn = b(operator.getitem, both, 0)
    attn.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")})
    colsum = b(operator.getitem, both, 1)  # (B, Hq, S)
    node.replace_all_uses_with(attn, propagate_meta=False)
    gm.graph.erase_node(node)
    b.like = attn
    b.before = boundary.next
    return _select(out, gm, b, ids, colsum, boundary, plan, cfg, keep_n, gather)


def _select(out, gm, b, ids, colsum, boundary, plan: Plan, cfg: TokenPruningConfig, keep_n: int,
            gather: bool):
    padding = None
    if plan.padding:
        pix = _placeholder(out, "pixel_values")
        geo = geometry(tuple(pix.meta["val"].shape), plan.n_img)
        padding = padding_nodes(b, pix, geo, cfg.pad_value, cfg.pad_tolerance, cfg.pad_threshold)
    sel = select_nodes(b, ids, colsum, image_token=plan.image_token, n_img=plan.n_img,
                       keep_count=keep_n, weights=plan.weights, padding=padding)
    if gather:
        gather_tokens(gm, boundary, sel.keep, sel.live, last_only=cfg.output == "last")
        prune(gm)
    else:  # a probe: the selection nodes stay for node_values to read
        gm.graph.lint()
        gm.recompile()
    return out, sel


# ------------------------------------------------------------------------------ plan / apply


def make_plan(program, cfg: TokenPruningConfig, ctx=None) -> tuple[Plan, dict]:
    cfg.validate()
    ids = _placeholder(program, "input_ids")
    if ids is None:
        raise PassError("token-pruning needs a model with an input_ids input (a VLM)")
    tok, n_img = _image_token(program.example_args[program.input_names.index("input_ids")],
                              cfg.image_token_id)
    sites = _decoder_sites(program)
    if cfg.layer >= len(sites) - 1:
        raise RecipeError(f"token-pruning layer {cfg.layer} is out of range: the decoder has "
                          f"{len(sites)} layers, and pruning needs a layer after it")
    site = sites[cfg.layer]
    info: dict = {"image_token_id": tok, "image_tokens": n_img}
    padding = False
    if cfg.padding != "off":
        geo = _geometry(program, n_img)
        if geo is None and cfg.padding == "on":
            raise PassError(f"token-pruning padding_mask: {n_img} image tokens are not a raster "
                            "grid of the pixel input")
        padding = geo is not None
        info["padding_mask"] = "from the letterbox bars" if padding else "off: no raster grid"
    else:
        info["padding_mask"] = "off"
    plan = Plan(site.node, _boundary(program.gm, site.node), tok, n_img,
                keep_count(cfg.keep, n_img), padding, None)
    if cfg.debias != "none":
        w, fit = fit_weights(_prober(program, plan, cfg), cfg.debias, n_img, ctx)
        plan = replace(plan, weights=torch.from_numpy(w))
        info["trend"] = fit
    return plan, info


def _geometry(program, n_img: int):
    pix = _placeholder(program, "pixel_values")
    return geometry(tuple(pix.meta["val"].shape), n_img) if pix is not None else None


def _prober(program, plan: Plan, cfg: TokenPruningConfig):
    """probe(keep_n, weights) -> (program, Selection): the selection without the gather."""
    return lambda keep_n, weights: _build(program, replace(plan, weights=weights), cfg,
                                          keep_n=keep_n, gather=False)


# The plan travels from plan() to apply() in the decision's metrics, as plain JSON values (as
# every pass's choice does): apply() rebuilds it from them, so report.json holds what was applied.
PLAN_KEYS = ("node", "boundary", "image_token_id", "image_tokens", "keep", "padding")


def plan_metrics(p: Plan) -> dict:
    m = {"node": p.site, "boundary": p.boundary, "image_token_id": p.image_token,
         "image_tokens": p.n_img, "keep": p.keep_count, "padding": p.padding}
    if p.weights is not None:  # float32 values are exact as JSON floats
        m["trend_weights"] = [float(x) for x in p.weights.to(torch.float32)]
    return m


def plan_from_metrics(m: dict) -> Plan:
    missing = [k for k in PLAN_KEYS if k not in m]
    if missing:
        raise PassError(f"token-pruning decision lacks {missing} (not made by token-pruning's "
                        "plan)")
    w = m.get("trend_weights")
    weights = torch.tensor(w, dtype=torch.float32) if w is not None else None
    if weights is not None and weights.shape != (int(m["image_tokens"]),):
        raise PassError(f"token-pruning trend_weights has {weights.numel()} values for "
                        f"{m['image_tokens']} image tokens")
    return Plan(str(m["node"]), str(m["boundary"]), int(m["image_token_id"]),
                int(m["image_tokens"]), int(m["keep"]), bool(m["padding"]), weights)


def plan(program, cfg: TokenPruningConfig, ctx) -> list[Decision]:
    p, info = make_plan(program, cfg, ctx)
    m = {"layer": cfg.layer, "scorer": cfg.scorer, "debias": cfg.debias,
         "score_op": cfg.score_op, "output": cfg.output, **info, **plan_metrics(p),
         "calibration_images": calibration_images(ctx)}
    stats = kept_stats(_prober(program, p, cfg), p.keep_count, p.weights, p.n_img,
                       _geometry(program, p.n_img), ctx)
    if stats is not None:
        m["kept_on_calibration"] = stats
    decisions = []
    for s in _decoder_sites(program):
        if s.node != p.site:
            decisions.append(Decision(s.node, "skip", "not the scoring layer", {}))
        elif p.keep_count == p.n_img and not p.padding:
            decisions.append(Decision(s.node, "keep", "keeps every image token", m))
        else:
            reason = (f"keep {p.keep_count} of {p.n_img} image tokens after layer {cfg.layer} "
                      f"({cfg.scorer}, debias {cfg.debias}, padding mask "
                      f"{'on' if p.padding else 'off'})")
            decisions.append(Decision(s.node, "prune", reason, m))
    return decisions


def apply(program, decisions: list[Decision], cfg: TokenPruningConfig):
    todo = [d for d in decisions if d.action == "prune"]
    if not todo:
        return program
    if len(todo) > 1:
        raise PassError(f"token-pruning prunes after one layer; {len(todo)} decisions prune")
    p = plan_from_metrics(todo[0].metrics)
    return _build(program, p, cfg, keep_n=p.keep_count, gather=True)[0]


def prune_tokens(program, cfg: TokenPruningConfig, ctx=None):
    """The pruned program and its plan (for tests and benchmarks)."""
    p, info = make_plan(program, cfg, ctx)
    return _build(program, p, cfg, keep_n=p.keep_count, gather=True)[0], p, info


register_pass(
    PassInfo(
        id="token-pruning",
        config_cls=TokenPruningConfig,
        plan=plan,
        apply=apply,
        exact=False,
        summary="drop low-attention visual tokens after a decoder layer (debiased FastV)",
        paper="arXiv 2403.06764, arXiv 2508.17807",
        report=render_report,
    )
)
