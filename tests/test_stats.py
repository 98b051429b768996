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
from attnc.kernels import masks

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
        pad = torch.finfo(torch.float32).min if seed % 2 else -1e4  # HF's, older models'
        mask = torch.where(real[:, None, None, :], bias, pad)
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
        allowed &= mask > -1e4  # HF's finfo.min, older models' -1e4
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


def test_positions_never_real_are_null_in_json():
    import json

    acc = ColumnSumAccumulator("last")
    acc.update(torch.ones(1, 2, 4), torch.tensor([2]), torch.tensor([[1, 1, 0, 0]]))
    res = acc.result()
    assert res.count.tolist() == [1, 1, 0, 0]
    text = json.dumps(res.to_json(), allow_nan=False)
    assert json.loads(text)["mean"] == [[0.5, 0.5, None, None]] * 2


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


# ------------------------------------------------------------------ the Triton path


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_triton_path_matches_torch_path(kind):
    """Under TRITON_INTERPRET=1 (tests/conftest.py) the Triton lse/colsum kernels run on CPU:
    kept mass from exp(lse_P - lse_A) and kernel column sums equal the chunked torch path."""
    pytest.importorskip("triton")
    S = 37
    q, k, mask, is_causal, real = _inputs(2, 4, 2, S, 16, kind, seed=5)
    causal = kind == "bool"
    cands = [P.window(4, 2, causal), P.block_sparse("power", 8, local_blocks=2),
             P.neighborhood([-1], 5, dilation=2, is_causal=causal),  # kernel forms
             P.neighborhood([-1, 4], 3, num_global=1), _per_head_fn]  # torch path
    assert [c.flash_form(S, S) is not None for c in P.as_candidates(cands)] == [1, 1, 1, 0, 0]
    kw = dict(attn_mask=mask, is_causal=is_causal, query_mask=real)
    got = kept_mass(q, k, cands, backend="triton", **kw)
    ref = kept_mass(q, k, cands, backend="torch", **kw)
    assert list(got.queries) == list(ref.queries)
    for a, b in zip(got.patterns, ref.patterns, strict=True):
        for key in ("mean", "quantile", "min", "density"):
            np.testing.assert_allclose(getattr(a, key), getattr(b, key), atol=ATOL, rtol=0)
    rows = real & (torch.arange(S) % 3 == 0)
    torch.testing.assert_close(column_sums(q, k, rows, attn_mask=mask, backend="triton"),
                               column_sums(q, k, rows, attn_mask=mask, backend="torch"),
                               atol=ATOL, rtol=0)


# ------------------------------------------------------------------ memory at S = 8192

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, time, torch
    torch.set_num_threads(1)
    from attnc.graph import stats_patterns as P
    from attnc.graph.stats import kept_mass
    g = torch.Generator().manual_seed(0)
    S = 8192
    q, k = torch.randn(1, 4, S, 64, generator=g), torch.randn(1, 4, S, 64, generator=g)
    cands = [P.window(256, 4), P.window(1024, 4), P.block_sparse("power", 128)]
    kept_mass(q[:, :, :512], k[:, :, :512], cands, is_causal=True)  # warm every code path
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    res = kept_mass(q, k, cands, is_causal=True)
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_mb": (after - before) / 1024, "seconds": seconds,
                      "density": [p.density.tolist() for p in res.patterns],
                      "mean": [p.mean.tolist() for p in res.patterns]}))
""")


@pytest.mark.slow
def test_kept_mass_at_8192_tokens_stays_within_64_mb(root):
    """B=1, H=4, S=8192, D=64, three candidates, causal: the S x S float32 probabilities would be
    256 MB per head (1 GB for the four); kept_mass raises the peak resident memory by about
    38 MB (tiles of 64 query rows x 8192 keys x 4 heads, 8 MB each) and takes about 14 s on
    this shared 2-core machine (one thread). Asserted: < 64 MB, in a fresh process."""
    import json

    run = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], cwd=root, capture_output=True,
                         text=True, timeout=600, env={**__import__("os").environ,
                                                      "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["extra_mb"] < 64, out
    # densities are exact counts: query i keeps min(i + 1, w) window keys plus the sinks before
    i = np.arange(8192)
    for w, dens in ((256, out["density"][0]), (1024, out["density"][1])):
        kept = np.minimum(i + 1, w) + np.clip(i + 1 - w, 0, 4)
        np.testing.assert_allclose(dens, kept.sum() / (i + 1).sum(), rtol=1e-12)
    assert all(0 < a < b < 1 for a, b in zip(out["mean"][0], out["mean"][1], strict=True))


# ------------------------------------------------------------------ the collector on a model


def _llama_batches():
    """Two right-padded batches of different lengths (token_mask = attention_mask)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for S, lengths in ((16, (16, 9)), (12, (5, 12))):
        ids = torch.randint(0, 512, (2, S), generator=g)
        mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()
        out.append((ids, mask))
    return out


@pytest.fixture(scope="module")
def llama():
    from attnc.capture.program import capture
    from attnc.load.models import wrap_hf

    model = hf_models.build("llama")
    return model, capture(wrap_hf(model, "llama", None, None))


SPEC = StatsSpec(candidates=[P.window(4, 1), P.window(8, 0),
                             P.block_sparse("power", 4, local_blocks=1)],
                 colsum_rows="last", head_norms=True)


@pytest.mark.slow  # capturing the model takes 5-15 s
def test_collector_on_hf_llama_equals_eager_attention_probabilities(llama):
    import copy

    from attnc.load.calibration import Batch

    model, program = llama
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    batches = _llama_batches()
    got = collect_site_stats(program, None, [Batch((i, m), m) for i, m in batches], SPEC)
    sites = program.sites
    assert list(got) == [s.node for s in sites] and len(sites) == 2
    probs = {s.node: [] for s in sites}
    xs = {s.node: [] for s in sites}
    for layer, s in enumerate(sites):
        o = eager.model.layers[layer].self_attn.o_proj
        o.register_forward_pre_hook(lambda _m, a, n=s.node: xs[n].append(a[0]))
    with torch.no_grad():
        for ids, m in batches:
            att = eager(input_ids=ids, attention_mask=m, output_attentions=True).attentions
            for s, a in zip(sites, att, strict=True):
                probs[s.node].append(a.double())
    for layer, s in enumerate(sites):
        st = got[s.node]
        assert st.queries == sum(int(m.sum()) for _, m in batches) == 42
        assert st.layer == layer and st.num_heads == 4
        # kept mass: the eager probabilities summed over each pattern, real queries only
        for cand, pm in zip(SPEC.candidates, st.kept.patterns, strict=True):
            kept, allowed, ref_pat = [], [], []
            for (_, m), a in zip(batches, probs[s.node], strict=True):
                S = m.shape[1]
                pat = cand.mask_mod(S, S)(0, torch.arange(4)[:, None, None],
                                          torch.arange(S)[None, :, None],
                                          torch.arange(S)[None, None, :])
                real = m.bool()
                vis = (torch.arange(S)[None, :] <= torch.arange(S)[:, None]) & real[:, None, None]
                kept.append(((a * pat).sum(-1)).transpose(1, 2)[real])  # (n, H)
                allowed.append(((vis & pat).sum(-1).transpose(1, 2)[real].double(),
                                vis.sum(-1).expand(-1, 4, -1).transpose(1, 2)[real].double()))
                ref_pat.append(pat)
            kept = torch.cat(kept)
            np.testing.assert_allclose(pm.mean, kept.mean(0).numpy(), atol=ATOL)
            np.testing.assert_allclose(pm.min, kept.amin(0).numpy(), atol=ATOL)
            dens = sum(x[0].sum(0) for x in allowed) / sum(x[1].sum(0) for x in allowed)
            np.testing.assert_allclose(pm.density, dens.numpy(), atol=1e-12)
        # column sums from each sequence's last real token
        tot, cnt = torch.zeros(4, 16, dtype=torch.double), torch.zeros(16)
        for (_, m), a in zip(batches, probs[s.node], strict=True):
            for b in range(2):
                n = int(m[b].sum())
                tot[:, :n] += a[b, :, n - 1, :n]
                cnt[:n] += 1
        np.testing.assert_allclose(st.colsum.mean, (tot / cnt).numpy(), atol=ATOL)
        assert st.colsum.count.tolist() == cnt.long().tolist()
        # head output norms through o_proj, over real tokens
        w = eager.model.layers[layer].self_attn.o_proj.weight.detach().double()
        norms = torch.zeros(4, dtype=torch.double)
        for (_, m), x in zip(batches, xs[s.node], strict=True):
            xh = x.double().reshape(*x.shape[:2], 4, 16)
            for h in range(4):
                y = xh[:, :, h] @ w[:, h * 16:(h + 1) * 16].T
                norms[h] += y.norm(dim=-1)[m.bool()].sum()
        np.testing.assert_allclose(st.head_norms, (norms / 42).numpy(), atol=ATOL)
        assert json_roundtrip(st.to_json())


def json_roundtrip(obj) -> bool:
    import json

    return json.loads(json.dumps(obj)) == obj


@pytest.mark.slow
def test_collector_reads_attnc_attention_by_its_schema(llama):
    """After lower_dense every site is attnc::attention(q, k, v, mask, is_causal, scale), read
    by its own schema (not SDPA's positions); the statistics stay those of the SDPA program."""
    from attnc.export.artifacts import lower_dense
    from attnc.load.calibration import Batch

    _, program = llama
    lowered = program.clone()
    assert lower_dense(lowered) == 2
    batches = [Batch((i, m), m) for i, m in _llama_batches()]
    spec = StatsSpec(candidates=SPEC.candidates)
    a = collect_site_stats(program, None, batches, spec)
    b = collect_site_stats(lowered, None, batches, spec)
    for x, y in zip(a.values(), b.values(), strict=True):
        for p, r in zip(x.kept.patterns, y.kept.patterns, strict=True):
            np.testing.assert_allclose(p.mean, r.mean, atol=1e-6)


class _Bidirectional(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.ops.attnc.attention(q, k, v, None, False, 0.3)


def test_call_args_of_attnc_attention_and_refusals():
    import attnc.kernels  # noqa: F401 - registers the ops
    from attnc.graph.stats_collect import call_args

    gm = torch.fx.symbolic_trace(_Bidirectional())
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    a = call_args(node)
    assert a["is_causal"] is False and a["scale"] == 0.3 and a["attn_mask"] is None
    node.meta["attnc_attention_region"] = {"q": "q"}
    with pytest.raises(PassError, match="region"):
        call_args(node)
    del node.meta["attnc_attention_region"]
    node.target = torch.ops.aten.relu.default
    with pytest.raises(PassError, match="not dense attention"):
        call_args(node)
