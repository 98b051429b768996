"""The blocked sliding-window forms (kernels/window_blocked.py) against the reference: the torch
form the op runs off CUDA at long sequences, and the ONNX form in ONNX Runtime (graph
optimizations off and on, two sequence lengths from one export, odd lengths, S = 1, S below
the window, GQA, key padding, per-head windows)."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from onnx_sessions import ort_sessions

import attnc.kernels
from attnc.kernels import reference, sliding_window, window_blocked

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _qkv(b, s, seed, hq=4, hkv=2, d=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g),
            torch.randn(b, hkv, s, d, generator=g))


def _padding(b, s):
    kpm = torch.ones(b, s, dtype=torch.bool)
    kpm[0, s - max(1, s // 5):] = False  # right padding (all of it when s == 1)
    kpm[-1, : max(1, s // 7)] = False  # left padding
    return kpm


@pytest.mark.parametrize("causal", [True, False])
def test_torch_blocked_matches_reference(causal):
    for s, ns, wins, pad, bq in itertools.product([1, 7, 33, 70], [0, 3], [[5], [3, 9, 5, 2]],
                                                  [False, True], [8, 16]):
        q, k, v = _qkv(2, s, s)
        kpm = _padding(2, s) if pad else None
        hw = wins if len(wins) > 1 else None
        want = reference.sliding_window_attention_ref(q, k, v, wins[0], ns, causal, 0.3, kpm, hw)
        got = window_blocked.blocked_attention(q, k, v, wins, ns, causal, 0.3, kpm, bq=bq)
        assert (got - want).abs().max() < 1e-5, (s, ns, wins, pad, bq)


def test_torch_blocked_other_lengths():
    for sq, skv, causal in itertools.product([1, 20, 45], [3, 30, 50], [True, False]):
        g = torch.Generator().manual_seed(sq * skv)
        q = torch.randn(1, 2, sq, 8, generator=g)
        k, v = torch.randn(2, 1, 1, skv, 8, generator=g)
        want = reference.sliding_window_attention_ref(q, k, v, 6, 2, causal)
        got = window_blocked.blocked_attention(q, k, v, [6], 2, causal, None, bq=8)
        assert (got - want).abs().max() < 1e-5, (sq, skv, causal)


def test_op_runs_blocked_on_cpu_at_long_lengths(monkeypatch):
    """Off CUDA the op takes the blocked form when the cost rule says so (and equals the
    reference), the reference when not."""
    calls = []
    real = window_blocked.blocked_attention
    monkeypatch.setattr(window_blocked, "blocked_attention",
                        lambda *a, **kw: calls.append(a[2].shape[2]) or real(*a, **kw))
    for s in (40, 200):  # 2 * (4 + 64) = 136
        q, k, v = _qkv(1, s, s)
        got = torch.ops.attnc.sliding_window_attention(q, k, v, 4, 2, True)
        want = reference.sliding_window_attention_ref(q, k, v, 4, 2, True)
        assert (got - want).abs().max() < 1e-5
    assert calls == [200]


def test_cost_rule():
    assert window_blocked.blocked_pays(4096, [256], True)
    assert not window_blocked.blocked_pays(512, [256], True)  # 2 * (256 + 64) = 640
    assert not window_blocked.blocked_pays(1150, [256], False)  # span 511: 2 * (511 + 64)
    assert window_blocked.blocked_pays(1151, [256], False)
    assert not window_blocked.blocked_pays(10**6, [256, -1], True)  # a dense head
    form = sliding_window.onnx_form
    assert form(256, 4, True, seq=4096) == sliding_window.BLOCKED_FORM
    assert form(256, 4, True, seq=512) == sliding_window.DENSE_FORM
    assert form(256, 4, True, True, False, seq=4096, mask_rank=4) == sliding_window.BLOCKED_FORM
    assert form(256, 4, True, False, False, seq=4096, mask_rank=4) == sliding_window.DENSE_FORM


S = torch.export.Dim("S", min=2, max=8192)
B = torch.export.Dim("B", min=1, max=64)


class _Op(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _export(tmp_path, fn, args, dyn, hint):
    with warnings.catch_warnings(), window_blocked.onnx_seq_hint(hint):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(_Op(fn), args, dynamo=True, opset_version=23,
                                 custom_translation_table=attnc.kernels.translation_table(),
                                 dynamic_shapes=(dyn,), verbose=False)
    path = tmp_path / "m.onnx"
    prog.save(str(path))
    ops, sessions = ort_sessions(path)
    return ops, sessions


def _check(sessions, fn, runs):
    for inputs in runs:
        want = fn(*inputs).numpy()
        for sess in sessions:
            feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs, strict=True)}
            got = sess.run(None, feeds)[0]
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 1e-4, inputs[0].shape


@pytest.mark.parametrize("causal,sinks", [(True, 4), (False, 2), (True, 0)])
def test_onnx_blocked(tmp_path, causal, sinks):
    """One export, lengths: odd and over several blocks, below the window, 1."""
    def fn(q, k, v):
        return torch.ops.attnc.sliding_window_attention(q, k, v, 12, sinks, causal)

    ops, sessions = _export(tmp_path, fn, _qkv(1, 40, 0), ({0: B, 2: S},) * 3, 10**4)
    assert "Attention" not in ops and "GroupQueryAttention" not in ops and "Gather" in ops
    _check(sessions, fn, [_qkv(2, 157, 1), _qkv(1, 9, 2), _qkv(1, 1, 3), _qkv(3, 64, 4)])


@pytest.mark.parametrize("hf", [False, True, "bool"])
def test_onnx_blocked_padding_and_head_windows(tmp_path, hf):
    """Per-head windows with a (B, S) key padding mask, or a Hugging Face (B, 1, S, S) causal +
    padding float (or bool) mask (read off its diagonal)."""
    wins = [5, 12, 3, 7]

    def fn(q, k, v, m):
        return torch.ops.attnc.sliding_window_attention(q, k, v, 12, 2, True, None, m, wins)

    def inputs(b, s, seed):
        m = _padding(b, s)
        if hf:
            c = torch.tril(torch.ones(s, s, dtype=torch.bool))
            m = torch.where(c[None, None] & m[:, None, None, :], 0.0,
                            torch.finfo(torch.float32).min)
            m = m == 0 if hf == "bool" else m
        return (*_qkv(b, s, seed), m)

    mdyn = {0: B, 2: S, 3: S} if hf else {0: B, 1: S}
    ops, sessions = _export(tmp_path, fn, inputs(2, 40, 0), ({0: B, 2: S},) * 3 + (mdyn,), None)
    assert "Attention" not in ops
    _check(sessions, fn, [inputs(2, 131, 1), inputs(2, 9, 2), inputs(3, 70, 3)])


def test_onnx_keeps_masked_dense_when_short(tmp_path):
    def fn(q, k, v):
        return torch.ops.attnc.sliding_window_attention(q, k, v, 12, 4, True)

    ops, sessions = _export(tmp_path, fn, _qkv(1, 40, 0), ({0: B, 2: S},) * 3, 100)
    assert "Attention" in ops
    _check(sessions, fn, [_qkv(1, 57, 1)])
