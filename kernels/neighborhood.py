"""`attnc::neighborhood_attention`: NATTEN neighborhood attention on a 1-D/2-D/3-D token grid.

    out = softmax(scale q k^T + (-inf outside the neighborhood)) v,  q, k, v (B, H, S, D)

Tokens are the row-major flattening of `grid` (one entry may be -1: inferred from S, so the
sequence length can stay dynamic in export). `kernel_size`, `dilation`, `stride`, `is_causal`
give one entry per axis, with NATTEN's exact border semantics (masks.py). Triton on CUDA
(multi-dim tiles, block skipping). Elsewhere, on a 2-D/3-D grid, the blocked torch form of
neighborhood_blocked.py (grid tiles attend to their key halo) when its cost rule says it pays,
else the reference. ONNX: that blocked form under the same rule (at the static length or the
build's `onnx_seq_hint`), else an in-graph mask + Attention.
"""

from __future__ import annotations

import math

import torch
from onnxscript import opset23 as op

from attnc.errors import KernelError
from attnc.kernels import masks, neighborhood_blocked, reference
from attnc.kernels import neighborhood1d_blocked as nb1d
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
    site_reason,
    with_padding,
)


def can_use_neighborhood(seq_len: int, grid, kernel_size, dilation=None, stride=None,
                         is_causal=None, num_global: int = 0, head_kernel_size=None,
                         num_heads: int = 1) -> str | None:
    """Why these arguments do not describe a valid neighborhood attention, or None.
    `head_kernel_size`: num_heads x ndim kernel sizes (row-major, -1: the whole axis)."""
    n = len(grid) or 1
    if not 0 <= num_global < max(seq_len, 1):
        return f"num_global {num_global} must lie in [0, {seq_len})"
    try:
        g = masks.resolve_grid(grid, seq_len - num_global)
        for ks in reference.head_kernels(kernel_size, head_kernel_size, num_heads, n):
            masks.check_natten_args(g, ks, dilation or [1] * n, stride or [1] * n,
                                    is_causal or [False] * n, whole_ok=True)
    except KernelError as e:
        return e.message
    return None


def can_use_neighborhood_site(site, seq_len: int, grid, kernel_size, dilation=None, stride=None,
                              is_causal=None, num_global: int = 0,
                              head_kernel_size=None) -> str | None:
    """`can_use_neighborhood` for an `attnc.graph.sites.AttentionSite`: a self-attention site
    whose mask (if any) the op carries as a key padding mask (patterns.site_reason)."""
    n = len(grid) or 1
    causal = all(is_causal or [False] * n) and num_global == 0  # every key j <= i
    reason = site_reason(site, "neighborhood attention", self_only=True, causal=causal)
    if reason is None and site.window is not None:
        reason = (f"site {site.index} has a sliding window of {site.window}, which neighborhood "
                  f"attention does not keep")
    return reason or can_use_neighborhood(seq_len, grid, kernel_size, dilation, stride,
                                          is_causal, num_global, head_kernel_size,
                                          site.num_heads)


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
        kern = [h[0] for h in heads]
        if len(g) == 1 and nb1d.blocked_pays(s, kern, dilation[0], stride[0], num_global):
            kp = None if key_padding_mask is None else masks.resolve_padding(
                key_padding_mask, q.shape[0], s, s, pattern)  # 1-D: blocked, off CUDA
            return nb1d.blocked_attention(q, k, v, kern, dilation[0], stride[0],
                                          bool(is_causal[0]), scale, num_global, kp)
        if neighborhood_blocked.blocked_pays(s, g, heads, dilation, stride, is_causal,
                                             num_global):  # off CUDA: skip the unseen work
            kp = None if key_padding_mask is None else masks.resolve_padding(
                key_padding_mask, q.shape[0], s, s, pattern)
            return neighborhood_blocked.blocked_attention(q, k, v, g, heads, dilation, stride,
                                                          is_causal, scale, kp, num_global)
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
    reach = [math.prod(L if x < 0 else x for L, x in zip(g, ks, strict=True)) for ks in heads]
    density = min(1.0, (max(reach) + num_global) / max(s, 1))
    return run_pattern(q, k, v, scale=scale, causal=False, pattern=pattern_, layout=None,
                       density=density, dense_mask=dense, ref=ref, fwd=fwd if extras else None)


@neighborhood_attention.register_fake
def _(q, k, v, grid, kernel_size, dilation, stride, is_causal, scale=None, key_padding_mask=None,
      num_global=0, head_kernel_size=None):
    return torch.empty_like(q)


def _axis_visible(xq, xk, L, K, d: int, s: int, causal: bool):
    """ONNX form of masks.natten_axis_visible on 1-D int64 coordinates -> (Sq, Sk) bool, or
    (H, Sq, Sk) when K is a list of per-head kernel sizes (-1: the whole dilation group)."""
    g = op.Mod(xq, i64(d))
    xi = op.Div(xq, i64(d))
    lg = op.Div(op.Add(op.Sub(L, g), i64(d - 1)), i64(d))
    lg1 = op.Sub(lg, i64(1))
    base = op.Mul(op.Div(xi, i64(s)), i64(s))
    ks = [int(K)] if isinstance(K, int) else [int(x) for x in K]
    kk = op.Reshape(op.Constant(value_ints=ks), op.Constant(value_ints=[-1, 1]))  # (H|1, 1)
    if min(ks) < 0:
        kk = op.Where(op.Less(kk, i64(0)), as_cols(lg), kk)  # (H|1, Sq)
    if causal:
        c0 = op.Min(op.Add(base, i64(s - 1)), lg1)
        start = op.Max(op.Add(op.Sub(c0, kk), i64(1)), i64(0))
        end = op.Add(xi, i64(1))
    else:
        wl = op.Div(kk, i64(2))
        wr = op.Sub(op.Add(wl, op.Mod(kk, i64(2))), i64(1))
        c0 = op.Min(op.Add(base, i64(s // 2)), lg1)
        c = op.Min(op.Max(c0, wl), op.Sub(lg1, wr))
        start = op.Sub(c, wl)
        end = op.Add(c, op.Add(wr, i64(1)))
    ki = as_cols(op.Div(xk, i64(d)))
    same = op.Equal(as_cols(op.Mod(xk, i64(d))), as_rows(g))

    def rows(x):  # (..., Sq) -> (..., Sq, 1)
        return op.Unsqueeze(x, op.Constant(value_ints=[-1]))

    inside = op.And(op.GreaterOrEqual(ki, rows(start)), op.Less(ki, rows(end)))
    return op.And(same, inside)  # (H|1, Sq, Sk)


@register_translation(torch.ops.attnc.neighborhood_attention.default)
def neighborhood_attention_onnx(q, k, v, grid, kernel_size, dilation, stride, is_causal,
                                scale=None, key_padding_mask=None, num_global: int = 0,
                                head_kernel_size=None):
    blocked = _blocked_1d(q, k, v, grid, kernel_size, dilation, stride, is_causal, scale,
                          key_padding_mask, num_global, head_kernel_size)
    if blocked is not None:
        return blocked
    blocked = neighborhood_blocked.translate(q, k, v, grid, kernel_size, dilation, stride,
                                             is_causal, scale, key_padding_mask, num_global,
                                             head_kernel_size)  # 2-D/3-D: the halo tiles
    if blocked is not None:
        return blocked
    s = seq_len(q)
    gl = [int(x) for x in grid] or [-1]
    n = op.Sub(s, i64(num_global))  # grid tokens
    known = math.prod(x for x in gl if x != -1)
    sizes = [op.Div(n, i64(known)) if x == -1 else i64(x) for x in gl]
    heads = reference.head_kernels(kernel_size, head_kernel_size, q.shape[1], len(gl))
    t = op.Sub(positions(s), i64(num_global))  # (S,): grid index, < 0 for a global token
    tc = op.Max(t, i64(0))
    vis = None
    inner = None  # product of the extents after the current axis
    for a in reversed(range(len(gl))):
        coord = tc if inner is None else op.Div(tc, inner)
        coord = op.Mod(coord, sizes[a]) if a > 0 else coord
        kk = heads[0][a] if len(heads) == 1 else [h[a] for h in heads]
        m = _axis_visible(coord, coord, sizes[a], kk, int(dilation[a]), int(stride[a]),
                          bool(is_causal[a]))
        vis = m if vis is None else op.And(vis, m)
        inner = sizes[a] if inner is None else op.Mul(inner, sizes[a])
    if num_global:
        glob = op.Less(t, i64(0))
        vis = op.And(vis, op.And(op.Not(as_rows(glob)), op.Not(as_cols(glob))))
        vis = op.Or(vis, op.Or(as_rows(glob), as_cols(glob)))
    vis = with_padding(vis, key_padding_mask)  # (B|1, H|1, S, S)
    return attention_with_mask(q, k, v, vis, scale, zero_unseen=key_padding_mask is not None)


def _blocked_1d(q, k, v, grid, kernel_size, dilation, stride, is_causal, scale,
                key_padding_mask, num_global, head_kernel_size):
    """The blocked ONNX form of a 1-D neighborhood (neighborhood1d_blocked.py) where its cost
    rule pays at the length (static, else the export's target length); None otherwise."""
    from attnc.kernels import window_blocked

    if len(grid) > 1:
        return None
    dims = (q.shape[1], q.shape[3], k.shape[1])
    static = all(isinstance(x, int) for x in dims)
    seq = q.shape[2] if isinstance(q.shape[2], int) else window_blocked.seq_hint()
    kern = [h[0] for h in reference.head_kernels(kernel_size, head_kernel_size, q.shape[1], 1)]
    rank = None if key_padding_mask is None else len(key_padding_mask.shape)
    ok = static and nb1d.onnx_form(seq, kern, int(dilation[0]), int(stride[0]),
                                   int(num_global), rank) is not None
    nb1d.record(seq, kern, int(stride[0]), int(num_global), ok, DENSE_FORM)
    if not ok:
        return None
    pad = key_padding_mask
    if rank == 4:  # (B|1, H|1, S, S): key j's flag on the diagonal (the op checked it)
        pad = window_blocked.diagonal_padding(pad)
    return nb1d.blocked_onnx(q, k, v, kern, int(dilation[0]), int(stride[0]),
                             bool(is_causal[0]), scale, int(num_global), pad,
                             padding_is_bool=pad is None or key_padding_mask.dtype == 9)


DENSE_FORM = neighborhood_blocked.DENSE_FORM
