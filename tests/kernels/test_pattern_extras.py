"""Pattern ops with a key padding mask, global tokens and per-head parameters (issue 14, item 4):
the Triton kernels (pattern_extras.py, under the interpreter on CPU) against the references and
against masked SDPA with a mask built here independently; the Hugging Face mask reduction;
identities with dense SDPA; ONNX Runtime against the reference at two sequence lengths and two
batch sizes from one export, graph optimizations on and off; the site predicates."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnc.kernels
from attnc.errors import KernelError
from attnc.graph.sites import AttentionSite
from attnc.kernels import masks, pattern_extras, reference
from attnc.kernels.block_sparse import can_use_block_sparse_site
from attnc.kernels.neighborhood import can_use_neighborhood_site
from attnc.kernels.patterns import sdpa_masked
from attnc.kernels.sliding_window import can_use_sliding_window_site
from tests.kernels.conftest import DEVICE, assert_close_attention, rand_qkv

SCALE = 0.2


def padding(b: int, s: int) -> torch.Tensor:
    """(B, S) key padding: batch 0 right-padded, batch 1 left-padded (a few tokens each)."""
    kpm = torch.ones(b, s, dtype=torch.bool)
    if s > 2:
        kpm[0, s - max(1, s // 5):] = False
        kpm[-1, : max(1, s // 7)] = False
    return kpm.to(DEVICE)


def check(out, lse, q, k, v, allowed):
    """The kernel against reference.masked_attention and masked SDPA with `allowed`."""
    ref_out, ref_lse = reference.masked_attention(q, k, v, allowed, SCALE)
    assert_close_attention(out, lse, ref_out, ref_lse, q, k, v, allowed, SCALE)
    if q.dtype == torch.float32:
        torch.testing.assert_close(out, sdpa_masked(q, k, v, allowed, SCALE), atol=2e-5, rtol=0)
    return ref_out


# ------------------------------------------------------------------ sliding window


def sliding_expected(sq, skv, wins, sinks, causal):
    i = torch.arange(sq)[:, None]
    j = torch.arange(skv)[None, :]
    out = []
    for w in wins:
        w = sq + skv if w < 0 else w
        near = (i - j >= 0) & (i - j < w) if causal else (i - j).abs() < w
        m = near | (j < sinks)
        out.append(m & (j <= i) if causal else m)
    return torch.stack(out).to(DEVICE)  # (H, Sq, Skv)


@pytest.mark.parametrize("sq,skv", [(1, 1), (7, 7), (37, 37), (113, 113), (37, 113), (113, 37)])
@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window_kernel(sq, skv, causal):
    d = 80 if (sq + skv) % 2 else 32
    q, k, v = rand_qkv(2, 4, 2, sq, skv, d, torch.float32, seed=sq * 7 + skv)
    wins, kpm = [5, -1, 3, 17], padding(2, skv)
    out, lse = pattern_extras.sliding_window_fwd(q, k, v, windows=wins, num_sinks=2,
                                                 causal=causal, scale=SCALE,
                                                 key_padding_mask=kpm)
    allowed = sliding_expected(sq, skv, wins, 2, causal)[None] & kpm[:, None, None, :]
    want = check(out, lse, q, k, v, allowed)
    got = torch.ops.attnc.sliding_window_attention(q.cpu(), k.cpu(), v.cpu(), 5, 2, causal,
                                                   SCALE, kpm.cpu(), wins)
    torch.testing.assert_close(got, want.cpu(), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ neighborhood


def natten_expected(grid, heads, dil, st, ca, g):
    """Per head, the AND over axes of the 1-D NATTEN masks (masks.natten_mask, checked against
    the spec) on the grid after g global tokens, whole-group axes (-1) spelled out."""
    n = math.prod(grid)
    t = torch.arange(n)
    coords = masks.grid_coords(t, grid)
    out = []
    for ks in heads:
        m = torch.ones(n, n, dtype=torch.bool)
        for a, L in enumerate(grid):
            x = coords[a]
            if ks[a] == -1:
                ax = (x[:, None] % dil[a]) == (x[None, :] % dil[a])
                if ca[a]:
                    ax = ax & (x[None, :] <= x[:, None])
            else:
                one = masks.natten_mask([L], [ks[a]], [dil[a]], [st[a]], [ca[a]])
                ax = one[x[:, None], x[None, :]]
            m &= ax
        full = torch.ones(g + n, g + n, dtype=torch.bool)
        full[g:, g:] = m
        out.append(full)
    return torch.stack(out).to(DEVICE)  # (H|1, S, S)


NATTEN_CASES = [  # global, grid, per-head kernels, dilation, stride, causal, hkv
    (0, (1,), [[1]], (1,), (1,), (False,), 2),
    (0, (7,), [[3], [-1], [5], [7]], (1,), (1,), (False,), 1),
    (1, (36,), [[5], [9], [-1], [3]], (2,), (2,), (False,), 2),
    (2, (5, 7), [[3, 3], [-1, -1], [5, 3], [3, -1]], (1, 2), (1, 1), (False, True), 2),
    (1, (2, 3, 6), [[2, 3, 3]], (1, 1, 2), (1, 1, 1), (False, False, True), 2),
    (0, (113,), [[7], [13], [-1], [7]], (1,), (1,), (True,), 1),
]


@pytest.mark.parametrize("case", NATTEN_CASES, ids=str)
def test_neighborhood_kernel(case):
    g, grid, heads, dil, st, ca, hkv = case
    s = g + math.prod(grid)
    d = 80 if len(grid) == 2 else 32
    q, k, v = rand_qkv(2, 4, hkv, s, s, d, torch.float32, seed=s)
    kpm = padding(2, s)
    out, lse = pattern_extras.neighborhood_fwd(q, k, v, grid=list(grid), head_kernels=heads,
                                               dilation=dil, stride=st, is_causal=ca,
                                               num_global=g, scale=SCALE, key_padding_mask=kpm)
    allowed = natten_expected(grid, heads, dil, st, ca, g)[None] & kpm[:, None, None, :]
    want = check(out, lse, q, k, v, allowed)
    flat = [x for h in heads for x in h] if len(heads) > 1 else None
    got = torch.ops.attnc.neighborhood_attention(q.cpu(), k.cpu(), v.cpu(), [-1, *grid[1:]],
                                                 heads[0], list(dil), list(st), list(ca), SCALE,
                                                 kpm.cpu(), g, flat)
    torch.testing.assert_close(got, want.cpu(), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ block-sparse


@pytest.mark.parametrize("sq,skv,bs", [(1, 1, 4), (7, 7, 4), (37, 37, 8), (113, 37, 16),
                                       (37, 113, 8)])
@pytest.mark.parametrize("causal", [True, False])
def test_block_sparse_kernel(sq, skv, bs, causal):
    q, k, v = rand_qkv(2, 4, 2, sq, skv, 32 if bs != 16 else 80, torch.float32, seed=bs + sq)
    layout = masks.random_layout(-(-sq // bs), -(-skv // bs), 0.4, heads=4, seed=sq).to(DEVICE)
    kpm = padding(2, skv)
    out, lse = pattern_extras.block_sparse_fwd(q, k, v, layout=layout, block_size=bs,
                                               causal=causal, scale=SCALE, key_padding_mask=kpm)
    allowed = masks.block_layout_mask(layout, bs, sq, skv, causal) & kpm[:, None, None, :]
    want = check(out, lse, q, k, v, allowed)
    got = torch.ops.attnc.block_sparse_attention(q.cpu(), k.cpu(), v.cpu(), layout.cpu(), bs,
                                                 causal, SCALE, kpm.cpu())
    torch.testing.assert_close(got, want.cpu(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision(dtype):
    q, k, v = rand_qkv(2, 4, 2, 37, 37, 32, dtype, seed=3)
    kpm = padding(2, 37)
    out, lse = pattern_extras.neighborhood_fwd(q, k, v, grid=[6, 6], head_kernels=[[3, 5]],
                                               dilation=[1, 1], stride=[1, 1],
                                               is_causal=[False, False], num_global=1,
                                               scale=SCALE, key_padding_mask=kpm)
    allowed = natten_expected((6, 6), [[3, 5]], (1, 1), (1, 1), (False, False), 1)[None]
    check(out, lse, q, k, v, allowed & kpm[:, None, None, :])


# ------------------------------------------------------------------ masks, identities


def test_fully_masked_rows_give_zeros():
    """Causal window, left padding: the padded queries see only padded keys -> zeros, lse -inf
    (what reference.masked_attention defines; SDPA alone would give NaN)."""
    q, k, v = rand_qkv(1, 2, 1, 20, 20, 32, torch.float32, seed=5)
    kpm = torch.ones(1, 20, dtype=torch.bool, device=DEVICE)
    kpm[0, :6] = False
    out, lse = pattern_extras.sliding_window_fwd(q, k, v, windows=[4], num_sinks=0, causal=True,
                                                 scale=SCALE, key_padding_mask=kpm)
    assert torch.equal(out[0, :, :6].cpu(), torch.zeros(2, 6, 32))
    assert torch.isinf(lse[0, :, :6]).all() and torch.isfinite(lse[0, :, 6:]).all()
    ref = reference.sliding_window_attention_ref(q, k, v, 4, 0, True, SCALE, kpm)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


def test_hugging_face_masks_reduce_to_key_padding():
    b, s = 2, 23
    kpm = padding(b, s).cpu()
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool))
    fmin = torch.finfo(torch.float32).min
    hf = torch.where(causal[None, None] & kpm[:, None, None, :], 0.0, fmin)  # (B, 1, S, S)

    def sliding(i, j):  # a causal pattern
        return masks.sliding_window_visible(i, j, 5, 1, True)

    assert torch.equal(masks.key_padding_mask(hf, b, s, s, sliding), kpm)
    assert torch.equal(masks.key_padding_mask(kpm.float().log(), b, s, s), kpm)  # 0 / -inf
    assert masks.key_padding_mask(hf, b, s, s) is None  # causal is more than padding ...
    bidir = masks.key_padding_mask(hf, b, s, s, lambda i, j: (i - j).abs() < 5)
    assert bidir is None  # ... on a bidirectional pattern
    with pytest.raises(KernelError, match="bias"):
        masks.key_padding_mask(hf + 0.5 * causal, b, s, s, sliding)
    q, k, v = rand_qkv(b, 4, 2, s, s, 32, torch.float32, seed=1, device="cpu")
    want = torch.ops.attnc.sliding_window_attention(q, k, v, 5, 1, True, None, kpm)
    got = torch.ops.attnc.sliding_window_attention(q, k, v, 5, 1, True, None, hf)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(KernelError, match="not a key padding mask"):
        torch.ops.attnc.sliding_window_attention(q, k, v, 5, 1, False, None, hf)
    assert masks.head_values(7, 3) == [7, 7, 7]
    assert masks.head_values([4, -1], 4, groups=[0, 0, 1, 1]) == [4, 4, -1, -1]
    with pytest.raises(KernelError):
        masks.head_values([4, 5], 3)


def test_unbounded_patterns_are_dense_sdpa():
    """Window >= S (or -1) and kernel -1 on every axis, no padding: dense SDPA, atol 1e-6."""
    s = 37
    q, k, v = rand_qkv(2, 4, 2, s, s, 32, torch.float32, seed=2)
    qc, kc, vc = q.cpu(), k.cpu(), v.cpu()
    for causal in (True, False):
        dense = F.scaled_dot_product_attention(qc, kc, vc, is_causal=causal, scale=SCALE,
                                               enable_gqa=True)
        op = torch.ops.attnc.sliding_window_attention(qc, kc, vc, s, 0, causal, SCALE, None,
                                                      [-1, s, 2 * s, -1])
        torch.testing.assert_close(op, dense, atol=1e-6, rtol=0)
        out, _ = pattern_extras.sliding_window_fwd(q, k, v, windows=[-1, s, 2 * s, -1],
                                                   num_sinks=0, causal=causal, scale=SCALE)
        torch.testing.assert_close(out.cpu(), dense, atol=1e-6, rtol=0)
    dense = F.scaled_dot_product_attention(qc, kc, vc, scale=SCALE, enable_gqa=True)
    op = torch.ops.attnc.neighborhood_attention(qc, kc, vc, [-1, 5], [-1, -1], [1, 1], [1, 1],
                                                [False, False], SCALE, None, 2)
    torch.testing.assert_close(op, dense, atol=1e-6, rtol=0)
    out, _ = pattern_extras.neighborhood_fwd(q, k, v, grid=[7, 5], head_kernels=[[-1, -1]],
                                             dilation=[1, 1], stride=[1, 1],
                                             is_causal=[False, False], num_global=2,
                                             scale=SCALE)
    torch.testing.assert_close(out.cpu(), dense, atol=1e-6, rtol=0)
    lay = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    op = torch.ops.attnc.block_sparse_attention(qc, kc, vc, lay, 8, False, SCALE,
                                                torch.ones(2, s, dtype=torch.bool))
    torch.testing.assert_close(op, dense, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ site predicates

SITE = AttentionSite(index=3, layer=1, module="layers.1.attn", node="sdpa", kind="self",
                     num_heads=4, num_kv_heads=2, head_dim=32, causal=False, mask="float",
                     scale=0.17, window=None, pattern="dense", q_proj=None, k_proj=None,
                     v_proj=None, o_proj=None, residual_add=None, norm=None,
                     block_style="pre-norm")


def test_site_predicates_take_masked_sites():
    causal = dataclasses.replace(SITE, causal=True, mask="bool")
    assert can_use_neighborhood_site(SITE, 197, [14, 14], [7, 7], num_global=1) is None
    assert can_use_neighborhood_site(SITE, 197, [14, 14], [7, 7], num_global=1,
                                     head_kernel_size=[7, 7, -1, -1, 3, 3, 5, 5]) is None
    assert "heads" in can_use_neighborhood_site(SITE, 197, [14, 14], [7, 7], num_global=1,
                                                head_kernel_size=[7, 7])
    assert "causal" in can_use_neighborhood_site(causal, 196, [196], [7])
    assert can_use_neighborhood_site(causal, 196, [196], [7], is_causal=[True]) is None
    assert "alibi" in can_use_sliding_window_site(dataclasses.replace(SITE, score="alibi"), 8)
    assert can_use_sliding_window_site(causal, 8, 4, True, [8, -1, 2, 8]) is None
    assert "causal" in can_use_sliding_window_site(causal, 8, 0, False)
    assert "window" in can_use_sliding_window_site(dataclasses.replace(causal, window=16), 32)
    assert can_use_sliding_window_site(dataclasses.replace(causal, window=16), 16) is None
    lay = masks.power_attention_layout(4)
    assert can_use_block_sparse_site(causal, lay, 16, 64, 64, is_causal=True) is None
    assert "causal" in can_use_block_sparse_site(causal, lay, 16, 64, 64)
    assert can_use_block_sparse_site(dataclasses.replace(SITE, kind="cross"), lay, 16, 64,
                                     64) is None


# ------------------------------------------------------------------ ONNX

ort = pytest.importorskip("onnxruntime")
B = torch.export.Dim("B", min=1, max=64)
S = torch.export.Dim("S", min=2, max=4096)


class _Op(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def onnx_runs(tmp_path, fn, args, dyn, runs):
    """Export once (dynamic dims `dyn`), run each input tuple of `runs` in ONNX Runtime with
    graph optimizations off and on; yields (inputs, [output per level])."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(_Op(fn), args, dynamo=True, opset_version=23,
                                 custom_translation_table=attnc.kernels.translation_table(),
                                 dynamic_shapes=(dyn,), verbose=False)
    path = tmp_path / "m.onnx"
    prog.save(str(path))
    sessions = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        sessions.append(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))
    for inputs in runs:
        outs = []
        for sess in sessions:
            feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs, strict=True)}
            outs.append(sess.run(None, feeds)[0])
        yield inputs, outs


def _inputs(b, s, seed, with_hf=False):
    q, k, v = rand_qkv(b, 4, 2, s, s, 16, torch.float32, seed=seed, device="cpu")
    kpm = padding(b, s).cpu()
    if with_hf:  # a Hugging Face causal + padding float mask (B, 1, S, S)
        c = torch.tril(torch.ones(s, s, dtype=torch.bool))
        kpm = torch.where(c[None, None] & kpm[:, None, None, :], 0.0,
                          torch.finfo(torch.float32).min)
    return q, k, v, kpm


def _check_onnx(tmp_path, fn, ref, shapes, mask_dyn):
    dyn = ({0: B, 2: S},) * 3 + (mask_dyn,)
    runs = [_inputs(b, s, seed=s, with_hf=len(mask_dyn) == 3) for b, s in shapes]
    for inputs, outs in onnx_runs(tmp_path, fn, runs[0], dyn, runs):
        want = ref(*inputs).numpy()
        for o in outs:
            assert np.abs(o - want).max() < 1e-4


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window_onnx(tmp_path, causal):
    wins = [5, -1, 3, 9]

    def fn(q, k, v, m):
        return torch.ops.attnc.sliding_window_attention(q, k, v, 5, 2, causal, None, m, wins)

    _check_onnx(tmp_path, fn, fn, [(2, 30), (3, 47)],
                {0: B, 2: S, 3: S} if causal else {0: B, 1: S})


@pytest.mark.parametrize("case", [
    (2, [-1, 7], [3, 3], [1, 2], [1, 1], [False, True], [3, 3, -1, -1, 5, 3, 3, -1]),
    (1, [-1], [5], [2], [2], [False], [5, 9, -1, 3]),
    (0, [-1], [7], [1], [1], [True], None),
    (1, [2, -1, 3], [2, 3, 3], [1, 1, 1], [1, 3, 1], [False, True, False], None),
], ids=str)
def test_neighborhood_onnx(tmp_path, case):
    g, grid, ks, dil, st, ca, heads = case
    per = math.prod(x for x in grid if x != -1)

    def fn(q, k, v, m):
        return torch.ops.attnc.neighborhood_attention(q, k, v, grid, ks, dil, st, ca, None, m,
                                                      g, heads)

    n1, n2 = (20, 23) if len(grid) == 1 else (7, 10)  # the -1 axis: two extents
    _check_onnx(tmp_path, fn, fn, [(2, g + per * n1), (3, g + per * n2)], {0: B, 1: S})


def test_block_sparse_onnx(tmp_path):
    nb = torch.export.Dim("NB", min=1, max=256)

    def fn(q, k, v, m, lay):
        return torch.ops.attnc.block_sparse_attention(q, k, v, lay, 8, True, None, m)

    runs = []
    for b, n in ((2, 5), (3, 7)):
        lay = masks.random_layout(n, n, 0.5, heads=4, seed=n)
        runs.append((*_inputs(b, 8 * n, seed=n), lay))
    dyn = ({0: B, 2: 8 * nb},) * 3 + ({0: B, 1: 8 * nb}, {2: nb, 3: nb})
    for inputs, outs in onnx_runs(tmp_path, fn, runs[0], dyn, runs):
        want = fn(*inputs).numpy()
        for o in outs:
            assert np.abs(o - want).max() < 1e-4


@pytest.mark.parametrize("kind", ["natten", "sliding", "block"])
@pytest.mark.parametrize("bool_mask", [True, False])
def test_flash_pattern_with_a_mask_masks_every_tile(kind, bool_mask):
    """flash.attention_fwd with a pattern and a site's mask (what attnc.graph.stats calls): the
    mask reaches the `full` tiles and the neighborhood fast loops too."""
    from attnc.kernels import flash

    s = 48
    q, k, v = rand_qkv(2, 4, 2, s, s, 32, torch.float32, seed=8)
    kpm = padding(2, s)
    layout = None
    if kind == "natten":
        pat = flash.natten_pattern([6, 8], [5, 5], [1, 1], [1, 1], [False, False])
        allowed = masks.natten_mask([6, 8], [5, 5], [1, 1], [1, 1], [False, False], DEVICE)
    elif kind == "sliding":
        pat = flash.Pattern("sliding", window=20, num_sinks=2)
        allowed = masks.sliding_window_mask(s, s, 20, 2, False, DEVICE)
    else:
        layout = torch.ones(1, 1, 3, 3, dtype=torch.bool, device=DEVICE)
        pat = flash.Pattern("block", block_size=16)
        allowed = masks.block_layout_mask(layout, 16, s, s)
    mask = kpm[:, None, None, :]
    if not bool_mask:
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    out, lse = flash.attention_fwd(q, k, v, mask=mask, scale=SCALE, pattern=pat, layout=layout)
    check(out, lse, q, k, v, allowed & mask if bool_mask else allowed & kpm[:, None, None, :])
