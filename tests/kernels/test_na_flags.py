"""Per-tile window-bound flags of the dilation-1 neighborhood fast path (natten_tile_flags):
checking only the flagged bounds of a partial tile must give exactly the NATTEN mask."""

from __future__ import annotations

import math

import pytest
import torch
from attnc.kernels import flash, masks

from tests.kernels.conftest import DEVICE, rand_qkv


def _coords(t, tile, grid3):
    n1, n2 = -(-grid3[1] // tile[1]), -(-grid3[2] // tile[2])
    t0, t1, t2 = t // (n1 * n2), (t // n2) % n1, t % n2
    o = torch.arange(tile[0] * tile[1] * tile[2])
    return [t0 * tile[0] + o // (tile[1] * tile[2]), t1 * tile[1] + (o // tile[2]) % tile[1],
            t2 * tile[2] + o % tile[2]]


@pytest.mark.parametrize("grid,ks,st,ca,bm,bn", [
    ((24, 20), (5, 7), (1, 1), (False, False), 32, 16),
    ((13, 11), (4, 6), (2, 3), (True, False), 16, 16),
    ((5, 6, 7), (3, 3, 5), (1, 2, 1), (False, True, False), 32, 32),
    ((50,), (9,), (3,), (False,), 16, 8),
])
def test_flagged_bounds_reproduce_the_mask(grid, ks, st, ca, bm, bn):
    pat = flash.natten_pattern(grid, ks, [1] * len(grid), st, ca)
    reach = list(pat.kernel_size)
    tq = masks.natten_tile_shape(bm, pat.grid, reach)
    tk = masks.natten_tile_shape(bn, pat.grid, reach)
    _, _, pnum, pidx = flash._na_fast_lists(pat, tq, tk, "cpu")
    g3 = pat.grid
    for qt in range(pidx.shape[2]):
        qc = _coords(qt, tq, g3)
        qok = (qc[0] < g3[0]) & (qc[1] < g3[1]) & (qc[2] < g3[2])
        win = [masks.natten_window(qc[a].clamp(max=g3[a] - 1), g3[a], pat.kernel_size[a], 1,
                                   pat.stride[a], pat.causal_axes[a]) for a in range(3)]
        for raw in pidx[0, 0, qt, : pnum[0, 0, qt]].tolist():
            kt, fl = raw & 0xFFFFFF, raw >> 24
            kc = _coords(kt, tk, g3)
            want = torch.ones(qc[0].numel(), kc[0].numel(), dtype=torch.bool)
            got = want.clone()
            for a in range(3):
                _, s, e = win[a]
                want &= (kc[a][None] >= s[:, None]) & (kc[a][None] < e[:, None])
                want &= (kc[a] < g3[a])[None]
                if fl >> (2 * (2 - a)) & 1:
                    got &= kc[a][None] >= s[:, None]
                if fl >> (2 * (2 - a) + 1) & 1:
                    got &= kc[a][None] < e[:, None]
            assert torch.equal(got[qok], want[qok]), (qt, kt, fl)


@pytest.mark.parametrize("grid,ks,st,ca", [((12, 20), (5, 9), (1, 2), (False, True)),
                                         ((10, 13), (3, 7), (2, 3), (True, False)),
                                         ((3, 5, 7), (3, 3, 5), (1, 2, 1), (True, False, True)),
                                         ((50,), (9,), (3,), (True,)),
                                         ((45,), (8,), (1,), (False,))])
def test_fast_paths_match_general_path(grid, ks, st, ca):
    """Dilation 1: the box loop and the flagged lists give the general predicate's output."""
    s = math.prod(grid)
    q, k, v = rand_qkv(1, 2, 2, s, s, 32, torch.float32)
    pat = flash.natten_pattern(grid, ks, [1] * len(grid), st, ca)
    outs = []
    old = flash.NA_FAST_MASK, flash.NA_BOX_LOOP
    for fast, box in ((False, False), (True, False), (True, True)):
        flash.NA_FAST_MASK, flash.NA_BOX_LOOP = fast, box
        try:
            outs.append(flash.attention_fwd(q, k, v, scale=0.25, pattern=pat))
        finally:
            flash.NA_FAST_MASK, flash.NA_BOX_LOOP = old
    for o, lse in outs[1:]:
        torch.testing.assert_close(o, outs[0][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(lse, outs[0][1], atol=1e-5, rtol=0)


def test_negative_scale_is_not_folded():
    q, k, v = rand_qkv(1, 2, 1, 40, 40, 32, torch.float32, seed=3)
    out, lse = flash.attention_fwd(q, k, v, scale=-0.3, causal=True)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * -0.3
    s = s.masked_fill(~torch.ones(40, 40, dtype=torch.bool, device=DEVICE).tril(), float("-inf"))
    ref = torch.softmax(s, -1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-4, rtol=0)
