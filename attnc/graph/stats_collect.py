"""Attention statistics per site and head over calibration batches, through taps on the graph.

`collect_site_stats(program, sites, batches, spec)` runs the batches through a copy of the
program's graph with a tap after each site's attention call (q, k, mask, causality and scale read
from the op's schema, never by position) and, for head norms, one after its output projection.
Each tap folds the tensors into running statistics (`attnc.graph.stats`) and keeps nothing else,
so calibration never holds attention matrices or hidden states. The batch's token mask (B, S)
marks padding: padding queries are left out and padding keys masked, on top of the site's own
mask (Hugging Face text models already mask padding keys in theirs).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.fx import GraphModule, Node

from attnc.errors import PassError
from attnc.graph.sites import REGION_META, SDPA, AttentionSite, find_sites
from attnc.graph.stats import (
    CHUNK_BYTES,
    ColumnSumAccumulator,
    ColumnSums,
    KeptMass,
    KeptMassAccumulator,
    column_sums,
    head_output_norms,
    json_list,
)
from attnc.graph.stats_patterns import Candidate
from attnc.load.calibration import Batch

log = logging.getLogger(__name__)

RowsSpec = str | Callable[[Batch], torch.Tensor] | None


@dataclass(frozen=True)
class StatsSpec:
    """What to collect. `candidates`: the patterns whose kept mass to measure, or a function of
    the site giving them; `colsum_rows`: "last" (each sequence's last real token), "all" (every
    real token), a function of the batch returning a (B, S) bool row mask, or None (no column
    sums); `head_norms`: per-head output norms through the output projection."""

    candidates: Sequence[Candidate] | Callable[[AttentionSite], Sequence[Candidate]] = ()
    colsum_rows: RowsSpec = None
    head_norms: bool = False
    quantile: float = 0.05
    bins: int = 512
    chunk_bytes: int = CHUNK_BYTES
    backend: str = "auto"  # auto | torch | triton


@dataclass(frozen=True)
class SiteStats:
    site: str  # the attention node's name
    module: str
    layer: int | None
    num_heads: int
    queries: int  # real query tokens seen
    kept: KeptMass | None
    colsum: ColumnSums | None
    head_norms: np.ndarray | None  # (H,) mean over real tokens

    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "module": self.module, "layer": self.layer,
                "num_heads": self.num_heads, "queries": self.queries,
                "kept": self.kept.to_json() if self.kept else None,
                "colsum": self.colsum.to_json() if self.colsum else None,
                "head_norms": None if self.head_norms is None else json_list(self.head_norms)}


def call_args(node: Node) -> dict[str, Any]:
    """q, k, v, attn_mask, is_causal and scale of a dense attention node, by the op's schema."""
    if REGION_META in node.meta:
        raise PassError(f"site {node.name} is a hand-written attention region (score "
                        f"{node.meta.get('attnc_score', 'other')}); statistics read SDPA calls",
                        "leave the site out of the statistics")
    target = node.target
    if isinstance(target, torch._ops.OpOverloadPacket):  # traced as torch.ops.ns.op(...)
        target = target.default
    dense = target is SDPA or str(target) == "attnc.attention.default"
    if not dense or not hasattr(target, "_schema"):
        raise PassError(f"site {node.name} runs {target}, not dense attention; statistics are "
                        f"measured on the dense program", "collect them before rewriting")
    vals = {a.name: a.default_value if a.has_default_value() else None
            for a in target._schema.arguments}
    vals.update(zip([a.name for a in target._schema.arguments], node.args, strict=False))
    vals.update(node.kwargs)
    get = (lambda a, b: vals.get(a, vals.get(b)))  # noqa: E731 - SDPA's names, then attnc's
    return {"q": get("query", "q"), "k": get("key", "k"), "v": get("value", "v"),
            "attn_mask": vals.get("attn_mask"), "is_causal": bool(vals.get("is_causal")),
            "scale": vals.get("scale")}


class _Site:
    """Running statistics of one site, fed by its taps."""

    def __init__(self, site: AttentionSite, spec: StatsSpec, args: dict):
        self.site, self.spec, self.args = site, spec, args
        cands = spec.candidates(site) if callable(spec.candidates) else spec.candidates
        self.kept = KeptMassAccumulator(cands, spec.quantile, spec.bins) if cands else None
        rows = spec.colsum_rows
        self.cols = (ColumnSumAccumulator(rows if isinstance(rows, str) else "custom")
                     if rows is not None else None)
        self.norm_sum: torch.Tensor | None = None
        self.norm_count = 0
        self.queries = 0

    def attention(self, batch: Batch, q, k, mask) -> None:
        spec, a = self.spec, self.args
        qm = _token_mask(batch, q.shape[0], q.shape[2])
        km = _token_mask(batch, k.shape[0], k.shape[2])
        self.queries += int(qm.sum()) if qm is not None else q.shape[0] * q.shape[2]
        kw = dict(attn_mask=mask, is_causal=a["is_causal"], scale=a["scale"],
                  key_padding_mask=km, chunk_bytes=spec.chunk_bytes, backend=spec.backend)
        if self.kept is not None:
            self.kept.update(q, k, query_mask=qm, **kw)
        if self.cols is not None:
            rows = _colsum_rows(spec.colsum_rows, batch, qm, q.shape[0], q.shape[2], q.device)
            cs = column_sums(q, k, rows, **kw)
            self.cols.update(cs, rows.sum(1), km)

    def out_proj(self, batch: Batch, out, x, w) -> None:
        B, H, S, Dv = out.shape
        if x.numel() != out.numel() or not torch.equal(x.reshape(B, S, H, Dv),
                                                       out.transpose(1, 2)):
            raise PassError(f"the output projection of site {self.site.node} does not read the "
                            f"attention output head by head", "leave out head_norms")
        total, n = head_output_norms(out, w, _token_mask(batch, B, S))
        self.norm_sum = total if self.norm_sum is None else self.norm_sum + total
        self.norm_count += n

    def result(self) -> SiteStats:
        s = self.site
        norms = None
        if self.norm_sum is not None:
            norms = (self.norm_sum / max(self.norm_count, 1)).cpu().numpy()
        return SiteStats(s.node, s.module, s.layer, s.num_heads, self.queries,
                         self.kept.result() if self.kept else None,
                         self.cols.result() if self.cols else None, norms)


def collect_site_stats(program, sites: Sequence[AttentionSite] | None, batches: Iterable[Batch],
                       spec: StatsSpec) -> dict[str, SiteStats]:
    """Statistics per site (keyed by the attention node's name) over `batches`; `program` is a
    `Program` or a GraphModule, which is not modified."""
    gm: GraphModule = getattr(program, "gm", program)
    sites = find_sites(gm) if sites is None else list(sites)
    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    state = {"batch": None}
    runs: dict[str, _Site] = {}
    for site in sites:
        node = by_name.get(site.node)
        if node is None:
            raise PassError(f"site {site.node} is not in the program's graph")
        args = call_args(node)
        run = runs[site.node] = _Site(site, spec, args)
        if run.kept is not None or run.cols is not None:
            with graph.inserting_after(node):
                graph.call_function(_tap(run.attention, state),
                                    (args["q"], args["k"], args["attn_mask"]))
        if spec.head_norms:
            proj, x, w = _out_projection(site, by_name)
            with graph.inserting_after(proj):
                graph.call_function(_tap(run.out_proj, state), (node, x, w))
    tapped = GraphModule(gm, graph)
    from attnc.load import distributed
    from attnc.progress import track

    batches = distributed.shard(list(batches))  # this rank's share (all of them alone)
    with torch.no_grad():
        for batch in track(batches, f"attention statistics of {len(sites)} sites", len(batches)):
            state["batch"] = batch
            tapped(*batch.args)
    runs = distributed.reduce_stats(runs)  # every rank's batches (no-op alone)
    return {name: r.result() for name, r in runs.items()}


def _tap(method, state: dict):
    def attnc_stats_tap(*tensors):
        method(state["batch"], *tensors)

    return attnc_stats_tap


def _out_projection(site: AttentionSite, by_name: dict[str, Node]):
    """(projection node, its input node, its weight as `aten.linear` takes it (E, H * Dv))."""
    proj = by_name.get(site.o_proj or "")
    if proj is None:
        raise PassError(f"site {site.node} has no output projection to measure head norms on")
    aten = torch.ops.aten
    if proj.target == aten.linear.default:
        return proj, proj.args[0], proj.args[1]
    if proj.target == aten.addmm.default:
        x, w = proj.args[1], proj.args[2]
    elif proj.target in (aten.mm.default, aten.matmul.default):
        x, w = proj.args[0], proj.args[1]
    else:
        raise PassError(f"the output projection {proj.name} of site {site.node} is {proj.target}")
    with proj.graph.inserting_before(proj):
        wt = proj.graph.call_function(aten.t.default, (w,))  # (in, out) -> (out, in)
    return proj, x, wt


def _token_mask(batch: Batch, B: int, S: int) -> torch.Tensor | None:
    """The batch's token mask when it describes these (B, S) tokens, else None (all real)."""
    tm = batch.token_mask
    if tm is None:
        return None
    if tuple(tm.shape) != (B, S):
        log.debug("token mask %s does not describe (%d, %d) tokens", tuple(tm.shape), B, S)
        return None
    return tm.bool()


def _colsum_rows(rows: RowsSpec, batch: Batch, qm, B: int, S: int, device) -> torch.Tensor:
    real = qm.to(device) if qm is not None else torch.ones(B, S, dtype=torch.bool, device=device)
    if rows == "all":
        return real
    if rows == "last":
        pos = torch.arange(S, device=device)
        last = torch.where(real, pos, -1).amax(1)  # (B,) -1: no real token
        return (pos[None, :] == last[:, None]) & real
    if callable(rows):
        r = rows(batch).to(device).bool()
        if tuple(r.shape) != (B, S):
            raise PassError(f"colsum_rows gave {tuple(r.shape)} rows, expected {(B, S)}")
        return r & real
    raise PassError(f"unknown colsum_rows {rows!r}", "last, all or a function of the batch")
