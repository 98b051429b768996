"""What the `token-pruning` pass learns from calibration data: the positional trend it divides
out (`fit_weights`) and what its selection keeps on the calibration images (`kept_stats`), both
read from a probe of the pass's own selection subgraph (`node_values`), never re-implemented.

`calibration_images(ctx)` says where the calibration pixels came from (real image files, a tensor
file, or generated), for the report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from attnc.errors import PassError
from attnc.graph.gather import node_values

from .token_pruning_select import Geometry, fit_trend


def calibration_images(ctx) -> str:
    """Where the calibration pixels came from, in words (the report says it)."""
    data = getattr(ctx, "calibration", None)
    if data is None:
        return "none"
    images = getattr(data, "images", None)
    if images:
        return str(images)
    if getattr(data, "source", "") == "generated":
        return "generated (random pixels)"
    return "unknown"


def _batches(ctx) -> list:
    data = getattr(ctx, "calibration", None)
    return list(getattr(data, "calib", None) or [])


def fit_weights(probe_of: Callable[..., Any], kind: str, n_img: int,
                ctx) -> tuple[np.ndarray, dict]:
    """The trend weights (n_img,) from calibration: the mean undebiased score per image position
    over valid patches, fitted as `kind` says. `probe_of(keep_n, weights)` gives (program,
    Selection) of the pass's selection without the gather."""
    batches = _batches(ctx)
    if not batches:
        raise PassError(f"token-pruning debias {kind!r} needs calibration data (--calib)")
    probe, sel = probe_of(n_img, None)  # weights all ones: the raw score
    total, count = np.zeros(n_img), np.zeros(n_img)
    want = [sel.score, sel.is_img] + ([sel.valid] if sel.valid is not None else [])
    for batch in batches:
        got = node_values(probe.gm, batch.args, want)
        score, is_img = got[sel.score.name].double(), got[sel.is_img.name]
        ok = got[sel.valid.name] if sel.valid is not None else is_img
        for r in range(score.shape[0]):
            s, m = score[r][is_img[r]].numpy(), ok[r][is_img[r]].numpy()
            total += np.where(m, s, 0.0)
            count += m
    mean = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    w, info = fit_trend(kind, mean, count > 0)
    info["calibration_sequences"] = int(sum(b.args[0].shape[0] for b in batches))
    info["positions_fitted"] = int((count > 0).sum())
    return w, info


def kept_stats(probe_of: Callable[..., Any], keep_n: int, weights, n_img: int,
               geo: Geometry | None, ctx) -> dict | None:
    """What the selection (with the plan's weights and keep count) keeps on the calibration
    sequences: valid (non-padding) image tokens, kept image tokens that are live and that are
    padding, where the kept tokens sit in the image (mean raster index over n_img - 1; share per
    quarter of the grid's rows, top to bottom), and the share of the scorer's attention to the
    image that the kept tokens hold. None without calibration data."""
    batches = _batches(ctx)
    if not batches:
        return None
    probe, sel = probe_of(keep_n, weights)
    want = [sel.keep, sel.is_img, sel.attn] + [n for n in (sel.live, sel.valid) if n is not None]
    valid_n, kept_n, pad_n, where, mass = [], [], [], [], []
    rows = geo.grid_h if geo is not None else 4
    per_row = n_img / rows
    quarters = np.zeros(4)
    for batch in batches:
        got = node_values(probe.gm, batch.args, want)
        keep, is_img = got[sel.keep.name], got[sel.is_img.name]
        attn = got[sel.attn.name].double()
        valid = got[sel.valid.name] if sel.valid is not None else is_img
        live = got[sel.live.name] if sel.live is not None else None
        for r in range(keep.shape[0]):
            img_pos = is_img[r].nonzero().flatten()  # (n_img,) positions of the image tokens
            index = {int(p): i for i, p in enumerate(img_pos.tolist())}
            k = keep[r].tolist()
            alive = live[r].tolist() if live is not None else [True] * len(k)
            kept_img = [index[p] for p, a in zip(k, alive, strict=True) if p in index and a]
            padded = [p for p in k if p in index and not bool(valid[r, p])]
            valid_n.append(int(valid[r][img_pos].sum()))
            kept_n.append(len(kept_img))
            pad_n.append(len(padded))
            if kept_img:
                where.append(float(np.mean(kept_img)) / max(n_img - 1, 1))
                for i in kept_img:
                    quarters[min(3, int(i // per_row) * 4 // rows)] += 1
            a = attn[r][img_pos]
            total = float(a.sum())
            if total > 0:
                mass.append(float(a[kept_img].sum()) / total)
    stat = lambda xs: {"mean": round(float(np.mean(xs)), 4), "min": int(np.min(xs)),
                       "max": int(np.max(xs))}
    return {
        "sequences": len(valid_n),
        "valid_image_tokens": stat(valid_n),
        "kept_image_tokens": stat(kept_n),
        "kept_padding_tokens": stat(pad_n),
        "kept_index_mean": round(float(np.mean(where)), 4) if where else None,
        "kept_share_by_row_quarter": [round(float(q), 4) for q in quarters / max(quarters.sum(),
                                                                                 1)],
        "attention_mass_kept": round(float(np.mean(mass)), 4) if mass else None,
    }
