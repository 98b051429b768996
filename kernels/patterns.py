"""Shared plumbing of the sparse-pattern ops, and `attnc::attention_colsum`.

Each pattern op (neighborhood.py, sliding_window.py, block_sparse.py) runs:
  CUDA + Triton  -> the cost model (autotune.dense_is_cheaper) picks SDPA with the dense mask for
                    small problems, else the block-skipping kernel in flash.py;
  elsewhere      -> its plain-PyTorch reference in reference.py.
Their ONNX translations build the bool mask in-graph from Range/Div/Mod arithmetic on the dynamic
sequence lengths (no S x S constants) and feed opset-23 `Attention`; the helpers are here.

`attnc::attention_colsum(q, k, v, rows, attn_mask, is_causal, scale) -> (out, colsum)` is dense
attention that also returns, per key, the probability mass it receives from the query rows
`rows` (bool (Sq,) or int64 indices), shape (B, Hq, Skv) float32: what token pruning and sink
detection need, computed by a second kernel pass from the lse (no attention matrix).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from onnxscript import opset23 as op

from attnc.kernels import reference
from attnc.kernels.onnx import register_translation


def flash_module():
    """attnc.kernels.flash, or None when Triton is missing."""
    try:
        from attnc.kernels import flash
    except ImportError:
        return None
    return flash


def run_pattern(q, k, v, *, scale, causal: bool, pattern, layout, density: float,
                dense_mask: Callable[[], torch.Tensor], ref: Callable[[], torch.Tensor],
                fwd: Callable[[float], tuple] | None = None):
    """Dispatch one pattern op: Triton kernel, SDPA (cost model) or the reference. `fwd(scale)
    -> (out, lse)` replaces flash.attention_fwd for the ops with a padding mask, global tokens
    or per-head parameters (pattern_extras.py)."""
    if q.is_cuda:
        flash = flash_module()
        if flash is not None and flash.can_use_flash(q, k, v) is None:
            from attnc.kernels import autotune

            s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
            if autotune.dense_is_cheaper(q.shape[-2], k.shape[-2], density):
                return sdpa_masked(q, k, v, dense_mask(), s)
            if fwd is not None:
                return fwd(s)[0]
            out, _ = flash.attention_fwd(q, k, v, causal=causal, scale=s, pattern=pattern,
                                         layout=layout)
            return out
    return ref()


def site_reason(site, op_name: str, *, self_only: bool, causal: bool) -> str | None:
    """Why an `attnc.graph.sites.AttentionSite` cannot become a pattern op, or None (the
    pattern's own arguments are checked by the op's `can_use_*`). The site's mask is carried as a
    key padding mask: the op checks at run time that it masks only keys on the pattern's support
    (a padding mask, or a causal mask on a causal pattern) and raises KernelError otherwise. A
    score bias is not carried, and a causal site needs a pattern whose keys all satisfy j <= i."""
    if self_only and site.kind != "self":
        return f"site {site.index} is {site.kind}-attention; {op_name} needs Sq == Skv"
    if site.score != "none":
        return f"site {site.index} adds a {site.score} score, which {op_name} would drop"
    if site.causal and not causal:
        return f"site {site.index} is causal; a bidirectional {op_name} would see later keys"
    if site.num_kv_heads < 1 or site.num_heads % site.num_kv_heads:
        return f"{site.num_heads} query heads are not a multiple of {site.num_kv_heads} kv heads"
    return None


def sdpa_masked(q, k, v, allowed, scale):
    """SDPA with a bool mask; rows that see no key give zeros (SDPA would give NaN)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    seen = allowed.any(-1, keepdim=True)  # (..., Sq, 1)
    return torch.where(seen, out, 0.0).to(q.dtype).contiguous()


# ------------------------------------------------------------------ ONNX index arithmetic


def i64(x: int):
    """A scalar int64 constant."""
    return op.Constant(value_int=int(x))


def seq_len(t, axis: int = 2):
    """The (dynamic) length of `t` along `axis`, a scalar int64."""
    return op.Squeeze(op.Shape(t, start=axis, end=axis + 1), op.Constant(value_ints=[0]))


def positions(n):
    """Range(0, n) as int64."""
    return op.Range(i64(0), n, i64(1))


def as_rows(x):
    return op.Unsqueeze(x, op.Constant(value_ints=[1]))  # (S, 1)


def as_cols(x):
    return op.Unsqueeze(x, op.Constant(value_ints=[0]))  # (1, S)


def attention_with_mask(q, k, v, allowed, scale, zero_unseen: bool = False):
    """opset-23 Attention with a bool mask; `zero_unseen`: rows that see no key give zeros
    (reference.masked_attention) whatever the runtime does with a fully masked row."""
    kw = {} if scale is None else {"scale": float(scale)}
    res = op.Attention(q, k, v, allowed, **kw)  # (Y, present_key, present_value, qk)
    out = res[0] if isinstance(res, (tuple, list)) else res
    if not zero_unseen:
        return out
    seen = op.ReduceMax(op.Cast(allowed, to=1), op.Constant(value_ints=[-1]), keepdims=1)
    return op.Where(op.Greater(seen, op.Constant(value_float=0.0)), out,
                    op.CastLike(op.Constant(value_float=0.0), out))


def with_padding(vis, mask):
    """`vis` (..., Sq, Skv) AND the op's padding mask: a (B, Skv) key padding mask, or a mask
    broadcastable to (B, H|1, Sq, Skv) (bool, or float with masked entries <= -1e4) ANDed as it
    is (exact: the torch op checked that it masks only keys on the pattern's support)."""
    if mask is None:
        return vis
    rank = len(mask.shape)
    if mask.dtype != 9:  # not BOOL: a Hugging Face float mask
        mask = op.Greater(mask, op.CastLike(op.Constant(value_float=-1e4), mask))
    if rank == 2:  # (B, Skv) -> (B, 1, 1, Skv)
        mask = op.Unsqueeze(mask, op.Constant(value_ints=[1, 2]))
    return op.And(vis, mask)


def head_ints(values, unbounded: int | None = None):
    """A per-head int64 constant of shape (H, 1, 1) (-1 entries replaced by `unbounded`)."""
    vals = [unbounded if (unbounded is not None and x < 0) else int(x) for x in values]
    return op.Constant(value_ints=vals) if len(vals) == 1 else op.Reshape(
        op.Constant(value_ints=vals), op.Constant(value_ints=[-1, 1, 1]))


# ------------------------------------------------------------------ attnc::attention_colsum


@torch.library.custom_op("attnc::attention_colsum", mutates_args=())
def attention_colsum(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if q.is_cuda:
        flash = flash_module()
        if flash is not None and flash.can_use_flash(q, k, v, attn_mask) is None:
            s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
            out, lse = flash.attention_fwd(q, k, v, mask=attn_mask, causal=is_causal, scale=s)
            cs = flash.column_sums(q, k, lse, rows, mask=attn_mask, causal=is_causal, scale=s)
            return out, cs
    return reference.attention_colsum_ref(q, k, v, rows, attn_mask, is_causal, scale)


@attention_colsum.register_fake
def _(q, k, v, rows, attn_mask=None, is_causal=False, scale=None):
    cs = q.new_empty((q.shape[0], q.shape[1], k.shape[2]), dtype=torch.float32)
    return torch.empty_like(q), cs


@register_translation(torch.ops.attnc.attention_colsum.default)
def attention_colsum_onnx(q, k, v, rows, attn_mask=None, is_causal: bool = False,
                          scale: float | None = None):
    kw = {"is_causal": 1 if is_causal else 0, "qk_matmul_output_mode": 3}
    if scale is not None:
        kw["scale"] = float(scale)
    if attn_mask is None:
        out, _, _, probs = op.Attention(q, k, v, **kw)
    else:
        out, _, _, probs = op.Attention(q, k, v, attn_mask, **kw)
    # probs (B, Hq, Sq, Skv): summed over the chosen rows
    if rows.dtype == 9:  # BOOL
        w = op.Cast(rows, to=1)
        cs = op.ReduceSum(op.Mul(probs, op.Unsqueeze(w, op.Constant(value_ints=[1]))),
                          op.Constant(value_ints=[2]), keepdims=0)
    else:
        cs = op.ReduceSum(op.Gather(probs, rows, axis=2), op.Constant(value_ints=[2]),
                          keepdims=0)
    return out, op.Cast(cs, to=1)
