"""`attnc::sliding_window_attention`: a local window plus `num_sinks` global sink keys.

    causal:        query i sees key j iff j <= i and (i - j < window or j < num_sinks)
    bidirectional: query i sees key j iff |i - j| < window or j < num_sinks

(StreamingLLM when causal; top-left aligned like SDPA when Sq != Skv). Triton on CUDA (block
lists: full tiles skip the mask, tiles outside window and sinks are never loaded). Elsewhere,
the blocked torch form of window_blocked.py when the cost rule (`window_blocked.blocked_pays`)
says it pays, else the reference. ONNX (`onnx_form` says which form a site gets): the blocked
form (query blocks gathering their key windows + sinks), the head-split form for heads that
differ (window_split.py), ORT's GroupQueryAttention local window, or an in-graph mask from Range
arithmetic + opset-23 Attention.
"""

from __future__ import annotations

import torch
from onnxscript import opset23 as op
from onnxscript.values import Opset

from attnc.errors import KernelError
from attnc.kernels import masks, reference, window_blocked, window_split
from attnc.kernels.onnx import register_translation
from attnc.kernels.patterns import (
    as_cols,
    as_rows,
    attention_with_mask,
    flash_module,
    head_ints,
    i64,
    positions,
    run_pattern,
    seq_len,
    site_reason,
    with_padding,
)


def can_use_sliding_window(window: int, num_sinks: int = 0, head_windows=None,
                           num_heads: int | None = None) -> str | None:
    """Why these arguments do not describe a valid sliding window, or None. `head_windows`:
    one window per query head (-1: a dense head), replacing `window`."""
    if window < 1:
        return f"window must be >= 1, got {window}"
    if num_sinks < 0:
        return f"num_sinks must be >= 0, got {num_sinks}"
    if head_windows is not None:
        if num_heads is not None and len(head_windows) != num_heads:
            return f"{len(head_windows)} head windows for {num_heads} heads"
        if any(w < 1 and w != -1 for w in head_windows):
            return f"head windows must be >= 1 or -1 (dense), got {list(head_windows)}"
    return None


def can_use_sliding_window_site(site, window: int, num_sinks: int = 0, is_causal: bool = True,
                                head_windows=None) -> str | None:
    """`can_use_sliding_window` for an `attnc.graph.sites.AttentionSite`: a self-attention site
    whose mask (if any) the op carries as a key padding mask (patterns.site_reason); a site
    that already has a window keeps only windows no wider than its own."""
    reason = site_reason(site, "a sliding window", self_only=True, causal=is_causal)
    if reason is None and site.window is not None:
        wins = [window] if head_windows is None else list(head_windows)
        if not is_causal or num_sinks or any(w < 0 or w > site.window for w in wins):
            reason = (f"site {site.index} has a causal window of {site.window}: a window must be "
                      f"causal, without sinks and at most that wide")
    return reason or can_use_sliding_window(window, num_sinks, head_windows, site.num_heads)


DENSE_FORM = "Attention(opset 23) + in-graph Range/Sub/Abs window mask"
GQA_FORM = "com.microsoft.GroupQueryAttention(local_window_size)"
BLOCKED_FORM = window_blocked.FORM
SPLIT_FORM = window_split.FORM


def onnx_form(window: int, num_sinks: int, is_causal: bool, same_length: bool = True,
              plain: bool = True, *, seq: int | None = -1, head_windows=None,
              mask_rank: int | None = None) -> str:
    """The ONNX form the translation emits (recorded in reports). The blocked form
    (window_blocked.py) where every head has a window, any mask is a key padding mask (2-D,
    or 4-D over q and k of one length) and the cost rule says it pays at `seq` (None: the
    length is unknown, see `window_blocked.blocked_pays`; -1: do not consider it); else, where
    the heads differ and a group of them runs blocked at a known `seq`, the head-split form
    (window_split.py); else ORT's contrib GroupQueryAttention with `local_window_size` for
    causal windows without sinks
    over q and k of one (symbolic) length (`plain`: no padding mask, one window for every head;
    also at an unknown length, where it is the smaller graph); else standard Attention with an
    in-graph mask (benchmarks/onnx_window.py measures all of them)."""
    wins = [int(window)] if head_windows is None else [int(w) for w in head_windows]
    mask_ok = mask_rank in (None, 2) or (mask_rank == 4 and same_length)
    gqa = is_causal and num_sinks == 0 and same_length and plain
    if seq != -1 and not (gqa and seq is None) and mask_ok and window_blocked.blocked_pays(
            seq, wins, is_causal):  # measured: blocked >= GQA at every length, 2.6x at 4096
        return BLOCKED_FORM
    if seq != -1 and mask_ok and window_split.split_pays(seq, wins, is_causal):
        return SPLIT_FORM  # heads differ: groups by window, the blocked form where it pays
    return GQA_FORM if gqa else DENSE_FORM


def _register_gqa_schema() -> None:
    """onnxscript builds ops from ONNX schemas; ORT's contrib op has none in onnx, so declare the
    part we use (inputs 0-6, outputs 0-2) once."""
    from onnx import defs

    if defs.has("GroupQueryAttention", "com.microsoft"):
        return
    fp, opt = defs.OpSchema.FormalParameter, defs.OpSchema.FormalParameterOption.Optional
    names = [("query", "T"), ("key", "T"), ("value", "T"), ("past_key", "T"),
             ("past_value", "T"), ("seqlens_k", "M"), ("total_sequence_length", "M")]
    ins = [fp(n, t, param_option=opt if n.startswith(("past", "key", "value")) else
              defs.OpSchema.FormalParameterOption.Single) for n, t in names]
    outs = [fp(n, "T") for n in ("output", "present_key", "present_value")]
    at = defs.OpSchema.AttrType
    attrs = [defs.OpSchema.Attribute(n, t, "") for n, t in (
        ("num_heads", at.INT), ("kv_num_heads", at.INT), ("local_window_size", at.INT),
        ("scale", at.FLOAT))]
    defs.register_schema(defs.OpSchema(
        "GroupQueryAttention", "com.microsoft", 1, inputs=ins, outputs=outs,
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("M", ["tensor(int32)"], "")], attributes=attrs))


_register_gqa_schema()
_MS = Opset("com.microsoft", 1)


def _bsd(t):
    perm = op.Transpose(t, perm=[0, 2, 1, 3])  # (B, S, H, D)
    return op.Reshape(perm, op.Constant(value_ints=[0, 0, -1]))  # (B, S, H*D)


def _gqa_local(q, k, v, window: int, scale):
    """ORT GroupQueryAttention (prompt, no past): query i sees keys (i - window, i]; measured on
    ORT 1.32 CPU: its `local_window_size` equals our `window`."""
    hq, d, hkv = q.shape[1], q.shape[3], k.shape[1]
    s = op.Shape(q, start=2, end=3)  # (1,) int64
    total = op.Cast(op.Squeeze(s, op.Constant(value_ints=[0])), to=6)  # int32 scalar
    seqlens = op.Cast(op.Expand(op.Sub(s, i64(1)), op.Shape(q, start=0, end=1)), to=6)  # (B,)
    kw = {"num_heads": int(hq), "kv_num_heads": int(hkv), "local_window_size": int(window)}
    if scale is not None:
        kw["scale"] = float(scale)
    out, _, _ = _MS.GroupQueryAttention(_bsd(q), _bsd(k), _bsd(v), None, None, seqlens, total,
                                        **kw)
    out = op.Reshape(out, op.Constant(value_ints=[0, 0, int(hq), int(d)]))  # (B, S, H, D)
    return op.Transpose(out, perm=[0, 2, 1, 3])  # (B, H, S, D)


@torch.library.custom_op("attnc::sliding_window_attention", mutates_args=())
def sliding_window_attention(
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
    reason = can_use_sliding_window(window, num_sinks, head_windows, q.shape[1])
    if reason is not None:
        raise KernelError(reason)
    sq, skv = q.shape[-2], k.shape[-2]
    wins = [int(window)] if head_windows is None else [int(w) for w in head_windows]
    extras = key_padding_mask is not None or head_windows is not None

    def ref():
        if window_blocked.blocked_pays(max(sq, skv), wins, is_causal):  # skip the unseen work
            kp = None if key_padding_mask is None else masks.resolve_padding(
                key_padding_mask, q.shape[0], sq, skv, pattern)
            return window_blocked.blocked_attention(q, k, v, wins, num_sinks, is_causal, scale,
                                                    kp)
        return reference.sliding_window_attention_ref(q, k, v, window, num_sinks, is_causal,
                                                      scale, key_padding_mask, head_windows)

    def pattern(i, j):
        w = torch.as_tensor([x if x >= 0 else sq + skv + 1 for x in wins], device=i.device)
        return masks.sliding_window_visible(i, j, w[:, None, None], num_sinks, is_causal)

    kpm = None
    if extras and q.is_cuda:  # the kernel takes the (B, Skv) key padding mask
        kpm = masks.resolve_padding(key_padding_mask, q.shape[0], sq, skv, pattern)

    def dense():
        return masks.pad_keys(masks.sliding_window_heads_mask(sq, skv, wins, num_sinks,
                                                              is_causal, q.device), kpm)

    def fwd(sc):
        from attnc.kernels import pattern_extras

        return pattern_extras.sliding_window_fwd(q, k, v, windows=wins, num_sinks=num_sinks,
                                                 causal=is_causal, scale=sc,
                                                 key_padding_mask=kpm)

    flash = flash_module()
    pattern_ = None if flash is None or extras else flash.Pattern(
        "sliding", window=int(window), num_sinks=int(num_sinks))
    widest = max(w if w >= 0 else sq + skv for w in wins)
    width = widest if is_causal else 2 * widest - 1
    density = min(1.0, (width + num_sinks) / max(skv, 1))
    return run_pattern(q, k, v, scale=scale, causal=is_causal, pattern=pattern_, layout=None,
                       density=density, dense_mask=dense, ref=ref, fwd=fwd if extras else None)


@sliding_window_attention.register_fake
def _(q, k, v, window, num_sinks=0, is_causal=True, scale=None, key_padding_mask=None,
      head_windows=None):
    return torch.empty_like(q)


def _static_ints(shape, axes) -> bool:
    try:
        return all(isinstance(shape[a], int) for a in axes)
    except (TypeError, IndexError):
        return False


@register_translation(torch.ops.attnc.sliding_window_attention.default)
def sliding_window_attention_onnx(q, k, v, window: int, num_sinks: int = 0,
                                  is_causal: bool = True, scale: float | None = None,
                                  key_padding_mask=None, head_windows=None):
    static = _static_ints(q.shape, (1, 3)) and _static_ints(k.shape, (1,))
    same = static and str(q.shape[2]) == str(k.shape[2])
    plain = key_padding_mask is None and head_windows is None
    rank = None if key_padding_mask is None else len(key_padding_mask.shape)
    seq = q.shape[2] if _static_ints(q.shape, (2,)) else window_blocked.seq_hint()
    form = onnx_form(window, num_sinks, is_causal, same, plain, seq=seq if static else -1,
                     head_windows=head_windows, mask_rank=rank)
    wins_ = [int(window)] if head_windows is None else [int(w) for w in head_windows]
    why = (window_blocked.why_form(seq, wins_, is_causal) if static else
           "heads or head size not static: the blocked form needs them")
    if rank == 4 and not same:
        why = "a 4-D mask over q and k of different lengths"
    if form == GQA_FORM:
        why = f"causal window without sinks or padding; {why}"
    if form == SPLIT_FORM:
        why = window_split.why(seq, wins_, is_causal)
    window_blocked.record_form("sliding_window_attention", form, why)
    if form == BLOCKED_FORM:
        wins = [int(window)] if head_windows is None else [int(w) for w in head_windows]
        pad = key_padding_mask
        if rank == 4:
            pad = window_blocked.diagonal_padding(pad)
        return window_blocked.blocked_onnx(q, k, v, wins, num_sinks, is_causal, scale, pad,
                                           same_length=same, padding_is_bool=pad is None or
                                           key_padding_mask.dtype == 9)  # BOOL
    if form == SPLIT_FORM:
        return window_split.split_onnx(q, k, v, wins_, num_sinks, is_causal, scale,
                                       key_padding_mask, seq, same)
    if form == GQA_FORM:
        return _gqa_local(q, k, v, window, scale)
    i = as_rows(positions(seq_len(q)))  # (Sq, 1)
    j = as_cols(positions(seq_len(k)))  # (1, Skv)
    dist = op.Sub(i, j)
    sink = op.Less(j, i64(num_sinks))
    w = i64(window) if head_windows is None else head_ints(head_windows, 1 << 62)  # (H, 1, 1)
    if is_causal:
        local = op.And(op.GreaterOrEqual(dist, i64(0)), op.Less(dist, w))
        vis = op.And(op.Or(local, sink), op.LessOrEqual(j, i))
    else:
        vis = op.Or(op.Less(op.Abs(dist), w), sink)
    vis = with_padding(vis, key_padding_mask)  # (B|1, H|1, Sq, Skv)
    return attention_with_mask(q, k, v, vis, scale, zero_unseen=key_padding_mask is not None)
