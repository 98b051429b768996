"""Mask predicates of attnc's sparse patterns, as plain torch functions.

One definition of each pattern, used by the references, the block lists the Triton kernels walk,
and the FlexAttention `mask_mod`s of the benchmarks (the functions take integer tensors of any
broadcastable shape and use only elementwise ops). The ONNX translations mirror the same
integer arithmetic with ONNX ops.

Neighborhood attention follows NATTEN exactly (see ../shared/specs/sparse_patterns.md 5a): per axis
with extent L, kernel K, dilation d, stride s, a token x lies in dilation group g = x mod d at
in-group coordinate x' = x div d; the group has L_g = ceil((L - g) / d) tokens;
  non-causal: c0 = min((x' div s) s + s div 2, L_g - 1), c = clamp(c0, K div 2, L_g - 1 - w_r),
              window [c - K div 2, c + w_r] with w_r = K div 2 + K mod 2 - 1 (shifted, not shrunk);
  causal:     c0 = min((x' div s) s + s - 1, L_g - 1), window [max(c0 - K + 1, 0), x'].
A key is visible iff it is in the same group and inside the window, on every axis.
Tokens of an N-D grid (L0, L1, L2) are flattened row-major.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from attnc.errors import KernelError

# ---------------------------------------------------------------- neighborhood (NATTEN)


def resolve_grid(grid: Sequence[int], seq_len: int) -> list[int]:
    """The token grid with one -1 entry (or an empty grid) inferred from the sequence length."""
    g = [int(x) for x in grid] or [-1]
    if g.count(-1) > 1 or any(x == 0 or x < -1 for x in g):
        raise KernelError(f"grid {list(grid)} is invalid: positive sizes and at most one -1")
    known = math.prod(x for x in g if x != -1)
    if -1 in g:
        if seq_len % known:
            raise KernelError(f"sequence length {seq_len} is not divisible by grid {list(grid)}")
        g[g.index(-1)] = seq_len // known
    if math.prod(g) != seq_len:
        raise KernelError(f"grid {g} has {math.prod(g)} tokens but the sequence has {seq_len}")
    return g


def check_natten_args(grid, kernel_size, dilation, stride, is_causal, whole_ok=False) -> None:
    """NATTEN's argument checks; `whole_ok` also accepts kernel size -1 (the whole axis)."""
    n = len(grid)
    if not 1 <= n <= 3:
        raise KernelError(f"neighborhood attention needs a 1-D, 2-D or 3-D grid, got {list(grid)}")
    for name, val in (("kernel_size", kernel_size), ("dilation", dilation), ("stride", stride),
                      ("is_causal", is_causal)):
        if len(val) != n:
            raise KernelError(f"{name} {list(val)} must have one entry per grid axis ({n})")
    for L, K, d, s in zip(grid, kernel_size, dilation, stride, strict=True):
        if K < 1 and not (K == -1 and whole_ok) or d < 1 or s < 1:
            raise KernelError(f"kernel_size, dilation and stride must be >= 1, got {K}, {d}, {s}")
        if K * d > L:
            raise KernelError(f"kernel_size {K} x dilation {d} exceeds the axis extent {L}")
        if s > (K if K > 0 else L):
            raise KernelError(f"stride {s} exceeds kernel_size {K}")


def natten_window(x: torch.Tensor, L: int, K, d: int, s: int, causal: bool):
    """(group, start, end) of query coordinates `x` on one axis; the window is [start, end) in
    in-group coordinates. K may be a tensor broadcastable with x (per head); K = -1 is the whole
    dilation group (NATTEN with K = L_g: the dense head)."""
    g = x % d
    xi = x // d
    lg = (L - g + d - 1) // d
    if isinstance(K, torch.Tensor) or K < 0:
        K = torch.where(torch.as_tensor(K, device=x.device) < 0, lg, K)
    wl = K // 2
    wr = K // 2 + K % 2 - 1
    if causal:
        c0 = torch.minimum((xi // s) * s + (s - 1), lg - 1)
        start = torch.clamp(c0 - (K - 1), min=0)
        end = xi + 1
    else:
        c0 = torch.minimum((xi // s) * s + s // 2, lg - 1)
        c = torch.minimum(torch.clamp(c0, min=wl), lg - 1 - wr)
        start = c - wl
        end = c + wr + 1
    return g, start, end


def natten_axis_visible(xq, xk, L: int, K: int, d: int, s: int, causal: bool) -> torch.Tensor:
    g, start, end = natten_window(xq, L, K, d, s, causal)
    xki = xk // d
    return (xk % d == g) & (xki >= start) & (xki < end)


def grid_coords(tok: torch.Tensor, grid: Sequence[int]) -> list[torch.Tensor]:
    """Row-major coordinates of flat token indices on `grid`."""
    coords = []
    for size in reversed(grid):
        coords.append(tok % size)
        tok = tok // size
    return coords[::-1]


def natten_visible(qtok, ktok, grid, kernel_size, dilation, stride, is_causal) -> torch.Tensor:
    """Neighborhood-attention predicate on flat token indices (any broadcastable shapes)."""
    vis = None
    qc, kc = grid_coords(qtok, grid), grid_coords(ktok, grid)
    for a in range(len(grid)):
        m = natten_axis_visible(qc[a], kc[a], grid[a], kernel_size[a], dilation[a], stride[a],
                                bool(is_causal[a]))
        vis = m if vis is None else vis & m
    return vis


def natten_mask(grid, kernel_size, dilation, stride, is_causal, device="cpu") -> torch.Tensor:
    """Dense (S, S) bool mask (True = attend) of neighborhood attention on `grid`."""
    check_natten_args(grid, kernel_size, dilation, stride, is_causal)
    t = torch.arange(math.prod(grid), device=device)
    return natten_visible(t[:, None], t[None, :], grid, kernel_size, dilation, stride, is_causal)


# ---------------------------------------------------------------- sliding window + sinks


def sliding_window_visible(i, j, window: int, num_sinks: int, causal: bool) -> torch.Tensor:
    """Causal: 0 <= i - j < window, or j < num_sinks (j <= i). Bidirectional: |i - j| < window,
    or j < num_sinks (sinks are global keys every query sees)."""
    sink = j < num_sinks
    if causal:
        return (j <= i) & ((i - j < window) | sink)
    return ((i - j).abs() < window) | sink


def sliding_window_mask(sq: int, skv: int, window: int, num_sinks: int, causal: bool,
                        device="cpu") -> torch.Tensor:
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(skv, device=device)[None, :]
    return sliding_window_visible(i, j, window, num_sinks, causal)  # (Sq, Skv)


# ---------------------------------------------------------------- padding, global tokens, heads
#
# The pattern ops also take (1) a key padding mask (B, Skv), True = real token: padded keys are
# excluded on top of the pattern, and a query row left with no key gives zeros (out 0, lse -inf,
# as reference.masked_attention defines it); (2) `num_global` prefix tokens (CLS, registers,
# BOS) that every query sees and that see everything, the grid starting after them; (3) one
# window / kernel size per query head, -1 meaning unbounded (a dense head).


def head_values(value, num_heads: int, groups: Sequence[int] | None = None) -> list[int]:
    """One int per head from an int (every head), a sequence of num_heads values, or one value
    per head group with `groups[h]` the group of head h."""
    if isinstance(value, int):
        return [value] * num_heads
    vals = [int(v) for v in value]
    if groups is not None:
        if len(groups) != num_heads or any(not 0 <= g < len(vals) for g in groups):
            raise KernelError(f"head groups {list(groups)} do not map {num_heads} heads onto "
                              f"{len(vals)} group values")
        return [vals[g] for g in groups]
    if len(vals) != num_heads:
        raise KernelError(f"{len(vals)} per-head values for {num_heads} heads")
    return vals


def mask_allowed(attn_mask: torch.Tensor) -> torch.Tensor:
    """A bool mask (True = attend) as is; a float mask (Hugging Face: 0 = attend, finfo.min or
    -inf = masked, anything <= -1e4 counts as masked) as bool. A float mask whose attended
    entries are not 0 carries a bias, which the pattern ops do not take: KernelError."""
    if attn_mask.dtype == torch.bool:
        return attn_mask
    if not attn_mask.is_floating_point():
        raise KernelError(f"mask dtype {attn_mask.dtype} is neither bool nor float")
    allowed = attn_mask > -1e4
    if bool((attn_mask.masked_fill(~allowed, 0) != 0).any()):
        raise KernelError("the float mask adds a bias to the scores, which a pattern op drops",
                          hint="keep this site dense")
    return allowed


def key_padding_mask(attn_mask: torch.Tensor, batch: int, sq: int, skv: int,
                     pattern: Callable | None = None,
                     chunk_elems: int = 1 << 26) -> torch.Tensor | None:
    """The (B, Skv) key padding mask (True = real key) that `attn_mask` is, or None.

    A 2-D (B|1, Skv) mask is one already. A mask broadcastable to (B, H|1, Sq, Skv) (the mask a
    Hugging Face model builds) is one when, on the pattern's support, it only masks key
    columns: allowed[b, h, i, j] == real[b, j] wherever pattern(i, j) holds (`pattern(i, j)`
    takes (r, 1) and (1, Skv) int64 positions and returns a bool broadcastable to
    (H|1, r, Skv); None: every pair), so masking the keys gives the full mask's attention
    exactly (a causal mask on a causal pattern, a padding mask on any pattern)."""
    allowed = mask_allowed(attn_mask)
    if allowed.dim() == 2:
        if allowed.shape[-1] != skv or allowed.shape[0] not in (1, batch):
            return None
        return allowed.expand(batch, skv)
    if allowed.dim() > 4:
        return None
    a = allowed.reshape((1,) * (4 - allowed.dim()) + tuple(allowed.shape))
    try:
        torch.broadcast_shapes(a.shape, (batch, a.shape[1], sq, skv))
    except RuntimeError:
        return None
    a = a.expand(batch, a.shape[1], sq, skv)
    j = torch.arange(skv, device=a.device)[None, :]
    rows = max(1, chunk_elems // max(batch * a.shape[1] * skv, 1))

    def chunks():
        for r0 in range(0, sq, rows):
            i = torch.arange(r0, min(r0 + rows, sq), device=a.device)[:, None]
            p = torch.ones((), dtype=torch.bool) if pattern is None else pattern(i, j)
            yield a[:, :, r0:r0 + rows] & p.to(a.device), p

    real = torch.zeros(batch, skv, dtype=torch.bool, device=a.device)
    for m, _ in chunks():
        real |= m.any(1).any(1)
    for m, p in chunks():
        if not bool((m == (real[:, None, None, :] & p.to(a.device))).all()):
            return None
    return real


def resolve_padding(attn_mask: torch.Tensor | None, batch: int, sq: int, skv: int,
                    pattern: Callable | None = None) -> torch.Tensor | None:
    """`key_padding_mask`, raising KernelError when the mask is more than key padding."""
    if attn_mask is None:
        return None
    kpm = key_padding_mask(attn_mask, batch, sq, skv, pattern)
    if kpm is None:
        raise KernelError(f"the attention mask {tuple(attn_mask.shape)} is not a key padding "
                          f"mask on this pattern ({batch}, {sq}, {skv})",
                          hint="a pattern op takes only padding masks: keep this site dense")
    return kpm


def pad_keys(allowed: torch.Tensor, kpm: torch.Tensor | None) -> torch.Tensor:
    """`allowed` (..., Sq, Skv) with the padded keys of kpm (B, Skv) excluded: (B, ..., Sq, Skv)."""
    if kpm is None:
        return allowed
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    return allowed & kpm[:, None, None, :].to(allowed.device)


def with_global(vis: torch.Tensor, qtok, ktok, num_global: int) -> torch.Tensor:
    """`vis` plus global tokens: query or key index < num_global sees / is seen by all."""
    if num_global <= 0:
        return vis
    return vis | (qtok < num_global) | (ktok < num_global)


def natten_heads_visible(qtok, ktok, grid, head_kernels, dilation, stride, is_causal,
                         num_global: int = 0) -> torch.Tensor:
    """Neighborhood attention with per-head kernel sizes (H lists, -1 = the whole axis) on the
    grid after `num_global` global tokens: (H, *broadcast(qtok, ktok)) bool."""
    kt = torch.as_tensor(head_kernels, dtype=torch.long, device=qtok.device)  # (H, ndim)
    kt = kt.reshape(kt.shape[0], len(grid), *([1] * max(qtok.dim(), ktok.dim())))
    qt, ktt = qtok - num_global, ktok - num_global
    vis = natten_visible(qt.clamp(min=0), ktt.clamp(min=0), grid, list(kt.unbind(1)),
                         dilation, stride, is_causal)
    return with_global(vis & (qt >= 0) & (ktt >= 0), qtok, ktok, num_global)


def natten_heads_mask(grid, head_kernels, dilation, stride, is_causal, num_global: int = 0,
                      device="cpu") -> torch.Tensor:
    """Dense (H, S, S) bool mask of `natten_heads_visible`, S = num_global + prod(grid)."""
    for ks in head_kernels:
        check_natten_args(grid, ks, dilation, stride, is_causal, whole_ok=True)
    t = torch.arange(num_global + math.prod(grid), device=device)
    return natten_heads_visible(t[:, None], t[None, :], grid, head_kernels, dilation, stride,
                                is_causal, num_global)


def sliding_window_heads_mask(sq: int, skv: int, windows: Sequence[int], num_sinks: int,
                              causal: bool, device="cpu") -> torch.Tensor:
    """(H, Sq, Skv) bool mask of a sliding window per head (-1: dense head) + sinks."""
    w = torch.as_tensor(windows, dtype=torch.long, device=device)
    w = torch.where(w < 0, sq + skv + 1, w)[:, None, None]
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(skv, device=device)[None, :]
    return sliding_window_visible(i, j, w, num_sinks, causal)


# ---------------------------------------------------------------- block layouts


def block_layout_mask(layout: torch.Tensor, block_size: int, sq: int, skv: int,
                      causal: bool = False) -> torch.Tensor:
    """Expand a (B|1, H|1, nq, nkv) bool block layout to a dense (B|1, H|1, Sq, Skv) mask."""
    i = torch.arange(sq, device=layout.device) // block_size
    j = torch.arange(skv, device=layout.device) // block_size
    m = layout[:, :, i][:, :, :, j]  # (B|1, H|1, Sq, Skv)
    if causal:
        kk = torch.arange(skv, device=layout.device)
        m = m & (kk[None, :] <= torch.arange(sq, device=layout.device)[:, None])
    return m


def check_layout(layout: torch.Tensor, block_size: int, sq: int, skv: int) -> None:
    if layout.dtype != torch.bool or layout.dim() != 4:
        raise KernelError(f"block layout must be a 4-D bool tensor, got {layout.dtype} "
                          f"{tuple(layout.shape)}")
    need = (-(-sq // block_size), -(-skv // block_size))
    if tuple(layout.shape[2:]) != need:
        raise KernelError(f"block layout has {tuple(layout.shape[2:])} blocks, the sequence "
                          f"lengths ({sq}, {skv}) with block_size {block_size} need {need}")


def power_attention_layout(n_blocks: int, local_blocks: int = 5, sink_blocks: int = 1,
                           device="cpu") -> torch.Tensor:
    """PowerAttention (arXiv 2503.03588): causal; block distance < local_blocks, a power of two,
    or a sink block. Returns (1, 1, n, n) bool."""
    qb = torch.arange(n_blocks, device=device)[:, None]
    kb = torch.arange(n_blocks, device=device)[None, :]
    delta = qb - kb
    pow2 = (delta > 0) & ((delta & (delta - 1)) == 0)
    m = (delta >= 0) & ((delta < local_blocks) | pow2 | (kb < sink_blocks))
    return m[None, None]


def local_stride_layout(n_blocks: int, local_blocks: int, vert_stride: int, causal: bool = True,
                        device="cpu") -> torch.Tensor:
    """Local + vertical-stride layout (Phi-3-small / ORT SparseAttention): block distance
    < local_blocks, or key block index + 1 divisible by vert_stride. Returns (1, 1, n, n) bool."""
    qb = torch.arange(n_blocks, device=device)[:, None]
    kb = torch.arange(n_blocks, device=device)[None, :]
    m = ((qb - kb).abs() < local_blocks) | ((kb + 1) % vert_stride == 0)
    if causal:
        m = m & (kb <= qb)
    return m[None, None]


def random_layout(n_q: int, n_kv: int, density: float, heads: int = 1, seed: int = 0,
                  device="cpu") -> torch.Tensor:
    """A seeded random (1, heads, n_q, n_kv) layout with the diagonal always kept."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(1, heads, n_q, n_kv, generator=g) < density
    d = torch.arange(min(n_q, n_kv))
    m[:, :, d, d] = True
    return m.to(device)


# ---------------------------------------------------------------- FlexAttention mask_mods


def natten_mask_mod(grid, kernel_size, dilation, stride, is_causal):
    def mod(b, h, q, kv):
        return natten_visible(q, kv, grid, kernel_size, dilation, stride, is_causal)

    return mod


def sliding_window_mask_mod(window: int, num_sinks: int, causal: bool):
    def mod(b, h, q, kv):
        return sliding_window_visible(q, kv, window, num_sinks, causal)

    return mod


def block_sparse_mask_mod(layout: torch.Tensor, block_size: int, causal: bool = False):
    lay = layout

    def mod(b, h, q, kv):
        bb = b if lay.shape[0] > 1 else 0
        hh = h if lay.shape[1] > 1 else 0
        m = lay[bb, hh, q // block_size, kv // block_size]
        return (m & (kv <= q)) if causal else m

    return mod


# tile-level helpers (tile_any_all, compact_lists, natten_tile_*) live in tile_lists.py; their
# old names here still resolve
_MOVED = ("tile_any_all", "compact_lists", "natten_tile_any_all", "natten_tile_flags",
          "natten_tile_shape")


def __getattr__(name: str):
    if name in _MOVED:
        from attnc.kernels import tile_lists

        return getattr(tile_lists, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
