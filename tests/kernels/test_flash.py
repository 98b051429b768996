"""The dense flash kernel against the reference: odd shapes, GQA, causal, masks, dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from attnc.errors import KernelError
from attnc.kernels import flash, reference
from tests.kernels.conftest import DEVICE, assert_close_attention, rand_qkv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (b, hq, hkv, sq, skv, d)
    (1, 2, 1, 1, 1, 32),
    (1, 2, 2, 7, 7, 64),
    (2, 2, 1, 7, 113, 80),
    (1, 4, 2, 113, 7, 32),
    (1, 2, 1, 203, 203, 32),
    (1, 3, 1, 113, 203, 64),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_dense(shape, dtype, causal):
    b, hq, hkv, sq, skv, d = shape
    q, k, v = rand_qkv(b, hq, hkv, sq, skv, d, dtype, seed=sq * 7 + d)
    scale = 1 / math.sqrt(d)
    out, lse = flash.attention_fwd(q, k, v, causal=causal, scale=scale)
    allowed = reference.causal_allowed(sq, skv, DEVICE) if causal else None
    ref_out, ref_lse = reference.masked_attention(q, k, v, allowed, scale)
    assert_close_attention(out, lse, ref_out, ref_lse, q, k, v, allowed, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float", "bool-broadcast"])
def test_masks_through_strides(kind, dtype):
    q, k, v = rand_qkv(2, 4, 2, 37, 45, 32, dtype, seed=3)
    g = torch.Generator().manual_seed(5)
    bias = None
    if kind == "bool":
        mask = (torch.rand(2, 4, 37, 45, generator=g) > 0.6).to(DEVICE)
        mask[0, 1, 5] = False  # a row that sees nothing
        allowed = mask
    elif kind == "float":
        mask = torch.randn(37, 45, generator=g).to(DEVICE, dtype)
        mask[3] = float("-inf")
        allowed, bias = None, mask
    else:
        mask = (torch.rand(1, 4, 1, 45, generator=g) > 0.5).to(DEVICE)  # stride 0 on B and Sq
        allowed = mask
    out, lse = flash.attention_fwd(q, k, v, mask=mask, causal=True, scale=0.2)
    c = reference.causal_allowed(37, 45, DEVICE)
    allowed = c if allowed is None else allowed & c
    ref_out, ref_lse = reference.masked_attention(q, k, v, allowed, 0.2, bias)
    assert_close_attention(out, lse, ref_out, ref_lse, q, k, v, allowed, 0.2, bias)


def test_head_dim_96_and_noncontiguous():
    q, k, v = rand_qkv(1, 2, 1, 33, 33, 96, torch.float32, seed=9)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, S, D) view of (B, S, H, D)
    out, lse = flash.attention_fwd(q, k, v, scale=0.1)
    ref_out, ref_lse = reference.masked_attention(q, k, v, None, 0.1)
    assert_close_attention(out, lse, ref_out, ref_lse, q, k, v, None, 0.1)


def test_rejects_bad_inputs():
    q, k, v = rand_qkv(1, 3, 2, 8, 8, 32, torch.float32)
    assert flash.can_use_flash(q, k, v) is not None  # 3 heads over 2 kv heads
    with pytest.raises(KernelError):
        flash.attention_fwd(q, k, v, scale=1.0)
    q, k, v = rand_qkv(1, 2, 1, 8, 8, 32, torch.float32)
    assert flash.can_use_flash(q, k, v) is None
    assert flash.can_use_flash(q, k, v, torch.ones(3, 3, dtype=torch.bool)) is not None
    assert flash.can_use_flash(q.double(), k.double(), v.double()) is not None
