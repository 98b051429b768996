"""The sparse pass's cost model: the predicted time of a pattern op against the dense attention
it replaces, at the build's target length, on the backend the build is for.

Each backend is priced by what it actually runs:

- ``cuda``: the dense site runs torch SDPA (FlashAttention). The pattern op runs attnc's Triton
  kernels over BLOCK_M x BLOCK_N tiles per (batch, head): tiles the pattern leaves empty are
  never visited, full tiles cost ``C_FULL``, partial tiles ``C_PARTIAL`` (the pattern evaluated
  per element), plus a launch overhead per call. Problems the op itself sends to SDPA with a dense
  bool mask (``kernels.autotune.dense_is_cheaper``: short or nearly dense ones) cost masked SDPA
  plus building the mask, which is slower than dense SDPA. A site with a mask (a Hugging Face
  padding mask) also pays, per call, the op's check that the mask only pads keys
  (``masks.resolve_padding``: two passes over B x Hm x S x S). ``C_FULL``, the SDPA figures and
  ``C_PARTIAL`` are fitted to ``benchmarks/results/kernels-nvidia-h100-80gb-hbm3.json``
  (``fit_cuda`` re-derives them); the overheads are stated assumptions, not measurements.
- ``onnxruntime-cpu``: each site is priced as the ONNX form the export emits at the target
  length (``kernels.sliding_window.onnx_form``, handed the target length by the pass). A
  sliding window where ``window_blocked.blocked_pays`` picks the blocked form (S > 2 (span +
  64), every head windowed) exports as blocked local attention: only the query blocks' key
  ranges and the sinks are scored, ``ORT_BLOCKED_EFF`` dense-score costs each, plus
  ``ORT_BLOCK_OVH`` dense-score costs per (batch, head, query block) (ORT's batched small
  GEMMs and their thread-pool dispatch: at 2 threads this is most of the form's time at
  S=2048), and with per-head windows ``ORT_PER_HEAD`` more per score (the (H, BQ, K) in-tile
  mask applied per head). A site whose heads differ exports the head-split form
  (``kernels/window_split.py``) where a group of heads runs blocked: each group priced on its
  slice (blocked or masked) plus ``ORT_SPLIT_EXCESS`` dense-site times (measured over the
  parts). Fitted (``fit_ort``) to ``benchmarks/onnx_sparse_cost.py`` at 2 ORT threads on this
  shared 2-core machine, two runs (the long LM's H=4, Hkv=2, D=48 at S=2048: windows 128-1024
  measured 4.38-1.53x and 2.98-1.13x, predicted 3.30-1.31x; the split sites 0.74-0.97x,
  predicted 0.85-0.87x; H=8, D=64, window 256 at S=4096: 5.37x, predicted 5.43x), the
  conservative end: the 1-thread runs measure more (blocked 256: 4.8x; split 1.25-1.41x).
  Neighborhood and block-sparse sites get the form their translation selects at the target length
  (``*_cost`` call ``neighborhood_blocked.export_form`` / ``block_sparse_gather.export_form``;
  priced in ``passes/sparse_cost_ort.py``). The masked-dense form is opset-23 ``Attention`` with
  an in-graph bool mask (Range/Sub/Less... over S x S): every score is still computed, and the
  mask is built and applied on top: at most 1.0x (a site mixing dense heads with windows, per-head
  mask: 0.62x predicted, 0.60x / 0.68x measured at 1 / 2 threads; windows of 1024 at 2048, where
  the blocked rule says no though the forced blocked form measures 1.5x: 0.83x predicted, 0.92x /
  1.00x measured). The ``GroupQueryAttention(local_window_size)`` form (causal window, no sinks,
  no padding mask) is priced as dense: no gain measured.
- ``torch-cpu``: the blocked window form likewise (SDPA per query block, against SDPA's causal
  kernel); otherwise the op runs its reference (``kernels/reference.py``): float32 scores
  materialised, the dense mask built and the padding checked, against SDPA's fused CPU kernel:
  at most 1.0x.

Tile counts come from the same ``kernels.masks`` predicates the ops run, evaluated on up to
``SAMPLE_TILES`` query tiles (all of them when there are fewer) and scaled to the whole sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Backend = Literal["onnxruntime-cpu", "cuda", "torch-cpu"]
BACKENDS: tuple[str, ...] = ("onnxruntime-cpu", "cuda", "torch-cpu")
Pred = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (r, 1), (1, S) -> (r, S) bool

# ---- cuda (H100 bf16, D = 128, 64 x 64 tiles; per (batch, head) tile)
BM, BN, D_REF = 64, 64, 128
C_FULL = 4.45e-9  # attnc dense S=8192 B2 H16: 2.334 ms / 524,288 tiles
C_PARTIAL = 22.0e-9  # fit_cuda: na1d w=2048 and sliding w=2048+4 sinks at S=32768
C_SDPA = 5.83e-9  # SDPA dense S=8192: 3.059 ms / 524,288 tiles
C_SDPA_CAUSAL = 6.46e-9  # SDPA causal S=8192: 1.707 ms / 264,192 visible tiles
C_SDPA_MASKED = 7.51e-9  # SDPA with a bool mask S=32768 H16: 31.47 ms / 4,194,304 tiles
OVH_SDPA = 10e-6  # assumption: one SDPA launch
OVH_ATTNC = 40e-6  # assumption: the op's Python launcher, cached tile lists, one launch
C_GPU_ELEM = 0.0015e-9  # assumption: one elementwise op on one bool element (~2 TB/s)
PAD_CHECK_OPS = 8  # resolve_padding: compare, and, any, equal over the mask, twice

# ---- cpu (2 threads, float32): assumptions of the order this machine shows
F_CPU = 30e9  # GEMM FLOP/s
C_SOFTMAX = 1.0e-9  # per score: max, exp, sum, scale
C_CPU_ELEM = 0.5e-9  # one elementwise op on one element (bool or int64 mask arithmetic)
MASK_OPS = {"window": 8, "neighborhood": 14, "block": 4}  # in-graph mask ops per S x S entry
REF_EXTRA = 3.0  # the reference's float32 score, masked_fill, logsumexp, exp, where passes
BLOCKED_EFF = 2.2  # blocked window form: per-score cost / dense kernel's (onnx_window, S>=2048)
BLOCKED_OVH = 0.4e-3  # assumption: ~40 small ONNX ops / torch calls of the blocked form
# onnxruntime-cpu blocked form, in dense-score costs (fit_ort over onnx_sparse_cost-*-t2.json)
ORT_BLOCKED_EFF = 1.05  # per score computed (fit_ort: 1.052; the 1-thread runs: ~1.3)
ORT_BLOCK_OVH = 26600.0  # per (batch, head, query block) (fit_ort: 26,608; 1 thread: ~2,000)
ORT_PER_HEAD = 0.94  # per score more with per-head windows (fit_ort: 0.941; 1 thread: 0.33)
ORT_SPLIT_EXCESS = 0.32  # head-split form: measured over its parts, in dense-site times (0.317)
# 2-D/3-D halo tiles and gathered block-sparse, in dense-score costs (fit_ort_patterns over
# benchmarks/results/onnx_patterns-*.json rows at S >= 1024 of the forms emitted now: the tiles'
# Loop form, idle Xeon, interleaved, default spinning (cautious); blocks: Xeon, EPYC)
ORT_NBHD_EFF = 0.805  # per score of a tile's halo (onnx_patterns-nbhd3-*; fused form: 2.967)
ORT_NBHD_OVH = 80300.0  # per (batch, head, tile) (fit: 80,299; the fused form: 34,200)
ORT_GATHER_EFF = 1.991  # per score of a query block's gathered key blocks (AMD alone: 1.43)
ORT_GATHER_OVH = 20370.0  # per (batch, head, query block) (AMD alone: 31,850)

SAMPLE_TILES = 24


@dataclass(frozen=True)
class SiteShape:
    """The attention call being priced, at the target length."""

    seq: int
    heads: int
    head_dim: int
    causal: bool
    batch: int = 1
    mask: bool = False  # the site carries a mask the op takes as key padding


@dataclass(frozen=True)
class PatternCost:
    """A pattern as the cost model sees it: per distinct head parameter, its predicate at the
    target length, how many heads share it (a None predicate: a dense head) and a hashable key
    naming the predicate (tile counts are cached on it; None: not cached)."""

    kind: str  # window | neighborhood | block
    heads: tuple[tuple[Pred | None, int, object], ...]
    onnx_form: str
    extras: bool  # padding mask, global tokens or per-head params: the 1-D-tile kernels
    mask_heads: int = 1  # heads of the in-graph ONNX mask (1 unless per-head parameters)
    window: tuple | None = None  # (windows, num_sinks, causal): a window the blocked form takes
    # the tiled ONNX form the export emits at the target length (sparse_cost_ort.form_work):
    # ("nd" | "1d" | "gather", ...) where it is a neighborhood/block-sparse blocked form, else None
    form_args: tuple | None = None


@dataclass(frozen=True)
class Prediction:
    backend: str
    speedup: float
    dense_ms: float
    pattern_ms: float
    density: float  # computed pairs / pairs the dense site computes, at the target length
    form: str  # what runs: the kernel, SDPA with a mask, the ONNX form, the reference
    note: str = ""

    def metrics(self) -> dict:
        return {"backend": self.backend, "predicted_speedup": round(self.speedup, 4),
                "dense_ms": round(self.dense_ms, 5), "pattern_ms": round(self.pattern_ms, 5),
                "density": round(self.density, 5), "runs_as": self.form}


def resolve_backend(backend: str) -> str:
    """`auto`: cuda where a CUDA device is present, else onnxruntime-cpu."""
    if backend != "auto":
        return backend
    return "cuda" if torch.cuda.is_available() else "onnxruntime-cpu"


# ------------------------------------------------------------------------------- tile counts


@dataclass(frozen=True)
class Tiles:
    full: float
    partial: float
    visible: float  # visible (query, key) pairs


def tile_counts(pred: Pred | None, sq: int, skv: int, bm: int = BM, bn: int = BN,
                sample: int = SAMPLE_TILES) -> Tiles:
    """Full and partial bm x bn tiles and visible pairs of one head's pattern (None: every pair),
    from up to `sample` evenly spaced query tiles, scaled to all of them."""
    nq, nk = -(-sq // bm), -(-skv // bn)
    if pred is None:
        return Tiles(float(nq * nk), 0.0, float(sq * skv))
    n = min(sample, nq)  # evenly spaced over all query tiles (every one when nq <= sample)
    picks = sorted({round(x * (nq - 1) / max(n - 1, 1)) for x in range(n)})
    cols = torch.arange(nk * bn)[None, :]
    full = part = vis = 0
    for t in picks:
        rows = torch.arange(t * bm, min((t + 1) * bm, sq))[:, None]
        m = pred(rows, cols.clamp(max=skv - 1)) & (cols < skv)  # (r, nk*bn)
        m = m.reshape(-1, rows.shape[0], nk * bn).any(0)  # a head-broadcast predicate
        tiles = m.reshape(rows.shape[0], nk, bn)
        a, b = tiles.any(-1).any(0), tiles.all(-1).all(0)
        if skv % bn:
            b[-1] = False
        full += int(b.sum())
        part += int((a & ~b).sum())
        vis += int(m.sum())
    scale = nq / len(picks)
    last = sq - (nq - 1) * bm  # the last tile's rows when scaling visible pairs
    rows_seen = sum(bm if t < nq - 1 else last for t in picks)
    return Tiles(full * scale, part * scale, vis * sq / rows_seen)


_TILES: dict[tuple, Tiles] = {}


def _counts(pred: Pred | None, key, seq: int) -> Tiles:
    if key is None or pred is None:
        return tile_counts(pred, seq, seq)
    k = (key, seq)
    if k not in _TILES:
        if len(_TILES) > 4096:
            _TILES.clear()
        _TILES[k] = tile_counts(pred, seq, seq)
    return _TILES[k]


def dense_pairs(seq: int, causal: bool) -> float:
    return seq * (seq + 1) / 2 if causal else float(seq * seq)


# ------------------------------------------------------------------------------- prediction


def predict(backend: str, shape: SiteShape, pattern: PatternCost) -> Prediction:
    """The pattern op's predicted time against the dense site's, at `shape.seq`."""
    backend = resolve_backend(backend)
    counts = [(_counts(p, key, shape.seq), n) for p, n, key in pattern.heads]
    visible = sum(t.visible * n for t, n in counts)
    density = visible / (dense_pairs(shape.seq, shape.causal) * shape.heads)
    if backend == "cuda":
        return _cuda(shape, pattern, counts, density)
    if backend == "onnxruntime-cpu":
        from attnc.passes.sparse_cost_ort import ort

        return ort(shape, pattern, density)
    if backend == "torch-cpu":
        return _torch_cpu(shape, pattern, density)
    raise ValueError(f"unknown backend {backend!r}")


def _sdpa_dense(shape: SiteShape) -> float:
    s, d = shape.seq, shape.head_dim / D_REF
    nt = -(-s // BM)
    tiles = nt * (nt + 1) / 2 if shape.causal else nt * nt
    c = C_SDPA_CAUSAL if shape.causal else C_SDPA
    return OVH_SDPA + c * shape.batch * shape.heads * tiles * d


def _pad_check(shape: SiteShape, per_elem: float) -> float:
    if not shape.mask:
        return 0.0
    return PAD_CHECK_OPS * shape.batch * shape.seq * shape.seq * per_elem


def _cuda(shape: SiteShape, pattern: PatternCost, counts, density: float) -> Prediction:
    from attnc.kernels import autotune

    dense = _sdpa_dense(shape)
    s, d = shape.seq, shape.head_dim / D_REF
    tile_density = sum((t.full + t.partial) * n for t, n in counts) / (
        shape.heads * (-(-s // BM)) * (-(-s // BN)))
    if autotune.dense_is_cheaper(s, s, tile_density):
        nt = -(-s // BM)
        build = MASK_OPS.get(pattern.kind, 8) * pattern.mask_heads * s * s * C_GPU_ELEM
        t = OVH_SDPA + build + C_SDPA_MASKED * shape.batch * shape.heads * nt * nt * d
        t += _pad_check(shape, C_GPU_ELEM)
        return Prediction("cuda", dense / t, dense * 1e3, t * 1e3, density,
                          "SDPA with a dense bool mask (the op's own small-problem route)")
    work = sum((t.full * C_FULL + t.partial * C_PARTIAL) * n for t, n in counts)
    t = OVH_ATTNC + shape.batch * work * d + _pad_check(shape, C_GPU_ELEM)
    form = "Triton kernel (1-D tile lists)" if pattern.extras else "Triton kernel"
    return Prediction("cuda", dense / t, dense * 1e3, t * 1e3, density, form)


def _cpu_dense(shape: SiteShape) -> float:
    pairs = shape.batch * shape.heads * float(shape.seq) ** 2  # CPU kernels compute every score
    return pairs * (4 * shape.head_dim / F_CPU + C_SOFTMAX)


def _blocked(shape: SiteShape, pattern: PatternCost) -> tuple[float, str] | None:
    """Seconds of the blocked window form (kernels/window_blocked.py) where the op and its ONNX
    translation pick it at this length (None elsewhere): query blocks of BQ times (sinks + the
    block's key range) scores, the K/V window gathers and the in-tile mask, at BLOCKED_EFF times
    the dense kernel's per-score cost (small batched GEMMs, a separate Softmax and bias Add)."""
    from attnc.kernels import window_blocked as wb

    if pattern.window is None:
        return None
    wins, ns, causal = pattern.window
    if not wb.blocked_pays(shape.seq, wins, causal):
        return None
    s, bq = shape.seq, wb.BQ
    keys = ns + min(s, bq + max(wins) - 1 if causal else bq + 2 * max(wins) - 2)
    scores = shape.batch * shape.heads * (-(-s // bq)) * bq * keys
    gathers = 2 * shape.batch * shape.heads * (-(-s // bq)) * keys * shape.head_dim
    mask = MASK_OPS["window"] * pattern.mask_heads * (-(-s // bq)) * bq * keys
    per = 4 * shape.head_dim / F_CPU + C_SOFTMAX + C_CPU_ELEM
    return BLOCKED_EFF * (scores * per + (gathers + mask) * C_CPU_ELEM) + BLOCKED_OVH, wb.FORM


def _torch_cpu(shape: SiteShape, pattern: PatternCost, density: float) -> Prediction:
    dense = _cpu_dense(shape)
    blocked = _blocked(shape, pattern)
    if blocked is not None:  # against SDPA, whose CPU kernel skips the causal upper half
        dense = dense / 2 if shape.causal else dense
        return Prediction("torch-cpu", dense / blocked[0], dense * 1e3, blocked[0] * 1e3, density,
                          "the op's blocked torch form (SDPA per query block)",
                          "only the blocks' key windows are computed")
    s2 = float(shape.seq) ** 2
    pairs = shape.batch * shape.heads * s2
    build = MASK_OPS.get(pattern.kind, 8) * pattern.mask_heads * s2 * C_CPU_ELEM
    t = dense + pairs * REF_EXTRA * C_CPU_ELEM + build + _pad_check(shape, C_CPU_ELEM)
    return Prediction("torch-cpu", dense / t, dense * 1e3, t * 1e3, density,
                      "the op's reference (dense float32 scores and mask)",
                      "every score is still computed")


def _window(w: int, sinks: int, causal: bool, masks) -> Pred:
    return lambda i, j: masks.sliding_window_visible(i, j, w, sinks, causal)


def window_cost(windows: Sequence[int], num_sinks: int, causal: bool, onnx_form: str,
                extras: bool) -> PatternCost:
    """A sliding window per head (-1 or None: a dense head) as a PatternCost."""
    from attnc.kernels import masks

    groups: dict[int, int] = {}
    for w in windows:
        groups[w] = groups.get(w, 0) + 1
    # a dense head (-1) of a causal op is causal: priced over the lower triangle, not S x S
    heads = tuple((None if w < 0 and not causal else _window(w if w >= 0 else 1 << 62,
                                                              num_sinks, causal, masks), n,
                   ("window", w, num_sinks, causal)) for w, n in groups.items())
    per_head = len(groups) > 1
    return PatternCost("window", heads, onnx_form, extras, len(windows) if per_head else 1,
                       (tuple(int(w) for w in windows), int(num_sinks), bool(causal)))


def neighborhood_cost(grid: Sequence[int], kernels: Sequence[Sequence[int]], dilation, stride,
                      is_causal, num_global: int, extras: bool, seq: int | None = None,
                      mask_rank: int | None = None) -> PatternCost:
    """NATTEN on `grid` after `num_global` global tokens, one kernel per head (-1 entries: the
    whole axis; a kernel of all -1: a dense head), priced as the ONNX form the op's translation
    emits at length `seq` with a mask of `mask_rank` (None: no mask):
    `neighborhood_blocked.export_form`, the translation's own selection."""
    from attnc.kernels import masks
    from attnc.kernels import neighborhood1d_blocked as nb1d
    from attnc.kernels import neighborhood_blocked as nb

    groups: dict[tuple[int, ...], int] = {}
    for ks in kernels:
        groups[tuple(ks)] = groups.get(tuple(ks), 0) + 1

    def pred(ks):
        if all(k < 0 for k in ks) and not any(is_causal):  # a dense head; causal ones stay causal
            return None
        return lambda i, j: masks.natten_heads_visible(i, j, list(grid), [list(ks)], dilation,
                                                       stride, is_causal, num_global)[0]

    key = ("neighborhood", tuple(grid), tuple(dilation), tuple(stride), tuple(is_causal),
           num_global)
    heads = tuple((pred(ks), n, (*key, ks)) for ks, n in groups.items())
    per_head = len(groups) > 1
    op_heads = [list(k) for k in kernels] if per_head else [list(kernels[0])]  # head_kernels
    args = nb._args(grid, op_heads, dilation, stride, is_causal)
    form = nb.export_form(seq, *args, int(num_global), mask_rank)
    fa = None
    if form == nb.FORM:
        fa = ("nd", *args, int(num_global))
    elif form == nb1d.FORM:
        fa = ("1d", tuple(h[0] for h in args[1]), args[2][0], args[3][0], int(num_global))
    return PatternCost("neighborhood", heads, form, extras, len(kernels) if per_head else 1,
                       form_args=fa)


def block_cost(layout: torch.Tensor, block_size: int, causal: bool, extras: bool,
               heads: int, mask_rank: int | None = None) -> PatternCost:
    """A (1, H|1, n, n) block layout over `heads` heads (a head whose blocks are all kept and
    not causal counts as dense), priced as the ONNX form the op's translation emits for it
    (`block_sparse_gather.export_form` at the layout's n blocks, as the translation reads a
    dynamic key length off the layout) with a mask of `mask_rank` (None: no mask)."""
    from attnc.kernels import block_sparse_gather as bsg

    groups: dict[bytes, tuple[torch.Tensor, int]] = {}
    for h in range(layout.shape[1]):
        key = layout[0, h].numpy().tobytes()
        lay, n = groups.get(key, (layout[0, h], 0))
        groups[key] = (lay, n + (heads if layout.shape[1] == 1 else 1))

    def pred(lay):
        if bool(lay.all()) and not causal:
            return None

        def p(i, j):
            qb = (i[:, 0] // block_size).clamp(max=lay.shape[0] - 1)
            kb = (j[0] // block_size).clamp(max=lay.shape[1] - 1)
            m = lay[qb][:, kb]  # (r, S)
            return (m & (j <= i)) if causal else m

        return p

    heads = tuple((pred(lay), n, ("block", k, tuple(lay.shape), block_size, causal))
                  for k, (lay, n) in groups.items())
    n = layout.shape[-1]
    form = bsg.export_form(n * block_size, block_size, mask_rank)
    m = max(int(layout.sum(-1).max()), 1) if layout.numel() else 1  # the index table's width
    fa = ("gather", layout.shape[-2], int(block_size), m) if form == bsg.FORM else None
    return PatternCost("block", heads, form, extras, layout.shape[1] if len(groups) > 1 else 1,
                       form_args=fa)


def fmt_speedup(x: float) -> str:
    return f"{x:.2f}x" if math.isfinite(x) else "n/a"
