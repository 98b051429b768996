"""Fitting passes/sparse_cost.py's constants from committed benchmark files: `fit_cuda` reads the
Triton kernel benchmark JSON (the CUDA tile costs), `fit_ort` the ONNX Runtime timings of
benchmarks/onnx_sparse_cost.py (the blocked and head-split window forms). Tests check that the
constants in sparse_cost.py are what these fits give."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from . import sparse_cost as sc
from .sparse_cost import (
    BM,
    BN,
    D_REF,
    SiteShape,
    _window,
    predict,
    tile_counts,
    window_cost,
)


def _natten1d(s: int, k: int, masks):
    return lambda i, j: masks.natten_axis_visible(i, j, s, k, 1, 1, False)


def fit_cuda(path: str | Path) -> dict[str, float]:
    """Re-derive C_FULL, the SDPA figures and C_PARTIAL from a kernels benchmark JSON: the dense
    rows give the per-tile costs; the 1-D rows whose tiles the predicates reproduce (na1d and
    the causal sliding window, both at one config) give C_PARTIAL by subtracting the full tiles.
    Returns {} entries only for what the file holds."""
    from attnc.kernels import masks

    rows = {r["case"]: r for r in json.loads(Path(path).read_text())["results"]}
    out: dict[str, float] = {}

    def per_tile(r: dict, ms: float, causal: bool) -> float:
        cfg = r.get("config") or {"BLOCK_M": BM, "BLOCK_N": BN}
        nq, nk = -(-r["S"] // cfg["BLOCK_M"]), -(-r["S"] // cfg["BLOCK_N"])
        tiles = nq * (nq + 1) / 2 if causal else nq * nk
        area = cfg["BLOCK_M"] * cfg["BLOCK_N"] / (BM * BN)
        return ms * 1e-3 / (r["B"] * r["H"] * tiles * area) * D_REF / r["D"]

    dense = rows.get("dense S=8192")
    if dense:
        out["C_FULL"] = per_tile(dense, dense["ms_attnc"], False)
        out["C_SDPA"] = per_tile(dense, dense["ms_sdpa_dense"], False)
    causal = rows.get("dense causal S=8192")
    if causal:
        ms = causal.get("ms_sdpa_dense_causal", causal["ms_sdpa_dense"])
        out["C_SDPA_CAUSAL"] = per_tile({**causal, "config": None}, ms, True)
    fits = []
    for name, r in rows.items():
        if not r.get("ms_attnc") or "C_FULL" not in out:
            continue
        if name.startswith("na1d"):
            k = int(name.split("w=")[1])
            pred = _natten1d(r["S"], k, masks)
        elif name.startswith("sliding") and "causal" in name:
            w, sinks = int(name.split("w=")[1].split("+")[0]), int(name.split("+")[1].split()[0])
            pred = _window(w, sinks, True, masks)
        else:
            continue
        if r.get("ms_sdpa_masked"):
            nt = -(-r["S"] // BM)
            out.setdefault("C_SDPA_MASKED", r["ms_sdpa_masked"] * 1e-3 / (
                r["B"] * r["H"] * nt * nt) * D_REF / r["D"])
        cfg = r["config"]
        t = tile_counts(pred, r["S"], r["S"], cfg["BLOCK_M"], cfg["BLOCK_N"])
        area = cfg["BLOCK_M"] * cfg["BLOCK_N"] / (BM * BN)
        per_head = r["ms_attnc"] * 1e-3 / (r["B"] * r["H"]) * D_REF / r["D"]
        fits.append((per_head - t.full * area * out["C_FULL"]) / (t.partial * area))
    if fits:
        out["C_PARTIAL"] = sum(fits) / len(fits)
    return out


def _case_windows(case: str) -> list[int]:
    """'blocked:512x4' -> [512] * 4; 'blocked:1024,1024,256,32' -> that list."""
    spec = case.split(":", 1)[1]
    if "x" in spec:
        w, n = spec.split("x")
        return [int(w)] * int(n)
    return [int(w) for w in spec.split(",")]


def fit_ort(paths: Sequence[str | Path]) -> dict[str, float]:
    """Re-derive ORT_BLOCKED_EFF and ORT_BLOCK_OVH (least squares over the rows with one window
    for every head), ORT_PER_HEAD (the mean excess of the per-head rows) and ORT_SPLIT_EXCESS
    (the head-split rows' mean time over what their groups price) from
    benchmarks/onnx_sparse_cost.py JSON files, in the dense `Attention`'s per-score cost: each
    row's time over the same run's dense time, times the S x S x H scores dense computes."""
    from attnc.kernels import window_blocked as wb
    from attnc.kernels import window_split as split

    uniform, per_head, splits = [], [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        sh = data["shape"]
        s, h, ns = sh["S"], sh["H"], sh.get("sinks", 0)
        rows = {r["case"]: r for r in data["rows"]}
        for case, r in rows.items():
            if case.startswith("split:"):
                splits.append((SiteShape(s, h, sh["D"], True), _case_windows(case), ns,
                               r["ms"] / rows["dense"]["ms"]))
            if not case.startswith("blocked:"):
                continue
            wins = _case_windows(case)
            if len(wins) != h:
                continue
            keys = ns + min(s, wb.BQ + max(wins) - 1)  # causal
            nb = h * (-(-s // wb.BQ))
            units = r["ms"] / rows["dense"]["ms"] * s * s * h
            (per_head if len(set(wins)) > 1 else uniform).append((nb * wb.BQ * keys, nb, units))
    out: dict[str, float] = {}
    if len(uniform) >= 2:
        a = torch.tensor([[x, n] for x, n, _ in uniform], dtype=torch.float64)
        y = torch.tensor([u for _, _, u in uniform], dtype=torch.float64)
        eff, ovh = torch.linalg.lstsq(a, y[:, None]).solution[:, 0].tolist()
        out.update({"ORT_BLOCKED_EFF": eff, "ORT_BLOCK_OVH": ovh})
        if per_head:
            out["ORT_PER_HEAD"] = sum((u - eff * x - ovh * n) / x
                                      for x, n, u in per_head) / len(per_head)
        if splits:  # the split rows' time over what their parts price, with the fit above
            # predict with the fitted constants: set on sparse_cost for the call, then restored
            keep = {k: getattr(sc, k) for k in (*out, "ORT_SPLIT_EXCESS")}
            for k, v in {**out, "ORT_SPLIT_EXCESS": 0.0}.items():
                setattr(sc, k, v)
            try:
                ex = [ratio - 1.0 / predict("onnxruntime-cpu", shape, window_cost(
                    wins, ns, True, split.FORM, True)).speedup for shape, wins, ns, ratio in splits]
            finally:
                for k, v in keep.items():
                    setattr(sc, k, v)
            out["ORT_SPLIT_EXCESS"] = sum(ex) / len(ex)
    return out


NBHD_WINDOWS = {"nbhd64x64": (13, 13), "nbhd32x32": (7, 7), "nbhd16x16": (7, 7)}  # older rows


def pattern_row(row: dict, heads: int = 8, head_dim: int = 64):
    """(SiteShape, PatternCost) of a benchmarks/onnx_patterns.py nbhd*/block* row (the grid and
    window from the row, else from its case name; a layout with the row's fullest row count:
    the ORT prices read only that and the block count), or None for other rows."""
    s, case = int(row["S"]), row["case"]
    shape = SiteShape(s, heads, head_dim, False)
    if case.startswith("nbhd"):
        grid = row.get("grid") or [int(x) for x in case[4:].split("x")]
        ks = row.get("window") or NBHD_WINDOWS[case]
        nd = len(grid)
        return shape, sc.neighborhood_cost(grid, [list(ks)] * heads, [1] * nd, [1] * nd,
                                           [False] * nd, 0, False, seq=s)
    if case.startswith("block"):
        bs = int(row.get("block_size", 64))
        n, m = -(-s // bs), int(row["max_blocks_per_row"])
        lay = torch.zeros(1, 1, n, n, dtype=torch.bool)
        for i in range(n):
            lay[0, 0, i, [(i + j) % n for j in range(m)]] = True
        return shape, sc.block_cost(lay, bs, False, False, heads)
    return None


def fit_ort_patterns(paths: Sequence[str | Path], min_seq: int = 1024) -> dict[str, float]:
    """Re-derive ORT_NBHD_EFF/OVH and ORT_GATHER_EFF/OVH (least squares, in the dense
    `Attention`'s per-score cost) from benchmarks/onnx_patterns.py JSON files: each nbhd/block
    row at S >= `min_seq` (smaller ones are noise-dominated on the shared machine) whose chosen
    form is the tiled form the export emits now (rows of an earlier form, by its name, are left
    out), its time over the same run's dense time times the S x S scores dense computes,
    against the form's scores and blocks per head."""
    from attnc.kernels import block_sparse_gather as bsg
    from attnc.kernels import neighborhood_blocked as nb
    from attnc.passes.sparse_cost_ort import form_work

    pts: dict[str, list] = {"nd": [], "gather": []}
    for path in paths:
        for r in json.loads(Path(path).read_text())["results"]:
            got = pattern_row(r) if int(r["S"]) >= min_seq else None
            if got is None:
                continue
            shape, pc = got
            meas = r["ort_speedup_vs_dense"].get("chosen")
            if pc.form_args is None or meas is None or r["chosen_form"] not in (nb.FORM,
                                                                                 bsg.FORM):
                continue
            kind, scores, blocks, _ = form_work(shape.seq, pc.form_args)
            pts[kind].append((scores, blocks, float(shape.seq) ** 2 / meas))
    out: dict[str, float] = {}
    for kind, name in (("nd", "NBHD"), ("gather", "GATHER")):
        if len(pts[kind]) >= 2:
            a = torch.tensor([[x, n] for x, n, _ in pts[kind]], dtype=torch.float64)
            y = torch.tensor([u for _, _, u in pts[kind]], dtype=torch.float64)
            eff, ovh = torch.linalg.lstsq(a, y[:, None]).solution[:, 0].tolist()
            out.update({f"ORT_{name}_EFF": eff, f"ORT_{name}_OVH": ovh})
    return out
