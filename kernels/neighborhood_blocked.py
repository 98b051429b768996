"""Blocked 2-D/3-D neighborhood attention for `attnc::neighborhood_attention`: only the halos.

NATTEN (masks.py) on an N-D grid after `num_global` global tokens. Per axis a (extent L, kernel
K, dilation d, stride s), query coordinate x lies in group g = x mod d at x' = x div d and sees
the in-group window [start(x'), end(x')) of masks.natten_window; start and end never decrease
in x'. So a tile of T consecutive in-group coordinates [t, t + T) of one group sees keys of that
group in [start(t), end(t + T - 1)): at most T + K + s - 2 of them, the axis halo. The N-D tile
is the product of one axis tile per axis (T = prod T_a queries), its halo the product of the axis
halos (H = prod H_a keys), and its in-tile mask the AND of the per-axis masks (each a tiny
(tiles_a, T_a, H_a) table), so nothing of size S x S is ever built. Each tile also sees the
`num_global` global keys; the global queries attend to every key (a dense row each).

Scores per tile: T x (num_global + H), against S x S for the masked-dense form (64x64 grid,
13x13 window, 8x8 tiles: 64 x 404 per tile, 10x fewer). GQA: the g query heads of a KV head
share its halo and are folded into the tile (g T rows); per-head kernel sizes (-1: the whole
axis) make the halo cover the widest head and the in-tile mask per head. A key padding mask is
gathered like the keys; a row that sees no key gives zeros (reference.masked_attention).

`blocked_attention` is the torch form (the op's path off CUDA when `blocked_pays`), built on SDPA
per tile; neighborhood_blocked_onnx.py the ONNX forms (Gather of the tiles and halos, the
in-tile scores capped by a Min or a fused `Attention` with a bias; the global rows dense;
dynamic batch, the sequence fixed by the grid). The plan (index tables) depends only on the
static grid arguments and is cached. 1-D grids are left to the 1-D blocked form."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from attnc.kernels import masks

TILES = {1: (64,), 2: (8, 8), 3: (4, 4, 4)}
FORM = ("blocked neighborhood (grid tiles Gather their key halo + global keys; capped in-tile "
        "mask, float32 tiles in Loop steps; fused Attention with a padding mask)")
DENSE_FORM = "Attention(opset 23) + in-graph Range/Div/Mod neighborhood mask"


class Plan(NamedTuple):
    qtok: torch.Tensor  # (nt, T) query token of each tile slot (padded slots repeat one)
    keys: torch.Tensor  # (nt, K) key tokens: the num_global globals, then the halo
    axis_vis: list[torch.Tensor]  # per axis (Hk, nt_a, T_a, H_a) bool
    inv: torch.Tensor  # (prod grid,) flat tile slot of each grid token
    tiles: tuple[int, ...]  # T_a
    halos: tuple[int, ...]  # H_a
    ntiles: tuple[int, ...]  # nt_a
    unseen: bool  # some real query row sees no key (without padding)
    diag: bool  # every token's pattern contains itself (a 4-D mask's diagonal is its padding)


def _axis_plan(L: int, ks: tuple[int, ...], d: int, s: int, causal: bool, tile: int):
    """(qc (nt, T), kc (nt, H), vis (Hk, nt, T, H)) raw coordinates and the mask on one axis."""
    qs, los, his = [], [], []
    kt = torch.tensor(ks)[:, None]  # (Hk, 1)
    for g in range(d):
        lg = (L - g + d - 1) // d
        for t0 in range(0, lg, tile):
            xi = torch.arange(t0, min(t0 + tile, lg))
            x = xi * d + g
            _, start, end = masks.natten_window(x[None, :].expand(len(ks), -1), L, kt, d, s,
                                                causal)
            qs.append((g, lg, F.pad(xi, (0, tile - len(xi)), value=int(xi[-1]))))
            los.append(int(start.min()))
            his.append(int(end.max()))
    halo = max(h - lo for lo, h in zip(los, his, strict=True))
    qc, kc, kvalid = [], [], []
    for (g, lg, xi), lo in zip(qs, los, strict=True):
        lo = max(0, min(lo, lg - halo))
        c = torch.arange(lo, lo + halo)
        kvalid.append(c < lg)
        qc.append(xi * d + g)
        kc.append(c.clamp(max=lg - 1) * d + g)
    qc, kc, kvalid = torch.stack(qc), torch.stack(kc), torch.stack(kvalid)  # (nt, T), (nt, H)
    vis = torch.stack([masks.natten_axis_visible(qc[:, :, None], kc[:, None, :], L, k, d, s,
                                                 causal) for k in ks])  # (Hk, nt, T, H)
    diag = all(bool(masks.natten_axis_visible(x, x, L, k, d, s, causal).all())
               for k in ks for x in (torch.arange(L),))
    return qc, kc, vis & kvalid[None, :, None, :], diag


def _outer(parts: list[torch.Tensor], strides: list[int]) -> torch.Tensor:
    """sum_a parts[a] * strides[a] on the outer product of (n_a, m_a) tables: (prod n, prod m)."""
    n = len(parts)
    tot = 0
    for a, (p, st) in enumerate(zip(parts, strides, strict=True)):
        shape = [1] * (2 * n)
        shape[a], shape[n + a] = p.shape
        tot = tot + p.reshape(shape) * st
    return tot.reshape(math.prod(p.shape[0] for p in parts), -1)


def plan(grid: tuple[int, ...], heads: tuple[tuple[int, ...], ...], dilation: tuple[int, ...],
         stride: tuple[int, ...], causal: tuple[bool, ...], num_global: int,
         tiles: tuple[int, ...] | None = None) -> Plan:
    """The cached index tables of one grid and kernel set (`heads`: Hk kernel tuples), query
    tiles `tiles` (default TILES)."""
    tiles = tuple(min(t, L) for t, L in zip(tiles or TILES[len(grid)], grid, strict=True))
    return _plan(grid, heads, dilation, stride, causal, num_global, tiles)


@functools.lru_cache(maxsize=32)
def _plan(grid, heads, dilation, stride, causal, num_global, tiles) -> Plan:
    n = len(grid)
    strides = [math.prod(grid[a + 1:]) for a in range(n)]
    axes = [_axis_plan(grid[a], tuple(h[a] for h in heads), dilation[a], stride[a],
                       bool(causal[a]), tiles[a]) for a in range(n)]
    qtok = _outer([x[0] for x in axes], strides)  # (nt, T)
    halo = _outer([x[1] for x in axes], strides)  # (nt, H)
    nt, t = qtok.shape
    glob = torch.arange(num_global).expand(nt, num_global)
    keys = torch.cat([glob, halo + num_global], 1)  # (nt, ng + H)
    # the real slot of each grid token: a padded slot repeats a real token, the first wins
    inv = torch.full((math.prod(grid),), -1, dtype=torch.long)
    slots = torch.arange(nt * t)
    flat = qtok.flatten()
    inv[flat.flip(0)] = slots.flip(0)
    vis = axis_product([x[2] for x in axes])  # (Hk, nt, T, H)
    unseen = num_global == 0 and not bool(vis.any(-1).all())
    return Plan(qtok + num_global, keys, [x[2] for x in axes], inv, tiles,
                tuple(x[1].shape[1] for x in axes), tuple(x[0].shape[0] for x in axes), unseen,
                all(x[3] for x in axes))


def axis_product(vs: list[torch.Tensor]) -> torch.Tensor:
    """AND of per-axis (Hk, nt_a, T_a, H_a) masks -> (Hk, prod nt, prod T, prod H)."""
    n = len(vs)
    out = None
    for a, v in enumerate(vs):
        shape = [v.shape[0]] + [1] * (3 * n)
        shape[1 + a], shape[1 + n + a], shape[1 + 2 * n + a] = v.shape[1:]
        out = v.reshape(shape) if out is None else out & v.reshape(shape)
    hk = out.shape[0]
    sizes = [math.prod(out.shape[1 + i * n:1 + (i + 1) * n]) for i in range(3)]
    return out.reshape(hk, *sizes)


def _args(grid, heads, dilation, stride, is_causal):
    return (tuple(int(x) for x in grid), tuple(tuple(int(x) for x in h) for h in heads),
            tuple(int(x) for x in dilation), tuple(int(x) for x in stride),
            tuple(bool(x) for x in is_causal))


def blocked_pays(seq: int | None, grid, heads, dilation, stride, is_causal,
                 num_global: int = 0) -> bool:
    """The cost rule: blocked when the grid has 2-3 axes, is known, S >= 512 and S >= 2 (ng + H)
    (H the tile halo): a tile's T x (ng + H) scores against T x S dense, with the gathers and
    the per-tile launches costing about another such block (benchmarks/onnx_patterns.py: ORT
    CPU 0.98x at a 16x16 grid, 7x7 window, 1.5x at 32x32)."""
    if len(grid) < 2 or any(int(x) < 1 for x in grid):
        return False
    p = plan(*_args(grid, heads, dilation, stride, is_causal), int(num_global))
    s = num_global + math.prod(grid) if seq is None else seq
    return s >= 2 * p.keys.shape[1] and s >= 512


def _vis6(p: Plan, hkv: int, g: int, device) -> torch.Tensor:
    """(1, Hkv|1, nt, g|1, T, K) in-tile mask with the global keys in front."""
    vis = axis_product([v.to(device) for v in p.axis_vis])  # (Hk, nt, T, H)
    hk, nt, t, _ = vis.shape
    ng = p.keys.shape[1] - vis.shape[-1]
    vis = torch.cat([vis.new_ones(hk, nt, t, ng), vis], -1)
    if hk == 1:
        return vis[:, None, :, None]
    return vis.view(hkv, g, nt, t, -1).transpose(1, 2)[None]


@functools.lru_cache(maxsize=32)
def _cached(args, num_global, tiles, hkv, g, device, dtype):
    p = plan(*args, num_global, tiles)
    vis = _vis6(p, hkv, g, device)
    return p, vis, _bias(vis, 1, hkv, g, dtype)


def _bias(vis, b, hkv, g, dtype):
    """vis (B|1, Hkv|1, nt, g|1, T, K) -> SDPA's (B*Hkv | 1, nt, g*T, K) bool mask and bias."""
    _, _, nt, _, t, kk = vis.shape
    b, hkv = (b, hkv) if vis.shape[0] > 1 or vis.shape[1] > 1 else (1, 1)
    mask = vis.expand(b, hkv, nt, g, t, kk).reshape(b * hkv, nt, g * t, kk)
    return mask, torch.zeros((), dtype=dtype, device=vis.device).masked_fill(~mask, -math.inf)


def blocked_attention(q, k, v, grid, heads, dilation, stride, is_causal, scale=None,
                      key_padding_mask: torch.Tensor | None = None, num_global: int = 0,
                      tiles: tuple[int, ...] | None = None) -> torch.Tensor:
    """Neighborhood attention, tiled. q (B, Hq, S, D), k/v (B, Hkv, S, D), S = num_global +
    prod(grid) (grid resolved, no -1); `heads`: [kernel] or one kernel per query head;
    key_padding_mask (B|1, S) bool (True = real) or None."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    args = _args(grid, heads, dilation, stride, is_causal)
    tiles = tuple(tiles or TILES[len(args[0])])
    p, vis, (mask, bias) = _cached(args, int(num_global), tiles, hkv, g, str(q.device), q.dtype)
    qtok, keys = p.qtok.to(q.device), p.keys.to(q.device)
    nt, t = qtok.shape
    kk = keys.shape[1]
    qb = q.index_select(2, qtok.flatten()).view(b, hkv, g, nt, t, d).transpose(2, 3)
    qb = qb.reshape(b * hkv, nt, g * t, d)  # (B*Hkv, nt, g*T, D)
    kw = k.index_select(2, keys.flatten()).view(b * hkv, nt, kk, d)
    vw = v.index_select(2, keys.flatten()).view(b * hkv, nt, kk, d)
    unseen = p.unseen
    kpm = None
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=q.device, dtype=torch.bool)
        real = kpm[:, keys]  # (B|1, nt, K)
        mask, bias = _bias(vis & real[:, None, :, None, None, :], b, hkv, g, q.dtype)
        unseen = True
    elif b > 1 and mask.shape[0] == hkv > 1:  # per-head kernels: one mask per (b, kv head)
        mask, bias = (x.expand(b, *x.shape).reshape(b * hkv, *x.shape[1:]) for x in (mask, bias))
    out = F.scaled_dot_product_attention(qb, kw, vw, attn_mask=bias, scale=scale)
    if unseen:  # rows that see no key give zeros (SDPA gives NaN)
        out = torch.where(mask.any(-1, keepdim=True), out, 0.0)
    out = out.view(b, hkv, nt, g, t, d).transpose(2, 3).reshape(b, hq, nt * t, d)
    out = out.index_select(2, p.inv.to(q.device))  # (B, Hq, prod grid, D)
    if num_global:
        gm = None if kpm is None else kpm[:, None, None, :]  # (B|1, 1, 1, S)
        go = F.scaled_dot_product_attention(q[:, :, :num_global], k, v, attn_mask=gm,
                                            scale=scale, enable_gqa=g > 1)
        if gm is not None:
            go = torch.where(gm.any(-1, keepdim=True), go, 0.0)
        out = torch.cat([go, out], 2)
    return out.to(q.dtype).contiguous()


def _static(shape, axes) -> bool:
    try:
        return all(isinstance(shape[a], int) for a in axes)
    except (TypeError, IndexError):
        return False


def onnx_form(seq: int | None, grid, heads, dilation, stride, is_causal, num_global: int = 0,
              mask_rank: int | None = None) -> str | None:
    """FORM when the translation emits the blocked form at length `seq` (the static length, or
    the build's target length): a known 2-D/3-D grid, a padding mask that is a (B|1, S) key
    padding mask or a 4-D mask whose diagonal is one, and `blocked_pays`; else None."""
    if len(grid) < 2 or any(int(x) < 1 for x in grid) or mask_rank not in (None, 2, 4):
        return None
    if not blocked_pays(seq, grid, heads, dilation, stride, is_causal, num_global):
        return None
    if mask_rank == 4 and not plan(*_args(grid, heads, dilation, stride, is_causal),
                                   int(num_global)).diag:
        return None
    return FORM


def export_form(seq: int | None, grid, heads, dilation, stride, is_causal, num_global: int = 0,
                mask_rank: int | None = None) -> str:
    """The ONNX form the op's translation emits at length `seq` (static, or the build's target
    length), `heads` as reference.head_kernels gives them: the 1-D blocked form on one axis, the
    halo tiles on 2-3, else DENSE_FORM. The sparse pass's cost model calls the same selection."""
    from attnc.kernels import neighborhood1d_blocked as nb1d

    if len(grid) == 1:
        return nb1d.onnx_form(seq, [int(h[0]) for h in heads], int(dilation[0]), int(stride[0]),
                              int(num_global), mask_rank) or DENSE_FORM
    return onnx_form(seq, grid, heads, dilation, stride, is_causal, num_global,
                     mask_rank) or DENSE_FORM


def why_form(seq: int | None, grid, heads, dilation, stride, is_causal, num_global: int,
             mask_rank: int | None, form: str) -> str:
    if form == FORM:
        return f"length {seq}: grid {list(grid)} tiles score only their halos (cost rule)"
    if mask_rank not in (None, 2, 4):
        return f"a {mask_rank}-D mask: masked dense"
    p = plan(*_args(grid, heads, dilation, stride, is_causal), int(num_global))
    if mask_rank == 4 and not p.diag:
        return "a 4-D mask whose diagonal is not the padding: masked dense"
    return (f"length {seq} < max(512, 2 x {p.keys.shape[1]} keys per tile): masked dense "
            f"(onnxruntime-cpu cost rule)")


def translate(q, k, v, grid, kernel_size, dilation, stride, is_causal, scale=None,
              key_padding_mask=None, num_global: int = 0, head_kernel_size=None):
    """The blocked ONNX graph of the op when `onnx_form` picks it, else None (masked dense)."""
    from attnc.kernels import reference, window_blocked

    if not (_static(q.shape, (1, 3)) and _static(k.shape, (1,))):
        return None
    gl = [int(x) for x in grid] or [-1]
    if -1 in gl:  # inferred from a static length only
        if not _static(q.shape, (2,)):
            return None
        gl = masks.resolve_grid(gl, int(q.shape[2]) - int(num_global))
    if len(gl) < 2:  # one axis: neighborhood1d_blocked's form (it records its own choice)
        return None
    heads = reference.head_kernels(kernel_size, head_kernel_size, int(q.shape[1]), len(gl))
    seq = int(q.shape[2]) if _static(q.shape, (2,)) else window_blocked.seq_hint()
    rank = None if key_padding_mask is None else len(key_padding_mask.shape)
    form = export_form(seq, gl, heads, dilation, stride, is_causal, num_global, rank)
    window_blocked.record_form("neighborhood_attention", form, why_form(
        seq, gl, heads, dilation, stride, is_causal, num_global, rank, form))
    if form != FORM:
        return None
    pad = key_padding_mask
    if rank == 4:
        pad = window_blocked.diagonal_padding(pad)
    from attnc.kernels import neighborhood_blocked_onnx as nbo

    return nbo.blocked_onnx(q, k, v, gl, heads, dilation, stride, is_causal, scale, pad,
                            int(num_global), key_padding_mask is None or
                            key_padding_mask.dtype == 9)  # BOOL
