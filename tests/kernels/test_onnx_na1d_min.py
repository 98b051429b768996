"""The capped ONNX forms of the blocked 1-D neighborhood (kernels/neighborhood1d_blocked.py,
scores shifted to the own key; MASK "mul" and "min"): the own-key rule they rest on against
NATTEN's windows, and per form one export of several sites (the capped form: dilation, stride,
causal, per-head kernels, global tokens, GQA; the Add(-inf) form beside it for a key padding
mask) in ONNX Runtime against the plain reference, fp32, max abs diff <= 1e-4, at odd lengths
(the shortest each site allows too), a second dynamic length and batch, scores spread over a
wide range (masked keys far above and far below the visible ones), graph optimizations off and
on."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch

import attnc.kernels
from attnc.kernels import masks, reference, window_blocked
from attnc.kernels import neighborhood1d_blocked as nb1d

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def test_own_key_in_every_window():
    """own_key_visible's rule (stride <= kernel: every in-group row's window holds the row) on
    every length, kernel, stride and dilation of a small range, causal and not."""
    for n, kk, d, causal in itertools.product(range(1, 40), range(1, 8), (1, 2, 3), (False, True)):
        if kk * d > n:
            continue
        x = torch.arange(n)
        for st in range(1, kk + 1):
            assert nb1d.own_key_visible([kk], st)
            _, start, end = masks.natten_window(x, n, kk, d, st, causal)
            xi = x // d
            assert bool(((start <= xi) & (xi < end)).all()), (n, kk, d, st, causal)
    assert not nb1d.own_key_visible([3, -1], 1)


# kernel, dilation, stride, causal, num_global, per-head kernels (4 query heads, 2 KV heads)
CASES = [
    (5, 3, 1, False, 0, None),  # dilation that divides none of the lengths
    (4, 2, 3, True, 2, None),  # even kernel, stride, causal, global tokens
    (7, 1, 2, False, 1, [7, 3, 5, 4]),  # per-head kernels, stride 2, a global token
]
PAD = (5, 2, 1, False, 1)  # with a (B, S) key padding mask: the Add(-inf) form


def _qkv(b, s, seed, spread=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, 8, generator=g) for h in (4, 2, 2))
    if spread:  # keys 30x louder every 7th token: masked scores far above / below visible ones
        k[:, :, ::7] *= 30.0
    return q, k, v


def _padding(b, s):
    kpm = torch.ones(b, s, dtype=torch.bool)
    kpm[0, s - s // 4:] = False
    kpm[-1, :2] = False
    return kpm


def _fn(*xs, f=None):
    """Every site: the op (exported), or `f` (the plain reference)."""
    f = f or torch.ops.attnc.neighborhood_attention
    outs = [f(*xs[3 * i:3 * i + 3], [-1], [kk], [d], [st], [causal], None, None, ng, hk)
            for i, (kk, d, st, causal, ng, hk) in enumerate(CASES)]
    kk, d, st, causal, ng = PAD
    outs.append(f(*xs[-4:-1], [-1], [kk], [d], [st], [causal], 0.3, xs[-1], ng))
    return tuple(outs)


def _inputs(b, lengths, seed, spread=False):
    xs = [x for i, s in enumerate(lengths[:-1]) for x in _qkv(b, s, seed + i, spread)]
    return (*xs, *_qkv(b, lengths[-1], seed - 1, spread), _padding(b, lengths[-1]))


class _Op(torch.nn.Module):
    def forward(self, *xs):
        return _fn(*xs)


@pytest.mark.slow
@pytest.mark.parametrize("mask,loop", [("mul", True), ("min", False)])
def test_onnx_capped_na1d(tmp_path, monkeypatch, mask, loop):
    """float32's default (mul, blocks in Loop steps: 2 a step here, so several steps and a
    padded last one), and what bf16/fp16 take (min, one flat chain)."""
    monkeypatch.setattr(nb1d, "MASK", mask)
    monkeypatch.setattr(nb1d, "LOOP", loop)
    monkeypatch.setattr(nb1d, "STEP_SCORES", 2 * 4 * 64 * 72)  # 4 heads, keys per block <= 72
    shifted = []
    real = nb1d.own_shift
    monkeypatch.setattr(nb1d, "own_shift", lambda *a: shifted.append(a[-1]) or real(*a))
    dims = [torch.export.Dim(f"S{i}", min=2, max=8192) for i in range(len(CASES) + 1)]
    b = torch.export.Dim("B", min=1, max=16)
    dyn = tuple({0: b, 2: s} for s in dims for _ in range(3)) + ({0: b, 1: dims[-1]},)
    n = len(CASES) + 1
    with warnings.catch_warnings(), window_blocked.onnx_seq_hint(10**4), \
            window_blocked.recording_forms() as forms:
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(_Op(), _inputs(1, [70] * n, 0), dynamo=True, opset_version=23,
                                 custom_translation_table=attnc.kernels.translation_table(),
                                 dynamic_shapes=(dyn,), verbose=False)
    # the capped form on every site but the padded one, the own key at MARGIN ("mul") or 0
    assert shifted == [nb1d.MARGIN if mask == "mul" else 0.0] * len(CASES)
    assert [f["onnx_form"] for f in forms] == [nb1d.FORM] * n
    path = tmp_path / "m.onnx"
    prog.save(str(path))
    assert ("Loop" in {n.op_type for n in onnx.load(str(path)).graph.node}) == loop
    runs = [_inputs(2, [157, 131, 201, 93], 1), _inputs(1, [67, 65, 99, 41], 2, spread=True),
            _inputs(3, [16, 11, 9, 12], 3)]  # the shortest: kernel x dilation + globals + 1
    wants = [[x.numpy() for x in _fn(*xs, f=reference.neighborhood_attention_ref)]
             for xs in runs]
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level, so.intra_op_num_threads = level, 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for xs, want in zip(runs, wants, strict=True):
            feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs, strict=True)}
            for c, (got, w) in enumerate(zip(sess.run(None, feeds), want, strict=True)):
                assert got.shape == w.shape and np.isfinite(got).all()
                assert np.abs(got - w).max() <= 1e-4, (level, c, xs[0].shape)

