"""Kernel tests run the Triton kernels themselves: on CPU through the interpreter
(`TRITON_INTERPRET=1`, set here before triton is imported), on a GPU with `ATTNC_GPU_TESTS=1`."""

from __future__ import annotations

import os

GPU = os.environ.get("ATTNC_GPU_TESTS", "0") == "1"
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if GPU else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


def rand_qkv(b, hq, hkv, sq, skv, d, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return r(b, hq, sq, d), r(b, hkv, skv, d), r(b, hkv, skv, d)


def lowp_error(q, k, v, allowed, scale, ref_out, bias=None):
    """Max error against the fp32 reference of the same attention done by PyTorch in q's dtype."""
    from attnc.kernels.reference import expand_kv

    hq = q.shape[1]
    qc, kc, vc = q.cpu(), expand_kv(k, hq).cpu(), expand_kv(v, hq).cpu()
    s = (qc @ kc.transpose(-1, -2)) * scale  # (B, Hq, Sq, Skv), in q's dtype
    if bias is not None:
        s = s + bias.cpu().to(s.dtype)
    if allowed is not None:
        s = s.masked_fill(~allowed.cpu(), float("-inf"))
    p = torch.softmax(s.float(), -1).to(q.dtype).nan_to_num(0.0)
    out = p @ vc
    return (out.float() - ref_out.float().cpu()).abs().max().item()


def assert_close_attention(out, lse, ref_out, ref_lse, q, k, v, allowed, scale, bias=None):
    """fp32: atol with rtol 0; fp16/bf16: at most 2x PyTorch's own low-precision error."""
    fin = torch.isfinite(ref_lse.cpu())
    assert torch.equal(torch.isfinite(lse.cpu()), fin), "rows seeing no key must give lse=-inf"
    assert torch.isfinite(out).all()
    err = (out.float().cpu() - ref_out.float().cpu()).abs().max().item() if out.numel() else 0.0
    if q.dtype == torch.float32:
        tol = 2e-5 if not GPU else 2e-4
    else:
        tol = 2 * lowp_error(q, k, v, allowed, scale, ref_out, bias) + 1e-3
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"
    if fin.any():
        lerr = (lse.cpu()[fin] - ref_lse.cpu()[fin]).abs().max().item()
        assert lerr <= (1e-4 if q.dtype == torch.float32 else 2e-2), f"lse error {lerr:.3g}"
