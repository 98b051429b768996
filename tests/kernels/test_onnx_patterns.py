"""Each pattern op exported with a dynamic sequence length runs in ONNX Runtime (CPU) and matches
the reference at a length other than the one it was exported with."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import attnc.kernels
from attnc.kernels import masks, reference

ort = pytest.importorskip("onnxruntime")


class _Op(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _run(tmp_path, fn, args, dyn, args2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(_Op(fn), args, dynamo=True, opset_version=23,
                                 custom_translation_table=attnc.kernels.translation_table(),
                                 dynamic_shapes=(dyn,), verbose=False)
    path = tmp_path / "m.onnx"
    prog.save(str(path))
    outs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), args2, strict=True)}
        outs.append(sess.run(None, feeds))
    return outs


def _qkv(s, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, s, 16, generator=g), torch.randn(1, 2, s, 16, generator=g),
            torch.randn(1, 2, s, 16, generator=g))


S = torch.export.Dim("S", min=2, max=4096)


@pytest.mark.parametrize("args", [
    ([-1], [7], [2], [3], [False]),
    ([-1], [5], [1], [1], [True]),
    ([-1, 6], [3, 5], [2, 1], [1, 2], [False, True]),
    ([2, -1, 3], [2, 3, 3], [1, 1, 1], [1, 3, 1], [False, True, False]),
])
def test_neighborhood_onnx(tmp_path, args):
    q2, k2, v2 = _qkv(66 if len(args[0]) < 3 else 54, 1)
    outs = _run(tmp_path, lambda q, k, v: torch.ops.attnc.neighborhood_attention(q, k, v, *args),
                _qkv(48 if len(args[0]) < 3 else 36, 0), ({2: S},) * 3, (q2, k2, v2))
    want = reference.neighborhood_attention_ref(q2, k2, v2, *args).numpy()
    for (o,) in outs:
        assert np.abs(o - want).max() < 1e-5


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window_onnx(tmp_path, causal):
    q2, k2, v2 = _qkv(57, 1)
    fn = lambda q, k, v: torch.ops.attnc.sliding_window_attention(q, k, v, 6, 2, causal)  # noqa
    outs = _run(tmp_path, fn, _qkv(40, 0), ({2: S},) * 3, (q2, k2, v2))
    want = reference.sliding_window_attention_ref(q2, k2, v2, 6, 2, causal).numpy()
    for (o,) in outs:
        assert np.abs(o - want).max() < 1e-5


def test_block_sparse_onnx(tmp_path):
    nb = torch.export.Dim("NB", min=1, max=256)
    lay = masks.local_stride_layout(5, 2, 2, causal=False).expand(1, 4, 5, 5).contiguous()
    lay2 = masks.power_attention_layout(7, local_blocks=2).expand(1, 4, 7, 7).contiguous()
    q2, k2, v2 = _qkv(56, 1)
    fn = lambda q, k, v, lay: torch.ops.attnc.block_sparse_attention(q, k, v, lay, 8, True)  # noqa
    outs = _run(tmp_path, fn, (*_qkv(40, 0), lay), ({2: 8 * nb},) * 3 + ({2: nb, 3: nb},),
                (q2, k2, v2, lay2))
    want = reference.block_sparse_attention_ref(q2, k2, v2, lay2, 8, True).numpy()
    for (o,) in outs:
        assert np.abs(o - want).max() < 1e-5


@pytest.mark.parametrize("as_bool", [False, True])
def test_colsum_onnx(tmp_path, as_bool):
    rows, rows2 = torch.tensor([0, 3, 5]), torch.tensor([0, 3, 5, 30])
    dyn = {0: torch.export.Dim("R", min=1, max=4096)}
    if as_bool:  # a bool row selector follows the sequence length
        rows, rows2, dyn = torch.arange(20) % 3 == 0, torch.arange(31) % 4 == 1, {0: S}
    q2, k2, v2 = _qkv(31, 1)
    fn = lambda q, k, v, r: torch.ops.attnc.attention_colsum(q, k, v, r, None, True)  # noqa
    outs = _run(tmp_path, fn, (*_qkv(20, 0), rows), ({2: S},) * 3 + (dyn,), (q2, k2, v2, rows2))
    ro, rcs = reference.attention_colsum_ref(q2, k2, v2, rows2, None, True)
    for o, cs in outs:
        assert np.abs(o - ro.numpy()).max() < 1e-5
        assert np.abs(cs - rcs.numpy()).max() < 1e-5


def test_causal_window_without_sinks_uses_ort_gqa(tmp_path):
    import onnx

    q2, k2, v2 = _qkv(57, 1)
    fn = lambda q, k, v: torch.ops.attnc.sliding_window_attention(q, k, v, 6, 0, True)  # noqa
    outs = _run(tmp_path, fn, _qkv(40, 0), ({2: S},) * 3, (q2, k2, v2))
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "GroupQueryAttention" in ops and "Attention" not in ops
    want = reference.sliding_window_attention_ref(q2, k2, v2, 6, 0, True).numpy()
    for (o,) in outs:
        assert np.abs(o - want).max() < 1e-5
