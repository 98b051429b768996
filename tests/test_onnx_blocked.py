"""The blocked 1-D neighborhood form (kernels/neighborhood1d_blocked.py) in torch and in ONNX
Runtime against the reference (odd lengths, dilation that does not divide S, stride, causal,
global tokens, GQA, per-head kernels, key padding, a second dynamic length, graph optimizations
off and on), and the export wiring: the target length picks each window op's ONNX form and the
export records which form each site got and why."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from onnx_sessions import ort_sessions

import attnc.kernels
from attnc.kernels import neighborhood1d_blocked as nb1d
from attnc.kernels import reference, sliding_window, window_blocked

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

S = torch.export.Dim("S", min=2, max=8192)
B = torch.export.Dim("B", min=1, max=64)


def _qkv(b, s, seed, hq=4, hkv=2, d=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g),
            torch.randn(b, hkv, s, d, generator=g))


def _padding(b, s):
    kpm = torch.ones(b, s, dtype=torch.bool)
    kpm[0, s - s // 4:] = False  # right padding
    kpm[-1, :3] = False  # left padding (the global tokens too)
    return kpm


@pytest.mark.parametrize("s,kk,d,st,causal,ng", [
    (9, 3, 1, 1, False, 0), (67, 4, 3, 2, False, 2), (150, 7, 2, 1, False, 0),
    (150, 7, 1, 3, True, 0), (67, 3, 3, 1, True, 2), (131, 4, 2, 2, True, 1),
])
def test_torch_blocked_na1d_matches_reference(s, kk, d, st, causal, ng):
    q, k, v = _qkv(2, s, s + kk)
    for pad, hk in itertools.product([None, _padding(2, s)], [None, [kk, 3, kk, 4]]):
        want = reference.neighborhood_attention_ref(q, k, v, [-1], [kk], [d], [st], [causal],
                                                    0.3, pad, ng, hk)
        got = nb1d.blocked_attention(q, k, v, hk or [kk], d, st, causal, 0.3, ng, pad)
        assert (got - want).abs().max() < 1e-5, (pad is None, hk)


def test_op_runs_blocked_1d_on_cpu(monkeypatch):
    """Off CUDA a long 1-D neighborhood takes the blocked form (equal to the reference)."""
    calls = []
    real = nb1d.blocked_attention
    monkeypatch.setattr(nb1d, "blocked_attention", lambda *a, **kw: calls.append(1) or real(
        *a, **kw))
    q, k, v = _qkv(1, 301, 5)
    out = torch.ops.attnc.neighborhood_attention(q, k, v, [-1], [7], [2], [1], [False])
    want = reference.neighborhood_attention_ref(q, k, v, [-1], [7], [2], [1], [False])
    assert calls and (out - want).abs().max() < 1e-5
    calls.clear()
    torch.ops.attnc.neighborhood_attention(*_qkv(1, 40, 5), [-1], [7], [2], [1], [False])
    assert not calls  # short: the reference


class _Op(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _export(tmp_path, fn, args, dyn, hint):
    with warnings.catch_warnings(), window_blocked.onnx_seq_hint(hint), \
            window_blocked.recording_forms() as forms:
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(_Op(fn), args, dynamo=True, opset_version=23,
                                 custom_translation_table=attnc.kernels.translation_table(),
                                 dynamic_shapes=(dyn,), verbose=False)
    path = tmp_path / "m.onnx"
    prog.save(str(path))
    ops, sessions = ort_sessions(path)
    return ops, sessions, forms


def _check(sessions, fn, runs):
    """Every output of every session against fn (one tensor or a tuple, one per case)."""
    for inputs in runs:
        want = fn(*inputs)
        want = [x.numpy() for x in (want if isinstance(want, tuple) else (want,))]
        for sess in sessions:
            feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs, strict=True)}
            got = sess.run(None, feeds)
            assert len(got) == len(want)
            for c, (g, w) in enumerate(zip(got, want, strict=True)):
                assert g.shape == w.shape
                assert np.abs(g - w).max() <= 1e-4, (c, inputs[0].shape)


NA1D = [  # kernel, dilation, stride, causal, num_global, per-head kernels
    (5, 3, 1, False, 0, None),  # dilation 3, lengths it does not divide
    (4, 2, 2, True, 2, None),  # even kernel, stride, causal, global tokens
    (5, 1, 1, False, 1, [5, 3, 5, 2]),  # per-head kernels
]


@pytest.mark.slow
def test_onnx_blocked_na1d(tmp_path):
    """One export of the NA1D cases (each its own q, k, v of its own dynamic length, one output
    each; dynamic batch, blocked under a long target length), run over several blocks, at each
    case's shortest length (kernel x dilation + globals + 1) and with a grid of exactly one
    block, graph optimizations off and on."""
    def fn(*qkv):
        return tuple(torch.ops.attnc.neighborhood_attention(
            *qkv[3 * i:3 * i + 3], [-1], [kk], [d], [st], [causal], None, None, ng, hk)
            for i, (kk, d, st, causal, ng, hk) in enumerate(NA1D))

    def inputs(b, lengths, seed):
        return tuple(x for i, s in enumerate(lengths) for x in _qkv(b, s, seed + i))

    dims = [torch.export.Dim(f"S{i}", min=2, max=8192) for i in range(len(NA1D))]
    dyn = tuple({0: B, 2: s} for s in dims for _ in range(3))
    ops, sessions, forms = _export(tmp_path, fn, inputs(1, [40, 41, 42], 0), dyn, 10**4)
    assert "Attention" not in ops and "Gather" in ops
    assert len(forms) == len(NA1D)
    assert all(f["onnx_form"] == nb1d.FORM and "> 2 x" in f["why"] for f in forms)
    _check(sessions, fn, [inputs(2, [157] * 3, 1),
                          inputs(1, [kk * d + ng + 1 for kk, d, _, _, ng, _ in NA1D], 2),
                          inputs(3, [64 + c[4] for c in NA1D], 4)])


@pytest.mark.slow
@pytest.mark.parametrize("hf", [False, True])
def test_onnx_blocked_na1d_padding(tmp_path, hf):
    """A (B, S) bool key padding mask, or a Hugging Face (B, 1, S, S) float mask."""
    def fn(q, k, v, mask):
        return torch.ops.attnc.neighborhood_attention(q, k, v, [-1], [5], [2], [1], [False],
                                                      0.25, mask, 1)

    def inputs(b, s, seed):
        kpm = _padding(b, s)
        if hf:
            kpm = torch.zeros(b, 1, s, s).masked_fill(~kpm[:, None, None, :], -3.4e38)
        return (*_qkv(b, s, seed), kpm)

    dyn = ({0: B, 2: S},) * 3 + (({0: B, 2: S, 3: S} if hf else {0: B, 1: S}),)
    ops, sessions, _ = _export(tmp_path, fn, inputs(2, 40, 0), dyn, 10**4)
    assert "Attention" not in ops
    _check(sessions, fn, [inputs(2, 93, 1), inputs(3, 30, 2)])


@pytest.mark.slow
def test_onnx_blocked_window_wide(tmp_path):
    """The window form with a window over several key blocks and sinks over two, causal and
    bidirectional (GQA, one export at lengths below the window, odd, and over several query
    blocks)."""
    def fn(q, k, v):
        return tuple(torch.ops.attnc.sliding_window_attention(q, k, v, 40, 20, causal)
                     for causal in (True, False))

    ops, sessions, forms = _export(tmp_path, fn, _qkv(1, 40, 0), ({0: B, 2: S},) * 3, 10**4)
    assert "Attention" not in ops and len(forms) == 2
    assert all(f["onnx_form"] == sliding_window.BLOCKED_FORM for f in forms)
    _check(sessions, fn, [_qkv(2, 203, 1), _qkv(1, 17, 2), _qkv(1, 1, 3)])


@pytest.mark.slow
def test_onnx_blocked_window_attention_op(tmp_path, monkeypatch):
    """The variant with the blocks as the batch of one opset-23 Attention: per-head windows,
    sinks, GQA and a (B, S) key padding mask (rows that see no key give zeros)."""
    monkeypatch.setattr(window_blocked, "ATTENTION_OP", True)

    def fn(q, k, v, mask):
        return torch.ops.attnc.sliding_window_attention(q, k, v, 9, 3, True, None, mask,
                                                        [9, 4, 20, 9])

    def inputs(b, s, seed):
        kpm = _padding(b, s)
        kpm[0] = False  # a row with no key at all
        return (*_qkv(b, s, seed), kpm)

    dyn = ({0: B, 2: S},) * 3 + ({0: B, 1: S},)
    ops, sessions, _ = _export(tmp_path, fn, inputs(2, 40, 0), dyn, 10**4)
    assert "Attention" in ops and "Gather" in ops
    _check(sessions, fn, [inputs(2, 157, 1), inputs(3, 13, 2)])


@pytest.mark.slow
def test_target_length_picks_the_form(tmp_path):
    """Under a short target length both ops export masked dense, under a long one blocked; the
    recorded forms say so and why."""
    def fn(q, k, v):
        a = torch.ops.attnc.sliding_window_attention(q, k, v, 16, 2, True)
        return a + torch.ops.attnc.neighborhood_attention(q, k, v, [-1], [9], [1], [1], [False])

    for hint, blocked in ((128, False), (4096, True)):
        ops, sessions, forms = _export(tmp_path, fn, _qkv(1, 40, 0), ({0: B, 2: S},) * 3, hint)
        assert [f["op"] for f in forms] == ["sliding_window_attention", "neighborhood_attention"]
        assert (forms[0]["onnx_form"] == sliding_window.BLOCKED_FORM) == blocked
        assert (forms[1]["onnx_form"] == nb1d.FORM) == blocked
        assert all(str(hint) in f["why"] for f in forms)
        assert ("Attention" in ops) != blocked
        _check(sessions[1:], fn, [_qkv(1, 75, 3)])


def test_build_target_length():
    """The build hands the sparse pass's target length to the export, else the calibration
    length."""
    from types import SimpleNamespace as NS

    from attnc.build_steps import target_length as _target_length

    res = [NS(decisions=[NS(metrics={"target_length": 2048}), NS(metrics={})])]
    assert _target_length(res, None, []) == 2048
    prog = NS(dynamic_dims={"input_ids": {1: "sequence"}}, input_names=["input_ids"])
    batches = [NS(args=(torch.zeros(2, 300),)), NS(args=(torch.zeros(2, 512),))]
    assert _target_length([], prog, batches) == 512
    assert _target_length([], NS(dynamic_dims={}, input_names=[]), batches) is None
