"""moh's calibration: per site, streamed over calibration batches through taps on a copy of the
graph (the program is not modified), real tokens only:

- head importance: mean over tokens of ||H^h_t W_O^h||, head h's contribution through the
  output projection (`attnc.graph.stats.head_output_norms`' quantity);
- the normal equations of the linear router: [x_t, 1] regressed on the contribution norms
  (x_t: the input of the query projection), accumulated in float64;
- a bounded sample of tokens (x_t, per-head query norms, per-head attention outputs) for the
  router fit, the gate values and the fidelity cost (`max_tokens` per site, spread over batches).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from attnc.errors import PassError
from attnc.graph.calls import read_call
from attnc.graph.sites import AttentionSite

aten = torch.ops.aten


@dataclass
class SiteCalib:
    site: str
    heads: int
    tokens: int
    importance: torch.Tensor  # (H,) mean contribution norm
    xtx: torch.Tensor  # (E+1, E+1) float64
    xty: torch.Tensor  # (E+1, H) float64
    x: torch.Tensor  # (N, E) sampled q-projection inputs
    qn: torch.Tensor  # (N, H) query norms
    o: torch.Tensor  # (N, H, Dv) attention outputs
    w_o: torch.Tensor  # (E_out, H * Dv) output projection weight (float32)


def anchors(gm: GraphModule, site: AttentionSite) -> tuple[Node, Node, Node, Node] | str:
    """(attention node, q-projection input (B, S, E), q (B, H, S, D), o-projection weight
    (E_out, H * Dv)) or why the site has none."""
    nodes = {n.name: n for n in gm.graph.nodes}
    attn = nodes.get(site.node)
    qp, op_ = nodes.get(site.q_proj or ""), nodes.get(site.o_proj or "")
    if attn is None or qp is None or op_ is None:
        return "no query or output projection found"
    if qp.target != aten.linear.default or op_.target != aten.linear.default:
        return "the query/output projection is not aten.linear"
    xv, wv = qp.args[0].meta.get("val"), op_.args[1].meta.get("val")
    if not isinstance(xv, torch.Tensor) or xv.dim() != 3:
        return "the query projection's input is not (B, S, E)"
    if not isinstance(wv, torch.Tensor) or wv.shape[1] != site.num_heads * _dv(attn):
        return "the output projection does not read every head's output"
    return attn, qp.args[0], read_call(attn).q, op_.args[1]


def _dv(attn: Node) -> int:
    val = attn.meta.get("val")
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) else -1


class _Acc:
    def __init__(self, site: AttentionSite, quota: int, seed: int):
        self.site, self.quota = site, quota
        self.g = torch.Generator().manual_seed(seed)
        self.n = 0
        self.imp = None
        self.xtx = self.xty = None
        self.keep: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.w = None

    def __call__(self, tm, x, q, out, w):
        B, H, S, Dv = out.shape
        real = (torch.ones(B, S, dtype=torch.bool) if tm is None else tm.bool().cpu())
        xr = x.detach().float().cpu()[real]  # (N, E)
        qn = q.detach().float().cpu().norm(dim=-1).transpose(1, 2)[real]  # (N, H)
        o = out.detach().float().cpu().transpose(1, 2)[real]  # (N, H, Dv)
        wf = w.detach().float().cpu()
        self.w = wf
        c = torch.einsum("nhd,ehd->nhe", o, wf.reshape(-1, H, Dv)).norm(dim=-1)  # (N, H)
        X = torch.cat([xr, torch.ones(len(xr), 1)], 1).double()  # (N, E+1)
        self.imp = c.double().sum(0) if self.imp is None else self.imp + c.double().sum(0)
        self.xtx = X.T @ X if self.xtx is None else self.xtx + X.T @ X
        self.xty = X.T @ c.double() if self.xty is None else self.xty + X.T @ c.double()
        self.n += len(xr)
        take = torch.randperm(len(xr), generator=self.g)[: self.quota]
        self.keep.append((xr[take], qn[take], o[take]))

    def result(self) -> SiteCalib:
        x, qn, o = (torch.cat([k[i] for k in self.keep]) for i in range(3))
        return SiteCalib(self.site.node, self.site.num_heads, self.n,
                         (self.imp / max(self.n, 1)).float(), self.xtx, self.xty, x, qn, o,
                         self.w)


def _tap(acc: _Acc, state: dict):
    def attnc_moh_tap(x, q, out, w):
        acc(state["mask"], x, q, out, w)

    return attnc_moh_tap


def calibrate(program, sites: list[AttentionSite], batches, max_tokens: int,
              seed: int = 0) -> dict[str, SiteCalib]:
    """Calibration statistics of `sites` (keyed by attention node name) over `batches`."""
    gm: GraphModule = program.gm
    batches = list(batches)
    if not batches:
        raise PassError("moh needs calibration batches (--calib)")
    graph = copy.deepcopy(gm.graph)
    tapped_gm = GraphModule(gm, graph)
    state: dict = {"mask": None}
    accs: dict[str, _Acc] = {}
    quota = max(1, math.ceil(max_tokens / len(batches)))
    for site in sites:
        found = anchors(tapped_gm, site)
        if isinstance(found, str):
            raise PassError(f"moh: site {site.node}: {found}")
        attn, x, q, w = found
        acc = accs[site.node] = _Acc(site, quota, seed + len(accs))
        last = max((attn, x, q, w), key=lambda n: _index(graph, n))
        with graph.inserting_after(last):
            graph.call_function(_tap(acc, state), (x, q, attn, w))
    tapped = GraphModule(tapped_gm, graph)
    with torch.no_grad():
        for batch in batches:
            state["mask"] = batch.token_mask
            B = batch.args[0].shape[0] if batch.args else None
            if state["mask"] is not None and B is not None and state["mask"].shape[0] != B:
                state["mask"] = None
            tapped(*batch.args)
    return {k: a.result() for k, a in accs.items()}


def _index(graph, node: Node) -> int:
    for i, n in enumerate(graph.nodes):
        if n is node:
            return i
    return -1
