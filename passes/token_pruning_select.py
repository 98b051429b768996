"""The in-graph selection of the `token-pruning` pass: scores, debiasing, padding mask, top-R.

Built with `attnc.graph.gather.Builder` (ATen nodes with fake values), from:
  ids (B, S) the token ids, pixels (B, C, H, W), colsum (B, Hq, S) of the scoring layer,
  the trend weights w (n_img,) as a buffer.
Per token: a = colsum averaged over heads; for an image token at index i of its image (raster
order, found at run time as cumsum(ids == image_token) - 1) the score is a * w_i, or -1 when its
patch is padding; text tokens score +1e30 (always kept). `topk(k = S - n_img + R)` then `sort`
gives the kept positions (B, S'), sorted, and `live` (B, S') marks which kept slots are real.

The trend fits (numpy, on calibration means) are `fit_exponential` (log-linear: w_i = exp(-b i))
and `fit_cubic` (w_i = p(0) / p(i)), as the reference's shipped weights are.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch.fx import Node

from attnc.errors import PassError
from attnc.graph.gather import Builder

aten = torch.ops.aten
BIG = 1e30


@dataclass(frozen=True)
class Geometry:
    """How image tokens map to pixels: a raster grid of `patch`-pixel cells."""

    grid_h: int
    grid_w: int
    patch: int


def geometry(pix_shape: tuple[int, ...], n_img: int) -> Geometry | None:
    """The raster grid of n_img tokens on an (.., H, W) image, or None when they are not one."""
    h, w = int(pix_shape[-2]), int(pix_shape[-1])
    for patch in range(1, min(h, w) + 1):
        if h % patch == 0 and w % patch == 0 and (h // patch) * (w // patch) == n_img:
            return Geometry(h // patch, w // patch, patch)
    return None


def padding_nodes(b: Builder, pix: Node, geo: Geometry, pad_value: float, tol: float,
                  threshold: float) -> Node:
    """valid (B, n_img) bool: cells whose share of letterbox padding is at most `threshold`.
    Padding rows/columns are those whose every pixel (all channels) is within `tol` of
    `pad_value` (the letterbox colour, normalised): the image's size before letterboxing."""
    diff = b(aten.abs.default, b(aten.sub.Tensor, pix, pad_value))  # (B, C, H, W)
    near = b(aten.le.Scalar, diff, tol)
    rows = b(aten.all.dim, b(aten.all.dim, near, 3), 1)  # (B, H): whole row is padding
    cols = b(aten.all.dim, b(aten.all.dim, near, 2), 1)  # (B, W)
    vr = b(aten.rsub.Scalar, b(aten._to_copy.default, rows, dtype=torch.float32), 1.0)
    vc = b(aten.rsub.Scalar, b(aten._to_copy.default, cols, dtype=torch.float32), 1.0)
    bsz = b.size(pix, 0)
    vr = b(aten.mean.dim, b(aten.view.default, vr, [bsz, geo.grid_h, geo.patch]), [-1])  # (B, Gh)
    vc = b(aten.mean.dim, b(aten.view.default, vc, [bsz, geo.grid_w, geo.patch]), [-1])  # (B, Gw)
    frac = b(aten.mul.Tensor, b(aten.unsqueeze.default, vr, 2), b(aten.unsqueeze.default, vc, 1))
    frac = b(aten.view.default, frac, [bsz, geo.grid_h * geo.grid_w])  # (B, n_img) valid share
    return b(aten.ge.Scalar, frac, 1.0 - threshold)


@dataclass
class Selection:
    score: Node  # (B, S) float32: debiased score (image), +BIG (text), -1 (padding)
    keep: Node  # (B, S') int64 sorted
    live: Node | None  # (B, S') bool, or None without a padding mask
    is_img: Node  # (B, S) bool
    valid: Node | None  # (B, S) bool: image tokens that are not padding
    attn: Node  # (B, S) float: the scorer's attention to each token, mean over heads


def select_nodes(b: Builder, ids: Node, colsum: Node, *, image_token: int, n_img: int,
                 keep_count: int, weights: torch.Tensor | None,
                 padding: Node | None) -> Selection:
    """The selection subgraph (see the module docstring)."""
    a = b(aten.mean.dim, colsum, [1])  # (B, S) mean over heads
    is_img = b(aten.eq.Scalar, ids, image_token)  # (B, S)
    pos = b(aten.cumsum.default, b(aten._to_copy.default, is_img, dtype=torch.int64), 1)
    pos = b(aten.clamp.default, b(aten.sub.Tensor, pos, 1), 0, n_img - 1)  # (B, S) index in image
    s = a
    if weights is not None:
        w = b.buffer("attnc_token_pruning_trend", weights.to(torch.float32))
        s = b(aten.mul.Tensor, a, b(aten.index.Tensor, w, [pos]))  # (B, S)
    valid = None
    if padding is not None:
        valid = b(aten.logical_and.default, is_img, b(aten.gather.default, padding, 1, pos))
        s = b(aten.where.ScalarOther, valid, s, -1.0)
    score = b(aten.where.self, is_img, s, b(aten.full_like.default, s, BIG))
    seq = b.size(ids, 1)
    k = seq if keep_count == n_img else _sub(b, seq, n_img - keep_count)
    top = b(aten.topk.default, score, k, 1, True, False)
    idx = b(operator.getitem, top, 1)  # (B, S')
    keep = b(operator.getitem, b(aten.sort.default, idx, 1), 0)  # sorted positions
    live = None
    if valid is not None:
        real = b(aten.logical_or.default, b(aten.logical_not.default, is_img), valid)  # (B, S)
        live = b(aten.gather.default, real, 1, keep)  # (B, S')
    return Selection(score, keep, live, is_img, valid, a)


def _sub(b: Builder, size, n: int):
    return size - n if isinstance(size, int) else b(operator.sub, size, n)


def _positions(b: Builder, ids: Node) -> Node:
    """arange(S) int64 as cumsum(ones) - 1 (fake arange on a symbolic end specialises it)."""
    ones = b(aten.ones_like.default, b(aten.select.int, ids, 0, 0), dtype=torch.int64)  # (S,)
    return b(aten.sub.Tensor, b(aten.cumsum.default, ones, 0), 1)


def scoring_rows(b: Builder, ids: Node, scorer: str, image_token: int) -> Node:
    """The query rows of the colsum, shared by the batch: the last position (FastV), or a bool
    (S,) of the positions after the last image token in every sequence (HiMAP's text tokens;
    with left padding, the text that follows the image in each row of the batch)."""
    if scorer == "last-token":
        return b(aten.slice.Tensor, _positions(b, ids), 0, -1, 9223372036854775807)  # (1,)
    ar = _positions(b, ids)  # (S,)
    is_img = b(aten.eq.Scalar, ids, image_token)
    marked = b(aten.where.ScalarOther, is_img, b(aten.unsqueeze.default, ar, 0), -1)  # (B, S)
    last = b(operator.getitem, b(aten.max.dim, marked, 1, True), 0)  # (B, 1)
    after = b(aten.gt.Tensor, b(aten.unsqueeze.default, ar, 0), last)  # (B, S)
    return b(aten.all.dim, after, 0)  # (S,) bool


# ------------------------------------------------------------------------- trend fits


def fit_exponential(mean: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, dict]:
    """log a_i = c + b i by least squares over positions `ok` with a_i > 0; w_i = exp(-b i)."""
    i = np.arange(len(mean), dtype=np.float64)
    use = ok & (mean > 0)
    if use.sum() < 2:
        raise PassError("token-pruning: too few image positions with attention to fit a trend")
    slope, icpt = np.polyfit(i[use], np.log(mean[use]), 1)
    return np.exp(-slope * i), {"b": float(slope), "c": float(icpt)}


def fit_cubic(mean: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, dict]:
    """a_i ~ p(i), a degree-3 polynomial fitted over positions `ok`; w_i = p(0) / p(i), with p
    floored at 5% of its mean where the fit dips to or below zero."""
    i = np.arange(len(mean), dtype=np.float64)
    if ok.sum() < 4:
        raise PassError("token-pruning: too few image positions to fit a cubic trend")
    coef = np.polyfit(i[ok], mean[ok].astype(np.float64), 3)
    p = np.polyval(coef, i)
    floor = 0.05 * float(np.abs(p[ok]).mean() or 1.0)
    p = np.maximum(p, floor)
    return p[0] / p, {"coefficients": [float(c) for c in coef], "floored": int((p <= floor).sum())}


FITS = {"exponential": fit_exponential, "cubic": fit_cubic}


def fit_trend(kind: str, mean: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, dict]:
    w, info = FITS[kind](mean, ok)
    debiased = (mean * w)[ok]
    info["residual_cv"] = float(debiased.std() / max(debiased.mean(), 1e-30))
    info["raw_cv"] = float(mean[ok].std() / max(mean[ok].mean(), 1e-30))
    return w.astype(np.float32), info


# ------------------------------------------------------------------------- row scores


def row_colsum_nodes(b: Builder, call, ids: Node, scorer: str, image_token: int,
                     text_window: int) -> Node:
    """colsum (B, Hq, S) from the scorer's query rows only, in plain ATen ops: softmax of the
    last T rows' scores (T = 1 for last-token, the last `text_window` positions weighted by
    "after the image in every sequence" for text-tokens), O(T x S), no S x S matrix. The
    attention call itself stays as it is. Exports to any ONNX runtime."""
    q, k = call.q, call.k
    t = 1 if scorer == "last-token" else text_window
    pos = _positions(b, ids)  # (S,)
    qr = b(aten.slice.Tensor, q, 2, -t, 9223372036854775807)  # (B, Hq, T, D)
    hq, hk = q.meta["val"].shape[1], k.meta["val"].shape[1]
    if hq != hk:
        k = b(aten.repeat_interleave.self_int, k, hq // hk, 1)  # (B, Hq, S, D)
    s = b(aten.matmul.default, qr, b(aten.transpose.int, k, -1, -2))  # (B, Hq, T, S)
    s = b(aten.mul.Tensor, s, float(call.scale))
    rowpos = b(aten.slice.Tensor, pos, 0, -t, 9223372036854775807)  # (T,)
    if call.mask is not None:
        m = call.mask
        if m.meta["val"].dim() == 4:
            m = b(aten.slice.Tensor, m, 2, -t, 9223372036854775807)  # (B|1, 1|H, T, S)
        else:
            m = b(aten.slice.Tensor, m, -2, -t, 9223372036854775807)
        if m.meta["val"].dtype == torch.bool:
            s = b(aten.masked_fill.Scalar, s, b(aten.logical_not.default, m), float("-inf"))
        else:
            s = b(aten.add.Tensor, s, m)
    if call.is_causal:
        later = b(aten.gt.Tensor, b(aten.unsqueeze.default, pos, 0),
                  b(aten.unsqueeze.default, rowpos, 1))  # (T, S): key after the query
        s = b(aten.masked_fill.Scalar, s, later, float("-inf"))
    p = b(aten._softmax.default, b(aten._to_copy.default, s, dtype=torch.float32), -1, False)
    if scorer == "last-token":
        return b(aten.squeeze.dim, p, 2)  # (B, Hq, S)
    rows = scoring_rows(b, ids, scorer, image_token)  # (S,) bool
    w = b(aten._to_copy.default, b(aten.slice.Tensor, rows, 0, -t, 9223372036854775807),
          dtype=torch.float32)  # (T,)
    w = b(aten.unsqueeze.default, w, -1)  # (T, 1)
    return b(aten.sum.dim_IntList, b(aten.mul.Tensor, p, w), [2])  # (B, Hq, S)
