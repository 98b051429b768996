"""The sparse pass: it fires where the calibration data and the cost model allow it and the
rewritten program computes exactly the chosen pattern (masked SDPA with the pattern's mask), it
stays quiet where dense is cheaper, its identities are exact, heads get their own windows, bad
recipes are one-line errors, and the report carries the kept-mass curves."""

from __future__ import annotations

import json
import math

import hf_models
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnc.capture.program import capture
from attnc.check.fidelity import compare
from attnc.errors import RecipeError
from attnc.kernels import masks
from attnc.load.calibration import CalibrationConfig, CalibrationData, conform, generated_batches
from attnc.load.models import from_module, wrap_hf
from attnc.recipe.manager import PassContext, run_passes
from attnc.recipe.schema import parse_recipe

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _setup(loaded, example=None, samples=8):
    program = capture(loaded)
    example = example or loaded.example_args
    batches = generated_batches(example, loaded.input_names,
                                CalibrationConfig(samples=samples, batch_size=4))
    data = conform(CalibrationData(batches, batches[:1], "generated"), loaded.input_names,
                   loaded.example_args, program.dynamic_dims)
    return program, data


def _run(program, data, **cfg):
    recipe = parse_recipe({"version": 1, "passes": [{"id": "sparse", **cfg}]})
    out, results = run_passes(program.clone(), recipe.passes, PassContext(calibration=data))
    return out, results[0].decisions


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@pytest.fixture(scope="module")
def llama():
    loaded = wrap_hf(hf_models.build("llama"), "llama", None, None)
    program, data = _setup(loaded)
    ids = loaded.example_args[0]
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding in the second row
    return program, data, (ids, mask)


def _reference(program, decisions, seq: int):
    """The original program with each rewritten site's pattern ANDed into its SDPA mask."""
    ref = program.clone()
    nodes = {n.name: n for n in ref.gm.graph.nodes}
    for d in decisions:
        if d.action != "sparse":
            continue
        p = d.metrics["params"]
        assert d.metrics["op"] == "window"
        wins = p["head_windows"] or [p["window"]]
        pat = masks.sliding_window_heads_mask(seq, seq, wins, p["num_sinks"], p["is_causal"])
        node = nodes[d.metrics["node"]]
        name = f"pattern_{node.name}"
        ref.gm.register_buffer(name, pat[None])  # (1, H|1, S, S)
        g = ref.gm.graph
        with g.inserting_before(node):
            get = g.get_attr(name)
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            both = g.call_function(torch.ops.aten.logical_and.default, (mask, get))
        args = list(node.args) + [None] * (4 - len(node.args))
        args[3] = both
        node.args = tuple(args)
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "attn_mask"}
    ref.gm.recompile()
    return ref


def test_fires_on_llama_and_computes_the_chosen_pattern(llama):
    program, data, (ids, mask) = llama
    out, decisions = _run(program, data, min_mass=0.5, min_speedup=0)
    fired = [d for d in decisions if d.action == "sparse"]
    assert len(decisions) == len(program.sites) and fired
    for d in fired:
        assert d.metrics["kept_mass_min"] >= 0.5 and "predicted_speedup" in d.metrics
        assert d.metrics["statistic"] == "mean+tail" and "5th percentile" in d.reason
        assert out.sites[d.metrics["index"]].pattern == "sliding_window"
        assert d.metrics["backend"] in ("onnxruntime-cpu", "cuda")
    ref = _reference(program, decisions, ids.shape[1])
    with torch.no_grad():
        got, want = _first(out(ids, mask)), _first(ref(ids, mask))
        orig = _first(program(ids, mask))
    real = mask.bool()
    assert (got - want)[real].abs().max().item() < 1e-4
    assert (got - orig)[real].abs().max().item() > 1e-3  # the pattern changed something


def test_identities_min_mass_one_and_window_past_the_sequence(llama):
    program, data, (ids, mask) = llama
    same, decisions = _run(program, data, min_mass=1.0, min_speedup=0)
    assert all(d.action == "keep" for d in decisions)
    assert [s.pattern for s in same.sites] == ["dense"] * len(program.sites)
    wide, decisions = _run(program, data, windows=[64], min_speedup=0)
    assert all(d.action == "sparse" for d in decisions)
    assert all(s.pattern == "sliding_window" and s.pattern.window == 64 for s in wide.sites)
    with torch.no_grad():
        a, b, c = (_first(p(ids, mask)) for p in (program, same, wide))
    real = mask.bool()
    assert torch.equal(a, b)
    assert (a - c)[real].abs().max().item() < 1e-5


@pytest.mark.slow
def test_minilm_at_64_tokens_stays_dense(minilm):
    ex = []
    for name, t in zip(minilm.input_names, minilm.example_args, strict=True):
        ex.append(torch.ones(2, 64, dtype=t.dtype) if "mask" in name else
                  torch.zeros(2, 64, dtype=t.dtype) if "type" in name else
                  torch.randint(1000, 2000, (2, 64)))
    program, data = _setup(minilm, tuple(ex), samples=4)
    out, decisions = _run(program, data)
    assert len(decisions) == len(program.sites) == 6
    for d in decisions:
        assert d.action == "keep" and "sequence 64: dense is cheaper" in d.reason, d.reason
        assert d.metrics["predicted_speedup"] < 1.1
    assert all(s.pattern == "dense" for s in out.sites)


def test_default_rule_needs_the_mean_and_a_floor_on_the_tail():
    """mean+tail (the default): a head takes a pattern when its mean kept mass reaches min_mass
    and its 5th percentile reaches 1 - 5 (1 - min_mass); `quantile` asks the percentile itself to
    reach min_mass, `mean` drops the floor; min_mass 1.0 takes only patterns keeping every key."""
    from attnc.graph.stats import PatternMass
    from attnc.passes.sparse import SparseConfig
    from attnc.passes.sparse_rule import accepts, rule_text, tail_floor

    a = lambda *xs: np.array(xs, dtype=float)  # noqa: E731 - per head
    # head 0: mean 0.97, tail 0.80 (ok); head 1: mean 0.97, tail 0.60 (a few queries lose a lot);
    # head 2: mean 0.90, tail 0.90 (too little on average); head 3: all kept, density 1
    pm = PatternMass("w", {}, mean=a(0.97, 0.97, 0.90, 1.0), quantile=a(0.80, 0.60, 0.90, 1.0),
                     min=a(0.5, 0.1, 0.8, 1.0), density=a(0.5, 0.5, 0.5, 1.0))
    default = SparseConfig()
    assert default.statistic == "mean+tail" and tail_floor(default) == pytest.approx(0.75)
    assert [accepts(pm, h, default) for h in range(4)] == [True, False, False, True]
    assert "5th percentile >= 0.75" in rule_text(default)
    mean = SparseConfig(statistic="mean")
    assert [accepts(pm, h, mean) for h in range(4)] == [True, True, False, True]
    quant = SparseConfig(statistic="quantile")
    assert [accepts(pm, h, quant) for h in range(4)] == [False, False, False, True]
    tight = SparseConfig(tail_mass=0.85)
    assert [accepts(pm, h, tight) for h in range(4)] == [False, False, False, True]
    exact = SparseConfig(min_mass=1.0)
    assert tail_floor(exact) == 1.0
    kept_all_sparse = PatternMass("w", {}, a(1.0), a(1.0), a(1.0), density=a(0.9))
    assert not accepts(kept_all_sparse, 0, exact)  # 1.0 rounds nothing: only density 1 passes
    assert accepts(pm, 3, exact)


class TwoHeads(nn.Module):
    """One attention layer over fixed sinusoidal positions: head 0 attends to its neighbours
    (q = k = a sharp projection of the position code), head 1 attends everywhere (q = 0)."""

    def __init__(self, dim: int = 32, seq: int = 16):
        super().__init__()
        pos = torch.arange(64)[:, None].float()
        freq = torch.exp(-torch.arange(0, dim // 2).float() * math.log(100.0) / (dim // 2))
        pe = torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], -1)  # (64, dim)
        self.register_buffer("pe", pe)
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.o = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            half = dim // 2
            for lin in (self.q, self.k):
                lin.weight.zero_()
                lin.weight[:half, :half] = 4.0 * torch.eye(half)  # head 0 reads the sin code
            self.k.weight[:half, half:] = 4.0 * torch.eye(half)  # and the cos code
            self.q.weight[:half, half:] = 4.0 * torch.eye(half)

    def forward(self, x):  # (B, S, dim)
        b, s, d = x.shape
        h = self.pe[:s] + 0.01 * x
        q, k, v = (m(h).view(b, s, 2, d // 2).transpose(1, 2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 2, S, d/2)
        return x + self.o(out.transpose(1, 2).reshape(b, s, d))


def test_heads_get_their_own_windows():
    torch.manual_seed(0)
    loaded = from_module(TwoHeads(), (torch.randn(2, 16, 32),))
    program, data = _setup(loaded)
    _, decisions = _run(program, data, min_mass=0.9, min_speedup=0, sinks=0,
                        patterns=["window"])
    (d,) = decisions
    assert d.action == "sparse" and d.metrics["op"] == "window"
    wins = d.metrics["params"]["head_windows"]
    assert wins is not None and 0 < wins[0] < 16 and wins[1] == -1  # local head, global head
    assert d.metrics["dense_heads"] == 1
    _, per_site = _run(program, data, min_mass=0.9, min_speedup=0, sinks=0,
                       granularity="site", patterns=["window"])
    assert per_site[0].action == "keep"  # no one window keeps the global head's mass


def test_vision_grid_and_neighborhood_on_a_vit(tmp_path):
    loaded = wrap_hf(hf_models.build("vit"), "vit", None, None)
    program, data = _setup(loaded)
    from attnc.passes.sparse_candidates import vision_grid

    assert vision_grid(program, 17) == ((4, 4), 1)  # 32x32 pixels, patch 8, CLS
    out, decisions = _run(program, data, min_mass=0.3, min_speedup=0,
                          patterns=["neighborhood"])
    d = decisions[0]
    assert d.action == "sparse" and d.metrics["op"] == "neighborhood"
    got = out.sites[0].pattern
    assert got == "neighborhood" and got.num_global == 1
    # a user's block layout (JSON, never pickle) on the same static sites
    lay = np.eye(5, dtype=int)
    lay[:, 0] = 1
    f = tmp_path / "layout.json"
    f.write_text(json.dumps({"block_size": 4, "layout": lay.tolist()}))
    out, decisions = _run(program, data, min_mass=0.01, min_speedup=0, patterns=["layout"],
                          layout_file=str(f))
    assert decisions[0].action == "sparse", decisions[0].reason
    assert out.sites[0].pattern == "block_sparse" and out.sites[0].pattern.block_size == 4
    x = loaded.example_args[0]
    with torch.no_grad():
        assert torch.isfinite(_first(out(x))).all()


@pytest.mark.parametrize("cfg, match", [
    ({"min_mass": 1.5}, "min_mass"),
    ({"patterns": ["spiral"]}, "spiral"),
    ({"patterns": ["layout"]}, "layout_file"),
    ({"windows": [0]}, "windows"),
    ({"windows": [1.5]}, "windows"),
    ({"granularity": "layer"}, "granularity"),
    ({"backend": "tpu"}, "backend"),
    ({"min_speedup": -1}, "min_speedup"),
    ({"target_length": 1}, "target_length"),
    ({"grid": [0, 4]}, "grid"),
    ({"min_mas": 0.9}, "min_mas"),
    ({"tail_mass": 1.5}, "tail_mass"),
    ({"statistic": "median"}, "statistic"),
    ({"layout_file": "/nonexistent/layout.json"}, "does not exist"),
])
def test_bad_configs_are_one_line_recipe_errors(cfg, match):
    with pytest.raises(RecipeError, match=match) as exc:
        parse_recipe({"version": 1, "passes": [{"id": "sparse", **cfg}]})
    assert "\n" not in exc.value.one_line()


def test_layout_files_are_checked_and_never_unpickled(tmp_path):
    from attnc.passes.sparse_candidates import read_layout_file

    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(RecipeError, match="plain .npy"):
        read_layout_file(str(obj), 4)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"block_size": 4, "layout": [[1, 2], [0, 1]]}))
    with pytest.raises(RecipeError, match="0/1"):
        read_layout_file(str(bad), None)
    holes = tmp_path / "holes.npy"
    np.save(holes, np.zeros((3, 3), dtype=bool))
    with pytest.raises(RecipeError, match="diagonal"):
        read_layout_file(str(holes), 4)
    ok = tmp_path / "ok.npy"
    np.save(ok, np.eye(3, dtype=np.int64))
    lay, bs = read_layout_file(str(ok), 8)
    assert lay.shape == (1, 1, 3, 3) and lay.dtype == torch.bool and bs == 8


def test_cost_model_prices_what_each_backend_runs():
    from attnc.passes import sparse_cost as c

    long = c.SiteShape(16384, 32, 128, True)
    win = c.window_cost([1024] * 32, 4, True, "Attention(opset 23) + mask", False)
    assert c.predict("cuda", long, win).speedup > 5  # tiles outside the window are skipped
    # on CPU a long window runs as blocked local attention (kernels/window_blocked.py): it pays
    for backend in ("onnxruntime-cpu", "torch-cpu"):
        pred = c.predict(backend, long, win)
        assert pred.speedup > 1 and "blocked" in pred.form, (backend, pred)
    # block-sparse exports as the gathered form (block_sparse_gather.py): the listed blocks only
    n = 16384 // 128
    band = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() <= 2
    blocks = c.block_cost(band[None, None], 128, False, False, 32)
    wide = c.SiteShape(16384, 32, 128, False)
    assert c.predict("cuda", wide, blocks).speedup > 5
    ort = c.predict("onnxruntime-cpu", wide, blocks)
    assert ort.speedup > 5 and "gathered" in ort.form, ort
    short = c.SiteShape(64, 12, 32, False, 1, True)
    small = c.window_cost([8] * 12, 0, False, "Attention(opset 23) + mask", True)
    pred = c.predict("cuda", short, small)
    assert pred.speedup < 1 and "SDPA" in pred.form  # the op's own small-problem route
    half = c.predict("cuda", c.SiteShape(4096, 8, 64, False), c.window_cost(
        [1024] * 4 + [-1] * 4, 0, False, "x", True))
    assert 0.6 < half.density < 0.8  # a 2047-wide band on half the heads, dense on the rest


@pytest.mark.slow
def test_cuda_constants_match_the_benchmark_file(root):
    from attnc.passes import sparse_cost as c
    from attnc.passes import sparse_cost_fit as fitting

    fit = fitting.fit_cuda(root / "benchmarks" / "results" / "kernels-nvidia-h100-80gb-hbm3.json")
    for name in ("C_FULL", "C_SDPA", "C_SDPA_CAUSAL", "C_SDPA_MASKED", "C_PARTIAL"):
        assert fit[name] == pytest.approx(getattr(c, name), rel=0.05), name


def test_report_section_has_curves_per_site(llama):
    from attnc.passes.sparse_report import render
    from attnc.report.section import PassSection

    program, data, _ = llama
    _, decisions = _run(program, data, min_mass=0.5, min_speedup=0)
    json.dumps([vars(d) for d in decisions])  # report.json takes the metrics as they are
    part = render(PassSection("sparse", {}, 0.1, tuple(decisions), "sparse-"))
    svgs = [k for k in part.files if k.endswith(".svg")]
    assert len(svgs) == len(decisions)
    assert "predicted speed-up" in part.markdown and "sparse-mass-" in part.markdown
    assert "chosen" in part.files[svgs[0]]


@pytest.mark.slow
def test_build_end_to_end_exports_onnx_that_matches(tmp_path, llama):
    import onnx

    import attnc
    from attnc.check.fidelity import ort_runner

    model = hf_models.build("llama")
    _, _, (ids, mask) = llama
    recipe = {"version": 1, "passes": [{"id": "sparse", "min_mass": 0.5, "min_speedup": 0}],
              "fidelity": {"min_cosine": 0.0},
              "calibration": {"source": "generated", "samples": 8, "batch_size": 4},
              "export": {"opset": 23}}
    res = attnc.optimize(model, recipe, out=tmp_path / "b", example_inputs=(ids, mask),
                         bench=False)
    (entry,) = res.report["passes"]
    assert any(d["action"] == "sparse" for d in entry["decisions"])
    assert any("sliding_window" in s["pattern"] for s in res.report["sites_after"])
    path = tmp_path / "b" / "model.onnx"
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    run = ort_runner(str(path), res.program.input_names)
    with torch.no_grad():
        want = _first(res.program(ids, mask))
    got = run(ids, mask)
    assert (got - want)[mask.bool()].abs().max().item() < 1e-4
    plots = sorted(p.name for p in (tmp_path / "b").glob("sparse-mass-*.svg"))
    assert len(plots) == 2  # one kept-mass curve per site, linked from report.md
    assert f"]({plots[0]})" in (tmp_path / "b" / "report.md").read_text()


def test_cost_density_is_exact_for_short_sequences_and_causal_dense_heads():
    """The cost model's density equals the pattern mask's at lengths of fewer query tiles than it
    samples (it once sampled only the first tiles), and a dense head (-1) of a causal window or
    neighborhood is causal: the density of a mixed site stays <= 1 (it was 1.69 on the long LM)."""
    from attnc.passes import sparse_cost as c

    for seq, causal, wins in ((512, False, [256] * 4), (300, True, [-1, -1, -1, 100]),
                              (2048, True, [-1, -1, -1, 1024])):
        p = c.predict("cuda", c.SiteShape(seq, 4, 32, causal),
                      c.window_cost(wins, 0, causal, "x", True))
        m = masks.sliding_window_heads_mask(seq, seq, wins, 0, causal)
        want = float(m.sum()) / (c.dense_pairs(seq, causal) * 4)
        assert p.density == pytest.approx(want, rel=2e-3), (seq, causal, wins)
    dense = c.predict("cuda", c.SiteShape(256, 2, 16, True),
                      c.neighborhood_cost([256], [[-1], [-1]], [1], [1], [True], 0, True))
    assert dense.density == pytest.approx(1.0)


def _bound_ctx(program, data, min_cosine):
    """A PassContext whose evaluator compares a candidate's outputs with `program`'s on the
    calibration batches (as the build's does) under a min_cosine bound."""
    from attnc.check.fidelity import meets, reference_outputs
    from attnc.recipe.bounds import FidelityBound

    bound = FidelityBound(min_cosine=min_cosine)
    refs = reference_outputs(program, data.calib)
    seen = []

    def evaluate(candidate):
        m = compare(candidate, data.calib, refs, top1=False)
        seen.append(m["cosine"])
        return m

    ctx = PassContext(calibration=data, original=program, fidelity=bound, evaluate=evaluate,
                      meets_bound=lambda m: meets(m, bound)[0])
    return ctx, seen, refs


def test_back_off_raises_min_mass_until_the_bound_is_met(llama):
    program, data, _ = llama
    _, loose = _run(program, data, min_mass=0.5, min_speedup=0)
    ctx, seen, refs = _bound_ctx(program, data, 0.99999)
    recipe = parse_recipe({"version": 1, "passes": [
        {"id": "sparse", "min_mass": 0.5, "min_speedup": 0, "back_off": 6}]})
    out, results = run_passes(program.clone(), recipe.passes, ctx)
    ds = results[0].decisions
    trail = next(d.metrics["back_off"] for d in ds if d.action != "skip")
    assert [r["min_mass"] for r in trail][:3] == [0.5, 0.75, 0.875]
    assert [r["cosine"] for r in trail] == [round(c, 6) for c in seen], trail
    assert not trail[0]["ok"] and trail[0]["cosine"] < 0.99999  # 0.5 misses: it backed off
    assert all(not r["ok"] for r in trail[:-1])
    heads = sum(d.metrics["heads"] - d.metrics["dense_heads"] for d in ds if d.action == "sparse")
    got = compare(out, data.calib, refs, top1=False)["cosine"]
    if trail[-1]["ok"]:  # the kept setting is the one that met, and the program is that one
        assert heads == trail[-1]["heads"] and got >= 0.99999
        assert any("min_mass raised to" in d.reason for d in ds if d.action == "sparse")
    else:  # nothing met before no head kept the raised min_mass: every site dense
        assert heads == 0 and all(s.pattern == "dense" for s in out.sites)
    assert heads < sum(d.metrics["heads"] - d.metrics["dense_heads"]
                       for d in loose if d.action == "sparse")


def test_back_off_stops_at_once_when_the_bound_is_met_and_can_be_turned_off(llama):
    program, data, _ = llama
    ctx, seen, _ = _bound_ctx(program, data, -1.0)
    recipe = parse_recipe({"version": 1, "passes": [
        {"id": "sparse", "min_mass": 0.5, "min_speedup": 0}]})
    _, results = run_passes(program.clone(), recipe.passes, ctx)
    trail = next(d.metrics["back_off"] for d in results[0].decisions if d.action == "sparse")
    assert len(trail) == 1 and trail[0]["ok"] and len(seen) == 1
    ctx, seen, _ = _bound_ctx(program, data, 1.0)
    recipe = parse_recipe({"version": 1, "passes": [
        {"id": "sparse", "min_mass": 0.5, "min_speedup": 0, "back_off": 0}]})
    _, results = run_passes(program.clone(), recipe.passes, ctx)
    assert not seen and any(d.action == "sparse" for d in results[0].decisions)
    # a bound nothing meets: after the last try every site stays dense, and says why
    recipe = parse_recipe({"version": 1, "passes": [
        {"id": "sparse", "min_mass": 0.5, "min_speedup": 0, "back_off": 1}]})
    out, results = run_passes(program.clone(), recipe.passes, ctx)
    ds = results[0].decisions
    assert len(seen) == 2 and all(d.action != "sparse" for d in ds)
    assert all(s.pattern == "dense" for s in out.sites)
    missed = [d for d in ds if "missed the fidelity bound" in d.reason]
    assert missed and all("min_mass up to 0.75" in d.reason for d in missed)
