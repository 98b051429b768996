"""Issue 13's memory steps change no bytes and no results: the streamed `.pt2` writer
(attnc.export.pt2_stream) writes what `torch.export.save` writes, and the float32-compute copy's
narrowed weight casts (attnc.export.ort_lowmem) give ONNX Runtime the same outputs."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch

from attnc.export.pt2_stream import streaming


class _Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 8)
        self.emb = torch.nn.Embedding(50, 16).to(torch.bfloat16)
        self.register_buffer("b", torch.arange(4.0))

    def forward(self, x, ids):
        return self.lin(x) + self.b.sum() + self.emb(ids).float().sum()


def test_streamed_pt2_has_torchs_bytes():
    args = (torch.randn(2, 16), torch.tensor([1, 7]))
    ep = torch.export.export(_Small(), args)
    plain, streamed = io.BytesIO(), io.BytesIO()
    torch.export.save(ep, plain)
    with streaming() as patched:
        torch.export.save(ep, streamed)
    assert patched
    za, zb = zipfile.ZipFile(plain), zipfile.ZipFile(streamed)
    assert [i.filename for i in za.infolist()] == [i.filename for i in zb.infolist()]
    for info in za.infolist():
        if not info.filename.endswith("serialization_id"):  # random per save
            assert za.read(info.filename) == zb.read(info.filename), info.filename
    back = torch.export.load(io.BytesIO(streamed.getvalue())).module()
    assert torch.equal(back(*args), ep.module()(*args))
    # torch's own writer is back in place after the block
    from torch.export.pt2_archive import _package

    assert isinstance(_package._get_raw_tensor_bytes(torch.ones(2)), bytes)


def _low_model():
    """Gather from a bf16 table and a MatMul by a bf16 weight, each read through a Cast to
    float32, as the float32-compute copy writes them."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)

    def bf16(name, shape):
        t = numpy_helper.from_array(rng.standard_normal(shape).astype(ml_dtypes.bfloat16), name)
        t.data_type = T.BFLOAT16
        return t

    nodes = [
        helper.make_node("Cast", ["table"], ["table_f"], to=T.FLOAT, name="g__in0_f32"),
        helper.make_node("Gather", ["table_f", "ids"], ["h"], name="g"),
        helper.make_node("Cast", ["w"], ["w_f"], to=T.FLOAT, name="m__in1_f32"),
        helper.make_node("MatMul", ["h", "w_f"], ["y"], name="m"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", T.INT64, [2, 3])],
        [helper.make_tensor_value_info("y", T.FLOAT, None)],
        initializer=[bf16("table", [40, 24]), bf16("w", [24, 37])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_narrowed_casts_same_outputs():
    import onnxruntime as ort

    from attnc.export.ort_lowmem import narrow_weight_casts

    model = _low_model()
    ids = np.array([[0, 5, 39], [7, 7, 1]], np.int64)

    def run(m):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"ids": ids})[0]

    want = run(model)
    assert narrow_weight_casts(model, chunk_bytes=24 * 10 * 4) == 2  # 37 columns in 4 parts
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Slice") == 4 and ops.count("Concat") == 1
    assert "table" in model.graph.node[0].input  # the Gather reads the bf16 table itself
    np.testing.assert_array_equal(run(model), want)
