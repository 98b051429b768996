"""llm-drop on parallel-residual blocks (`x + attn(ln(x)) + mlp(ln(x))`) and on sublayers that share
a module: dropping one branch equals the original with that branch's output zeroed, removes exactly
that sublayer's parameters (its own norm too when nothing else uses it), every block of a parallel
model is labelled "parallel" (the last one too), and a drop that would remove anything else, or
nothing, is a PassError. Shared-weight calls (ALBERT) and self/cross pairs (BART) get one unit each.
"""

from __future__ import annotations

import os

import pytest
import torch

import attnc.passes.llm_drop as D
from attnc.capture.program import capture
from attnc.errors import PassError
from attnc.load.calibration import CalibrationConfig, CalibrationData, generated_batches
from attnc.load.models import wrap_hf
from attnc.recipe.manager import PassContext

SMALL = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


def _config(name: str):
    import transformers as tf

    if name == "gptj":
        return tf.GPTJConfig(
            vocab_size=256, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64
        ), "GPTJForCausalLM"
    if name == "gpt_neox":
        return tf.GPTNeoXConfig(
            **SMALL, intermediate_size=64, use_parallel_residual=True, max_position_embeddings=64
        ), "GPTNeoXForCausalLM"
    if name == "phi":
        return tf.PhiConfig(
            **SMALL, intermediate_size=64, max_position_embeddings=64
        ), "PhiForCausalLM"
    if name in ("falcon", "falcon_new"):
        new = name == "falcon_new"
        return tf.FalconConfig(
            **SMALL,
            parallel_attn=True,
            new_decoder_architecture=new,
            multi_query=not new,
            num_kv_heads=2 if new else None,
            alibi=False,
        ), "FalconForCausalLM"
    if name == "cohere":
        return tf.CohereConfig(
            **SMALL, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64
        ), "CohereForCausalLM"
    if name == "mixtral":
        return tf.MixtralConfig(
            **SMALL,
            num_key_value_heads=2,
            intermediate_size=64,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=64,
        ), "MixtralForCausalLM"
    if name == "gpt_neox_sequential":
        return tf.GPTNeoXConfig(
            **SMALL, intermediate_size=64, use_parallel_residual=False, max_position_embeddings=64
        ), "GPTNeoXForCausalLM"
    if name == "albert":
        return tf.AlbertConfig(
            **SMALL, embedding_size=16, intermediate_size=64, max_position_embeddings=64
        ), "AlbertModel"
    if name == "bart":
        return tf.BartConfig(
            vocab_size=256,
            d_model=32,
            encoder_layers=1,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
        ), "BartModel"
    raise KeyError(name)


def _load(name: str):
    import transformers as tf

    os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    cfg, cls_name = _config(name)
    cfg.architectures = [cls_name]
    torch.manual_seed(0)
    model = getattr(tf, cls_name)._from_config(cfg, attn_implementation="sdpa").eval()
    loaded = wrap_hf(model, name, None, None)
    return loaded, capture(loaded)


# (layers module, attention, mlp, the attention's own norm, the MLP's own norm) per family
PARALLEL = {
    "gptj": ("transformer.h", "attn", "mlp", None, None),
    "gpt_neox": (
        "gpt_neox.layers",
        "attention",
        "mlp",
        "input_layernorm",
        "post_attention_layernorm",
    ),
    "phi": ("model.layers", "self_attn", "mlp", None, None),
    "falcon": ("transformer.h", "self_attention", "mlp", None, None),
    "falcon_new": ("transformer.h", "self_attention", "mlp", "ln_attn", "ln_mlp"),
    "cohere": ("model.layers", "self_attn", "mlp", None, None),
}


def _zeroed(loaded, paths: list[str], call: int | None = None):
    """The original model's output with the outputs of `paths` zeroed (only the `call`-th call
    of a module called several times, when given)."""
    counts: dict[str, int] = {}
    handles = []
    for path in paths:

        def hook(_m, _inp, out, path=path):
            n = counts[path] = counts.get(path, -1) + 1
            if call is not None and n != call:
                return out
            if isinstance(out, tuple):
                return (torch.zeros_like(out[0]), *out[1:])
            return torch.zeros_like(out)

        handles.append(loaded.module.model.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return loaded.module(*loaded.example_args)
    finally:
        for h in handles:
            h.remove()


def _params(gm) -> set[str]:
    return {n for n, _ in gm.named_parameters()}


def _owned(loaded, *paths) -> set[str]:
    out = set()
    for p in paths:
        if p is not None:
            out |= {
                f"model.{p}.{n}" for n, _ in loaded.module.model.get_submodule(p).named_parameters()
            }
    return out


@pytest.mark.parametrize("arch", list(PARALLEL))
def test_parallel_branch_drop_equals_zeroed_branch(arch):
    loaded, program = _load(arch)
    layers, attn, mlp, attn_norm, mlp_norm = PARALLEL[arch]
    assert [s.block_style for s in program.sites] == ["parallel", "parallel"]  # the last one too
    units = {u.key: u for u in D.find_units(program.gm)}
    before = _params(program.gm)
    with torch.no_grad():
        original = program(*loaded.example_args)
    for layer in (0, 1):
        block = f"{layers}.{layer}"
        for kind, sub, norm in (("attention", attn, attn_norm), ("mlp", mlp, mlp_norm)):
            key = f"{kind}@{block}"
            assert units[key].style == "parallel"
            dropped, report = D.drop_report(program, [key])
            with torch.no_grad():
                got = dropped(*loaded.example_args)
            ref = _zeroed(loaded, [f"{block}.{sub}"])
            assert (got - ref).abs().max().item() <= 1e-5, key
            assert (got - original).abs().max().item() > 1e-3, key  # the drop did something
            gone = before - _params(dropped.gm)
            assert gone == _owned(loaded, f"{block}.{sub}", norm and f"{block}.{norm}"), key
            assert report[key].tensors == len(gone)
            assert report[key].params == sum(
                p.numel() for n, p in program.gm.named_parameters() if n in gone
            )
            assert len(dropped.sites) == len(program.sites) - (kind == "attention")
    # the whole block: both branches and every norm of the block
    block = f"{layers}.1"
    dropped = D.drop_units(program, [f"block@{block}"])
    with torch.no_grad():
        got = dropped(*loaded.example_args)
    ref = _zeroed(loaded, [f"{block}.{attn}", f"{block}.{mlp}"])
    assert (got - ref).abs().max().item() <= 1e-5
    assert {n for n in before - _params(dropped.gm)} == {
        n for n in before if n.startswith(f"model.{block}.")
    }
    # attention and MLP of one block dropped one after the other: the same as the block
    both = D.drop_units(program, [f"attention@{block}", f"mlp@{block}"])
    with torch.no_grad():
        assert torch.equal(both(*loaded.example_args), got)


def test_sequential_neox_stays_pre_norm():
    _, program = _load("gpt_neox_sequential")
    assert {s.block_style for s in program.sites} == {"pre-norm"}
    assert {u.style for u in D.find_units(program.gm)} == {"pre-norm"}


def test_a_drop_that_takes_the_sibling_branch_is_refused(monkeypatch):
    """The old edit (the block's final add rerouted to its stream) deleted the MLP and the
    shared norm with the attention: the parameter check turns that into a PassError."""
    import attnc.graph.edit as E
    from attnc.graph.residual import sum_tree
    from attnc.graph.sites import ancestors

    def old_edit(gm, join, branch):
        tree = sum_tree(join)
        anc = ancestors(branch)
        stream = next(leaf for leaf in tree.leaves if leaf is not branch and leaf in anc)
        tree.root.replace_all_uses_with(stream)
        return stream

    _, program = _load("gptj")
    D.drop_units(program, ["attention@transformer.h.0"])  # the real edit passes the check
    monkeypatch.setattr(E, "drop_summand", old_edit)
    with pytest.raises(PassError, match="did not remove exactly"):
        D.drop_units(program, ["attention@transformer.h.0"])


def test_an_inplace_sum_left_mutating_is_refused(monkeypatch):
    """Falcon's `mlp_output += attention_output` exports as `add_`: rerouting its uses alone
    leaves the in-place add in the graph (a no-op drop). The check catches it."""
    import attnc.graph.edit as E

    def reroute_only(gm, join, branch):
        keep = join.args[1] if join.args[0] is branch else join.args[0]
        join.replace_all_uses_with(keep)
        return keep

    _, program = _load("falcon")
    assert any(n.target == torch.ops.aten.add_.Tensor for n in program.gm.graph.nodes)
    monkeypatch.setattr(E, "drop_summand", reroute_only)
    with pytest.raises(PassError, match="did not remove exactly"):
        D.drop_units(program, ["attention@transformer.h.0"])


def test_decisions_report_removed_parameters():
    loaded, program = _load("phi")
    with torch.no_grad():
        loaded.module.model.model.layers[1].self_attn.dense.weight.zero_()
        loaded.module.model.model.layers[1].self_attn.dense.bias.zero_()
    program = capture(loaded)
    batches = generated_batches(
        loaded.example_args, loaded.input_names, CalibrationConfig(samples=4, batch_size=4)
    )
    ctx = PassContext(calibration=CalibrationData(batches, batches[:1], "generated"))
    decisions = {d.site: d for d in D.plan(program, D.LLMDropConfig(count=1), ctx)}
    d = decisions["attention@model.layers.1"]
    assert d.action == "drop"
    assert d.metrics["cosine"] == pytest.approx(1.0, abs=1e-6)  # cos(x, x + 0)
    assert d.metrics["removed_tensors"] == 8 and d.metrics["removed_params"] > 0
    assert all(m.startswith("model.layers.1.self_attn.") for m in d.metrics["removed_modules"])
    assert decisions["attention@model.layers.0"].action == "keep"


def test_shared_weight_calls_are_units_of_their_own():
    loaded, program = _load("albert")
    layer = "encoder.albert_layer_groups.0.albert_layers.0"
    keys = [u.key for u in D.find_units(program.gm) if u.kind == "attention"]
    assert keys == [f"attention@{layer}", f"attention@{layer}#1"]
    before = _params(program.gm)
    for call, key in enumerate(keys):
        dropped, report = D.drop_report(program, [key])
        assert _params(dropped.gm) == before  # the weights serve the other call
        assert report[key].tensors == 0
        assert len(dropped.sites) == 1
        with torch.no_grad():
            got = dropped(*loaded.example_args)
        ref = _zeroed(loaded, [f"{layer}.attention.dense"], call=call)
        assert (got - ref).abs().max().item() <= 1e-5


def test_self_and_cross_attention_are_two_units():
    loaded, program = _load("bart")
    keys = [u.key for u in D.find_units(program.gm)]
    assert len(keys) == len(set(keys))
    assert {"attention@decoder.layers.0", "attention@decoder.layers.0.encoder_attn"} <= set(keys)
    for key, path in (
        ("attention@decoder.layers.0", "decoder.layers.0.self_attn"),
        ("attention@decoder.layers.0.encoder_attn", "decoder.layers.0.encoder_attn"),
    ):
        dropped = D.drop_units(program, [key])
        with torch.no_grad():
            got = dropped(*loaded.example_args)
        assert (got - _zeroed(loaded, [path])).abs().max().item() <= 1e-5
        gone = _params(program.gm) - _params(dropped.gm)
        assert gone == _owned(loaded, path)


@pytest.mark.slow
def test_moe_mlp_and_block_drops_take_the_router_too():
    """MoE routing writes in place (`index_put_` into an `empty_like`, `div_` of the top-k
    weights): once the MoE output is dead those writes are unobservable and go, with the router
    and the norm before it (they used to keep the router, the norm and, for a block, the
    attention alive)."""
    loaded, program = _load("mixtral")
    before = _params(program.gm)
    dropped = D.drop_units(program, ["mlp@model.layers.1"])
    gone = before - _params(dropped.gm)
    assert gone == _owned(loaded, "model.layers.1.mlp", "model.layers.1.post_attention_layernorm")
    with torch.no_grad():
        got = dropped(*loaded.example_args)
    assert (got - _zeroed(loaded, ["model.layers.1.mlp"])).abs().max().item() <= 1e-5
    block = D.drop_units(program, ["block@model.layers.1"])
    assert before - _params(block.gm) == {
        n for n in before if n.startswith("model.model.layers.1.")
    }
    assert len(block.sites) == 1
