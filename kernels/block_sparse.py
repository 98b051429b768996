"""`attnc::block_sparse_attention`: attention restricted to a block layout.

    query i sees key j iff layout[b, h, i // block_size, j // block_size] (and j <= i if causal)

`layout` is a (B|1, H|1, ceil(Sq/bs), ceil(Skv/bs)) bool tensor: a static layout (masks.py:
PowerAttention, local + vertical stride) or one a pass computes. Triton on CUDA: kernel tiles
the layout leaves empty are never loaded, fully kept tiles skip the mask. Elsewhere, the
gathered torch form of block_sparse_gather.py (each query block attends to its listed key
blocks through an nq x M index table) when its cost rule says it pays, else the reference.
ONNX: that gathered form under the same rule; else the layout is gathered by
(Range // block_size) in-graph, + opset-23 Attention.
"""

from __future__ import annotations

import torch
from onnxscript import opset23 as op

from attnc.errors import KernelError
from attnc.kernels import block_sparse_gather, masks, reference
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


def can_use_block_sparse(layout: torch.Tensor, block_size: int, sq: int, skv: int) -> str | None:
    """Why this layout cannot drive block-sparse attention over (sq, skv), or None."""
    if block_size < 1:
        return f"block_size must be >= 1, got {block_size}"
    try:
        masks.check_layout(layout, block_size, sq, skv)
    except KernelError as e:
        return e.message
    return None


def can_use_block_sparse_site(site, layout: torch.Tensor, block_size: int, sq: int, skv: int,
                              is_causal: bool = False) -> str | None:
    """`can_use_block_sparse` for an `attnc.graph.sites.AttentionSite` (self or cross) whose
    mask (if any) the op carries as a key padding mask (patterns.site_reason)."""
    reason = site_reason(site, "block-sparse attention", self_only=False, causal=is_causal)
    if reason is None and site.window is not None:
        reason = f"site {site.index} has a sliding window of {site.window}, which a layout drops"
    if reason is None and layout.dim() == 4 and layout.shape[1] not in (1, site.num_heads):
        reason = f"layout has {layout.shape[1]} heads, the site {site.num_heads}"
    return reason or can_use_block_sparse(layout, block_size, sq, skv)


@torch.library.custom_op("attnc::block_sparse_attention", mutates_args=())
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    is_causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    sq, skv = q.shape[-2], k.shape[-2]
    reason = can_use_block_sparse(layout, block_size, sq, skv)
    if reason is not None:
        raise KernelError(reason)
    for a, n in ((0, q.shape[0]), (1, q.shape[1])):
        if layout.shape[a] not in (1, n):
            raise KernelError(f"layout dim {a} is {layout.shape[a]}, expected 1 or {n}")
    layout = layout.to(q.device)

    def ref():
        if block_sparse_gather.gather_pays(skv, block_size, int(layout.sum(-1).max())):
            kp = None if key_padding_mask is None else masks.resolve_padding(
                key_padding_mask, q.shape[0], sq, skv, pattern)  # off CUDA: only listed blocks
            return block_sparse_gather.gather_attention(q, k, v, layout, block_size, is_causal,
                                                        scale, kp)
        return reference.block_sparse_attention_ref(q, k, v, layout, block_size, is_causal,
                                                    scale, key_padding_mask)

    def pattern(i, j):
        m = layout[:, :, i[:, 0] // block_size][:, :, :, j[0] // block_size]
        return (m & (j <= i)) if is_causal else m

    kpm = None
    if key_padding_mask is not None and q.is_cuda:
        kpm = masks.resolve_padding(key_padding_mask, q.shape[0], sq, skv, pattern)

    def dense():
        return masks.pad_keys(masks.block_layout_mask(layout, block_size, sq, skv, is_causal),
                              kpm)

    def fwd(sc):
        from attnc.kernels import pattern_extras

        return pattern_extras.block_sparse_fwd(q, k, v, layout=layout, block_size=block_size,
                                               causal=is_causal, scale=sc, key_padding_mask=kpm)

    flash = flash_module()
    pattern_ = None if flash is None else flash.Pattern("block", block_size=int(block_size))
    density = float(layout.float().mean()) if layout.numel() else 0.0
    return run_pattern(q, k, v, scale=scale, causal=is_causal, pattern=pattern_, layout=layout,
                       density=density, dense_mask=dense, ref=ref,
                       fwd=fwd if key_padding_mask is not None else None)


@block_sparse_attention.register_fake
def _(q, k, v, layout, block_size, is_causal=False, scale=None, key_padding_mask=None):
    return torch.empty_like(q)


@register_translation(torch.ops.attnc.block_sparse_attention.default)
def block_sparse_attention_onnx(q, k, v, layout, block_size: int, is_causal: bool = False,
                                scale: float | None = None, key_padding_mask=None):
    gathered = block_sparse_gather.translate(q, k, v, layout, block_size, is_causal, scale,
                                             key_padding_mask)  # the listed blocks only
    if gathered is not None:
        return gathered
    i = positions(seq_len(q))
    j = positions(seq_len(k))
    rows = op.Gather(layout, op.Div(i, i64(block_size)), axis=2)  # (B|1, H|1, Sq, nkv)
    vis = op.Gather(rows, op.Div(j, i64(block_size)), axis=3)  # (B|1, H|1, Sq, Skv)
    if is_causal:
        vis = op.And(vis, op.LessOrEqual(as_cols(j), as_rows(i)))
    vis = with_padding(vis, key_padding_mask)
    return attention_with_mask(q, k, v, vis, scale, zero_unseen=key_padding_mask is not None)
