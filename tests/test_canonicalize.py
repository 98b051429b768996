"""Hand-written attention becomes one SDPA node; everything else is left alone and reported."""

from __future__ import annotations

import models
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnc.capture.canonicalize import SDPA, Candidate, canonicalize_attention, module_name

SOFTMAX = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default}


def _export(model: nn.Module, args: tuple) -> torch.fx.GraphModule:
    batch, seq = torch.export.Dim("batch", min=1, max=16), torch.export.Dim("seq", min=2, max=48)
    shapes = tuple({0: batch, 1: seq} if a.dim() == 2 else {0: batch} for a in args)
    return torch.export.export(model, args, dynamic_shapes=shapes, strict=False).module()


def _sdpa(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target == SDPA]


def _other_lengths(args: tuple) -> tuple:
    ids = torch.randint(0, models.VOCAB, (3, 17), generator=torch.Generator().manual_seed(7))
    return (ids, *([torch.ones(3, 17, dtype=torch.long)] if len(args) > 1 else []))


CASES = {  # factory, attention modules, mask kind, kv heads
    "nanogpt": (models.make_nanogpt, ["h.0.attn", "h.1.attn"], "causal", 4),
    "manual_gqa": (
        models.make_manual_gqa,
        ["layers.0.attention", "layers.1.attention"],
        "causal",
        2,
    ),
    "encoder_div_float_mask": (
        models.make_tiny_encoder_manual,
        ["layers.0.attention", "layers.1.attention"],
        "float",
        4,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_handwritten_attention_becomes_sdpa(name):
    factory, modules, mask_kind, kv_heads = CASES[name]
    model, args = factory()
    gm = _export(model, args)
    count, candidates = canonicalize_attention(gm)
    assert count == len(modules) and candidates == []
    nodes = _sdpa(gm)
    assert len(nodes) == len(modules)
    assert not any(n.target in SOFTMAX for n in gm.graph.nodes)
    assert [module_name(n) for n in nodes] == modules
    for n in nodes:
        assert n.meta["attnc_mask_kind"] == mask_kind
        assert n.meta["attnc_num_kv_heads"] == kv_heads
        assert n.args[5] == (mask_kind == "causal")
        assert n.kwargs.get("enable_gqa", False) == (kv_heads < 4)
        assert isinstance(n.meta["val"], torch.Tensor) and n.meta["val"].dim() == 4
    with torch.no_grad():
        for inputs in (args, _other_lengths(args)):
            assert (gm(*inputs) - model(*inputs)).abs().max().item() <= 1e-5
    assert canonicalize_attention(gm) == (0, [])  # idempotent


class Variant(nn.Module):
    """One attention layer written in the less common ways."""

    def __init__(self, dim: int = 32, heads: int = 4, kv: int = 2):
        super().__init__()
        self.heads, self.kv, self.d = heads, kv, dim // heads
        self.embed = nn.Embedding(models.VOCAB, dim)
        self.qkv = nn.Linear(dim, (heads + 2 * kv) * self.d)
        self.out = nn.Linear(dim, dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, S = idx.shape
        x = self.embed(idx)  # (B, S, C)
        q, k, v = self.qkv(x).split([self.heads * self.d, self.kv * self.d, self.kv * self.d], -1)
        q = q.view(B, S, self.heads, self.d).transpose(1, 2)  # (B, H, S, D)
        k = k.view(B, S, self.kv, self.d).transpose(1, 2)  # (B, Hkv, S, D)
        v = v.view(B, S, self.kv, self.d).transpose(1, 2)  # (B, Hkv, S, D)
        k = k.repeat_interleave(self.heads // self.kv, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(self.heads // self.kv, dim=1)  # (B, H, S, D)
        s = self.d**-0.25  # the scale split over q and k, a where() with a bool padding mask
        scores = (q * s) @ (k * s).permute(0, 1, 3, 2)  # (B, H, S, S)
        keep = (idx != 0)[:, None, None, :]  # (B, 1, 1, S)
        scores = torch.where(keep, scores, torch.tensor(float("-inf")))
        y = F.dropout(scores.softmax(-1), p=0.1, training=self.training) @ v  # (B, H, S, D)
        return self.out(y.transpose(1, 2).reshape(B, S, -1))


def test_sqrt_scale_where_mask_repeat_interleave():
    torch.manual_seed(0)
    model, args = Variant().eval(), models.make_nanogpt()[1]
    gm = _export(model, args)
    count, _ = canonicalize_attention(gm)
    assert count == 1 and len(_sdpa(gm)) == 1
    assert not any(n.target in SOFTMAX for n in gm.graph.nodes)
    node = _sdpa(gm)[0]
    assert node.meta["attnc_num_kv_heads"] == 2 and node.kwargs["enable_gqa"]
    assert node.meta["attnc_mask_kind"] == "bool"
    assert abs(node.kwargs["scale"] - 8**-0.5) < 1e-9
    with torch.no_grad():
        assert (gm(*args) - model(*args)).abs().max().item() <= 1e-5


def test_decomposed_graph_with_bmm():
    model, args = models.make_nanogpt()
    ep = torch.export.export(model, args, strict=False).run_decompositions()
    gm = ep.module()
    assert canonicalize_attention(gm) == (2, [])
    assert not any(n.target == torch.ops.aten.bmm.default for n in gm.graph.nodes)
    assert all(n.args[5] for n in _sdpa(gm))  # causal
    with torch.no_grad():
        assert (gm(*args) - model(*args)).abs().max().item() <= 1e-5


def test_softmax_gate_is_reported_and_left_alone():
    model, args = models.make_softmax_gate()
    gm = _export(model, args)
    before = [n.target for n in gm.graph.nodes]
    count, candidates = canonicalize_attention(gm)
    assert count == 0 and len(candidates) == 1
    assert isinstance(candidates[0], Candidate) and candidates[0].module == ""
    assert "not a matmul with values" in candidates[0].reason
    assert [n.target for n in gm.graph.nodes] == before
    with torch.no_grad():
        assert torch.equal(gm(*args), model(*args))


def test_no_softmax_no_candidates():
    model, args = models.make_no_attention()
    assert canonicalize_attention(_export(model, args)) == (0, [])


# an exported graph is already fixed in eval mode; its module refuses .eval()
@pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode")
def test_rewritten_module_reexports_to_torch_and_onnx(tmp_path):
    import onnxruntime as ort

    model, args = models.make_manual_gqa()
    gm = _export(model, args)
    assert canonicalize_attention(gm)[0] == 2
    again = _export(gm, args)
    assert len(_sdpa(again)) == 2
    with torch.no_grad():
        ref = model(*args)
        assert (again(*args) - ref).abs().max().item() <= 1e-5
    batch, seq = torch.export.Dim("batch", min=1, max=16), torch.export.Dim("seq", min=2, max=48)
    prog = torch.onnx.export(
        gm, args, dynamo=True, dynamic_shapes=({0: batch, 1: seq},), verbose=False
    )
    prog.save(str(tmp_path / "m.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for inputs in (args, _other_lengths(args)):
        (out,) = sess.run(None, {sess.get_inputs()[0].name: inputs[0].numpy()})
        assert np.abs(out - model(*inputs).detach().numpy()).max() <= 1e-4
