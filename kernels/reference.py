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
    key_padding_mask: torch.Tensor | None = None,
    num_global: int = 0,
    head_kernel_size: list[int] | None = None,
) -> torch.Tensor:
    """NATTEN neighborhood attention on a row-major token grid (one -1 entry: inferred from S)
    after `num_global` global tokens (every query sees them, they see every key), with one
    kernel size per query head when `head_kernel_size` (Hq x ndim, row-major; -1: the whole
    axis) is given, and padded keys (`key_padding_mask`, masks.key_padding_mask) excluded."""
    from attnc.kernels import masks

    s = q.shape[-2]
    g = masks.resolve_grid(grid, s - num_global)
    heads = head_kernels(kernel_size, head_kernel_size, q.shape[1], len(g))
    allowed = masks.natten_heads_mask(g, heads, dilation, stride, is_causal, num_global,
                                      q.device)  # (H|1, S, S)

    def pattern(i, j):
        return masks.natten_heads_visible(i, j, g, heads, dilation, stride, is_causal,
                                          num_global)

    kpm = masks.resolve_padding(key_padding_mask, q.shape[0], s, s, pattern)
    out, _ = masked_attention(q, k, v, masks.pad_keys(allowed, kpm), scale)
    return out


def head_kernels(kernel_size, head_kernel_size, num_heads: int, ndim: int) -> list[list[int]]:
    """[kernel_size] for a shared kernel, else the per-head kernels (num_heads lists of ndim)."""
    from attnc.errors import KernelError

    if head_kernel_size is None:
        return [[int(x) for x in kernel_size]]
    flat = [int(x) for x in head_kernel_size]
    if len(flat) != num_heads * ndim:
        raise KernelError(f"head_kernel_size has {len(flat)} entries, {num_heads} heads x "
                          f"{ndim} axes need {num_heads * ndim}")
    return [flat[h * ndim:(h + 1) * ndim] for h in range(num_heads)]


def sliding_window_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    num_sinks: int = 0,
    is_causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    head_windows: list[int] | None = None,
) -> torch.Tensor:
    """Sliding-window attention with `num_sinks` global keys (StreamingLLM when causal); one
    window per query head when `head_windows` is given (-1: a dense head); padded keys
    (`key_padding_mask`, masks.key_padding_mask) excluded."""
    from attnc.kernels import masks

    sq, skv = q.shape[-2], k.shape[-2]
    wins = [int(window)] if head_windows is None else [int(w) for w in head_windows]
    allowed = masks.sliding_window_heads_mask(sq, skv, wins, num_sinks, is_causal, q.device)

    def pattern(i, j):
        w = torch.as_tensor(wins, device=i.device)
        w = torch.where(w < 0, sq + skv + 1, w)[:, None, None]
        return masks.sliding_window_visible(i, j, w, num_sinks, is_causal)

    kpm = masks.resolve_padding(key_padding_mask, q.shape[0], sq, skv, pattern)
    out, _ = masked_attention(q, k, v, masks.pad_keys(allowed, kpm), scale)
    return out


def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    is_causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention restricted to the (B|1, H|1, nq, nkv) bool block layout (and causal if asked),
    padded keys (`key_padding_mask`, masks.key_padding_mask) excluded."""
    from attnc.kernels import masks

    sq, skv = q.shape[-2], k.shape[-2]
    allowed = masks.block_layout_mask(layout, block_size, sq, skv, is_causal)

    def pattern(i, j):
        m = layout[:, :, i[:, 0] // block_size][:, :, :, j[0] // block_size]
        return (m & (j <= i)) if is_causal else m

    kpm = masks.resolve_padding(key_padding_mask, q.shape[0], sq, skv, pattern)
    out, _ = masked_attention(q, k, v, masks.pad_keys(allowed, kpm), scale)
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
