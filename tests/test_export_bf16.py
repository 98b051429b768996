"""bfloat16 islands in an fp32 model (Falcon's ALiBi) run in ONNX Runtime's CPU build: the nodes
it has no bf16 kernel for compute in float32 between Casts, which is bit-exact with PyTorch."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch

from attnc.export.ort_dtypes import widen_unsupported_bf16


class Island(torch.nn.Module):
    def forward(self, x, y):
        a = x.to(torch.bfloat16) * y.to(torch.bfloat16)  # bf16 Mul: no ORT CPU kernel
        b = a + y.to(torch.bfloat16)
        return b.float() * 2.0


def _export(tmp_path):
    x, y = torch.randn(3, 17), torch.randn(3, 17)
    path = tmp_path / "m.onnx"
    torch.onnx.export(Island(), (x, y), str(path), dynamo=True, opset_version=23)
    return path, x, y


def test_bf16_island_runs_and_is_exact(tmp_path):
    path, x, y = _export(tmp_path)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fixed = widen_unsupported_bf16(path)
    assert fixed  # the Mul (and whatever else ORT lacks) was widened
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy(),
                             sess.get_inputs()[1].name: y.numpy()})
    assert torch.equal(torch.from_numpy(got), Island()(x, y))
    onnx.checker.check_model(onnx.load(str(path)))


def test_no_bf16_no_change(tmp_path):
    class Plain(torch.nn.Module):
        def forward(self, x):
            return x * 2

    path = tmp_path / "p.onnx"
    torch.onnx.export(Plain(), (torch.randn(2, 3),), str(path), dynamo=True)
    before = path.read_bytes()
    assert widen_unsupported_bf16(path) == []
    assert path.read_bytes() == before
