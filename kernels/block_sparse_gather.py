"""Gathered block-sparse attention for `attnc::block_sparse_attention`: only the listed blocks.

Layout (B|1, H|1, nq, nkv) bool, blocks of `bs` tokens. Per query block n, the key blocks the
layout lists go into an index table of M = max_n |row n| entries (the largest row count;
nq x M, never S x S): idx[n] = the listed blocks in increasing order, then unlisted ones as
padding, `valid[n, m]` saying which. Built by TopK on 2 nkv layout - j (listed blocks first,
ascending). Query block n then attends to the M bs keys of its gathered blocks with the in-tile
mask

    valid[n, m] & (key < Skv) & (key <= query if causal) & real[b, key]

(real: the key padding mask), so scores per block are bs x M bs against bs x Skv dense. A row
that sees no key gives zeros (reference.masked_attention). GQA: with a layout shared by every
head (H|1 = 1), the g query heads of a KV head fold into the query block; with one layout per
query head, K/V are gathered per query head.

`gather_attention` is the torch form (the op's path off CUDA when `gather_pays`), SDPA per
block, and `onnx_pays` the ONNX export's rule; `gather_onnx` the ONNX form (standard opset-23
ops: ReduceSum/TopK/GatherElements for the table, Gather or GatherND(batch_dims=2) for the
blocks, MatMul/Softmax; dynamic batch and sequence, M read from the layout at run time).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from onnxscript import opset23 as op

FORM = "gathered block-sparse (TopK index table of listed key blocks, Gather, MatMul/Softmax)"
DENSE_FORM = "Attention(opset 23) + in-graph block-layout mask"
MIN_SEQ = 512  # torch: below, the plain reference (one SDPA-sized matmul) wins
ONNX_MIN_BLOCKS = 2  # ONNX: the gathered form from 2 key blocks on


def gather_pays(skv: int | None, block_size: int, max_row: int | None = None) -> bool:
    """The torch cost rule (the op off CUDA): gathered when Skv >= MIN_SEQ (None: unknown,
    gathered), there are at least 4 key blocks, and the fullest row lists at most half the key
    blocks (`max_row`; None: unknown, gathered). Below 512 the gathered torch form's small ops
    lose to the reference (onnx_patterns.py torch rows: 0.1x SDPA at S = 128..256)."""
    if skv is not None and skv < MIN_SEQ:
        return False
    nkv = None if skv is None else -(-skv // block_size)
    if nkv is not None and nkv < 4:
        return False
    return max_row is None or nkv is None or 2 * max_row <= nkv


def onnx_pays(skv: int | None, block_size: int) -> bool:
    """The ONNX cost rule: gathered when the keys span at least ONNX_MIN_BLOCKS blocks (None:
    unknown, gathered). The masked-dense form is dense `Attention` plus an S x S mask built in
    the graph, never faster than dense and slower than the gathered form in every layout
    measured (benchmarks/onnx_patterns.py, ORT CPU 2 threads; gathered / masked vs dense: S=128
    one of 2 blocks 0.93x / 0.49x; S=256 one of 4 4.0x / 0.80x, two of 4 0.63x / 0.35x; S=1024
    two of 16 1.8-2.1x / 0.40-0.44x, 8 of 16 0.67x / 0.59x; S=4096 6 of 64 4.0-4.5x / 0.58-
    0.67x). The old S >= 512 kept the slower form at S = 256. A layout listing half the blocks
    is slower than dense in either form: the `sparse` pass keeps such a site dense."""
    return skv is None or -(-skv // block_size) >= ONNX_MIN_BLOCKS


def index_table(layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, valid), both (B|1, H|1, nq, M): listed key blocks first, ascending; M >= 1."""
    nkv = layout.shape[-1]
    m = max(int(layout.sum(-1).max()), 1) if layout.numel() else 1
    score = layout.long() * (2 * nkv) - torch.arange(nkv, device=layout.device)
    idx = score.topk(m, dim=-1).indices  # (B|1, H|1, nq, M)
    return idx, layout.gather(-1, idx)


def gather_attention(q, k, v, layout: torch.Tensor, block_size: int, causal: bool = False,
                     scale: float | None = None,
                     key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Block-sparse attention through the index table. q (B, Hq, Sq, D), k/v (B, Hkv, Skv, D),
    layout (B|1, Hq|1, nq, nkv) bool, key_padding_mask (B|1, Skv) bool (True = real) or None."""
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    bs = int(block_size)
    nq, nkv = -(-sq // bs), -(-skv // bs)
    lay = layout.to(q.device)
    idx, valid = index_table(lay)
    bl, hl, _, m = idx.shape
    shared = hl == 1
    he, gf = (hkv, hq // hkv) if shared else (hq, 1)  # heads K/V are gathered for, folded g
    kp = F.pad(k, (0, 0, 0, nkv * bs - skv))
    vp = F.pad(v, (0, 0, 0, nkv * bs - skv))
    if not shared and hq != hkv:  # one layout per query head: K/V per query head
        kp, vp = (x.repeat_interleave(hq // hkv, dim=1) for x in (kp, vp))
    kp = kp.reshape(b * he * nkv, bs, d)
    vp = vp.reshape(b * he * nkv, bs, d)
    base = (torch.arange(b, device=q.device)[:, None] * he
            + torch.arange(he, device=q.device)[None, :]) * nkv  # (B, He)
    flat = (base[:, :, None, None] + idx.expand(b, he, nq, m)).flatten()
    kw = kp.index_select(0, flat).view(b * he, nq, m * bs, d)
    vw = vp.index_select(0, flat).view(b * he, nq, m * bs, d)
    qb = F.pad(q, (0, 0, 0, nq * bs - sq)).view(b, he, gf, nq, bs, d).transpose(2, 3)
    qb = qb.reshape(b * he, nq, gf * bs, d)
    # in-tile mask (B|1, He|1, nq, 1, bs, M bs)
    kj = (idx[..., None] * bs + torch.arange(bs, device=q.device)).flatten(-2)  # (., nq, M bs)
    vis = valid.repeat_interleave(bs, -1) & (kj < skv)
    vis = vis[:, :, :, None, None, :]
    if causal:
        qi = torch.arange(nq * bs, device=q.device).view(nq, 1, bs, 1)
        vis = vis & (kj[:, :, :, None, None, :] <= qi)
    if key_padding_mask is not None:
        real = F.pad(key_padding_mask.to(device=q.device, dtype=torch.bool), (0, nkv * bs - skv))
        rg = real[:, kj]  # (B|1, Bl, Hl, nq, M bs)
        if bl > 1:  # a layout per batch: its own row
            bi = torch.arange(max(rg.shape[0], bl), device=q.device)
            rg = rg[bi % rg.shape[0], bi % bl]
        else:
            rg = rg[:, 0]
        vis = vis & rg[:, :, :, None, None, :]  # (B|1, Hl, nq, 1, bs|1, M bs)
    if vis.shape[0] == 1 and vis.shape[1] == 1:
        mask = vis.expand(1, 1, nq, gf, bs, m * bs).reshape(1, nq, gf * bs, m * bs)
    else:  # (B*He, nq, g bs, M bs)
        mask = vis.expand(b, he, nq, gf, bs, m * bs).reshape(b * he, nq, gf * bs, m * bs)
    bias = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~mask, -math.inf)
    out = F.scaled_dot_product_attention(qb, kw, vw, attn_mask=bias, scale=scale)
    out = torch.where(mask.any(-1, keepdim=True), out, 0.0)  # rows that see no key: zeros
    out = out.view(b, he, nq, gf, bs, d).transpose(2, 3).reshape(b, hq, nq * bs, d)
    return out[:, :, :sq].to(q.dtype).contiguous()


# ------------------------------------------------------------------ ONNX


def _c(x: int):
    return op.Constant(value_int=int(x))


def _ints(xs):
    return op.Constant(value_ints=[int(x) for x in xs])


def _len(t, axis: int):
    return op.Squeeze(op.Shape(t, start=axis, end=axis + 1), _ints([0]))


def gather_onnx(q, k, v, layout, block_size: int, causal: bool = False,
                scale: float | None = None, padding=None, padding_is_bool: bool = True):
    """The ONNX graph of `gather_attention`: q (B, Hq, Sq, D), k/v (B, Hkv, Skv, D) with static
    heads and head size, layout (B|1, Hq|1, nq, nkv) bool with a static head axis, `padding` a
    (B|1, Skv) key padding mask (bool, or float with masked entries <= -1e4) or None."""
    hq, d, hkv = int(q.shape[1]), int(q.shape[3]), int(k.shape[1])
    bl, hl = int(layout.shape[0]), int(layout.shape[1])
    bs = int(block_size)
    shared = hl == 1
    he, gf = (hkv, hq // hkv) if shared else (hq, 1)
    sq, skv = _len(q, 2), _len(k, 2)
    nq = op.Div(op.Add(sq, _c(bs - 1)), _c(bs))
    nkv = op.Div(op.Add(skv, _c(bs - 1)), _c(bs))
    # the index table: M = the fullest row, listed blocks first (ascending); the layout's
    # leading (nq, nkv) blocks serve a shorter sequence
    layout = op.Slice(layout, _ints([0, 0]), op.Concat(op.Unsqueeze(nq, _ints([0])),
                                                       op.Unsqueeze(nkv, _ints([0])), axis=0),
                      _ints([2, 3]))
    lay64 = op.Cast(layout, to=7)
    mrow = op.Max(op.ReduceMax(op.ReduceSum(lay64, _ints([-1]), keepdims=0), keepdims=0), _c(1))
    score = op.Sub(op.Mul(lay64, op.Mul(nkv, _c(2))), op.Range(_c(0), nkv, _c(1)))
    _, idx = op.TopK(score, op.Unsqueeze(mrow, _ints([0])), axis=-1, largest=1, sorted=1)
    valid = op.GatherElements(layout, idx, axis=3)  # (Bl, Hl, nq, M)

    def pad_keys(x):  # (B, Hkv, Skv, D) -> (B, He, nkv, bs, D)
        pads = op.Concat(_ints([0] * 6), op.Unsqueeze(op.Sub(op.Mul(nkv, _c(bs)), skv),
                                                      _ints([0])), _ints([0]), axis=0)
        x = op.Pad(x, pads)
        if not shared and hq != hkv:
            x = op.Expand(op.Unsqueeze(x, _ints([2])), _ints([1, 1, hq // hkv, 1, 1]))
        return op.Reshape(x, _ints([0, he, -1, bs, d]))

    kb, vb = pad_keys(k), pad_keys(v)
    bsz = op.Shape(q, start=0, end=1)
    bcast = op.Concat(bsz, _ints([he, 1, 1]), axis=0)
    gen = bl != 1 or not shared  # per batch or per head: GatherND
    if gen:
        ind = op.Unsqueeze(op.Expand(idx, bcast), _ints([-1]))  # (B, He, nq, M, 1)
        kw = op.GatherND(kb, ind, batch_dims=2)  # (B, He, nq, M, bs, D)
        vw = op.GatherND(vb, ind, batch_dims=2)
    else:
        idx2 = op.Reshape(idx, _ints([0, 0, 0, -1]))
        idx2 = op.Squeeze(idx2, _ints([0, 1]))  # (nq, M)
        kw = op.Gather(kb, idx2, axis=2)
        vw = op.Gather(vb, idx2, axis=2)
    kw = op.Reshape(kw, _ints([0, he, 0, -1, d]))  # (B, He, nq, M bs, D)
    vw = op.Reshape(vw, _ints([0, he, 0, -1, d]))
    pads = op.Concat(_ints([0] * 6), op.Unsqueeze(op.Sub(op.Mul(nq, _c(bs)), sq), _ints([0])),
                     _ints([0]), axis=0)
    qb = op.Reshape(op.Pad(q, pads), _ints([0, he, gf, -1, bs, d]))  # (B, He, g, nq, bs, D)
    qb = op.Reshape(op.Transpose(qb, perm=[0, 1, 3, 2, 4, 5]), _ints([0, he, -1, gf * bs, d]))
    sc = (1.0 / d ** 0.5) if scale is None else float(scale)
    qb = op.Mul(qb, op.CastLike(op.Constant(value_float=sc), q))
    s = op.MatMul(qb, op.Transpose(kw, perm=[0, 1, 2, 4, 3]))  # (B, He, nq, g bs, M bs)
    s = op.Reshape(s, _ints([0, he, 0, gf, bs, -1]))  # (B, He, nq, g, bs, M bs)
    # in-tile mask (Bl, Hl, nq, 1, bs, M bs)
    kj = op.Add(op.Unsqueeze(op.Mul(idx, _c(bs)), _ints([-1])), _ints(range(bs)))
    kj = op.Reshape(kj, _ints([0, 0, 0, -1]))  # (Bl, Hl, nq, M bs)
    vok = op.Reshape(op.Expand(op.Unsqueeze(valid, _ints([-1])), _ints([1, 1, 1, 1, bs])),
                     _ints([0, 0, 0, -1]))
    vis = op.And(vok, op.Less(kj, skv))
    vis = op.Unsqueeze(vis, _ints([3, 4]))  # (Bl, Hl, nq, 1, 1, M bs)
    kj6 = op.Unsqueeze(kj, _ints([3, 4]))
    if causal:
        qi = op.Add(op.Unsqueeze(op.Mul(op.Range(_c(0), nq, _c(1)), _c(bs)), _ints([1])),
                    _ints(range(bs)))  # (nq, bs)
        vis = op.And(vis, op.LessOrEqual(kj6, op.Unsqueeze(qi, _ints([1, 3]))))
    if padding is not None:
        if not padding_is_bool:
            padding = op.Greater(padding, op.CastLike(op.Constant(value_float=-1e4), padding))
        rp = op.Pad(padding, op.Concat(_ints([0, 0, 0]), op.Unsqueeze(
            op.Sub(op.Mul(nkv, _c(bs)), skv), _ints([0])), axis=0), op.Cast(_c(0), to=9))
        rp = op.Reshape(rp, _ints([0, -1, bs]))  # (B|1, nkv, bs)
        if gen:
            rp = op.Expand(op.Unsqueeze(rp, _ints([1])), op.Concat(bsz, _ints([he, 1, 1]),
                                                                   axis=0))
            real = op.GatherND(rp, op.Unsqueeze(op.Expand(idx, bcast), _ints([-1])),
                               batch_dims=2)  # (B, He, nq, M, bs)
            real = op.Reshape(real, _ints([0, 0, 0, -1]))
        else:
            real = op.Unsqueeze(op.Reshape(op.Gather(rp, idx2, axis=1), _ints([0, 0, -1])),
                                _ints([1]))  # (B|1, 1, nq, M bs)
        vis = op.And(vis, op.Unsqueeze(real, _ints([3, 4])))
    neg = op.CastLike(op.Constant(value_float=float("-inf")), s)
    zero = op.CastLike(op.Constant(value_float=0.0), s)
    p = op.Softmax(op.Add(s, op.Where(vis, zero, neg)), axis=-1)
    o = op.MatMul(op.Reshape(p, _ints([0, he, 0, gf * bs, -1])), vw)  # (B, He, nq, g bs, D)
    o = op.Reshape(o, _ints([0, he, 0, gf, bs, d]))
    seen = op.ReduceMax(op.Cast(vis, to=1), _ints([-1]), keepdims=1)  # a row may see nothing
    o = op.Where(op.Greater(seen, op.Constant(value_float=0.0)), o, zero)
    o = op.Reshape(op.Transpose(o, perm=[0, 1, 3, 2, 4, 5]), _ints([0, hq, -1, d]))
    return op.Slice(o, _ints([0]), op.Unsqueeze(sq, _ints([0])), _ints([2]))


def _static(shape, axes) -> bool:
    try:
        return all(isinstance(shape[a], int) for a in axes)
    except (TypeError, IndexError):
        return False


def onnx_form(skv: int | None, block_size: int, mask_rank: int | None = None) -> str | None:
    """FORM when the translation emits the gathered form for key length `skv` (static, or read
    off the layout's static block count), with no mask or a (B|1, Skv) key padding mask (a 4-D
    mask keeps the masked-dense form: a layout need not contain the diagonal); else None."""
    if mask_rank not in (None, 2) or not onnx_pays(skv, block_size):
        return None
    return FORM


def export_form(skv: int | None, block_size: int, mask_rank: int | None = None) -> str:
    """The ONNX form the block-sparse op's translation emits (onnx_form, else DENSE_FORM): the
    selection the sparse pass's cost model prices a site by."""
    return onnx_form(skv, block_size, mask_rank) or DENSE_FORM


def _why(skv: int | None, block_size: int, mask_rank: int | None, form: str) -> str:
    if form == FORM:
        return f"key length {skv}: the listed key blocks only (cost rule)"
    if mask_rank not in (None, 2):
        return f"a {mask_rank}-D mask: masked dense (a layout need not contain the diagonal)"
    return f"key length {skv} spans fewer than {ONNX_MIN_BLOCKS} blocks of {block_size}"


def translate(q, k, v, layout, block_size: int, is_causal: bool = False, scale=None,
              key_padding_mask=None):
    """The gathered ONNX graph of the op when `onnx_form` picks it, else None (masked dense)."""
    if not (_static(q.shape, (1, 3)) and _static(k.shape, (1,))
            and _static(layout.shape, (0, 1))):
        return None
    from attnc.kernels import window_blocked

    if _static(k.shape, (2,)):
        skv = int(k.shape[2])
    elif _static(layout.shape, (3,)):
        skv = int(layout.shape[3]) * int(block_size)
    else:
        skv = window_blocked.seq_hint()
    rank = None if key_padding_mask is None else len(key_padding_mask.shape)
    form = export_form(skv, block_size, rank)
    window_blocked.record_form("block_sparse_attention", form,
                               _why(skv, block_size, rank, form))
    if form != FORM:
        return None
    return gather_onnx(q, k, v, layout, block_size, is_causal, scale, key_padding_mask,
                       key_padding_mask is None or key_padding_mask.dtype == 9)  # BOOL
