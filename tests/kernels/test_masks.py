"""NATTEN index math against the spec's worked examples and invariants; block layouts."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnc.kernels import masks


def windows(L, K, s=1, d=1, causal=False):
    m = masks.natten_mask([L], [K], [d], [s], [causal])
    return [tuple(torch.nonzero(r).flatten().tolist()) for r in m]


def span(a, b):
    return tuple(range(a, b))


def test_spec_worked_examples():
    w = windows(10, 5)
    assert w[0] == w[1] == w[2] == span(0, 5) and w[3] == span(1, 6) and w[9] == span(5, 10)
    w = windows(10, 4)
    assert w[2] == span(0, 4) and w[3] == span(1, 5) and w[8] == w[9] == span(6, 10)
    w = windows(10, 4, s=2)
    want = [(0, 4), (0, 4), (1, 5), (1, 5), (3, 7), (3, 7), (5, 9), (5, 9), (6, 10), (6, 10)]
    assert w == [span(*x) for x in want]
    assert windows(9, 3, s=3) == [span(0, 3)] * 3 + [span(3, 6)] * 3 + [span(6, 9)] * 3
    assert windows(10, 3, s=3)[9] == span(7, 10)
    w = windows(10, 4, s=2, causal=True)
    assert w[4] == span(2, 5) and w[5] == span(2, 6)


def test_closed_form_start_matches_spec_formula():
    for L in range(2, 30):
        for K in range(1, L + 1):
            for s in range(1, K + 1):
                x = torch.arange(L)
                _, start, end = masks.natten_window(x, L, K, 1, s, False)
                wl, wr = K // 2, K // 2 + K % 2 - 1
                c0 = torch.clamp((x // s) * s + s // 2, max=L - 1)
                st = torch.clamp(c0 - wl, min=0) + (c0 + wr >= L).long() * (L - wr - c0 - 1)
                assert torch.equal(start, st) and torch.equal(end - start, torch.full_like(x, K))


@pytest.mark.parametrize("grid", [(17,), (6, 7), (3, 4, 5)])
def test_kernel_equal_extent_is_full_attention(grid):
    n = len(grid)
    m = masks.natten_mask(list(grid), list(grid), [1] * n, [1] * n, [False] * n)
    assert m.all()
    if n == 1:
        c = masks.natten_mask(list(grid), list(grid), [1], [1], [True])
        assert torch.equal(c, torch.ones_like(c).tril())


@pytest.mark.parametrize("grid,ks,dl,st", [
    ((23,), (5,), (3,), (2,)), ((9, 10), (4, 3), (2, 3), (3, 1)), ((5, 6, 7), (2, 3, 3), (2, 1, 2),
                                                                   (2, 3, 1)),
])
def test_every_noncausal_query_sees_prod_k_keys(grid, ks, dl, st):
    m = masks.natten_mask(list(grid), list(ks), list(dl), list(st), [False] * len(grid))
    assert (m.sum(-1) == math.prod(ks)).all()


def test_stride_equal_kernel_is_blocked_attention():
    for L, K in [(12, 3), (12, 4), (20, 5)]:
        m = masks.natten_mask([L], [K], [1], [K], [False])
        blk = torch.arange(L) // K
        assert torch.equal(m, blk[:, None] == blk[None, :])
    m = masks.natten_mask([8, 9], [4, 3], [1, 1], [4, 3], [False, False])
    r, c = torch.arange(72) // 9 // 4, torch.arange(72) % 9 // 3
    assert torch.equal(m, (r[:, None] == r[None, :]) & (c[:, None] == c[None, :]))


@pytest.mark.parametrize("L,K,d,s,causal", [(23, 3, 3, 1, False), (20, 4, 2, 2, False),
                                            (17, 3, 4, 3, True)])
def test_dilation_is_interleaved_subsequences(L, K, d, s, causal):
    m = masks.natten_mask([L], [K], [d], [s], [causal])
    for g in range(d):
        idx = torch.arange(g, L, d)
        sub = masks.natten_mask([len(idx)], [K], [1], [s], [causal])
        assert torch.equal(m[idx][:, idx], sub)
        other = torch.tensor([i for i in range(L) if i % d != g], dtype=torch.long)
        if other.numel():
            assert not m[idx][:, other].any()


def test_nd_mask_is_outer_and_of_axes():
    grid, ks, dl, st, ca = [5, 6], [3, 4], [1, 1], [1, 2], [True, False]
    m = masks.natten_mask(grid, ks, dl, st, ca)
    a = masks.natten_mask([5], [3], [1], [1], [True])
    b = masks.natten_mask([6], [4], [1], [2], [False])
    for (i0, i1), (j0, j1) in itertools.product(itertools.product(range(5), range(6)), repeat=2):
        assert m[i0 * 6 + i1, j0 * 6 + j1] == (a[i0, j0] & b[i1, j1])


def test_resolve_grid():
    assert masks.resolve_grid([-1, 4], 20) == [5, 4]
    assert masks.resolve_grid([], 7) == [7]


def test_static_layouts():
    p = masks.power_attention_layout(64, local_blocks=2, sink_blocks=1)[0, 0]
    assert torch.equal(p, p.tril())
    row = p[40].nonzero().flatten().tolist()
    assert row == [0, 8, 24, 32, 36, 38, 39, 40]
    ls = masks.local_stride_layout(8, 2, 4, causal=True)[0, 0]
    assert ls[7].nonzero().flatten().tolist() == [3, 6, 7]


def test_sliding_window_semantics():
    m = masks.sliding_window_mask(6, 6, 2, 1, True)
    assert m[5].nonzero().flatten().tolist() == [0, 4, 5]
    b = masks.sliding_window_mask(6, 6, 2, 0, False)
    assert b[3].nonzero().flatten().tolist() == [2, 3, 4]
