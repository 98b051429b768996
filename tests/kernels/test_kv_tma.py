"""K/V tiles through tensor descriptors (config "kv_tma": 1): every pattern and loop gives the
reference's attention, on odd shapes, padded head dims, GQA and non-packed (B, S, H, D) layouts;
inputs whose rows are not 16-byte aligned are not offered the variant."""

from __future__ import annotations

import math

import pytest
import torch

from attnc.kernels import autotune, flash, masks, reference
from tests.kernels.conftest import DEVICE, GPU, assert_close_attention, rand_qkv


def _cfg(**extra):
    return {**autotune.candidates(64, torch.float16, 4096, 4096)[-1], "kv_tma": 1, **extra}


def _check(q, k, v, allowed, scale, **kw):
    out, lse = flash.attention_fwd(q, k, v, scale=scale, **kw)
    ref_out, ref_lse = reference.masked_attention(q, k, v, allowed, scale)
    assert_close_attention(out, lse, ref_out, ref_lse, q, k, v, allowed, scale)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,skv,d", [(7, 7, 32), (45, 71, 80), (33, 33, 96)])
def test_dense(sq, skv, d, causal):
    q, k, v = rand_qkv(2, 4, 2, sq, skv, d, torch.float16, seed=sq)
    assert flash._tma_ok(q, k, v)
    allowed = reference.causal_allowed(sq, skv, DEVICE) if causal else None
    _check(q, k, v, allowed, 0.2, causal=causal, config=_cfg())


@pytest.mark.parametrize("loop", flash.NA_LOOPS)
@pytest.mark.parametrize("case", [((37,), (9,), (1,), (False,)),
                                  ((9, 11), (3, 5), (1, 2), (False, True)),
                                  ((4, 5, 6), (3, 3, 3), (1, 1, 2), (True, False, False))],
                         ids=str)
def test_neighborhood(case, loop):
    grid, ks, st, ca = case
    s = math.prod(grid)
    q, k, v = rand_qkv(1, 2, 1, s, s, 80, torch.bfloat16, seed=s)
    pat = flash.natten_pattern(grid, ks, [1] * len(grid), st, ca)
    allowed = masks.natten_mask(grid, ks, [1] * len(grid), st, ca, DEVICE)
    _check(q, k, v, allowed, 0.15, pattern=pat, config=_cfg(na_loop=loop))


def test_neighborhood_dilated_general_path():
    q, k, v = rand_qkv(1, 2, 2, 60, 60, 32, torch.float32, seed=1)
    args = ((6, 10), (3, 3), (2, 3), (1, 1), (False, False))
    pat = flash.natten_pattern(*args)
    _check(q, k, v, masks.natten_mask(*args, DEVICE), 0.3, pattern=pat, config=_cfg())


def test_sliding_and_block_sparse():
    q, k, v = rand_qkv(1, 4, 2, 53, 53, 64, torch.float16, seed=2)
    pat = flash.Pattern("sliding", window=9, num_sinks=2)
    _check(q, k, v, masks.sliding_window_mask(53, 53, 9, 2, True, DEVICE), 0.125,
           pattern=pat, causal=True, config=_cfg())
    layout = masks.random_layout(4, 4, 0.5, heads=1, seed=0, device=DEVICE)
    pat = flash.Pattern("block", block_size=16)
    _check(q, k, v, masks.block_layout_mask(layout, 16, 53, 53, False), 0.125,
           pattern=pat, layout=layout, config=_cfg())


def test_non_packed_layout():
    """(B, S, H, D) storage seen as (B, H, S, D), as Hugging Face models hand it over."""
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 41, 3, 4, 32, generator=g).to(DEVICE, torch.float16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not k.is_contiguous() and flash._tma_ok(q, k, v)
    _check(q, k, v, None, 0.2, config=_cfg())
    _check(q, k, v, reference.causal_allowed(41, 41, DEVICE), 0.2, causal=True, config=_cfg())


def test_misaligned_rows_are_not_offered_the_variant():
    q, k, v = rand_qkv(1, 2, 2, 20, 20, 36, torch.float16)  # 72-byte rows
    assert not flash._tma_ok(q, k, v)
    # a pinned kv_tma config still runs, through pointer loads
    _check(q, k, v, None, 0.2, config=_cfg())


@pytest.mark.skipif(GPU, reason="interpreter behaviour")
def test_interpreter_autotune_default_is_pointer_loads():
    q, k, v = rand_qkv(1, 2, 2, 20, 20, 32, torch.float16)
    cfg = flash._config(flash.Pattern(), q, k, v, False, None, None)
    assert not cfg.get("kv_tma")
