"""attnc::attention's fake (what torch.export sees) has the real op's shape: V's head size,
broadcast batch."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import attnc.kernels  # noqa: F401


@pytest.mark.parametrize(
    "qs,ks,vs",
    [
        ((2, 4, 5, 24), (2, 4, 7, 24), (2, 4, 7, 16)),  # Dv != Dq (DeepSeek)
        ((1, 4, 5, 8), (3, 2, 7, 8), (3, 2, 7, 8)),  # batch-1 query, GQA
        ((2, 3, 1, 32), (2, 3, 9, 32), (2, 3, 9, 32)),
    ],
)
def test_fake_matches_real_shape(qs, ks, vs):
    q, k, v = torch.randn(qs), torch.randn(ks), torch.randn(vs)
    if q.shape[0] != k.shape[0]:
        q = q.expand(k.shape[0], *q.shape[1:])  # SDPA itself needs equal batches on CPU
    real = torch.ops.attnc.attention(q, k, v)
    with FakeTensorMode() as mode:
        fake = torch.ops.attnc.attention(mode.from_tensor(q), mode.from_tensor(k),
                                         mode.from_tensor(v))
    assert tuple(fake.shape) == tuple(real.shape)
