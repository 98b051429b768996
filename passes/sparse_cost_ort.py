"""The sparse cost model's onnxruntime-cpu prices (passes/sparse_cost.py): each site priced as
the ONNX form the export emits at the build's target length, in the dense kernel's per-score
cost (`sparse_cost._cpu_dense`):

- the blocked window form (kernels/window_blocked.py): ORT_BLOCKED_EFF per score of the query
  blocks' key windows (+ sinks), ORT_PER_HEAD more with per-head windows, ORT_BLOCK_OVH per
  (batch, head, query block); the head-split form (kernels/window_split.py) per head group;
- the blocked 1-D neighborhood form (kernels/neighborhood1d_blocked.py), the same structure as
  the blocked window (query blocks of BQ gathering their key span): the same constants (an
  assumption: not timed apart);
- the 2-D/3-D halo tiles (kernels/neighborhood_blocked.py): ORT_NBHD_EFF per score of a tile's
  T x (global + halo) keys, ORT_NBHD_OVH per (batch, head, tile), the global rows dense;
- the gathered block-sparse form (kernels/block_sparse_gather.py): ORT_GATHER_EFF per score of
  a query block's bs x M bs keys (M: the fullest row of the whole layout, the index table's
  width), ORT_GATHER_OVH per (batch, head, query block);
- masked dense (opset-23 Attention + in-graph mask): every score, plus the mask built and
  applied: at most 1.0x.

Which form a site gets is the kernels' own selection (`sliding_window.onnx_form`,
`neighborhood_blocked.export_form`, `block_sparse_gather.export_form`), called by the pattern
constructors in sparse_cost.py at the target length: the cost model and the export never
disagree. Constants are read off the sparse_cost module at call time (fits set trial values
there)."""

from __future__ import annotations

from attnc.passes import sparse_cost as c


def _per_score(shape) -> float:
    return 4 * shape.head_dim / c.F_CPU + c.C_SOFTMAX  # the dense kernel's, as _cpu_dense


def _blocked_ort(shape, pattern) -> tuple[float, str] | None:
    """Seconds of the blocked window form where the export emits it (None elsewhere)."""
    from attnc.kernels import sliding_window as sw
    from attnc.kernels import window_blocked as wb

    if pattern.window is None or pattern.onnx_form == sw.DENSE_FORM:
        return None  # the export emits masked dense (a dense head, a short length, a mask)
    wins, ns, causal = pattern.window
    if not wb.blocked_pays(shape.seq, wins, causal):
        return None
    s, bq = shape.seq, wb.BQ
    keys = ns + min(s, bq + max(wins) - 1 if causal else bq + 2 * max(wins) - 2)
    nb = shape.batch * shape.heads * (-(-s // bq))
    eff = c.ORT_BLOCKED_EFF + (c.ORT_PER_HEAD if len(set(wins)) > 1 else 0.0)
    return _per_score(shape) * (eff * nb * bq * keys + c.ORT_BLOCK_OVH * nb), wb.FORM


def form_work(seq: int, form_args: tuple) -> tuple[str, float, float, float]:
    """(kind, scores, blocks, global-row scores) per (batch, head) of a tiled form:
    form_args ("nd", grid, heads, dilation, stride, causal, num_global), ("1d", kernels,
    dilation, stride, num_global) or ("gather", nq, block_size, M)."""
    kind = form_args[0]
    if kind == "nd":
        from attnc.kernels import neighborhood_blocked as nb

        _, grid, heads, dil, st, causal, ng = form_args
        p = nb.plan(grid, heads, dil, st, causal, ng)
        nt, t = p.qtok.shape
        return kind, float(nt * t * p.keys.shape[1]), float(nt), float(ng * seq)
    if kind == "1d":
        from attnc.kernels import neighborhood1d_blocked as nb1d

        _, kernels, d, st, ng = form_args
        lmax = -(-(seq - ng) // d)
        blocks = d * (-(-lmax // nb1d.BQ))
        w = min(nb1d.BQ + max(kernels) + st - 2, lmax)
        return kind, float(blocks * nb1d.BQ * (ng + w)), float(blocks), float(ng * seq)
    _, nq, bs, m = form_args
    return kind, float(nq * bs * m * bs), float(nq), 0.0


def _tiles_ort(shape, pattern) -> float | None:
    """Seconds of the 1-D blocked / 2-D-3-D halo-tile neighborhood or the gathered block-sparse
    form where the export emits it (the pattern carries form_args only then)."""
    if pattern.form_args is None:
        return None
    kind, scores, blocks, glob = form_work(shape.seq, pattern.form_args)
    if kind == "1d":
        eff = c.ORT_BLOCKED_EFF + (c.ORT_PER_HEAD if len(set(pattern.form_args[1])) > 1
                                   else 0.0)
        ovh = c.ORT_BLOCK_OVH
    elif kind == "nd":
        eff, ovh = c.ORT_NBHD_EFF, c.ORT_NBHD_OVH
    else:
        eff, ovh = c.ORT_GATHER_EFF, c.ORT_GATHER_OVH
    bh = shape.batch * shape.heads
    return _per_score(shape) * bh * (eff * scores + ovh * blocks + glob)


def _masked_ort(shape, kind: str, mask_heads: int) -> float:
    """Seconds of opset-23 Attention with an in-graph mask: every score, plus the mask built
    (per head with per-head parameters), applied, and ANDed with the padding."""
    s2 = float(shape.seq) ** 2
    build = c.MASK_OPS.get(kind, 8) * mask_heads * s2 * c.C_CPU_ELEM
    apply = shape.batch * shape.heads * s2 * c.C_CPU_ELEM  # the bool mask applied to each score
    pad = 0.0
    if shape.mask:  # AND with the padding mask, and the zero rows (ReduceMax, Cast, Where)
        pad = 4 * shape.batch * mask_heads * s2 * c.C_CPU_ELEM
    return c._cpu_dense(shape) + build + apply + pad


def _split_ort(shape, pattern) -> float | None:
    """Seconds of the head-split form (kernels/window_split.py) where the export emits it: per
    group of heads sharing a window, the blocked form or masked Attention on its slice, plus
    the Gathers of q/k/v and the Concat/Gather of the output (one copy each)."""
    from attnc.kernels import window_blocked as wb
    from attnc.kernels import window_split as split

    if pattern.window is None or pattern.onnx_form != split.FORM:
        return None
    wins, ns, causal = pattern.window
    t = 5 * shape.batch * shape.heads * shape.seq * shape.head_dim * c.C_CPU_ELEM
    t += c.ORT_SPLIT_EXCESS * c._cpu_dense(shape)
    for w, idx in split.groups(wins):
        sub = c.SiteShape(shape.seq, len(idx), shape.head_dim, causal, shape.batch, shape.mask)
        blocked = _blocked_ort(sub, c.PatternCost(
            "window", (), wb.FORM, True, 1, ((w,) * len(idx), ns, causal))) if w >= 0 else None
        t += blocked[0] if blocked is not None else _masked_ort(sub, "window", 1)
    return t


def ort(shape, pattern, density: float):
    """The onnxruntime-cpu Prediction of `pattern` at `shape`."""
    dense = c._cpu_dense(shape)

    def pred(t: float, form: str, note: str):
        return c.Prediction("onnxruntime-cpu", dense / t, dense * 1e3, t * 1e3, density, form,
                            note)

    if pattern.onnx_form.startswith("com.microsoft"):  # what an export of unknown length emits
        return pred(dense, pattern.onnx_form, "priced as dense: no gain measured")
    blocked = _blocked_ort(shape, pattern)
    if blocked is not None:
        return pred(blocked[0], blocked[1], "only the blocks' key windows are computed")
    tiles = _tiles_ort(shape, pattern)
    if tiles is not None:
        return pred(tiles, pattern.onnx_form, "only the tiles' halos / listed blocks are computed")
    split = _split_ort(shape, pattern)
    if split is not None:
        return pred(split, pattern.onnx_form, "windowed head groups computed blocked")
    return pred(_masked_ort(shape, pattern.kind, pattern.mask_heads), pattern.onnx_form,
                "every score is still computed")
