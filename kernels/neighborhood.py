"""`attnc::neighborhood_attention`: NATTEN neighborhood attention on a 1-D/2-D/3-D token grid.

    out = softmax(scale q k^T + (-inf outside the neighborhood)) v,  q, k, v (B, H, S, D)

Tokens are the row-major flattening of `grid` (one entry may be -1: inferred from S, so the
sequence length can stay dynamic in export). `kernel_size`, `dilation`, `stride`, `is_causal`
give one entry per axis, with NATTEN's exact border semantics (masks.py). Triton on CUDA
(multi-dim tiles, block skipping), reference elsewhere; ONNX: in-graph mask + Attention.
"""

from __future__ import annotations

import math

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


def can_use_neighborhood(seq_len: int, grid, kernel_size, dilation=None, stride=None,
                         is_causal=None) -> str | None:
    """Why these arguments do not describe a valid neighborhood attention, or None."""
    n = len(grid) or 1
    try:
        g = masks.resolve_grid(grid, seq_len)
        masks.check_natten_args(g, kernel_size, dilation or [1] * n, stride or [1] * n,
                                is_causal or [False] * n)
    except KernelError as e:
        return e.message
    return None


def can_use_neighborhood_site(site, seq_len: int, grid, kernel_size, dilation=None, stride=None,
                              is_causal=None) -> str | None:
    """`can_use_neighborhood` for an `attnc.graph.sites.AttentionSite`: also None only for a
    self-attention site without its own mask (the op has no mask input to carry one)."""
    if site.kind != "self":
        return f"site {site.index} is {site.kind}-attention; neighborhood attention needs Sq == Skv"
    if site.mask != "none":
        return f"site {site.index} has a {site.mask} mask, which neighborhood attention would drop"
    if site.num_kv_heads < 1 or site.num_heads % site.num_kv_heads:
        return f"{site.num_heads} query heads are not a multiple of {site.num_kv_heads} kv heads"
    return can_use_neighborhood(seq_len, grid, kernel_size, dilation, stride, is_causal)


@torch.library.custom_op("attnc::neighborhood_attention", mutates_args=())
def neighborhood_attention(
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
    s = q.shape[-2]
    if s != k.shape[-2]:
        raise KernelError(f"neighborhood attention needs Sq == Skv, got {s}, {k.shape[-2]}")
    if not 0 <= num_global < s:
        raise KernelError(f"num_global {num_global} must lie in [0, {s})")
    g = masks.resolve_grid(grid, s - num_global)
    heads = reference.head_kernels(kernel_size, head_kernel_size, q.shape[1], len(g))
    for ks in heads:
        masks.check_natten_args(g, ks, dilation, stride, is_causal, whole_ok=True)
    extras = (key_padding_mask is not None or num_global > 0 or head_kernel_size is not None
              or min(kernel_size) < 0)

    def ref():
        return reference.neighborhood_attention_ref(q, k, v, g, kernel_size, dilation, stride,
                                                    is_causal, scale, key_padding_mask,
                                                    num_global, head_kernel_size)

    def pattern(i, j):
        return masks.natten_heads_visible(i, j, g, heads, dilation, stride, is_causal,
                                          num_global)

    kpm = None
    if extras and q.is_cuda:  # the kernels take the (B, S) key padding mask
        kpm = masks.resolve_padding(key_padding_mask, q.shape[0], s, s, pattern)

    def dense():
        return masks.pad_keys(masks.natten_heads_mask(g, heads, dilation, stride, is_causal,
                                                      num_global, q.device), kpm)

    def fwd(sc):
        from attnc.kernels import pattern_extras

        return pattern_extras.neighborhood_fwd(q, k, v, grid=g, head_kernels=heads,
                                               dilation=dilation, stride=stride,
                                               is_causal=is_causal, num_global=num_global,
                                               scale=sc, key_padding_mask=kpm)

    flash = flash_module()
    pattern_ = None if flash is None or extras else flash.natten_pattern(
        g, kernel_size, dilation, stride, is_causal)
    reach = [math.prod(abs(x) for x in ks) for ks in heads]
    density = min(1.0, (max(reach) + num_global) / max(s, 1))
    return run_pattern(q, k, v, scale=scale, causal=False, pattern=pattern_, layout=None,
                       density=density, dense_mask=dense, ref=ref, fwd=fwd if extras else None)


@neighborhood_attention.register_fake
def _(q, k, v, grid, kernel_size, dilation, stride, is_causal, scale=None, key_padding_mask=None,
      num_global=0, head_kernel_size=None):
    return torch.empty_like(q)


def _axis_visible(xq, xk, L, K: int, d: int, s: int, causal: bool):
    """ONNX form of masks.natten_axis_visible on 1-D int64 coordinates -> (Sq, Sk) bool."""
    g = op.Mod(xq, i64(d))
    xi = op.Div(xq, i64(d))
    lg = op.Div(op.Add(op.Sub(L, g), i64(d - 1)), i64(d))
    lg1 = op.Sub(lg, i64(1))
    base = op.Mul(op.Div(xi, i64(s)), i64(s))
    if causal:
        c0 = op.Min(op.Add(base, i64(s - 1)), lg1)
        start = op.Max(op.Sub(c0, i64(K - 1)), i64(0))
        end = op.Add(xi, i64(1))
    else:
        wl, wr = K // 2, K // 2 + K % 2 - 1
        c0 = op.Min(op.Add(base, i64(s // 2)), lg1)
        c = op.Min(op.Max(c0, i64(wl)), op.Sub(lg1, i64(wr)))
        start = op.Sub(c, i64(wl))
        end = op.Add(c, i64(wr + 1))
    ki = as_cols(op.Div(xk, i64(d)))
    same = op.Equal(as_cols(op.Mod(xk, i64(d))), as_rows(g))
    inside = op.And(op.GreaterOrEqual(ki, as_rows(start)), op.Less(ki, as_rows(end)))
    return op.And(same, inside)


@register_translation(torch.ops.attnc.neighborhood_attention.default)
def neighborhood_attention_onnx(q, k, v, grid, kernel_size, dilation, stride, is_causal,
                                scale=None):
    s = seq_len(q)
    gl = [int(x) for x in grid] or [-1]
    known = math.prod(x for x in gl if x != -1)
    sizes = [op.Div(s, i64(known)) if x == -1 else i64(x) for x in gl]
    t = positions(s)  # (S,)
    vis = None
    inner = None  # product of the extents after the current axis
    for a in reversed(range(len(gl))):
        coord = t if inner is None else op.Div(t, inner)
        coord = op.Mod(coord, sizes[a]) if a > 0 else coord
        m = _axis_visible(coord, coord, sizes[a], int(kernel_size[a]),
                          int(dilation[a]), int(stride[a]), bool(is_causal[a]))
        vis = m if vis is None else op.And(vis, m)
        inner = sizes[a] if inner is None else op.Mul(inner, sizes[a])
    return attention_with_mask(q, k, v, vis, scale)  # vis (S, S)
