"""Attention statistics (attnc.graph.stats) against a dense float64 reference: the full softmax
matrix with every mask applied, on small odd shapes (GQA, padding, causal and bidirectional,
bool and float masks, tiles smaller than the sequence), the Triton path under the interpreter,
the S = 8192 memory bound, and the collector on a tiny Hugging Face Llama with right padding
against the eager model's attention probabilities."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import hf_models
import numpy as np
import pytest
import torch
from attnc.kernels import masks

from attnc.errors import PassError
from attnc.graph import stats_patterns as P
from attnc.graph.stats import (
    ColumnSumAccumulator,
    KeptMassAccumulator,
    column_sums,
    head_output_norms,
    kept_mass,
)
from attnc.graph.stats_collect import StatsSpec, collect_site_stats

ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster than two (and much faster on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ the dense reference


def _inputs(B, Hq, Hkv, S, D, kind, seed=0, skv=None):
    """q, k, the site's attn_mask / is_causal, and the real-token mask (right padding)."""
    g = torch.Generator().manual_seed(seed)
    skv = S if skv is None else skv
    q = torch.randn(B, Hq, S, D, generator=g)
    k = torch.randn(B, Hkv, skv, D, generator=g)
    lengths = [S] + [max(1, S - 3 - 2 * b) for b in range(1, B)]
    real = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]  # (B, S)
    causal = torch.arange(skv)[None, :] <= torch.arange(S)[:, None]
    mask, is_causal = None, False
    if kind == "is_causal":  # SDPA's flag, padding given as key_padding_mask
        is_causal = True
    elif kind == "bool":  # HF style: causal and padding in one (B, 1, S, S) bool mask
        mask = (causal[None] & real[:, None, :])[:, None]
    elif kind == "float":  # bidirectional, padding at the float minimum plus a per-head bias
        bias = torch.randn(1, Hq, S, skv, generator=g)
        mask = torch.where(real[:, None, None, :], bias, torch.finfo(torch.float32).min)
    elif kind != "none":
        raise KeyError(kind)
    return q, k, mask, is_causal, real


def _dense(q, k, mask, is_causal, real, scale=None, softcap=None):
    """(p (B, H, Sq, Skv) float64, allowed, valid rows (B, H, Sq)) the slow, obvious way."""
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    kx = k.repeat_interleave(H // k.shape[1], dim=1).double()
    s = q.double() @ kx.transpose(-1, -2) * (scale or 1 / math.sqrt(D))
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    allowed = torch.ones(B, H, Sq, Skv, dtype=torch.bool)
    if mask is not None and mask.dtype == torch.bool:
        allowed &= mask
    elif mask is not None:
        s = s + mask.double()
        allowed &= mask > torch.finfo(mask.dtype).min
    if is_causal:
        allowed &= torch.arange(Skv)[None, :] <= torch.arange(Sq)[:, None]
    if real is not None and Skv == real.shape[1]:
        allowed &= real[:, None, None, :]
    s = s.masked_fill(~allowed, -math.inf)
    ok = allowed.any(-1)
    p = torch.where(ok[..., None], torch.softmax(torch.where(ok[..., None], s, 0.0), -1), 0.0)
    valid = ok & (real[:, None, :] if real is not None else True)
    return p, allowed, valid


def _ref_kept(p, allowed, valid, pattern, quantile=0.05):
    """Per head: mean, p-quantile (rank ceil(p N)), min and density of `pattern` (B|1, H|1, Sq,
    Skv)."""
    kept = (p * pattern).sum(-1)  # (B, H, Sq)
    both = (allowed & pattern).sum(-1).double()
    H = p.shape[1]
    out = {k: np.zeros(H) for k in ("mean", "quantile", "min", "density")}
    for h in range(H):
        v = kept[:, h][valid[:, h]]
        srt = torch.sort(v).values
        out["mean"][h] = float(v.mean())
        out["min"][h] = float(srt[0])
        out["quantile"][h] = float(srt[max(math.ceil(quantile * v.numel()), 1) - 1])
        vh = valid[:, h]
        out["density"][h] = float(both[:, h][vh].sum() / allowed[:, h].sum(-1)[vh].sum())
    return out


def _per_head_fn(b, h, q, kv):  # a bare predicate with a per-head pattern
    return ((kv % 3) == 0) | (h == 1) | (kv == q)


def _patterns(S, causal):
    """(candidate, dense (1|B, 1|H, S, S) mask) pairs for sequence length S."""
    out = []
    for w, n in ((1, 0), (4, 2), (16, 0)):
        c = P.window(w, n, causal)
        out.append((c, masks.sliding_window_mask(S, S, w, n, causal)))
    c = P.neighborhood([-1], 5, dilation=2, is_causal=causal)
    out.append((c, masks.natten_visible(torch.arange(S)[:, None], torch.arange(S)[None, :],
                                        [S], [5], [2], [1], [causal])))
    if (S - 1) % 4 == 0 and S > 8:  # a 2-D grid after one global token (a CLS)
        grid = [(S - 1) // 4, 4]
        na = masks.natten_mask(grid, [3, 3], [1, 1], [1, 1], [False, False])
        full = torch.ones(S, S, dtype=torch.bool)
        full[1:, 1:] = na
        out.append((P.neighborhood([-1, 4], 3, num_global=1), full))
    nb = -(-S // 4)
    out.append((P.block_sparse("power", 4, local_blocks=2),
                masks.block_layout_mask(masks.power_attention_layout(nb, 2, 1), 4, S, S, True)))
    out.append((P.block_sparse("local-stride", 4, causal=causal, local_blocks=1, vert_stride=3),
                masks.block_layout_mask(masks.local_stride_layout(nb, 1, 3, causal), 4, S, S,
                                        causal)))
    h = torch.arange(4)[:, None, None]
    i, j = torch.arange(S)[None, :, None], torch.arange(S)[None, None, :]
    out.append((_per_head_fn, _per_head_fn(0, h, i, j)[None]))
    return out


def _check(res, name, ref, atol=ATOL):
    got = res[name]
    for key in ("mean", "min", "density"):
        np.testing.assert_allclose(getattr(got, key), ref[key], atol=atol, rtol=0,
                                   err_msg=f"{name} {key}")
    true, est = ref["quantile"], got.quantile
    assert np.all(est <= true + 1e-6), (name, est, true)
    assert np.all(est >= true - 0.033 * (1 - true) - 1e-6), (name, est, true)


# ------------------------------------------------------------------ kept mass


@pytest.mark.parametrize("S", [1, 7, 37, 113])
@pytest.mark.parametrize("kind", ["is_causal", "bool", "float", "none"])
def test_kept_mass_matches_dense_reference(S, kind):
    q, k, mask, is_causal, real = _inputs(3, 4, 2, S, 8, kind, seed=S)
    causal = kind in ("is_causal", "bool")
    pats = _patterns(S, causal)
    cands = [c for c, _ in pats]
    p, allowed, valid = _dense(q, k, mask, is_causal, real)
    # tiles of 5 query rows (chunk_bytes), and the default (one tile per sequence)
    for chunk in (5 * 4 * 4 * S, 8 << 20):
        # padding keys: in the mask (bool, float at its minimum) or as key_padding_mask
        kpm = real if kind in ("is_causal", "none") else None
        res = kept_mass(q, k, cands, attn_mask=mask, is_causal=is_causal, key_padding_mask=kpm,
                        query_mask=real, chunk_bytes=chunk)
        assert list(res.queries) == [int(valid[:, h].sum()) for h in range(4)]
        for (c, dense), got in zip(pats, res.patterns, strict=True):
            _check(res, got.name, _ref_kept(p, allowed, valid, dense))
            if isinstance(c, P.Candidate):
                assert got.name == c.name and got.config["kind"] == c.kind


def test_kept_mass_cross_attention_softcap_and_scale():
    """Sq != Skv (top-left causal), a soft-cap and an explicit scale, no padding."""
    q, k, _, _, _ = _inputs(2, 6, 3, 11, 16, "none", seed=3, skv=29)
    pat = P.window(5, 2, causal=True)
    p, allowed, valid = _dense(q, k, None, True, None, scale=0.3, softcap=2.0)
    res = kept_mass(q, k, [pat], is_causal=True, scale=0.3, softcap=2.0)
    _check(res, pat.name, _ref_kept(p, allowed, valid, masks.sliding_window_mask(11, 29, 5, 2,
                                                                                 True)))


@pytest.mark.parametrize("kind", ["is_causal", "bool", "float"])
def test_a_pattern_allowing_everything_keeps_all_mass(kind):
    S = 37
    q, k, mask, is_causal, real = _inputs(2, 4, 4, S, 8, kind, seed=1)
    everything = [P.custom("all", lambda b, h, i, j: j >= 0), P.window(S, 0, causal=False)]
    res = kept_mass(q, k, everything, attn_mask=mask, is_causal=is_causal,
                    key_padding_mask=real, query_mask=real, chunk_bytes=4 * 4 * S * 5)
    for pm in res.patterns:
        for key in ("mean", "quantile", "min", "density"):
            np.testing.assert_allclose(getattr(pm, key), 1.0, atol=1e-6, rtol=0)


def test_streaming_over_calls_equals_one_call_on_the_concatenation():
    """Two calls of different lengths stream into one accumulator; the mean is over all real
    queries of both (the reference concatenates their kept masses)."""
    pat = P.window(3, 1, True)
    acc = KeptMassAccumulator([pat], quantile=0.2)
    kept, valids = [], []
    for S, seed in ((9, 0), (20, 1)):
        q, k, mask, is_causal, real = _inputs(2, 4, 2, S, 8, "bool", seed=seed)
        acc.update(q, k, attn_mask=mask, query_mask=real)
        p, allowed, valid = _dense(q, k, mask, False, real)
        kept.append((p * masks.sliding_window_mask(S, S, 3, 1, True)).sum(-1).flatten(2))
        valids.append(valid)
    res = acc.result()[pat.name]
    for h in range(4):
        v = torch.cat([kk[:, h][vv[:, h]] for kk, vv in zip(kept, valids, strict=True)])
        assert abs(res.mean[h] - float(v.mean())) < ATOL
        assert abs(res.min[h] - float(v.min())) < ATOL


# ------------------------------------------------------------------ column sums, head norms


@pytest.mark.parametrize("S", [1, 7, 37])
@pytest.mark.parametrize("kind", ["is_causal", "bool", "float"])
def test_column_sums_match_dense_reference(S, kind):
    q, k, mask, is_causal, real = _inputs(3, 4, 2, S, 8, kind, seed=S + 7)
    p, _, _ = _dense(q, k, mask, is_causal, real)
    g = torch.Generator().manual_seed(1)
    rows = (torch.rand(3, S, generator=g) < 0.5) & real
    got = column_sums(q, k, rows, attn_mask=mask, is_causal=is_causal, key_padding_mask=real,
                      chunk_bytes=2 * 4 * 4 * S)
    ref = torch.stack([p[b][:, rows[b]].sum(1) for b in range(3)])
    torch.testing.assert_close(got.double(), ref, atol=ATOL, rtol=0)
    idx = torch.tensor([0, S - 1])  # shared integer rows
    got = column_sums(q, k, idx, attn_mask=mask, is_causal=is_causal, key_padding_mask=real)
    torch.testing.assert_close(got.double(), p[:, :, idx].sum(2), atol=ATOL, rtol=0)
    acc = ColumnSumAccumulator("rows")
    acc.update(got, torch.full((3,), 2), real)
    res = acc.result()
    ref_mean = (p[:, :, idx].sum(2) / 2 * real[:, None]).sum(0) / real.sum(0)
    np.testing.assert_allclose(res.mean, ref_mean.numpy(), atol=ATOL)
    assert res.count.tolist() == real.sum(0).tolist()


def test_head_output_norms_match_dense_reference():
    g = torch.Generator().manual_seed(0)
    B, H, S, Dv, E = 2, 3, 7, 5, 11
    out, w = torch.randn(B, H, S, Dv, generator=g), torch.randn(E, H * Dv, generator=g)
    real = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    total, n = head_output_norms(out, w, real)
    x = out.transpose(1, 2).reshape(B, S, H * Dv).double()
    for h in range(H):
        keep = torch.zeros(H * Dv, dtype=torch.double)
        keep[h * Dv:(h + 1) * Dv] = 1
        y = (x * keep) @ w.double().T  # the projection with every other head zeroed
        ref = y.norm(dim=-1)[real.bool()].mean()
        assert abs(float(total[h]) / n - float(ref)) < ATOL
    assert n == 11


def test_bad_inputs_fail_loudly():
    q, k = torch.randn(1, 3, 5, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(PassError, match="multiple"):
        kept_mass(q, k, [P.window(2)])
    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(PassError, match="broadcast"):
        kept_mass(q, k, [P.window(2)], attn_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(PassError, match="given twice"):
        kept_mass(q, k, [P.window(2), P.window(2)])
    with pytest.raises(PassError, match="key_padding_mask"):
        kept_mass(q, k, [P.window(2)], key_padding_mask=torch.ones(1, 4))
    with pytest.raises(PassError, match="need"):
        kept_mass(q, k, [P.block_sparse(torch.ones(1, 1, 1, 1, dtype=torch.bool), 2)])
    with pytest.raises(PassError, match="backend"):
        kept_mass(q, k, [P.window(2)], backend="cuda")
