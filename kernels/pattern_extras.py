"""Triton forward of the pattern ops with a key padding mask, global tokens or per-head params.

    out[b, h, i] = sum_j softmax_j(scale * <q[b,h,i], k[b,h//g,j]> | allowed) v[b,h//g,j]
    allowed[b, h, i, j] = pattern_h(i, j) & real[b, j]
    lse[b, h, i] = log sum_{allowed j} exp(scale * <q, k>)      (natural log, float32)

Layout (B, H, S, D), last dim contiguous; K/V may have Hq // g heads (GQA). `real` (B, Skv) is
the key padding mask (True = real token); a row that sees no key returns zeros and lse = -inf
(reference.masked_attention). The patterns (masks.py):
  sliding       sliding window (one per head, -1 dense) + `num_sinks` sink keys, causal or not;
  neighborhood  NATTEN on a 1-D/2-D/3-D grid after `num_global` global tokens (every query sees
                them, they see every key), one kernel size per head (-1: the whole axis);
  block         a (B|1, H|1, nq, nkv) block layout, causal or not.

One small kernel per pattern, in the Triton tutorial's style, sharing the `@triton.jit`
helpers below: 1-D token tiles (BLOCK_M queries x BLOCK_N keys) walk FlexAttention-style lists
built on the host from the same masks.py predicates (per head where heads differ): `full` key
tiles need no pattern arithmetic, `partial` ones evaluate the pattern per element. Key tiles
with no real key (padding) are never multiplied. The padding-free, shared-parameter ops keep
the tuned kernel of flash.py (multi-dimensional neighborhood tiles); these kernels serve the
rest.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from attnc.errors import KernelError
from attnc.kernels import autotune, masks, tile_lists
from attnc.kernels.flash import LOG2E, _ieee, _prep, can_use_flash
from attnc.kernels.flash_kernels import _dot, _na_vis, _na_win

# ------------------------------------------------------------------ shared @triton.jit helpers


@triton.jit
def _ids(H, GROUP):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    return tl.program_id(0), b, h, h // GROUP


@triton.jit
def _tile_lists(FNUM, FIDX, PNUM, PIDX, b, h, m, snb, snh, sib, sih, NKL):
    # (number, first index pointer) of the full and the partial key tiles of query tile m
    lb = b * snb + h * snh + m
    ib = b * sib + h * sih + m.to(tl.int64) * NKL
    return tl.load(FNUM + lb), FIDX + ib, tl.load(PNUM + lb), PIDX + ib


@triton.jit
def _keys(n, KPM, b, skpb, SKV, BLOCK_N: tl.constexpr, HAS_KPM: tl.constexpr):
    # key tokens of key tile n, and which of them exist and are real (not padding)
    ktok = n * BLOCK_N + tl.arange(0, BLOCK_N)
    kvalid = ktok < SKV
    real = kvalid
    if HAS_KPM:
        real = real & (tl.load(KPM + b * skpb + ktok, mask=kvalid, other=0) != 0)
    return ktok, kvalid, real


@triton.jit
def _step(acc, l_i, m_i, q, kbase, vbase, skn, svn, ktok, kvalid, vis, offs_d, dmask, qk_scale,
          IEEE: tl.constexpr):
    # one online-softmax step (base 2) over one key tile; `vis` broadcasts to (BLOCK_M, BLOCK_N)
    k = tl.load(kbase + ktok[None, :] * skn + offs_d[:, None],
                mask=kvalid[None, :] & dmask[:, None], other=0.0)  # (D, BLOCK_N)
    qk = tl.where(vis, _dot(q, k, IEEE) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = tl.load(vbase + ktok[:, None] * svn + offs_d[None, :],
                mask=kvalid[:, None] & dmask[None, :], other=0.0)  # (BLOCK_N, D)
    if IEEE:
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _finish(OUT, LSE, acc, l_i, m_i, b, h, H, SQ, sob, soh, som, qtok, qvalid, offs_d, dmask):
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(OUT + b * sob + h * soh + qtok[:, None] * som + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=qvalid[:, None] & dmask[None, :])
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + (b * H + h) * SQ + qtok, lse, mask=qvalid)


@triton.jit
def _na_axis(xq, xk, L, K, DIL, ST, CAUSAL: tl.constexpr):
    # one axis of masks.natten_axis_visible; K = -1: the whole dilation group (a dense head)
    lg = (L - xq % DIL + DIL - 1) // DIL
    g, start, end = _na_win(xq, L, tl.where(K < 0, lg, K), DIL, ST, CAUSAL)
    return _na_vis(g, start, end, xk, DIL)


@triton.jit
def _natten_vis(qtok, ktok, NG, L0, L1, L2, K0, K1, K2, D0, D1, D2, S0, S1, S2,
                CA0: tl.constexpr, CA1: tl.constexpr, CA2: tl.constexpr, NDIM: tl.constexpr):
    # masks.natten_heads_visible: the row-major grid starts after NG global tokens
    qt = tl.maximum(qtok - NG, 0)
    kt = tl.maximum(ktok - NG, 0)
    vis = _na_axis(qt % L2, kt % L2, L2, K2, D2, S2, CA2)
    if NDIM >= 2:
        vis = vis & _na_axis((qt // L2) % L1, (kt // L2) % L1, L1, K1, D1, S1, CA1)
    if NDIM >= 3:
        vis = vis & _na_axis(qt // (L1 * L2), kt // (L1 * L2), L0, K0, D0, S0, CA0)
    vis = vis & (qtok >= NG)[:, None] & (ktok >= NG)[None, :]
    return vis | (qtok < NG)[:, None] | (ktok < NG)[None, :]


# ------------------------------------------------------------------ one kernel per pattern

@triton.jit
def _sliding_kernel(
    Q, K, V, O, LSE, KPM, WIN, FNUM, FIDX, PNUM, PIDX,  # noqa: E741
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, skpb, swh,
    snb, snh, sib, sih, NKL, H, GROUP, SQ, SKV, HEAD_D, qk_scale, NSINK,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    m, b, h, hk = _ids(H, GROUP)
    qtok = m * BLOCK_M + tl.arange(0, BLOCK_M)
    qvalid = qtok < SQ
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_D
    q = tl.load(Q + b * sqb + h * sqh + qtok[:, None] * sqm + offs_d[None, :],
                mask=qvalid[:, None] & dmask[None, :], other=0.0)
    kbase, vbase = K + b * skb + hk * skh, V + b * svb + hk * svh
    win = tl.load(WIN + h * swh)  # this head's window (a dense head: > Sq + Skv)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    nf, fb, npart, pb = _tile_lists(FNUM, FIDX, PNUM, PIDX, b, h, m, snb, snh, sib, sih, NKL)
    for i in range(0, nf):
        ktok, kvalid, real = _keys(tl.load(fb + i), KPM, b, skpb, SKV, BLOCK_N, HAS_KPM)
        if tl.max(real.to(tl.int32), 0) > 0:
            acc, l_i, m_i = _step(acc, l_i, m_i, q, kbase, vbase, skn, svn, ktok, kvalid,
                                  real[None, :], offs_d, dmask, qk_scale, IEEE)
    for i in range(0, npart):
        ktok, kvalid, real = _keys(tl.load(pb + i), KPM, b, skpb, SKV, BLOCK_N, HAS_KPM)
        if tl.max(real.to(tl.int32), 0) > 0:
            dist = qtok[:, None] - ktok[None, :]
            if IS_CAUSAL:
                vis = (dist >= 0) & ((dist < win) | (ktok < NSINK)[None, :])
            else:
                vis = (tl.abs(dist) < win) | (ktok < NSINK)[None, :]
            acc, l_i, m_i = _step(acc, l_i, m_i, q, kbase, vbase, skn, svn, ktok, kvalid,
                                  vis & real[None, :], offs_d, dmask, qk_scale, IEEE)
    _finish(O, LSE, acc, l_i, m_i, b, h, H, SQ, sob, soh, som, qtok, qvalid, offs_d, dmask)


@triton.jit
def _natten_kernel(
    Q, K, V, O, LSE, KPM, KS, FNUM, FIDX, PNUM, PIDX,  # noqa: E741
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, skpb, skh_ks,
    snb, snh, sib, sih, NKL, H, GROUP, SQ, HEAD_D, qk_scale, NG,
    L0, L1, L2, D0, D1, D2, S0, S1, S2,
    CA0: tl.constexpr, CA1: tl.constexpr, CA2: tl.constexpr, NDIM: tl.constexpr,
    HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    m, b, h, hk = _ids(H, GROUP)
    qtok = m * BLOCK_M + tl.arange(0, BLOCK_M)
    qvalid = qtok < SQ
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_D
    q = tl.load(Q + b * sqb + h * sqh + qtok[:, None] * sqm + offs_d[None, :],
                mask=qvalid[:, None] & dmask[None, :], other=0.0)
    kbase, vbase = K + b * skb + hk * skh, V + b * svb + hk * svh
    ks = KS + h * skh_ks  # this head's kernel size per axis (0, 1, 2)
    k0, k1, k2 = tl.load(ks), tl.load(ks + 1), tl.load(ks + 2)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    nf, fb, npart, pb = _tile_lists(FNUM, FIDX, PNUM, PIDX, b, h, m, snb, snh, sib, sih, NKL)
    for i in range(0, nf):
        ktok, kvalid, real = _keys(tl.load(fb + i), KPM, b, skpb, SQ, BLOCK_N, HAS_KPM)
        if tl.max(real.to(tl.int32), 0) > 0:
            acc, l_i, m_i = _step(acc, l_i, m_i, q, kbase, vbase, skn, svn, ktok, kvalid,
                                  real[None, :], offs_d, dmask, qk_scale, IEEE)
    for i in range(0, npart):
        ktok, kvalid, real = _keys(tl.load(pb + i), KPM, b, skpb, SQ, BLOCK_N, HAS_KPM)
        if tl.max(real.to(tl.int32), 0) > 0:
            vis = _natten_vis(qtok, ktok, NG, L0, L1, L2, k0, k1, k2, D0, D1, D2, S0, S1, S2,
                              CA0, CA1, CA2, NDIM)
            acc, l_i, m_i = _step(acc, l_i, m_i, q, kbase, vbase, skn, svn, ktok, kvalid,
                                  vis & real[None, :], offs_d, dmask, qk_scale, IEEE)
    _finish(O, LSE, acc, l_i, m_i, b, h, H, SQ, sob, soh, som, qtok, qvalid, offs_d, dmask)


@triton.jit
def _block_kernel(
    Q, K, V, O, LSE, KPM, LAY, FNUM, FIDX, PNUM, PIDX,  # noqa: E741
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, skpb,
    slb, slh, slq, slk, snb, snh, sib, sih, NKL, H, GROUP, SQ, SKV, HEAD_D, qk_scale, LBS,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    m, b, h, hk = _ids(H, GROUP)
    qtok = m * BLOCK_M + tl.arange(0, BLOCK_M)
    qvalid = qtok < SQ
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_D
    q = tl.load(Q + b * sqb + h * sqh + qtok[:, None] * sqm + offs_d[None, :],
                mask=qvalid[:, None] & dmask[None, :], other=0.0)
    kbase, vbase = K + b * skb + hk * skh, V + b * svb + hk * svh
    lbase = LAY + b * slb + h * slh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    nf, fb, npart, pb = _tile_lists(FNUM, FIDX, PNUM, PIDX, b, h, m, snb, snh, sib, sih, NKL)
    for i in range(0, nf):
        ktok, kvalid, real = _keys(tl.load(fb + i), KPM, b, skpb, SKV, BLOCK_N, HAS_KPM)
        if tl.max(real.to(tl.int32), 0) > 0:
            acc, l_i, m_i = _step(acc, l_i, m_i, q, kbase, vbase, skn, svn, ktok, kvalid,
                                  real[None, :], offs_d, dmask, qk_scale, IEEE)
    for i in range(0, npart):
        ktok, kvalid, real = _keys(tl.load(pb + i), KPM, b, skpb, SKV, BLOCK_N, HAS_KPM)
        if tl.max(real.to(tl.int32), 0) > 0:
            vis = tl.load(lbase + (qtok // LBS)[:, None] * slq + (ktok // LBS)[None, :] * slk,
                          mask=qvalid[:, None] & kvalid[None, :], other=0) != 0
            if IS_CAUSAL:
                vis = vis & (ktok[None, :] <= qtok[:, None])
            acc, l_i, m_i = _step(acc, l_i, m_i, q, kbase, vbase, skn, svn, ktok, kvalid,
                                  vis & real[None, :], offs_d, dmask, qk_scale, IEEE)
    _finish(O, LSE, acc, l_i, m_i, b, h, H, SQ, sob, soh, som, qtok, qvalid, offs_d, dmask)


# ------------------------------------------------------------------ host side


def _check(q, k, v, kpm):
    reason = can_use_flash(q, k, v)
    if reason is not None:
        raise KernelError(f"the pattern kernel cannot run: {reason}")
    if kpm is None:
        return None
    if kpm.dim() != 2 or kpm.shape[-1] != k.shape[2] or kpm.shape[0] not in (1, q.shape[0]):
        raise KernelError(f"key padding mask {tuple(kpm.shape)} is not (B, Skv) = "
                          f"({q.shape[0]}, {k.shape[2]})")
    return kpm.to(device=q.device, dtype=torch.bool).expand(q.shape[0], -1).to(
        torch.uint8).contiguous()  # (B, Skv)


def _lead_strides(lists):
    fnum, fidx = lists[0], lists[1]
    return (fnum.stride(0) if fnum.shape[0] > 1 else 0, fnum.stride(1) if fnum.shape[1] > 1
            else 0, fidx.stride(0) if fidx.shape[0] > 1 else 0,
            fidx.stride(1) if fidx.shape[1] > 1 else 0, fidx.shape[3])


def _head_lists(key, pred, heads: int, sq: int, skv: int, bm: int, bn: int, device):
    """Cached (1, H|1, ...) full/partial tile lists of a per-head predicate (H|1, r, c)."""
    def build():
        a, b = tile_lists.tile_any_all(pred, sq, skv, bm, bn, device,
                                  chunk_elems=max(1 << 20, (1 << 26) // max(heads, 1)))
        return tile_lists.compact_lists(a[None], b[None])

    return tile_lists._cached((*key, sq, skv, bm, bn, str(device)), build)


def _run(name, q, k, v, kpm, causal, key, launch, config):
    """Config choice (autotune.choose, one config under the interpreter), outputs, launch."""
    q, k, v = _prep(q), _prep(k), _prep(v)
    kpm = _check(q, k, v, kpm)

    def go(cfg, scale_l2):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
        if q.numel() and k.shape[2]:
            launch(q, k, v, out, lse, kpm, cfg, scale_l2)
        elif q.numel():  # no keys at all: every row sees nothing
            out.zero_()
            lse.fill_(float("-inf"))
        return out, lse

    cfg = config or autotune.choose(f"extras-{name}", q, k, causal, kpm is not None,
                                    lambda c: (lambda: go(c, LOG2E)[0]), extra=repr(key))
    return go, cfg


def _common(q, k, v, out, kpm, cfg):
    B, H, SQ, D = q.shape
    kp = kpm if kpm is not None else q.new_zeros(1, dtype=torch.uint8)
    return dict(
        args=(q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
              out.stride(2), kp.stride(0) if kpm is not None else 0),
        kpm=kp, grid=(triton.cdiv(SQ, cfg["BLOCK_M"]), B * H),
        meta=dict(HAS_KPM=kpm is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  BLOCK_D=max(16, triton.next_power_of_2(D)), IEEE=_ieee(q.dtype),
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
    )


def sliding_window_fwd(q, k, v, *, windows, num_sinks: int, causal: bool, scale: float,
                       key_padding_mask=None, config=None):
    """(out, lse): sliding window per head (`windows`: one int, or Hq ints, -1 dense) + sinks."""
    sq, skv, hq = q.shape[2], k.shape[2], q.shape[1]
    wins = [int(w) if w >= 0 else sq + skv + 1 for w in windows]
    if len(wins) not in (1, hq) or min(wins) < 1:
        raise KernelError(f"windows {list(windows)}: give 1 or {hq} windows >= 1 (-1: dense)")
    key = ("x-sliding", tuple(wins), int(num_sinks), bool(causal))

    def pred(i, j):
        w = torch.as_tensor(wins, device=i.device)[:, None, None]
        return masks.sliding_window_visible(i, j, w, num_sinks, causal)

    def launch(q, k, v, out, lse, kpm, cfg, s2):
        c = _common(q, k, v, out, kpm, cfg)
        lists = _head_lists(key, pred, len(wins), sq, skv, cfg["BLOCK_M"], cfg["BLOCK_N"],
                            q.device)
        win = torch.tensor(wins, device=q.device, dtype=torch.int32)
        _sliding_kernel[c["grid"]](q, k, v, out, lse, c["kpm"], win, *lists, *c["args"],
                                   1 if len(wins) > 1 else 0, *_lead_strides(lists), hq,
                                   hq // k.shape[1], sq, skv, q.shape[3], s2, int(num_sinks),
                                   IS_CAUSAL=bool(causal), **c["meta"])

    go, cfg = _run("sliding", q, k, v, key_padding_mask, causal, key, launch, config)
    return go(cfg, scale * LOG2E)


def neighborhood_fwd(q, k, v, *, grid, head_kernels, dilation, stride, is_causal,
                     num_global: int, scale: float, key_padding_mask=None, config=None):
    """(out, lse): NATTEN on `grid` (resolved) after `num_global` global tokens, `head_kernels`
    one list (shared) or Hq lists of per-axis kernel sizes (-1: the whole axis)."""
    s, hq, n = q.shape[2], q.shape[1], len(grid)
    if k.shape[2] != s or num_global + math.prod(grid) != s:
        raise KernelError(f"neighborhood attention needs Sq == Skv == {num_global} + "
                          f"prod({list(grid)}), got {s}, {k.shape[2]}")
    if len(head_kernels) not in (1, hq):
        raise KernelError(f"give 1 or {hq} kernel sizes, got {len(head_kernels)}")
    for ks in head_kernels:
        masks.check_natten_args(grid, ks, dilation, stride, is_causal, whole_ok=True)
    heads = [[int(x) for x in ks] for ks in head_kernels]
    key = ("x-natten", tuple(grid), tuple(map(tuple, heads)), tuple(dilation), tuple(stride),
           tuple(map(bool, is_causal)), int(num_global))

    def pred(i, j):
        return masks.natten_heads_visible(i, j, grid, heads, dilation, stride, is_causal,
                                          num_global)

    def p3(x, fill):
        return [fill] * (3 - n) + [int(y) for y in x]

    def launch(q, k, v, out, lse, kpm, cfg, s2):
        c = _common(q, k, v, out, kpm, cfg)
        lists = _head_lists(key, pred, len(heads), s, s, cfg["BLOCK_M"], cfg["BLOCK_N"],
                            q.device)
        ks = torch.tensor([p3(h, 1) for h in heads], device=q.device, dtype=torch.int32)
        ca = p3(is_causal, 0)
        _natten_kernel[c["grid"]](q, k, v, out, lse, c["kpm"], ks, *lists, *c["args"],
                                  3 if len(heads) > 1 else 0, *_lead_strides(lists), hq,
                                  hq // k.shape[1], s, q.shape[3], s2, int(num_global),
                                  *p3(grid, 1), *p3(dilation, 1), *p3(stride, 1),
                                  CA0=bool(ca[0]), CA1=bool(ca[1]), CA2=bool(ca[2]), NDIM=n,
                                  **c["meta"])

    go, cfg = _run("natten", q, k, v, key_padding_mask, False, key, launch, config)
    return go(cfg, scale * LOG2E)


def block_sparse_fwd(q, k, v, *, layout, block_size: int, causal: bool, scale: float,
                     key_padding_mask=None, config=None):
    """(out, lse): a (B|1, H|1, nq, nkv) block layout, causal or not, padded keys excluded."""
    from attnc.kernels.flash import Pattern, _layout_args

    sq, skv, hq = q.shape[2], k.shape[2], q.shape[1]
    masks.check_layout(layout, block_size, sq, skv)
    layout = layout.to(q.device)

    def launch(q, k, v, out, lse, kpm, cfg, s2):
        c = _common(q, k, v, out, kpm, cfg)
        lists = tile_lists.lists(Pattern("block", block_size=int(block_size)), sq, skv,
                                 cfg["BLOCK_M"], cfg["BLOCK_N"], layout, None, None, causal,
                                 q.device)
        lay, lsb = _layout_args(layout)
        _block_kernel[c["grid"]](q, k, v, out, lse, c["kpm"], lay, *lists, *c["args"], *lsb,
                                 *_lead_strides(lists), hq, hq // k.shape[1], sq, skv,
                                 q.shape[3], s2, int(block_size), IS_CAUSAL=bool(causal),
                                 **c["meta"])

    key = ("x-block", int(block_size), bool(causal), tuple(layout.shape))
    go, cfg = _run("block", q, k, v, key_padding_mask, causal, key, launch, config)
    return go(cfg, scale * LOG2E)
