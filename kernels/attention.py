"""`attnc::attention`: dense softmax attention, a drop-in for one SDPA node.

    out[b, h, i] = sum_j softmax_j(scale * <q[b,h,i], k[b,h//g,j]> + mask[b,h,i,j]) v[b,h//g,j]

Layout (B, H, S, D); k and v may have fewer heads (GQA, g = Hq // Hkv). `attn_mask` is bool
(True = attend) or float (added to the scores), broadcastable to (B, Hq, Sq, Skv).

On CUDA it runs attnc's Triton flash kernel when `kernels/flash.py` can take the inputs
(`can_use_flash`), else torch SDPA; on CPU it runs torch SDPA, so that lowering a dense site
is exact. The ONNX translation is the standard `Attention` op (opset 23).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from onnxscript import opset23 as op23

from attnc.kernels.onnx import register_translation


def _sdpa(q, k, v, attn_mask, is_causal, scale):
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )


@torch.library.custom_op("attnc::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    if q.is_cuda:
        try:
            from attnc.kernels import flash
        except ImportError:  # triton missing: SDPA is the honest fallback
            flash = None
        if flash is not None and flash.can_use_flash(q, k, v, attn_mask) is None:
            s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
            out, _ = flash.attention_fwd(q, k, v, mask=attn_mask, causal=is_causal, scale=s)
            return out
    return _sdpa(q, k, v, attn_mask, is_causal, scale).contiguous()


@attention.register_fake
def _(q, k, v, attn_mask=None, is_causal=False, scale=None):
    # (batch broadcast over q/k/v, Hq, Sq, Dv): V's head size may differ from Q's (DeepSeek)
    batch = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    return q.new_empty((*batch, q.shape[-3], q.shape[-2], v.shape[-1]))


@register_translation(torch.ops.attnc.attention.default)
def attention_onnx(q, k, v, attn_mask=None, is_causal: bool = False, scale: float | None = None):
    kw = {"is_causal": 1 if is_causal else 0}
    if scale is not None:
        kw["scale"] = float(scale)
    # Attention has four outputs; only Y is wanted (the others are optional and left unnamed)
    if attn_mask is None:
        out = op23.Attention(q, k, v, **kw)
    else:
        out = op23.Attention(q, k, v, attn_mask, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out
