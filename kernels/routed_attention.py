"""`attnc::routed_attention`: attention whose query heads are gated per token (Mixture-of-Head).

    out[b, h, i] = gate[b, h, i] * sum_j softmax_j(scale <q[b,h,i], k[b,h//g,j]> + m) v[b,h//g,j]

Layout (B, H, S, D); k and v may have fewer heads (GQA, g = Hq // Hkv); `gate` is (B, Hq, Sq)
(0 for a head a token does not use; 1 for binary MoH gates, any value for weighted ones).
`attn_mask` and `is_causal` are SDPA's. Keys and values are untouched (routing only masks query
heads' outputs), so a KV cache would be unchanged.

- CUDA: a Triton flash kernel over (query block, batch x head) programs; a program whose rows all
  have gate 0 loads no K/V tile and stores zeros (the head-skipping the MoH paper's released code
  lacks), the others multiply their rows by the gate before the store. Full masks other than
  causal fall back to SDPA x gate.
- CPU and elsewhere: SDPA x gate (computes every head: exact, no speed claim).
- ONNX: opset-23 `Attention` x Unsqueeze(gate) (exact, computes every head).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from onnxscript import opset23 as op

import attnc.graph.gate  # noqa: F401  (registers the op's attention reader)
from attnc.errors import KernelError
from attnc.kernels.onnx import register_translation
from attnc.kernels.reference import attention_ref

try:  # triton is optional on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CPU path needs no triton
    triton = None


def routed_attention_ref(q, k, v, gate, attn_mask=None, is_causal=False, scale=None):
    """Plain-PyTorch reference: dense attention (float32) times the per-token head gate."""
    out = attention_ref(q, k, v, attn_mask, is_causal, scale).float()  # (B, Hq, Sq, Dv)
    return (out * gate.float().unsqueeze(-1)).to(q.dtype)


def check_gate(q: torch.Tensor, gate: torch.Tensor) -> str | None:
    """Why `gate` cannot gate q's heads, or None."""
    want = (*q.shape[:-3], q.shape[-3], q.shape[-2])
    if gate.dim() != 3 or tuple(gate.shape) != tuple(want):
        return f"gate has shape {tuple(gate.shape)}, expected (B, Hq, Sq) = {tuple(want)}"
    return None


def skipped_fraction(gate: torch.Tensor, block_m: int = 64) -> float:
    """The share of (batch, head, query block) programs the Triton kernel skips: those whose
    `block_m` rows all have gate 0."""
    B, H, S = gate.shape
    nb = -(-S // block_m)
    g = F.pad(gate.ne(0), (0, nb * block_m - S)).reshape(B, H, nb, block_m)  # (B, H, nb, bm)
    return float((~g.any(-1)).float().mean())


def _sdpa_gated(q, k, v, gate, attn_mask, is_causal, scale):
    gqa = k.shape[1] != q.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                         scale=scale, enable_gqa=gqa)  # (B, Hq, Sq, Dv)
    return (out * gate.to(out.dtype).unsqueeze(-1)).contiguous()


@torch.library.custom_op("attnc::routed_attention", mutates_args=())
def routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    reason = check_gate(q, gate)
    if reason is not None:
        raise KernelError(reason)
    if q.is_cuda and triton is not None and can_use_routed(q, k, v, attn_mask) is None:
        return routed_attention_fwd(q, k, v, gate, is_causal=is_causal, scale=scale)
    return _sdpa_gated(q, k, v, gate, attn_mask, is_causal, scale)


@routed_attention.register_fake
def _(q, k, v, gate, attn_mask=None, is_causal=False, scale=None):
    batch = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    return q.new_empty((*batch, q.shape[-3], q.shape[-2], v.shape[-1]))  # (B, Hq, Sq, Dv)


@register_translation(torch.ops.attnc.routed_attention.default)
def routed_attention_onnx(q, k, v, gate, attn_mask=None, is_causal: bool = False,
                          scale: float | None = None):
    kw = {"is_causal": 1 if is_causal else 0}
    if scale is not None:
        kw["scale"] = float(scale)
    out = op.Attention(q, k, v, **kw) if attn_mask is None else op.Attention(q, k, v, attn_mask,
                                                                             **kw)
    out = out[0] if isinstance(out, (tuple, list)) else out
    g = op.Unsqueeze(op.CastLike(gate, out), op.Constant(value_ints=[-1]))  # (B, Hq, Sq, 1)
    return op.Mul(out, g)


# ------------------------------------------------------------------------------ Triton (CUDA)


def can_use_routed(q, k, v, attn_mask) -> str | None:
    """Why the Triton kernel cannot take these inputs (SDPA x gate runs instead), or None."""
    if triton is None:
        return "triton is not installed"
    if attn_mask is not None:
        return "the kernel takes no full mask (only is_causal)"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be (B, H, S, D)"
    if q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads"
    if q.shape[-1] != v.shape[-1] or q.shape[-1] > 256:
        return "head size must match between q and v and be at most 256"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not supported"
    return None


if triton is not None:

    @triton.jit
    def _routed_kernel(Q, K, V, G, Out, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sgb, sgh,
                       sob, soh, som, H, GROUP, SQ, SKV, D, scale,
                       CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mvalid = offs_m < SQ
        dmask = offs_d < D
        g = tl.load(G + b * sgb + h * sgh + offs_m, mask=mvalid, other=0.0).to(tl.float32)
        active = tl.max(tl.abs(g), axis=0) > 0
        hi = SKV
        if CAUSAL:
            hi = tl.minimum(SKV, (pid_m + 1) * BLOCK_M)
        hi = tl.where(active, hi, 0)  # a skipped (head, query block) pair loads no K/V tile
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                    mask=mvalid[:, None] & dmask[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        qk_scale = scale * 1.4426950408889634
        for start in range(0, hi, BLOCK_N):
            n = start + offs_n
            nvalid = n < SKV
            kt = tl.load(K + b * skb + hk * skh + n[None, :] * skn + offs_d[:, None],
                         mask=nvalid[None, :] & dmask[:, None], other=0.0)
            s = tl.dot(q, kt, input_precision="ieee").to(tl.float32) * qk_scale
            ok = nvalid[None, :]
            if CAUSAL:
                ok = ok & (n[None, :] <= offs_m[:, None])
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vt = tl.load(V + b * svb + hk * svh + n[:, None] * svn + offs_d[None, :],
                         mask=nvalid[:, None] & dmask[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
            m_i = m_new
        out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        out = out * g[:, None]  # the gate, fused before the store
        tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=mvalid[:, None] & dmask[None, :])


def routed_attention_fwd(q, k, v, gate, *, is_causal: bool = False, scale: float | None = None,
                         block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """Launch the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    reason = can_use_routed(q, k, v, None) or check_gate(q, gate)
    if reason is not None:
        raise KernelError(reason)
    B, H, SQ, D = q.shape
    SKV = k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    gate = gate.contiguous()
    out = torch.empty_like(q)
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    bd = max(16, triton.next_power_of_2(D))
    grid = (triton.cdiv(SQ, block_m), B * H)
    _routed_kernel[grid](
        q, k, v, gate, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), v.stride(0), v.stride(1), v.stride(2), gate.stride(0), gate.stride(1),
        out.stride(0), out.stride(1), out.stride(2), H, H // k.shape[1], SQ, SKV, D, sc,
        CAUSAL=bool(is_causal), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd,
    )
    return out


__all__ = ["can_use_routed", "routed_attention", "routed_attention_fwd", "routed_attention_ref",
           "skipped_fraction"]
