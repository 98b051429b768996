"""Plain-PyTorch references of every attnc op: the executable spec.

Layout everywhere: q (B, Hq, Sq, D), k and v (B, Hkv, Skv, D) with Hq % Hkv == 0 (GQA/MQA).
`causal` is top-left aligned like torch SDPA: query i sees key j iff j <= i.
A query row that sees no key at all returns zeros (and log-sum-exp -inf), never NaN.
"""

from __future__ import annotations

import math

import torch


def expand_kv(k: torch.Tensor, hq: int) -> torch.Tensor:
    """Repeat KV heads so that (B, Hkv, S, D) becomes (B, Hq, S, D)."""
    hkv = k.shape[1]
    if hkv == hq:
        return k
    return k.repeat_interleave(hq // hkv, dim=1)  # (B, Hq, S, D)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with a boolean `allowed` mask (broadcastable to (B, Hq, Sq, Skv)) and an
    optional additive float `bias`. Computed in float32; returns (out in q's dtype, lse float32)."""
    hq, d = q.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf, kf, vf = q.float(), expand_kv(k, hq).float(), expand_kv(v, hq).float()
    scores = (qf @ kf.transpose(-1, -2)) * scale  # (B, Hq, Sq, Skv)
    if bias is not None:
        scores = scores + bias.float()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hq, Sq)
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, 0.0).unsqueeze(-1))
    probs = torch.where(finite.unsqueeze(-1), probs, 0.0)
    out = probs @ vf  # (B, Hq, Sq, D)
    return out.to(q.dtype), lse


def causal_allowed(sq: int, skv: int, device: torch.device | str = "cpu") -> torch.Tensor:
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(skv, device=device)[None, :]
    return j <= i  # (Sq, Skv)


def sdpa_mask(attn_mask: torch.Tensor | None, is_causal: bool, sq: int, skv: int,
              device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """SDPA's mask arguments as (allowed, bias): a bool mask is True = attend, a float mask is
    added to the scores, and causality ANDs the lower triangle into `allowed`."""
    allowed, bias = None, None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask
        else:
            bias = attn_mask
    if is_causal:
        c = causal_allowed(sq, skv, device)
        allowed = c if allowed is None else (allowed & c)
    return allowed, bias


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense attention, the semantics of torch SDPA (bool mask True = attend, float mask added)."""
    allowed, bias = sdpa_mask(attn_mask, is_causal, q.shape[-2], k.shape[-2], q.device)
    out, _ = masked_attention(q, k, v, allowed, scale, bias)
    return out


# ------------------------------------------------------- sparse patterns (kernels/masks.py)


def neighborhood_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: list[int],
    kernel_size: list[int],
    dilation: list[int],
    stride: list[int],
    is_causal: list[bool],
    scale: float | None = None,
) -> torch.Tensor:
    """NATTEN neighborhood attention on a row-major token grid (one -1 entry: inferred from S)."""
    from attnc.kernels import masks

    g = masks.resolve_grid(grid, q.shape[-2])
    allowed = masks.natten_mask(g, kernel_size, dilation, stride, is_causal, q.device)
    out, _ = masked_attention(q, k, v, allowed, scale)
    return out


def sliding_window_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    num_sinks: int = 0,
    is_causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Sliding-window attention with `num_sinks` global keys (StreamingLLM when causal)."""
    from attnc.kernels import masks

    allowed = masks.sliding_window_mask(
        q.shape[-2], k.shape[-2], window, num_sinks, is_causal, q.device
    )
    out, _ = masked_attention(q, k, v, allowed, scale)
    return out


def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention restricted to the (B|1, H|1, nq, nkv) bool block layout (and causal if asked)."""
    from attnc.kernels import masks

    allowed = masks.block_layout_mask(layout, block_size, q.shape[-2], k.shape[-2], is_causal)
    out, _ = masked_attention(q, k, v, allowed, scale)
    return out


def attention_colsum_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention plus, per key, the attention probability it receives summed over the query
    rows `rows` (bool (Sq,) or int indices): (out, colsum (B, Hq, Skv) float32)."""
    hq, d = q.shape[1], q.shape[-1]
    s = 1.0 / math.sqrt(d) if scale is None else scale
    allowed, bias = sdpa_mask(attn_mask, is_causal, q.shape[-2], k.shape[-2], q.device)
    out, lse = masked_attention(q, k, v, allowed, s, bias)
    scores = (q.float() @ expand_kv(k, hq).float().transpose(-1, -2)) * s  # (B, Hq, Sq, Skv)
    if bias is not None:
        scores = scores + bias.float()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
    probs = torch.where(torch.isfinite(lse).unsqueeze(-1), probs, 0.0)
    if rows.dtype == torch.bool:
        rows = rows.nonzero().flatten()
    return out, probs[:, :, rows].sum(2)
