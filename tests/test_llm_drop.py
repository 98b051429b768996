"""llm-drop against the unmodified model: drop-nothing is exact, dropping sublayer l equals the
original with that sublayer's output zeroed (pre- and post-norm), scores stream exactly, the
iterative mode re-scores the dropped model, and 'auto' picks the largest count within the bound."""

from __future__ import annotations

import hf_models
import pytest
import torch

import attnc.passes.llm_drop as D
from attnc.capture.program import capture
from attnc.check.fidelity import compare, meets, reference_outputs
from attnc.errors import RecipeError
from attnc.load.calibration import CalibrationConfig, CalibrationData, generated_batches
from attnc.load.models import load_model, wrap_hf
from attnc.recipe.manager import PassContext

# where to zero a sublayer's output in the eager model: (attention suffix, mlp suffix)
ZERO_AT = {
    "llama": ("self_attn", "mlp"),
    "qwen2": ("self_attn", "mlp"),
    "mistral": ("self_attn", "mlp"),
    "gpt2": ("attn", "mlp"),
    "bert": ("attention.output.dense", "output.dense"),
    "vit": ("attention", "mlp"),
    "clip": ("self_attn", "mlp"),
    "nanogpt": ("attn", "mlp"),
    "tiny_encoder": ("attention", "output"),
}


_CAPTURED: dict[str, tuple] = {}


def _setup(arch, root=None, fresh=False):
    """(loaded, program, ctx): the model and its capture made once per architecture and worker
    (no test here edits either: llm-drop's drops and scores work on copies / read the graph),
    unless `fresh` (a test that changes the model's weights); a new calibration context each
    call (tests set their own evaluate / meets_bound on it)."""
    made = _CAPTURED.get(arch)
    if fresh or made is None:
        if arch in ("nanogpt", "tiny_encoder"):
            loaded = load_model(f"{root / 'tests' / 'models.py'}:make_{arch}")
        else:
            loaded = wrap_hf(hf_models.build(arch), arch, None, None)
        made = (loaded, capture(loaded))
        if not fresh:
            _CAPTURED[arch] = made
    loaded, program = made
    batches = generated_batches(
        loaded.example_args, loaded.input_names, CalibrationConfig(samples=8, batch_size=4)
    )
    ctx = PassContext(calibration=CalibrationData(batches, batches[:1], "generated"))
    return loaded, program, ctx


def _zeroed_output(loaded, module_path):
    mod = loaded.module.model.get_submodule(module_path)

    def hook(_m, _inp, out):
        if isinstance(out, tuple):
            return (torch.zeros_like(out[0]), *out[1:])
        return torch.zeros_like(out)

    h = mod.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return loaded.module(*loaded.example_args)
    finally:
        h.remove()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "vit", "nanogpt", "tiny_encoder"])
def test_drop_equals_zeroed_sublayer(arch, root):
    loaded, program, _ = _setup(arch, root)
    units = D.find_units(program.gm)
    blocks = sorted({u.block for u in units})
    assert len(blocks) == 2
    attn_sfx, mlp_sfx = ZERO_AT[arch]
    for kind, sfx in (("attention", attn_sfx), ("mlp", mlp_sfx)):
        for block in blocks:
            dropped = D.drop_units(program, [f"{kind}@{block}"])
            ref = _zeroed_output(loaded, f"{block}.{sfx}")
            with torch.no_grad():
                got = dropped(*loaded.example_args)
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
            assert not torch.allclose(got, program(*loaded.example_args), atol=1e-4)
            if kind == "attention":
                assert len(dropped.sites) == len(program.sites) - 1


def test_drop_removes_weights_and_norm():
    loaded, program, _ = _setup("llama")
    before = {n for n, _ in program.gm.named_parameters()}
    dropped = D.drop_units(program, ["attention@model.layers.0"])
    after = {n for n, _ in dropped.gm.named_parameters()}
    gone = sorted(before - after)
    assert any("layers.0.self_attn.q_proj" in n for n in gone)
    assert any("layers.0.input_layernorm" in n for n in gone)  # pre-norm: its norm goes too
    assert not any("layers.1" in n for n in gone)
    # post-norm (BERT): the norm after the add stays
    _, bprog, _ = _setup("bert")
    bdropped = D.drop_units(bprog, ["attention@encoder.layer.0"])
    names = {n for n, _ in bdropped.gm.named_parameters()}
    assert any("layer.0.attention.output.LayerNorm" in n for n in names)
    assert not any("layer.0.attention.self.query" in n for n in names)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_drop_nothing_is_exact(arch):
    loaded, program, ctx = _setup(arch)
    cfg = D.LLMDropConfig(count=0)
    out = D.apply(program, D.plan(program, cfg, ctx), cfg)
    with torch.no_grad():
        assert torch.equal(out(*loaded.example_args), loaded.module(*loaded.example_args))


def test_block_drop_equals_both_sublayers_prenorm():
    loaded, program, _ = _setup("llama")
    a = D.drop_units(program, ["block@model.layers.1"])
    b = D.drop_units(program, ["attention@model.layers.1", "mlp@model.layers.1"])
    with torch.no_grad():
        assert torch.equal(a(*loaded.example_args), b(*loaded.example_args))


def test_zero_output_sublayer_scores_one_and_goes_first():
    loaded, program, ctx = _setup("llama", fresh=True)  # its weights are edited below
    with torch.no_grad():
        loaded.module.model.model.layers[1].self_attn.o_proj.weight.zero_()
    program = capture(loaded)
    cfg = D.LLMDropConfig(count=1)
    decisions = {d.site: d for d in D.plan(program, cfg, ctx)}
    assert decisions["attention@model.layers.1"].action == "drop"
    assert decisions["attention@model.layers.1"].metrics["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert -1.0 <= decisions["attention@model.layers.0"].metrics["cosine"] < 1.0


def test_streaming_score_equals_concatenated_mean():
    loaded, program, ctx = _setup("gpt2")
    units = [u for u in D.find_units(program.gm) if u.kind == "attention"]
    got = D.score_units(program, units, ctx)
    # reference: keep every hidden state of every batch, then one mean (what the paper's code does)
    layer = loaded.module.model.transformer.h[0]
    xs, ys = [], []
    h1 = layer.register_forward_pre_hook(lambda m, a, kw: xs.append(a[0].clone()), with_kwargs=True)
    h2 = layer.attn.register_forward_hook(lambda m, a, o: ys.append(o[0].clone()))
    with torch.no_grad():
        for b in ctx.calibration.calib:
            loaded.module(*b.args)
    h1.remove()
    h2.remove()
    x = torch.cat(xs).flatten(0, 1)
    y = x + torch.cat(ys).flatten(0, 1)
    ref = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).mean().item()
    assert got["attention@transformer.h.0"] == pytest.approx(ref, abs=1e-6)


def test_iterative_rescores_the_dropped_model():
    loaded, program, ctx = _setup("llama")
    cfg = D.LLMDropConfig(target="all", count=2, mode="iterative")
    decisions = D.plan(program, cfg, ctx)
    ranked = [d.site for d in sorted(decisions, key=lambda d: d.metrics["rank"])]
    assert {d.site for d in decisions if d.action == "drop"} == set(ranked[:2])
    # the second choice was scored on the model with the first one already dropped
    after = D.drop_units(program, [ranked[0]])
    units = [u for u in D.find_units(after.gm) if u.key == ranked[1]]
    rescored = D.score_units(after, units, ctx)[ranked[1]]
    by_site = {d.site: d for d in decisions}
    assert by_site[ranked[1]].metrics["cosine"] == pytest.approx(rescored, abs=1e-6)
    # joint target ranks attention and MLP sublayers together
    assert {d.site.split("@")[0] for d in decisions} == {"attention", "mlp"}


def test_auto_count_is_largest_within_bound():
    from attnc.recipe.schema import FidelityBound

    loaded, program, ctx = _setup("bert")
    refs = reference_outputs(program, ctx.calibration.calib)
    ctx.evaluate = lambda p: compare(p, ctx.calibration.calib, refs, top1=False)
    for bound, expect in ((-1.0, 2), (1.0, 0)):
        ctx.meets_bound = lambda m, b=bound: meets(m, FidelityBound(min_cosine=b))[0]
        decisions = D.plan(program, D.LLMDropConfig(count="auto"), ctx)
        assert sum(d.action == "drop" for d in decisions) == expect
        trail = decisions[0].metrics["auto_trail"]
        assert trail[0]["count"] == 1 and trail[-1]["ok"] == (expect == 2)


def test_count_out_of_range_is_a_usage_error():
    loaded, program, ctx = _setup("llama")
    with pytest.raises(RecipeError, match="out of range"):
        D.plan(program, D.LLMDropConfig(count=3), ctx)
    with pytest.raises(RecipeError):
        D.LLMDropConfig(count=-1).validate()
    with pytest.raises(RecipeError):
        D.LLMDropConfig(count="many").validate()


def test_layer_selector_limits_candidates():
    loaded, program, ctx = _setup("llama")
    decisions = D.plan(program, D.LLMDropConfig(count=1, layers="1"), ctx)
    acts = {d.site: d.action for d in decisions}
    assert acts == {"attention@model.layers.0": "skip", "attention@model.layers.1": "drop"}


def test_minilm_scores_and_drop_fidelity(minilm, root):
    """Real weights: scores are true cosines, and fidelity falls as more is dropped."""
    from attnc.load.calibration import load_calibration

    program = capture(minilm)
    data = load_calibration(
        str(root / "examples/data/minilm_calib.jsonl"),
        names=minilm.input_names,
        example_args=minilm.example_args,
        tokenizer=minilm.tokenizer,
        cfg=CalibrationConfig(samples=64, max_length=48, batch_size=32),
    )
    ctx = PassContext(calibration=data)
    decisions = D.plan(program, D.LLMDropConfig(count=6), ctx)
    order = [d.site for d in sorted(decisions, key=lambda d: d.metrics["rank"])]
    assert all(0.0 < d.metrics["cosine"] < 1.0 for d in decisions)
    refs = reference_outputs(program, data.holdout)
    cos = [
        compare(D.drop_units(program, order[:n]), data.holdout, refs, False)["cosine"]
        for n in (0, 1, 3, 6)
    ]
    assert cos[0] == pytest.approx(1.0, abs=1e-6)
    assert cos[0] > cos[1] > cos[2] > cos[3]


def test_units_are_found_again_on_a_partly_dropped_graph():
    """A layer's MLP is still scored (and droppable) after its attention went: units resolve
    through their branch nodes, and dropping both equals dropping the block."""
    loaded, program, ctx = _setup("llama")
    units = {u.key: u for u in D.find_units(program.gm)}
    after = D.drop_units(program, ["attention@model.layers.0"])
    got = D.score_units(after, [units["mlp@model.layers.0"]], ctx)
    assert set(got) == {"mlp@model.layers.0"} and -1.0 <= got["mlp@model.layers.0"] <= 1.0
    # x of the MLP is now the stream entering the layer: cos(x, x + mlp(ln(x)))
    assert (
        got["mlp@model.layers.0"]
        != D.score_units(program, [units["mlp@model.layers.0"]], ctx)["mlp@model.layers.0"]
    )
    both, report = D.drop_report(program, ["mlp@model.layers.0", "attention@model.layers.0"])
    block = D.drop_units(program, ["block@model.layers.0"])
    with torch.no_grad():
        assert torch.equal(both(*loaded.example_args), block(*loaded.example_args))
    assert set(report["mlp@model.layers.0"].modules) == {
        "model.layers.0.mlp.down_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.post_attention_layernorm",
    }
