"""Sparse-pattern kernels (neighborhood, sliding window + sinks, block-sparse) and column sums
against the references; block skipping; op dispatch and argument errors."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch

from attnc.errors import KernelError
from attnc.kernels import flash, masks, reference, tile_lists
from tests.kernels.conftest import DEVICE, assert_close_attention, rand_qkv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

NATTEN_CASES = [  # grid, kernel_size, dilation, stride, is_causal
    ((113,), (7,), (1,), (1,), (False,)),
    ((113,), (8,), (3,), (4,), (False,)),
    ((113,), (9,), (2,), (3,), (True,)),
    ((7,), (7,), (1,), (1,), (False,)),
    ((9, 11), (3, 4), (2, 1), (1, 2), (False, True)),
    ((12, 13), (5, 5), (1, 2), (5, 1), (True, False)),
    ((4, 5, 6), (3, 2, 3), (1, 2, 1), (1, 1, 3), (False, False, True)),
]


@pytest.mark.parametrize("case", NATTEN_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_neighborhood_kernel(case, dtype):
    grid, ks, dl, st, ca = case
    s = math.prod(grid)
    d = 80 if len(grid) == 2 else 32
    q, k, v = rand_qkv(1, 2, 1, s, s, d, dtype, seed=s)
    pat = flash.natten_pattern(grid, ks, dl, st, ca)
    out, lse = flash.attention_fwd(q, k, v, scale=0.15, pattern=pat)
    allowed = masks.natten_mask(grid, ks, dl, st, ca, DEVICE)
    ref_out, ref_lse = reference.masked_attention(q, k, v, allowed, 0.15)
    assert_close_attention(out, lse, ref_out, ref_lse, q, k, v, allowed, 0.15)


@pytest.mark.parametrize("sq,skv", [(1, 1), (7, 7), (113, 113), (203, 203), (113, 203)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sliding_window_kernel(sq, skv, causal, dtype):
    if dtype != torch.float32 and sq == skv == 203:
        pytest.skip("one large shape per dtype is enough")
    q, k, v = rand_qkv(1, 4, 2, sq, skv, 64, dtype, seed=sq + skv)
    window, sinks = 17, 3
    pat = flash.Pattern("sliding", window=window, num_sinks=sinks)
    out, lse = flash.attention_fwd(q, k, v, causal=causal, scale=0.125, pattern=pat)
    allowed = masks.sliding_window_mask(sq, skv, window, sinks, causal, DEVICE)
    ref_out, ref_lse = reference.masked_attention(q, k, v, allowed, 0.125)
    assert_close_attention(out, lse, ref_out, ref_lse, q, k, v, allowed, 0.125)


@pytest.mark.parametrize("sq,skv,bs", [(113, 113, 16), (203, 113, 24), (7, 7, 64), (113, 203, 8)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_sparse_kernel(sq, skv, bs, causal, dtype):
    q, k, v = rand_qkv(2, 2, 1, sq, skv, 32, dtype, seed=bs)
    nq, nk = -(-sq // bs), -(-skv // bs)
    g = torch.Generator().manual_seed(bs)
    layout = (torch.rand(2, 1, nq, nk, generator=g) < 0.4).to(DEVICE)  # per batch, head-shared
    pat = flash.Pattern("block", block_size=bs)
    out, lse = flash.attention_fwd(q, k, v, causal=causal, scale=0.2, pattern=pat, layout=layout)
    allowed = masks.block_layout_mask(layout, bs, sq, skv, causal)
    ref_out, ref_lse = reference.masked_attention(q, k, v, allowed, 0.2)
    assert_close_attention(out, lse, ref_out, ref_lse, q, k, v, allowed, 0.2)


def _listed_tiles(lists):
    fnum, _, pnum, _ = lists
    return int(fnum.sum()), int(pnum.sum())


def test_block_skipping_lists_are_exact():
    """Listed tiles = tiles with a visible pair; `full` tiles have every pair visible."""
    grid, ks, dl, st, ca = (24, 20), (5, 7), (1, 1), (1, 1), (False, False)
    pat = flash.natten_pattern(grid, ks, dl, st, ca)
    tq = masks.natten_tile_shape(32, pat.grid, [1, 5, 7])
    tk = masks.natten_tile_shape(16, pat.grid, [1, 5, 7])
    fnum, fidx, pnum, pidx = tile_lists.lists(pat, 480, 480, 32, 16, None, tq, tk, False, "cpu")
    dense = masks.natten_mask(grid, ks, dl, st, ca)
    # tile-space token ids of each query / key tile
    def tokens(t, tile):
        n2 = -(-grid[1] // tile[2])
        r = torch.arange(tile[1])[:, None] + (t // n2) * tile[1]
        c = torch.arange(tile[2])[None, :] + (t % n2) * tile[2]
        ok = (r < grid[0]) & (c < grid[1])
        return (r * grid[1] + c)[ok]
    nq, nk = fidx.shape[-2], fidx.shape[-1]
    for qt in range(nq):
        full = set(fidx[0, 0, qt, : fnum[0, 0, qt]].tolist())
        part = set(pidx[0, 0, qt, : pnum[0, 0, qt]].tolist())
        qi = tokens(qt, tq)
        for kt in range(nk):
            sub = dense[qi][:, tokens(kt, tk)]
            assert (kt in full) == bool(sub.all()), (qt, kt)
            assert (kt in full or kt in part) == bool(sub.any()), (qt, kt)
    nf, np_ = _listed_tiles((fnum, fidx, pnum, pidx))
    assert nf + np_ < nq * nk / 2  # most tiles are skipped


def test_sliding_lists_skip_far_tiles():
    pat = flash.Pattern("sliding", window=64, num_sinks=4)
    lists = tile_lists.lists(pat, 1024, 1024, 32, 16, None, None, None, True, "cpu")
    nf, np_ = _listed_tiles(lists)
    assert nf > 0 and nf + np_ < 32 * 64 * 0.2


@pytest.mark.parametrize("pattern", ["dense", "natten", "sliding", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_column_sums(pattern, dtype):
    s, d = 60, 32
    q, k, v = rand_qkv(1, 4, 2, s, s, d, dtype, seed=11)
    layout, causal, pat = None, pattern == "dense", flash.Pattern()
    if pattern == "natten":
        pat = flash.natten_pattern((6, 10), (3, 5), (1, 2), (1, 1), (False, False))
        allowed = masks.natten_mask([6, 10], [3, 5], [1, 2], [1, 1], [False, False], DEVICE)
    elif pattern == "sliding":
        pat = flash.Pattern("sliding", window=9, num_sinks=2)
        allowed = masks.sliding_window_mask(s, s, 9, 2, False, DEVICE)
    elif pattern == "block":
        layout = masks.local_stride_layout(4, 2, 2, causal=False, device=DEVICE)
        pat = flash.Pattern("block", block_size=16)
        allowed = masks.block_layout_mask(layout, 16, s, s)
    else:
        allowed = reference.causal_allowed(s, s, DEVICE)
    out, lse = flash.attention_fwd(q, k, v, causal=causal, scale=0.2, pattern=pat, layout=layout)
    rows = torch.zeros(s, dtype=torch.bool, device=DEVICE)
    rows[[0, 5, 17, 59]] = True
    cs = flash.column_sums(q, k, lse, rows, causal=causal, scale=0.2, pattern=pat, layout=layout)
    sc = (q.float() @ reference.expand_kv(k, 4).float().transpose(-1, -2)) * 0.2
    probs = torch.softmax(sc.masked_fill(~allowed, float("-inf")), -1)  # (B, H, S, S)
    want = probs[:, :, rows].sum(2)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (cs.cpu() - want.cpu()).abs().max().item() < tol


def test_colsum_op_matches_reference():
    q, k, v = rand_qkv(1, 2, 1, 20, 20, 32, torch.float32, device="cpu")
    rows = torch.tensor([1, 4, 19])
    out, cs = torch.ops.attnc.attention_colsum(q, k, v, rows, None, True)
    ro, rcs = reference.attention_colsum_ref(q, k, v, rows, None, True)
    torch.testing.assert_close(out, ro)
    torch.testing.assert_close(cs, rcs)
    # every selected row's probabilities sum to one
    assert abs(cs.sum().item() - 2 * 3) < 1e-4


def test_ops_on_cpu_run_their_reference():
    import attnc.kernels  # noqa: F401

    q, k, v = rand_qkv(1, 2, 1, 48, 48, 32, torch.float32, device="cpu")
    a = (grid, ks, dl, st, ca) = ([-1, 8], [3, 3], [1, 2], [1, 1], [False, True])
    out = torch.ops.attnc.neighborhood_attention(q, k, v, grid, ks, dl, st, ca)
    torch.testing.assert_close(out, reference.neighborhood_attention_ref(q, k, v, *a))
    out = torch.ops.attnc.sliding_window_attention(q, k, v, 5, 2, True)
    torch.testing.assert_close(out, reference.sliding_window_attention_ref(q, k, v, 5, 2, True))
    lay = masks.power_attention_layout(3, local_blocks=1)
    out = torch.ops.attnc.block_sparse_attention(q, k, v, lay, 16, True)
    torch.testing.assert_close(out, reference.block_sparse_attention_ref(q, k, v, lay, 16, True))


def test_op_argument_errors():
    import attnc.kernels  # noqa: F401
    from attnc.kernels.block_sparse import can_use_block_sparse
    from attnc.kernels.neighborhood import can_use_neighborhood
    from attnc.kernels.sliding_window import can_use_sliding_window

    q, k, v = rand_qkv(1, 2, 1, 48, 48, 32, torch.float32, device="cpu")
    with pytest.raises(KernelError, match="exceeds"):
        torch.ops.attnc.neighborhood_attention(q, k, v, [-1], [25], [2], [1], [False])
    with pytest.raises(KernelError, match="divisible"):
        torch.ops.attnc.neighborhood_attention(q, k, v, [-1, 7], [3, 3], [1, 1], [1, 1],
                                               [False, False])
    with pytest.raises(KernelError, match="stride"):
        torch.ops.attnc.neighborhood_attention(q, k, v, [48], [3], [1], [4], [False])
    with pytest.raises(KernelError):
        torch.ops.attnc.block_sparse_attention(q, k, v, torch.ones(1, 1, 2, 2, dtype=torch.bool),
                                               16)
    assert can_use_neighborhood(48, [-1, 8], [3, 3]) is None
    assert can_use_neighborhood(48, [-1], [49]) is not None
    assert can_use_sliding_window(0) is not None
    assert can_use_block_sparse(torch.ones(1, 1, 3, 3, dtype=torch.bool), 16, 48, 48) is None


def test_block_lists_are_not_reused_for_a_new_layout_at_the_same_address():
    """A freed layout's address and version can come back with other contents: the cached
    tile lists must belong to the same live tensor."""
    q, k, v = rand_qkv(1, 1, 1, 64, 64, 32, torch.float32, seed=9)
    pat = flash.Pattern("block", block_size=16)
    store = torch.zeros(16, dtype=torch.bool, device=DEVICE)

    def alias():  # a new tensor (own version counter) over the same memory
        return torch.empty(0, dtype=torch.bool, device=DEVICE).set_(
            store.untyped_storage(), 0, (1, 1, 4, 4), (16, 16, 4, 1))

    store.copy_(torch.eye(4, dtype=torch.bool, device=DEVICE).flatten())
    first = alias()
    flash.attention_fwd(q, k, v, scale=0.2, pattern=pat, layout=first)
    ptr, version = first.data_ptr(), first._version
    del first
    store.fill_(True)
    second = alias()
    assert (second.data_ptr(), second._version) == (ptr, version)
    out, lse = flash.attention_fwd(q, k, v, scale=0.2, pattern=pat, layout=second)
    allowed = masks.block_layout_mask(second, 16, 64, 64, False)
    ref_out, ref_lse = reference.masked_attention(q, k, v, allowed, 0.2)
    assert_close_attention(out, lse, ref_out, ref_lse, q, k, v, allowed, 0.2)


def test_list_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(tile_lists, "CACHE_SIZE", 3)
    monkeypatch.setattr(tile_lists, "CACHE", OrderedDict())
    q, k, v = rand_qkv(1, 1, 1, 40, 40, 32, torch.float32)
    for w in range(1, 7):
        flash.attention_fwd(q, k, v, scale=0.2, pattern=flash.Pattern("sliding", window=w))
    assert len(tile_lists.CACHE) == 3
