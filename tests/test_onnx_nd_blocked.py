"""The 2-D/3-D blocked neighborhood form (kernels/neighborhood_blocked.py) and the gathered
block-sparse form (kernels/block_sparse_gather.py) against the plain references: the torch forms
the ops run off CUDA, and the ONNX forms in ONNX Runtime (graph optimizations off and on, a
second batch, and a second length where the op allows it; odd grids and lengths, dilation,
stride, causal axes, global tokens, GQA, per-head kernels and layouts, key padding masks)."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from onnx_sessions import ort_sessions

import attnc.kernels
from attnc.kernels import block_sparse_gather, neighborhood_blocked, reference
from attnc.kernels import neighborhood_blocked_onnx as nbo

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

B = torch.export.Dim("B", min=1, max=64)
S = torch.export.Dim("S", min=2, max=96)

# grid, per-head kernels, dilation, stride, causal, num_global, (Hq, Hkv)
NBHD = [
    ([7, 9], [[3, 5]], [1, 1], [1, 1], [False, False], 0, (4, 2)),
    ([7, 9], [[3, 5]], [2, 1], [1, 2], [False, True], 1, (4, 4)),
    ([5, 6, 7], [[3, 3, 5]], [1, 2, 1], [1, 1, 2], [True, False, False], 2, (4, 1)),
    ([11, 10], [[5, 3], [3, -1], [5, 5], [1, 1]], [2, 1], [1, 1], [False, False], 3, (4, 2)),
]


def _nb_qkv(b, case, seed, d=8):
    grid, _, _, _, _, ng, (hq, hkv) = case
    s = ng + int(np.prod(grid))
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g),
            torch.randn(b, hkv, s, d, generator=g))


def _padding(b, s):
    kpm = torch.ones(b, s, dtype=torch.bool)
    kpm[0, s - max(1, s // 5):] = False
    kpm[-1, : max(1, s // 7)] = False
    return kpm


def _nb_ref(q, k, v, case, kpm=None, scale=None):
    grid, heads, dil, st, ca, ng, _ = case
    hks = None if len(heads) == 1 else [x for h in heads for x in h]
    return reference.neighborhood_attention_ref(q, k, v, grid, heads[0], dil, st, ca, scale,
                                                kpm, ng, hks)


@pytest.mark.parametrize("case", NBHD)
def test_torch_neighborhood_blocked(case):
    grid, heads, dil, st, ca, ng, _ = case
    q, k, v = _nb_qkv(2, case, 1)
    for pad, tiles in itertools.product([False, True], [None, (3,) * len(grid)]):
        kpm = _padding(2, q.shape[2]) if pad else None
        got = neighborhood_blocked.blocked_attention(q, k, v, grid, heads, dil, st, ca, 0.3, kpm,
                                                     ng, tiles)
        assert (got - _nb_ref(q, k, v, case, kpm, 0.3)).abs().max() < 1e-5, (pad, tiles)


def test_neighborhood_cost_rule_and_op_dispatch(monkeypatch):
    pays = neighborhood_blocked.blocked_pays
    assert pays(4096, [64, 64], [[13, 13]], [1, 1], [1, 1], [False, False])
    assert not pays(197, [14, 14], [[7, 7]], [1, 1], [1, 1], [False, False], 1)  # ViT 14x14
    assert not pays(4096, [4096], [[13]], [1], [1], [False])  # 1-D: the 1-D blocked form
    assert not pays(4096, [64, 64], [[-1, -1]], [1, 1], [1, 1], [False, False])  # dense
    calls = []
    real = neighborhood_blocked.blocked_attention
    monkeypatch.setattr(neighborhood_blocked, "blocked_attention",
                        lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
    for grid in ([8, 8], [24, 24]):  # 2 (ng + 14 x 14) > 64, < 577
        case = (grid, [[7, 7]], [1, 1], [1, 1], [False, False], 1, (2, 1))
        q, k, v = _nb_qkv(1, case, 2)
        kpm = _padding(1, q.shape[2])
        got = torch.ops.attnc.neighborhood_attention(q, k, v, grid, [7, 7], [1, 1], [1, 1],
                                                     [False, False], None, kpm, 1)
        assert (got - _nb_ref(q, k, v, case, kpm)).abs().max() < 1e-5
    assert calls == [[24, 24]]


def _sessions(tmp_path, module, args, dyn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=23,
                                 custom_translation_table=attnc.kernels.translation_table(),
                                 dynamic_shapes=dyn, verbose=False)
    path = tmp_path / "m.onnx"
    prog.save(str(path))
    ops, sessions = ort_sessions(path)
    return ops, sessions


def _check(sessions, runs):
    """want: one tensor, or a list of them (one per output)."""
    for inputs, want in runs:
        want = want if isinstance(want, list) else [want]
        for sess in sessions:
            feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs, strict=False)}
            got = sess.run(None, feeds)
            assert len(got) == len(want)
            for c, (g, w) in enumerate(zip(got, want, strict=True)):
                assert g.shape == tuple(w.shape)
                assert np.abs(g - w.numpy()).max() <= 1e-4, (c, inputs[0].shape)


class _Nbhd(torch.nn.Module):
    def __init__(self, case, mask):
        super().__init__()
        self.case, self.mask = case, mask

    def forward(self, q, k, v, m):
        grid, heads, dil, st, ca, ng, _ = self.case
        hks = None if len(heads) == 1 else [x for h in heads for x in h]
        return torch.ops.attnc.neighborhood_attention(q, k, v, grid, heads[0], dil, st, ca, None,
                                                      m if self.mask else None, ng, hks)


def _hf_mask(kpm):
    """A Hugging Face (B, 1, S, S) float mask of a key padding mask."""
    s = kpm.shape[1]
    return torch.zeros(kpm.shape[0], 1, s, s).masked_fill(~kpm[:, None, None, :], -3.4e38)


class _Nbhds(torch.nn.Module):
    """Several cases in one export: case i takes inputs 4 i .. 4 i + 3 (q, k, v, mask)."""

    def __init__(self, cases, mask):
        super().__init__()
        self.ops = [_Nbhd(c, mask) for c in cases]

    def forward(self, *args):
        return tuple(m(*args[4 * i:4 * i + 4]) for i, m in enumerate(self.ops))


@pytest.mark.slow
@pytest.mark.parametrize("cis,mask", [((1,), "hf"), ((2, 3), "kpm")])
def test_onnx_neighborhood_blocked(tmp_path, monkeypatch, cis, mask):
    """The blocked form (small tiles, forced) in ORT at two batch sizes; S is the grid's (the
    kpm cases share one export, an output each)."""
    monkeypatch.setattr(neighborhood_blocked, "TILES", {2: (4, 3), 3: (2, 3, 2)})
    monkeypatch.setattr(neighborhood_blocked, "blocked_pays", lambda *a, **k: True)
    cases = [NBHD[ci] for ci in cis]

    def inputs(b, seed):
        args, wants = [], []
        for i, case in enumerate(cases):
            q, k, v = _nb_qkv(b, case, seed + 10 * i)
            kpm = _padding(b, q.shape[2])
            args += [q, k, v, kpm if mask != "hf" else _hf_mask(kpm)]
            wants.append(_nb_ref(q, k, v, case, kpm))
        return tuple(args), wants

    ops, sessions = _sessions(tmp_path, _Nbhds(cases, mask), inputs(1, 0)[0],
                              (({0: B},) * (4 * len(cases)),))  # forward(*args)
    assert "Gather" in ops  # the halo tiles (their fused Attention: "Attention" in ops too)
    _check(sessions, [inputs(1, 3), inputs(3, 4)])


@pytest.mark.slow
@pytest.mark.parametrize("loop,mask", [(True, "mul"), (False, "min")])
def test_onnx_neighborhood_blocked_min_form(tmp_path, monkeypatch, loop, mask):
    """Without a padding mask the tiles' masked scores are capped (float32: Mul in Loop steps;
    the flat Min chain bf16/fp16 get; no fused Attention where every token sees itself): every
    case in one export, two batch sizes, large score spreads
    (a masked key scoring far above the visible ones must still get no weight)."""
    monkeypatch.setattr(neighborhood_blocked, "TILES", {2: (4, 3), 3: (2, 3, 2)})
    monkeypatch.setattr(neighborhood_blocked, "blocked_pays", lambda *a, **k: True)
    monkeypatch.setattr(nbo, "LOOP", loop)  # float32's default, and bf16/fp16's flat Min form
    monkeypatch.setattr(nbo, "MASK", mask)
    # several Loop steps of several tiles each (a prime tile count: one tile per step)
    monkeypatch.setattr(nbo, "tiles_per_step",
                        lambda nt, _: min([p for p in range(2, nt) if nt % p == 0] or [1]))

    cases = NBHD[1:]  # dilation, stride, causal, 3-D, globals, GQA, per-head kernels

    def inputs(b, seed):
        args, wants = [], []
        for i, case in enumerate(cases):
            q, k, v = _nb_qkv(b, case, seed + 10 * i)
            q, k = q * 6.0, k * 6.0  # scores spread over ~+-100
            args += [q, k, v]
            wants.append(_nb_ref(q, k, v, case))
        return tuple(args), wants

    class Unmasked(_Nbhds):
        def forward(self, *args):
            return tuple(m(*args[3 * i:3 * i + 3], None) for i, m in enumerate(self.ops))

    ops, sessions = _sessions(tmp_path, Unmasked(cases, False), inputs(1, 0)[0],
                              (({0: B},) * (3 * len(cases)),))
    # every case: the capped form (in float32 its tiles in the steps of a Loop), no Attention
    assert {"Gather", "Min" if mask == "min" else "Loop"} <= ops and "Attention" not in ops
    assert ("Loop" in ops) == loop
    _check(sessions, [inputs(1, 3), inputs(3, 4)])


@pytest.mark.slow
def test_onnx_neighborhood_falls_back(tmp_path):
    """A -1 grid axis with a dynamic length, or a rule that does not pay: masked dense."""
    case = ([4, -1], [[3, 3]], [1, 1], [1, 1], [False, False], 1, (2, 2))

    def inputs(b, s, seed):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(b, 2, s, 8, generator=g) for _ in range(3))
        want = reference.neighborhood_attention_ref(q, k, v, [4, -1], [3, 3], [1, 1], [1, 1],
                                                    [False, False], None, None, 1)
        return (q, k, v, torch.zeros(1)), want

    s4 = 4 * torch.export.Dim("W", min=3, max=20) + 1
    ops, sessions = _sessions(tmp_path, _Nbhd(case, None), inputs(1, 29, 0)[0],
                              ({0: B, 2: s4},) * 3 + (None,))
    assert "Attention" in ops
    _check(sessions, [inputs(2, 29, 1), inputs(1, 45, 2)])


# ------------------------------------------------------------------ block-sparse


def _bs_inputs(b, sq, skv, hq, hkv, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, 8, generator=g), torch.randn(b, hkv, skv, 8, generator=g),
            torch.randn(b, hkv, skv, 8, generator=g))


def _layout(lb, lh, nq, nkv, seed, density=0.3):
    g = torch.Generator().manual_seed(seed)
    lay = torch.rand(lb, lh, nq, nkv, generator=g) < density
    lay[..., 1, :] = False  # a query block with no key block: zeros
    return lay


def test_torch_block_sparse_gathered():
    combos = [c for c in itertools.product([37, 64], [37, 50], [False, True], [1, 2], [1, 4],
                                           [1, 4], [False, True]) if not c[2] or c[0] == c[1]]
    for sq, skv, causal, lb, lh, hkv, pad in combos[::5]:  # 16 of 80, every axis varies
        q, k, v = _bs_inputs(2, sq, skv, 4, hkv, sq + skv)
        lay = _layout(lb, lh, -(-sq // 8), -(-skv // 8), lb + lh)
        kpm = _padding(2, skv) if pad else None
        want = reference.block_sparse_attention_ref(q, k, v, lay, 8, causal, 0.3, kpm)
        got = block_sparse_gather.gather_attention(q, k, v, lay, 8, causal, 0.3, kpm)
        assert (got - want).abs().max() < 1e-5, (sq, skv, causal, lb, lh, hkv, pad)


def test_block_sparse_cost_rule_and_op_dispatch(monkeypatch):
    pays = block_sparse_gather.gather_pays
    assert pays(4096, 64, 6) and pays(4096, 64) and pays(None, 64)
    assert not pays(256, 64, 1)  # short: the torch reference
    assert not pays(4096, 64, 40)  # a row lists most blocks
    onnx_pays = block_sparse_gather.onnx_pays  # ONNX: gathered from 2 key blocks on
    assert onnx_pays(128, 64) and onnx_pays(256, 64) and onnx_pays(None, 64)
    assert not onnx_pays(64, 64) and block_sparse_gather.onnx_form(256, 64) is not None
    calls = []
    real = block_sparse_gather.gather_attention
    monkeypatch.setattr(block_sparse_gather, "gather_attention",
                        lambda *a, **kw: calls.append(a[0].shape[2]) or real(*a, **kw))
    for s in (200, 600):
        q, k, v = _bs_inputs(1, s, s, 2, 1, s)
        lay = _layout(1, 2, -(-s // 32), -(-s // 32), s, 0.1)
        kpm = _padding(1, s)
        got = torch.ops.attnc.block_sparse_attention(q, k, v, lay, 32, True, None, kpm)
        want = reference.block_sparse_attention_ref(q, k, v, lay, 32, True, None, kpm)
        assert (got - want).abs().max() < 1e-5
    assert calls == [600]


class _Block(torch.nn.Module):
    def __init__(self, lay, causal, pad):
        super().__init__()
        self.register_buffer("lay", lay)
        self.causal, self.pad = causal, pad

    def forward(self, q, k, v, m):
        return torch.ops.attnc.block_sparse_attention(q, k, v, self.lay, 8, self.causal, None,
                                                      m if self.pad else None)


@pytest.mark.slow
@pytest.mark.parametrize("causal,lb,lh,hkv,pad", [(True, 1, 1, 2, "kpm"),
                                                  (False, 1, 4, 2, "float"),
                                                  (True, 2, 1, 4, None)])
def test_onnx_block_sparse_gathered(tmp_path, causal, lb, lh, hkv, pad):
    """One export with a dynamic length (and batch, for a batch-shared layout): lengths 77 and
    an odd shorter one, key padding (bool or float), per-head / per-batch layouts, GQA."""
    lay = _layout(lb, lh, 10, 10, 7)

    def inputs(b, s, seed):
        q, k, v = _bs_inputs(b, s, s, 4, hkv, seed)
        kpm = _padding(b, s)
        m = kpm if pad != "float" else torch.zeros(b, s).masked_fill(~kpm, -1e9)
        want = reference.block_sparse_attention_ref(q, k, v, lay, 8, causal, None,
                                                    kpm if pad else None)
        return (q, k, v, m), want

    dims = {0: B, 2: S} if lb == 1 else {2: S}
    mdim = {0: B, 1: S} if lb == 1 else {1: S}
    ops, sessions = _sessions(tmp_path, _Block(lay, causal, pad), inputs(lb, 77, 0)[0],
                              (dims, dims, dims, mdim))
    assert "Attention" not in ops and "TopK" in ops
    _check(sessions, [inputs(lb, 77, 1), inputs(3 if lb == 1 else lb, 45, 2)])


class _GridAttention(torch.nn.Module):
    """A hand-written vision block whose attention is attnc's 2-D neighborhood op on a 24 x 24
    grid with a 7 x 7 window (576 tokens: the cost rule picks the halo tiles)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.h = heads
        self.qkv, self.out = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        o = torch.ops.attnc.neighborhood_attention(q, k, v, [24, 24], [7, 7], [1, 1], [1, 1],
                                                   [False, False])
        return self.out(o.transpose(1, 2).reshape(b, s, c))


@pytest.mark.slow
def test_build_export_runs_the_tile_loop_in_ort(tmp_path):
    """Through the build's own ONNX export (optimizer, names, checks, summary): the site gets
    the halo-tile form, its tiles in a Loop (the summary counts the body's nodes), and ONNX
    Runtime matches the model at two batch sizes."""
    from attnc.capture.program import capture
    from attnc.export.artifacts import export_onnx
    from attnc.load.models import from_module

    torch.manual_seed(0)
    model = _GridAttention().eval()
    program = capture(from_module(model, (torch.randn(2, 576, 32),)))
    info = export_onnx(program, tmp_path / "m.onnx", seq_hint=576)
    assert [f["onnx_form"] for f in info["attention_forms"]] == [neighborhood_blocked.FORM]
    assert info["op_counts"].get("Loop") == 1 and info["softmax_nodes"] >= 1
    assert info["attention_nodes"] == 0
    _, sessions = ort_sessions(tmp_path / "m.onnx")
    for b in (1, 3):
        x = torch.randn(b, 576, 32)
        with torch.no_grad():
            want = model(x)
        _check(sessions, [((x,), want)])
