"""Attention statistics, streamed per head over calibration batches with padding masked.

The attention is SDPA's: q (B, Hq, Sq, D), k (B, Hkv, Skv, D) with Hq % Hkv == 0 (GQA), a bool
(True = attend) or float (added) `attn_mask` broadcastable to (B, Hq, Sq, Skv), `is_causal`
(top-left: j <= i), `scale` (default D^-1/2) and an optional soft-cap tanh(s / c) * c. On top,
`key_padding_mask` (B, Skv) and `query_mask` (B, Sq) say which tokens are real. The keys the
original attention allows, A_i, are those its masks leave (a float entry <= -1e4, such as the
dtype's minimum or -inf, counts as masked, as in `kernels.masks.mask_allowed`); p_ij is the
softmax over A_i. Rows that allow no key, and padding queries, are left out of every statistic.

- kept mass of a candidate pattern P (`stats_patterns.Candidate`): m_i = sum_{j in A_i & P_i} p_ij,
  per head: the mean over real queries, the minimum, a low quantile (default the 5th percentile)
  and the density |A & P| / |A| over the same queries;
- column sums: sum over chosen query rows of p_ij, per key and head;
- head output norms: mean over real tokens of ||o_h W_h^T||, head h's share of the output
  projection.

Memory never grows with S x S: on CPU (and on CUDA without Triton) the scores are computed one
tile of (one sequence, a block of query rows, every key) at a time, block rows chosen so a tile
of float32 scores for all heads fits `chunk_bytes`; the row's log-sum-exp is exact because the
tile holds whole rows. On CUDA the Triton kernels of `kernels/flash.py` give the row lse of the
site's attention and of each pattern with a kernel form, so m_i = exp(lse_{A&P} - lse_A), and
column sums come from `flash.column_sums`.

The quantile comes from a streaming histogram over the lost mass 1 - m_i with log-spaced edges
(`bins` per head and pattern, from 1e-7 to 1): the value reported is the lower end of the bin
holding the p-quantile (rank ceil(p N) of the N values ascending), raised to the exact minimum,
so it never overstates the kept mass and undershoots it by at most 3.2% of the lost mass
(bins=512) plus 1e-7. Mean, minimum and density are exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attnc.errors import PassError
from attnc.graph.stats_call import CallInputs, flash_backend
from attnc.graph.stats_patterns import Candidate, MaskMod, as_candidates

CHUNK_BYTES = 8 << 20  # float32 scores of one tile, all heads
LOST_MIN = 1e-7


@dataclass(frozen=True)
class PatternMass:
    """Kept mass of one candidate, per head (numpy arrays of shape (H,))."""

    name: str
    config: dict[str, Any]
    mean: np.ndarray
    quantile: np.ndarray
    min: np.ndarray
    density: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config,
                **{k: json_list(getattr(self, k)) for k in ("mean", "quantile", "min", "density")}}


@dataclass(frozen=True)
class KeptMass:
    """Per candidate, per head; `queries` (H,) counts the real queries behind each head."""

    quantile: float
    queries: np.ndarray
    patterns: tuple[PatternMass, ...]

    def __getitem__(self, name: str) -> PatternMass:
        for p in self.patterns:
            if p.name == name:
                return p
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {"quantile": self.quantile, "queries": self.queries.tolist(),
                "patterns": [p.to_json() for p in self.patterns]}


@dataclass(frozen=True)
class ColumnSums:
    """mean[h, j]: the attention probability key position j receives, summed over a sequence's
    chosen rows and divided by their number, averaged over the sequences where j is a real key
    (`count[j]` of them)."""

    rows: str
    mean: np.ndarray  # (H, S)
    count: np.ndarray  # (S,)

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "mean": json_list(self.mean), "count": self.count.tolist()}


def json_list(a: np.ndarray) -> list:
    """A float array as nested lists, NaN (no data) as None, so the report stays valid JSON."""
    return np.where(np.isnan(a), None, a.astype(object)).tolist()


# ---------------------------------------------------------------------------- kept mass


class KeptMassAccumulator:
    """Streams kept mass of `candidates` per head over any number of attention calls."""

    def __init__(self, candidates: Sequence[Candidate | MaskMod], quantile: float = 0.05,
                 bins: int = 512):
        if not 0.0 < quantile <= 1.0 or bins < 8:
            raise PassError(f"quantile {quantile} must be in (0, 1] and bins {bins} >= 8")
        self.candidates = as_candidates(candidates)
        self.p, self.bins = quantile, bins
        self.inner = np.geomspace(LOST_MIN, 1.0, bins - 1)
        self.heads: int | None = None

    def _init(self, heads: int, device) -> None:
        if self.heads is not None:
            if heads != self.heads:
                raise PassError(f"kept mass collected over {self.heads} heads, now given {heads}")
            return
        C, f64 = len(self.candidates), torch.float64
        self.heads = heads
        self.sum = torch.zeros(C, heads, dtype=f64, device=device)
        self.nk = torch.zeros(C, heads, dtype=f64, device=device)  # |A & P| over valid rows
        self.na = torch.zeros(heads, dtype=f64, device=device)  # |A|
        self.count = torch.zeros(heads, dtype=torch.int64, device=device)
        self.min = torch.full((C, heads), math.inf, dtype=f64, device=device)
        self.hist = torch.zeros(C, heads * self.bins, dtype=torch.int64, device=device)
        self.edges = torch.tensor(self.inner, dtype=torch.float32, device=device)

    def update(self, q, k, *, attn_mask=None, is_causal=False, scale=None, key_padding_mask=None,
               query_mask=None, softcap=None, chunk_bytes: int = CHUNK_BYTES,
               backend: str = "auto") -> None:
        call = CallInputs(q, k, attn_mask, is_causal, scale, key_padding_mask, query_mask, softcap)
        self._init(call.H, call.device)
        flash = flash_backend(backend, call)
        torch_cands = list(range(len(self.candidates)))
        if flash is not None:
            torch_cands = self._flash_update(flash, call)
        mods = [c.mask_mod(call.Sq, call.Skv) for c in self.candidates]
        with torch.no_grad():
            for b, rows in call.tiles(chunk_bytes):
                self._tile(call, b, rows, mods, torch_cands, count_rows=flash is None)

    def _tile(self, call: CallInputs, b: int, rows: torch.Tensor, mods: list[MaskMod],
              with_scores: list[int], count_rows: bool) -> None:
        allowed = call.allowed(b, rows)
        if with_scores:
            p, total, valid = call.probs(b, rows, allowed, normalize=False)
        else:  # densities only: the rows the kernels already scored
            valid = (allowed.any(-1) if allowed is not None
                     else torch.ones(1, rows.numel(), dtype=torch.bool, device=call.device))
            if call.qm is not None:
                valid = valid & call.qm[b].index_select(0, rows)[None, :]
            valid = valid.expand(call.H, rows.numel())
        grids = call.index_grids(b, rows)
        n_allowed = allowed.sum(-1) if allowed is not None else call.Skv
        vf = valid.to(torch.float64)
        self.na += (vf * n_allowed).sum(1)
        if count_rows:
            self.count += valid.sum(1)
        for c, mod in enumerate(mods):
            m = mod(*grids)
            both = m if allowed is None else (m & allowed)
            self.nk[c] += (vf * both.sum(-1)).sum(1)
            if c in with_scores:
                kept = torch.where(m, p, 0.0).sum(-1) / total
                self._add(c, kept, valid)

    def _add(self, c: int, kept: torch.Tensor, valid: torch.Tensor) -> None:
        """Fold kept mass (H, n) of the valid rows into candidate c's sums and histogram."""
        kept = kept.clamp(max=1.0)
        self.sum[c] += torch.where(valid, kept.double(), 0.0).sum(1)
        self.min[c] = torch.minimum(self.min[c], torch.where(valid, kept.double(), math.inf)
                                    .amin(1))
        lost = (1.0 - kept).clamp(min=0.0)
        idx = torch.bucketize(lost.float(), self.edges, right=True)  # (H, n) in [0, bins-1]
        idx = idx + torch.arange(kept.shape[0], device=idx.device)[:, None] * self.bins
        self.hist[c] += torch.bincount(idx[valid], minlength=self.hist.shape[1])

    def _flash_update(self, flash, call: CallInputs) -> list[int]:
        """Kept mass from Triton row lse for candidates with a kernel form; returns the rest."""
        mask = call.flash_mask()
        k = call.k.expand(call.B, *call.k.shape[1:])
        _, lse_a = flash.attention_fwd(call.q, k, k, mask=mask, causal=call.causal,
                                       scale=call.scale)
        valid = torch.isfinite(lse_a)
        if call.qm is not None:
            valid = valid & call.qm[:, None, :]
        self.count += valid.sum((0, 2))
        rest = []
        for c, cand in enumerate(self.candidates):
            form = cand.flash_form(call.Sq, call.Skv)
            if form is None:
                rest.append(c)
                continue
            pattern, layout = form
            _, lse_p = flash.attention_fwd(call.q, k, k, mask=mask, scale=call.scale,
                                           causal=call.causal or cand.causal, pattern=pattern,
                                           layout=layout)
            kept = torch.exp(lse_p - torch.where(valid, lse_a, 0.0))
            self._add(c, kept.transpose(0, 1).reshape(call.H, -1),
                      valid.transpose(0, 1).reshape(call.H, -1))
        return rest

    def result(self) -> KeptMass:
        if self.heads is None:
            raise PassError("no attention call was collected", "give at least one batch")
        count = self.count.cpu().numpy()
        C, H = len(self.candidates), self.heads
        hist = self.hist.cpu().numpy().reshape(C, H, self.bins)
        rank = np.maximum(np.ceil(self.p * count), 1)  # (H,)
        cum = np.cumsum(hist[..., ::-1], axis=-1)  # from the largest lost mass down
        k = self.bins - 1 - (cum < rank[None, :, None]).sum(-1)  # the bin holding rank r
        upper = np.append(self.inner, 1.0)
        mn = self.min.cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.sum.cpu().numpy() / count
            quant = np.maximum(1.0 - upper[np.minimum(k, self.bins - 1)], mn)
            dens = self.nk.cpu().numpy() / self.na.cpu().numpy()
        empty = count == 0
        mean[:, empty] = quant[:, empty] = mn[:, empty] = np.nan
        pats = tuple(PatternMass(c.name, c.config(), mean[i], quant[i], mn[i], dens[i])
                     for i, c in enumerate(self.candidates))
        return KeptMass(self.p, count, pats)


def kept_mass(q, k, candidates: Sequence[Candidate | MaskMod], *, attn_mask=None,
              is_causal: bool = False, scale: float | None = None, key_padding_mask=None,
              query_mask=None, softcap: float | None = None, quantile: float = 0.05,
              bins: int = 512, chunk_bytes: int = CHUNK_BYTES, backend: str = "auto") -> KeptMass:
    """Kept attention mass of each candidate over one call (see the module docstring)."""
    acc = KeptMassAccumulator(candidates, quantile, bins)
    acc.update(q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
               key_padding_mask=key_padding_mask, query_mask=query_mask, softcap=softcap,
               chunk_bytes=chunk_bytes, backend=backend)
    return acc.result()


# ---------------------------------------------------------------------------- column sums


def column_sums(q, k, rows: torch.Tensor, *, attn_mask=None, is_causal: bool = False,
                scale: float | None = None, key_padding_mask=None, softcap: float | None = None,
                chunk_bytes: int = CHUNK_BYTES, backend: str = "auto") -> torch.Tensor:
    """(B, Hq, Skv) float32: per key, the attention probabilities it receives summed over the query
    `rows`: bool (Sq,) or (B, Sq), or int indices (n,) shared by the batch."""
    call = CallInputs(q, k, attn_mask, is_causal, scale, key_padding_mask, None, softcap)
    per_b = _rows_per_sequence(rows, call)
    out = torch.zeros(call.B, call.H, call.Skv, dtype=torch.float32, device=call.device)
    flash = flash_backend(backend, call)
    with torch.no_grad():
        if flash is not None:
            mask = call.flash_mask()
            kk = call.k.expand(call.B, *call.k.shape[1:])
            _, lse = flash.attention_fwd(call.q, kk, kk, mask=mask, causal=call.causal,
                                         scale=call.scale)
            for b, r in enumerate(per_b):
                out[b] = flash.column_sums(
                    call.q[b:b + 1], kk[b:b + 1], lse[b:b + 1], r, scale=call.scale,
                    mask=None if mask is None else mask[b if mask.shape[0] > 1 else 0][None],
                    causal=call.causal)[0]
            return out
        n = max(1, chunk_bytes // (4 * call.H * max(call.Skv, 1)))
        for b, r in enumerate(per_b):
            for i in range(0, r.numel(), n):
                sel = r[i:i + n]
                p, _, _ = call.probs(b, sel, call.allowed(b, sel))
                out[b] += p.sum(1)
    return out


def _rows_per_sequence(rows: torch.Tensor, call: CallInputs) -> list[torch.Tensor]:
    rows = rows.to(call.device)
    if rows.dtype == torch.bool:
        if rows.shape not in ((call.Sq,), (call.B, call.Sq)):
            raise PassError(f"query rows mask {tuple(rows.shape)} is neither ({call.Sq},) nor "
                            f"{(call.B, call.Sq)}")
        rows = rows.expand(call.B, call.Sq)
        return [r.nonzero().flatten() for r in rows]
    if rows.dim() != 1 or (rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= call.Sq)):
        raise PassError(f"query row indices must be 1-D within [0, {call.Sq})")
    return [rows.long()] * call.B


class ColumnSumAccumulator:
    """Streams `ColumnSums` over calls of any sequence length (positions grow as needed)."""

    def __init__(self, rows: str = "rows"):
        self.rows = rows
        self.sum: np.ndarray | None = None  # (H, S) float64
        self.count = np.zeros(0, dtype=np.int64)

    def update(self, colsum: torch.Tensor, n_rows: torch.Tensor, key_mask: torch.Tensor | None):
        """colsum (B, H, Skv) from `column_sums`, n_rows (B,) rows per sequence, key_mask (B, Skv)
        real keys (None: all). Sequences with no chosen row are skipped."""
        B, H, S = colsum.shape
        keep = (n_rows > 0).cpu()
        per = (colsum.double().cpu() / n_rows.clamp(min=1).double().cpu()[:, None, None])
        real = (torch.ones(B, S, dtype=torch.bool) if key_mask is None else key_mask.bool().cpu())
        real = real & keep[:, None]
        per = torch.where(real[:, None, :], per, 0.0)
        if self.sum is None:
            self.sum = np.zeros((H, 0))
        if self.sum.shape[1] < S:
            self.sum = np.pad(self.sum, ((0, 0), (0, S - self.sum.shape[1])))
            self.count = np.pad(self.count, (0, S - self.count.shape[0]))
        self.sum[:, :S] += per.sum(0).numpy()
        self.count[:S] += real.sum(0).numpy()

    def result(self) -> ColumnSums:
        if self.sum is None:
            raise PassError("no column sums were collected", "give at least one batch")
        with np.errstate(invalid="ignore", divide="ignore"):
            return ColumnSums(self.rows, self.sum / self.count, self.count.copy())


# ---------------------------------------------------------------------------- head output norms


def head_output_norms(attn_out: torch.Tensor, o_proj_weight: torch.Tensor,
                      token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(sum (H,) float64 of ||o_h W_h^T|| over real tokens, their count): head h's contribution
    through the output projection. attn_out (B, H, S, Dv) as SDPA returns it, o_proj_weight
    (E, H * Dv) as `aten.linear` takes it (head-major input columns), token_mask (B, S)."""
    B, H, S, Dv = attn_out.shape
    if o_proj_weight.dim() != 2 or o_proj_weight.shape[1] != H * Dv:
        raise PassError(f"output projection {tuple(o_proj_weight.shape)} does not take {H} heads "
                        f"of {Dv} (input {H * Dv})")
    w = o_proj_weight.float()
    real = (torch.ones(B, S, dtype=torch.bool, device=attn_out.device) if token_mask is None
            else token_mask.bool())
    total = torch.zeros(H, dtype=torch.float64, device=attn_out.device)
    with torch.no_grad():
        for b in range(B):
            for h in range(H):
                y = attn_out[b, h].float() @ w[:, h * Dv:(h + 1) * Dv].T  # (S, E)
                total[h] += y.norm(dim=-1)[real[b]].double().sum()
    return total, int(real.sum())

