"""Per-tile window-bound flags of the dilation-1 neighborhood fast path (natten_tile_flags):
checking only the flagged bounds of a partial tile must give exactly the NATTEN mask."""

from __future__ import annotations

import math

import pytest
import torch

from attnc.errors import KernelError
from attnc.kernels import autotune, flash, masks, tile_lists
from tests.kernels.conftest import DEVICE, assert_close_attention, rand_qkv


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
    _, _, pnum, pidx = tile_lists.na_fast_lists(pat, tq, tk, "cpu")
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


SLOW = pytest.mark.slow  # the two largest grids: a minute or two each in the interpreter


@pytest.mark.parametrize("grid,ks,st,ca", [((12, 20), (5, 9), (1, 2), (False, True)),
                                         ((10, 13), (3, 7), (2, 3), (True, False)),
                                         ((3, 5, 7), (3, 3, 5), (1, 2, 1), (True, False, True)),
                                         ((50,), (9,), (3,), (True,)),
                                         ((45,), (8,), (1,), (False,)),
                                         ((47,), (47,), (1,), (False,)),
                                         pytest.param((9, 23), (9, 4), (1, 1), (False, False),
                                                      marks=SLOW),
                                         pytest.param((6, 7, 9), (5, 7, 2), (1, 1, 3),
                                                      (False, True, False),
                                                      marks=SLOW)])
def test_fast_paths_match_general_path(grid, ks, st, ca):
    """Dilation 1: every key-tile loop (lists with flags, box, class loops) gives the general
    predicate's output; the shapes give every cut class tiles (and windows spanning the grid).
    One head: the loops and their flags are per tile, the same for every head (the kernels run
    one program per query tile and head, so a second head only doubled the interpreter's work)."""
    s = math.prod(grid)
    q, k, v = rand_qkv(1, 1, 1, s, s, 32, torch.float32)
    pat = flash.natten_pattern(grid, ks, [1] * len(grid), st, ca)
    cfg = autotune.candidates(32, torch.float32, s, s)[-1]
    old = flash.NA_FAST_MASK
    flash.NA_FAST_MASK = False
    try:
        assert flash.na_loop(pat) is None
        want = flash.attention_fwd(q, k, v, scale=0.25, pattern=pat, config=cfg)
    finally:
        flash.NA_FAST_MASK = old
    for loop in flash.NA_LOOPS:
        got = flash.attention_fwd(q, k, v, scale=0.25, pattern=pat, config={**cfg, "na_loop": loop})
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0, msg=loop)
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0, msg=loop)


def test_class_loop_on_odd_shapes_matches_reference():
    """The class loops in low precision and GQA against the plain-PyTorch NATTEN reference."""
    from attnc.kernels import reference

    grid = (11, 13)
    q, k, v = rand_qkv(2, 4, 2, 143, 143, 80, torch.bfloat16, seed=5)
    pat = flash.natten_pattern(grid, (5, 7), (1, 1), (1, 2), (True, False))
    cfg = {**autotune.candidates(80, torch.bfloat16, 143, 143)[-1], "na_loop": "class"}
    out, lse = flash.attention_fwd(q, k, v, scale=0.2, pattern=pat, config=cfg)
    allowed = masks.natten_mask(grid, (5, 7), (1, 1), (1, 2), (True, False), DEVICE)
    ref_out, ref_lse = reference.masked_attention(q, k, v, allowed, scale=0.2)
    assert_close_attention(out, lse, ref_out, ref_lse, q, k, v, allowed, 0.2)


def test_unknown_loop_is_an_error():
    pat = flash.natten_pattern((8,), (3,), (1,), (1,), (False,))
    with pytest.raises(KernelError, match="neighborhood loop"):
        flash.na_loop(pat, {"na_loop": "spiral"})


def test_negative_scale_is_not_folded():
    q, k, v = rand_qkv(1, 2, 1, 40, 40, 32, torch.float32, seed=3)
    out, lse = flash.attention_fwd(q, k, v, scale=-0.3, causal=True)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * -0.3
    s = s.masked_fill(~torch.ones(40, 40, dtype=torch.bool, device=DEVICE).tril(), float("-inf"))
    ref = torch.softmax(s, -1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-4, rtol=0)
