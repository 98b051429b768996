"""The head-split ONNX form of a sliding window whose heads differ (kernels/window_split.py):
dense heads and windows of several widths, sinks, GQA (whole KV groups and split ones), causal
and bidirectional, a (B, S) key padding mask and a Hugging Face (B, 1, S, S) float mask, one
export run at several lengths in ONNX Runtime against the reference, graph optimizations off
and on; and the form's choice (onnx_form)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from onnx_sessions import ort_sessions

import attnc.kernels
from attnc.kernels import sliding_window, window_blocked, window_split

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
S = torch.export.Dim("S", min=2, max=8192)
B = torch.export.Dim("B", min=1, max=64)


def test_the_split_form_is_chosen_where_a_group_runs_blocked():
    form = sliding_window.onnx_form
    for ws in ([-1, 256, 256, -1], [1024, 1024, 256, 32], [512, 16, 1024, 1024]):
        assert form(max(ws), 4, True, True, False, seq=2048, head_windows=ws) == \
            sliding_window.SPLIT_FORM, ws
    # every group too wide for the blocked rule, or no length, or one window: not split
    assert form(1024, 4, True, True, False, seq=2048, head_windows=[-1, 1024, 1024, -1]) == \
        sliding_window.DENSE_FORM
    assert form(64, 4, True, True, False, seq=None, head_windows=[-1, 64]) != \
        sliding_window.SPLIT_FORM
    assert form(64, 4, True, True, False, seq=-1, head_windows=[-1, 64]) != \
        sliding_window.SPLIT_FORM
    assert form(64, 4, True, True, False, seq=2048, head_windows=[64, 64]) == \
        sliding_window.BLOCKED_FORM
    assert window_split.groups([8, -1, 8, 3]) == [(8, [0, 2]), (-1, [1]), (3, [3])]


def _inputs(b, s, seed, mask):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 4, s, 8, generator=g)
    k, v = torch.randn(b, 2, s, 8, generator=g), torch.randn(b, 2, s, 8, generator=g)
    if mask is None:
        return q, k, v
    kpm = torch.ones(b, s, dtype=torch.bool)
    kpm[0, s - s // 4:] = False  # right padding
    kpm[-1, :2] = False  # left padding (a sink too)
    if mask == "hf":
        kpm = torch.zeros(b, 1, s, s).masked_fill(~kpm[:, None, None, :], -3.4e38)
    return q, k, v, kpm


@pytest.mark.slow
@pytest.mark.parametrize("ws,causal,mask", [
    ([-1, 8, 8, 30], True, None),  # KV groups split across window groups
    ([-1, -1, 8, 8], True, "2d"),  # whole KV groups: GQA kept
    ([20, 20, -1, 5], False, "hf"),  # bidirectional, a 4-D float mask
])
def test_onnx_split_matches_the_reference(tmp_path, ws, causal, mask):
    def fn(q, k, v, *m):
        return torch.ops.attnc.sliding_window_attention(q, k, v, max(ws), 3, causal, None,
                                                        m[0] if m else None, ws)

    dyn = ({0: B, 2: S},) * 3
    if mask == "2d":
        dyn += ({0: B, 1: S},)
    elif mask == "hf":
        dyn += ({0: B, 2: S, 3: S},)
    with warnings.catch_warnings(), window_blocked.onnx_seq_hint(400), \
            window_blocked.recording_forms() as forms:
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(_Op(fn), _inputs(2, 40, 0, mask), dynamo=True,
                                 opset_version=23, dynamic_shapes=(dyn,), verbose=False,
                                 custom_translation_table=attnc.kernels.translation_table())
    path = tmp_path / "m.onnx"
    prog.save(str(path))
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert forms[0]["onnx_form"] == sliding_window.SPLIT_FORM and "blocked" in forms[0]["why"]
    ops, sessions = ort_sessions(path)
    assert {"Attention", "Gather", "Softmax", "Concat"} <= ops
    for inputs in (_inputs(2, 203, 1, mask), _inputs(1, 17, 2, mask), _inputs(3, 130, 3, mask)):
        want = fn(*inputs).numpy()
        for sess in sessions:
            feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs, strict=True)}
            got = sess.run(None, feeds)[0]
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 1e-4, (inputs[0].shape, ws)


class _Op(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)
