"""The sparse pass's onnxruntime-cpu cost model against the ONNX form the export emits and the
ORT times measured by benchmarks/onnx_sparse_cost.py (committed JSON)."""

from __future__ import annotations

import json

import pytest
import torch

from attnc.kernels import block_sparse_gather as bsg
from attnc.kernels import neighborhood_blocked as nb
from attnc.kernels import sliding_window as sw
from attnc.kernels import window_blocked as wb
from attnc.passes import sparse_cost as c
from attnc.passes import sparse_cost_fit as fitting

LM = c.SiteShape(2048, 4, 48, True)  # the long-context LM's attention at its target length


def _predict(ws, shape=LM, sinks=4, plain=None):
    plain = len(set(ws)) == 1 if plain is None else plain
    form = sw.onnx_form(max(ws), sinks, True, True, plain, seq=shape.seq, head_windows=ws)
    return form, c.predict("onnxruntime-cpu", shape, c.window_cost(ws, sinks, True, form, True))


@pytest.mark.parametrize("ws", [[-1, 1024, 1024, -1], [1024] * 4, [-1, 2000, 2000, 2000]])
def test_sites_that_export_masked_dense_stay_dense(ws):
    # no head group the blocked rule takes at 2048: masked dense `Attention`
    form, pred = _predict(ws)
    assert form == sw.DENSE_FORM
    assert pred.speedup < 1.0 and pred.form == sw.DENSE_FORM, pred


@pytest.mark.parametrize("ws", [[1024, 1024, 256, 32], [512, 16, 1024, 1024],
                                [-1, -1, 256, 256], [-1, 64, 64, 64]])
def test_sites_whose_heads_differ_are_priced_as_the_head_split_form(ws):
    form, pred = _predict(ws)
    assert form == sw.SPLIT_FORM and pred.form == sw.SPLIT_FORM
    masked = c.predict("onnxruntime-cpu", LM, c.window_cost(ws, 4, True, sw.DENSE_FORM, True))
    assert pred.speedup > masked.speedup  # the groups that run blocked are cheaper
    if ws != [-1, 64, 64, 64]:  # the measured sites: 0.74-1.41x (2 threads loaded; 1 thread)
        assert pred.speedup < 1.1


@pytest.mark.parametrize("ws", [[512] * 4, [256] * 4, [512, 512, 128, 16]])
def test_sites_the_export_runs_blocked_are_predicted_faster(ws):
    form, pred = _predict(ws)
    assert form == sw.BLOCKED_FORM
    assert pred.speedup >= 1.1 and "blocked" in pred.form, pred


def test_a_masked_dense_form_is_priced_as_masked_even_where_the_rule_would_block():
    # the export's form wins: a window whose blocked rule says yes, handed the masked form
    ws = [256] * 4
    pc = c.window_cost(ws, 4, True, sw.DENSE_FORM, True)
    assert c.predict("onnxruntime-cpu", LM, pc).speedup < 1.0
    pc = c.window_cost(ws, 4, True, sw.BLOCKED_FORM, True)
    assert c.predict("onnxruntime-cpu", LM, pc).speedup > 1.5


def _measured(root):
    files = sorted((root / "benchmarks" / "results").glob("onnx_sparse_cost-*-t2*.json"))
    assert files, "benchmarks/onnx_sparse_cost.py results (2 ORT threads) are committed"
    return files


def test_predictions_follow_the_measured_ort_times(root, monkeypatch):
    """Each measured form (2 ORT threads, runs on a loaded and a more loaded machine):
    predicted within 0.5-1.35x of the measured speed-up, and never a prediction >= 1.1 for a
    form measured slower than dense."""
    seen = 0
    for path in _measured(root):
        data = json.loads(path.read_text())
        sh = data["shape"]
        shape = c.SiteShape(sh["S"], sh["H"], sh["D"], True)
        for r in data["rows"]:
            kind = r["case"].split(":")[0]
            if kind not in ("blocked", "masked", "split"):
                continue
            ws = fitting._case_windows(r["case"])
            if kind == "blocked":  # timed forced (exported at an unknown length)
                form = sw.BLOCKED_FORM
                monkeypatch.setattr(wb, "blocked_pays", lambda *a, **k: True)
            else:
                form = sw.onnx_form(max(ws), sh["sinks"], True, True, len(set(ws)) == 1,
                                    seq=sh["S"], head_windows=ws)
                assert form == (sw.DENSE_FORM if kind == "masked" else sw.SPLIT_FORM), r
            pred = c.predict("onnxruntime-cpu", shape,
                             c.window_cost(ws, sh["sinks"], True, form, True)).speedup
            monkeypatch.undo()
            meas = r["speedup_vs_dense"]
            assert 0.5 * meas <= pred <= 1.35 * meas, (path.name, r, pred)
            assert not (pred >= 1.1 and meas < 1.0), (path.name, r, pred)
            seen += 1
    assert seen >= 12


def test_fit_ort_reproduces_the_constants(root):
    fit = fitting.fit_ort(_measured(root))
    assert fit["ORT_BLOCKED_EFF"] == pytest.approx(c.ORT_BLOCKED_EFF, rel=0.02)
    assert fit["ORT_BLOCK_OVH"] == pytest.approx(c.ORT_BLOCK_OVH, rel=0.02)
    assert fit["ORT_PER_HEAD"] == pytest.approx(c.ORT_PER_HEAD, rel=0.02)
    assert fit["ORT_SPLIT_EXCESS"] == pytest.approx(c.ORT_SPLIT_EXCESS, abs=0.01)


# ---- neighborhood and block-sparse: the cost model prices the form the export emits

H_F, D_F = 2, 8
# (op, length, args, mask rank): one op call each, all in one export
FORM_CASES = [
    ("nbhd", 1024, ([32, 32], [[7, 7]], 0), None),  # 2-D, blocked
    ("nbhd", 256, ([16, 16], [[7, 7]], 0), None),  # 2-D, short: masked dense
    ("nbhd", 578, ([24, 24], [[7, 7], [5, 3]], 2), 2),  # per-head, globals, key padding
    ("nbhd", 512, ([8, 8, 8], [[3, 3, 3]], 0), None),  # 3-D
    ("nbhd", 1024, ([1024], [[65]], 0), None),  # 1-D, blocked
    ("nbhd", 300, ([300], [[65]], 0), None),  # 1-D, short: masked dense
    ("block", 1024, (64, 8), None),  # half the key blocks listed: gathered, slower than dense
    ("block", 1024, (64, 2), 2),  # two of 16, key padding
    ("block", 1024, (64, 2), 4),  # a 4-D mask: masked dense
    ("block", 64, (64, 1), None),  # one key block: masked dense
]


def _layout(n, m):
    lay = torch.zeros(1, 1, n, n, dtype=torch.bool)
    for i in range(n):
        lay[0, 0, i, [(i + j) % n for j in range(m)]] = True
    return lay


def _cost_form(case):
    kind, s, args, rank = case
    if kind == "nbhd":
        grid, ks, ng = args
        nd = len(grid)
        kernels = ks if len(ks) > 1 else ks * H_F
        return c.neighborhood_cost(grid, kernels, [1] * nd, [1] * nd, [False] * nd, ng, True,
                                   seq=s, mask_rank=rank)
    bs, m = args
    return c.block_cost(_layout(-(-s // bs), m), bs, False, rank is not None, H_F,
                        mask_rank=rank)


@pytest.fixture(scope="module")
def exported_forms():
    """The forms one export of every FORM_CASES op records (its translations' own choice)."""
    import warnings

    import attnc.kernels

    class M(torch.nn.Module):
        def forward(self, *xs):
            outs, i = [], 0
            for kind, s, args, rank in FORM_CASES:
                q, k, v = xs[i:i + 3]
                i += 3
                mask = None
                if rank is not None:
                    mask = xs[i]
                    i += 1
                if kind == "nbhd":
                    grid, ks, ng = args
                    nd = len(grid)
                    hks = None if len(ks) == 1 else [x for h in ks for x in h]
                    outs.append(torch.ops.attnc.neighborhood_attention(
                        q, k, v, grid, ks[0], [1] * nd, [1] * nd,
                        [False] * nd, None, mask, ng, hks))
                else:
                    bs, m = args
                    lay = _layout(-(-s // bs), m)
                    outs.append(torch.ops.attnc.block_sparse_attention(q, k, v, lay, bs, False,
                                                                       None, mask))
            return tuple(outs)

    xs = []
    for _, s, _, rank in FORM_CASES:
        xs += [torch.randn(1, H_F, s, D_F) for _ in range(3)]
        if rank == 2:
            xs.append(torch.ones(1, s, dtype=torch.bool))
        elif rank == 4:
            xs.append(torch.ones(1, 1, s, s, dtype=torch.bool))
    with warnings.catch_warnings(), wb.recording_forms() as forms:
        warnings.simplefilter("ignore")
        torch.onnx.export(M(), tuple(xs), dynamo=True, opset_version=23, verbose=False,
                          optimize=False,
                          custom_translation_table=attnc.kernels.translation_table())
    return forms


def test_the_cost_model_prices_the_form_the_export_emits(exported_forms):
    got = [f["onnx_form"] for f in exported_forms]
    assert len(got) == len(FORM_CASES), exported_forms
    want = [_cost_form(case).onnx_form for case in FORM_CASES]
    assert got == want
    sparse = [f not in (nb.DENSE_FORM, bsg.DENSE_FORM) for f in got]
    assert sparse == [True, False, True, True, True, False, True, True, False, False]


def _measured_patterns(root):
    files = sorted((root / "benchmarks" / "results").glob("onnx_patterns-*.json"))
    rows = [r for p in files if "tiles" not in p.name
            for r in json.loads(p.read_text())["results"] if fitting.pattern_row(r)]
    assert rows, "benchmarks/onnx_patterns.py results are committed"
    return files, rows


def test_where_the_model_picks_the_sparse_form_it_was_measured_faster(root):
    """Every nbhd/block row of benchmarks/onnx_patterns.py (S = 256, 1024, 4096): the pass
    keeps a site sparse where the predicted speed-up of the exported form is >= 1; there the
    measured one is too (rows at S >= 1024, where the timings are not noise-dominated), and
    the forms measured slower than dense (half the key blocks listed at S = 1024) predict < 1."""
    _, rows = _measured_patterns(root)
    seen = set()
    for r in rows:
        shape, pc = fitting.pattern_row(r)
        pred = c.predict("onnxruntime-cpu", shape, pc).speedup
        meas = r["ort_speedup_vs_dense"]["chosen"]
        form = bsg.FORM if r["case"].startswith("block") else nb.FORM
        assert (pc.onnx_form == form) == r["chosen_sparse"], r["case"]  # the rule, any run
        if r["S"] >= 1024:
            assert not (pred >= 1.0 and meas < 1.0), (r["case"], r["S"], pred, meas)
            if r["chosen_form"] == pc.onnx_form == form:  # a row of the form emitted now
                assert 0.5 * meas <= pred <= 1.5 * meas, (r["case"], r["S"], pred, meas)
        if meas < 0.9:
            assert pred < 1.0, (r["case"], r["S"], pred, meas)
        seen.add(r["S"])
    assert {256, 1024} <= seen
    half = c.predict("onnxruntime-cpu", c.SiteShape(1024, 8, 64, False),
                     c.block_cost(_layout(16, 8), 64, False, False, 8))
    assert half.form == bsg.FORM and half.speedup < 1.0


def test_fit_ort_patterns_reproduces_the_constants(root):
    files, _ = _measured_patterns(root)
    fit = fitting.fit_ort_patterns([p for p in files if "tiles" not in p.name])
    for k in ("ORT_NBHD_EFF", "ORT_NBHD_OVH", "ORT_GATHER_EFF", "ORT_GATHER_OVH"):
        assert fit[k] == pytest.approx(getattr(c, k), rel=0.02), k
