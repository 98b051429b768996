"""`attnc::sliding_window_attention`: a local window plus `num_sinks` global sink keys.

    causal:        query i sees key j iff j <= i and (i - j < window or j < num_sinks)
    bidirectional: query i sees key j iff |i - j| < window or j < num_sinks

(StreamingLLM when causal; top-left aligned like SDPA when Sq != Skv). Triton on CUDA (block
lists: full tiles skip the mask, tiles outside window and sinks are never loaded), reference
elsewhere. ONNX: in-graph mask from Range arithmetic + opset-23 Attention (`onnx_form` below
says which form a site gets).
"""

from __future__ import annotations

import torch
from attnc.kernels import masks, reference
from attnc.kernels.onnx import register_translation
from attnc.kernels.patterns import (
    as_cols,
    as_rows,
    attention_with_mask,
    flash_module,
    i64,
    positions,
    run_pattern,
    seq_len,
)
from onnxscript import opset23 as op

from attnc.errors import KernelError


def can_use_sliding_window(window: int, num_sinks: int = 0) -> str | None:
    """Why these arguments do not describe a valid sliding window, or None."""
    if window < 1:
        return f"window must be >= 1, got {window}"
    if num_sinks < 0:
        return f"num_sinks must be >= 0, got {num_sinks}"
    return None


def onnx_form(window: int, num_sinks: int, is_causal: bool) -> str:
    """The ONNX form the translation emits (recorded in reports)."""
    return "Attention(opset 23) + in-graph Range/Sub/Abs window mask"


@torch.library.custom_op("attnc::sliding_window_attention", mutates_args=())
def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    num_sinks: int = 0,
    is_causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    reason = can_use_sliding_window(window, num_sinks)
    if reason is not None:
        raise KernelError(reason)
    sq, skv = q.shape[-2], k.shape[-2]

    def ref():
        return reference.sliding_window_attention_ref(q, k, v, window, num_sinks, is_causal,
                                                      scale)

    def dense():
        return masks.sliding_window_mask(sq, skv, window, num_sinks, is_causal, q.device)

    flash = flash_module()
    pattern = None if flash is None else flash.Pattern("sliding", window=int(window),
                                                       num_sinks=int(num_sinks))
    width = window if is_causal else 2 * window - 1
    density = min(1.0, (width + num_sinks) / max(skv, 1))
    return run_pattern(q, k, v, scale=scale, causal=is_causal, pattern=pattern, layout=None,
                       density=density, dense_mask=dense, ref=ref)


@sliding_window_attention.register_fake
def _(q, k, v, window, num_sinks=0, is_causal=True, scale=None):
    return torch.empty_like(q)


@register_translation(torch.ops.attnc.sliding_window_attention.default)
def sliding_window_attention_onnx(q, k, v, window: int, num_sinks: int = 0,
                                  is_causal: bool = True, scale: float | None = None):
    i = as_rows(positions(seq_len(q)))  # (Sq, 1)
    j = as_cols(positions(seq_len(k)))  # (1, Skv)
    dist = op.Sub(i, j)
    sink = op.Less(j, i64(num_sinks))
    if is_causal:
        local = op.And(op.GreaterOrEqual(dist, i64(0)), op.Less(dist, i64(window)))
        vis = op.And(op.Or(local, sink), op.LessOrEqual(j, i))
    else:
        vis = op.Or(op.Less(op.Abs(dist), i64(window)), sink)
    return attention_with_mask(q, k, v, vis, scale)  # vis (Sq, Skv)
