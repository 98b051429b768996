"""ONNX export of mixture-of-experts models (transformers' grouped-mm experts) and of attention
whose key/value heads broadcast against the query's (multi-query attention): every model loads
through attnc, exports, passes the checker and matches torch in ONNX Runtime (fp32, max abs diff
<= 1e-4) with graph optimizations on and off, at the example shape and at a second, padded one.
The factories at the bottom are hand-written SDPA models loaded as `file.py:factory`.

The Hugging Face models here have one decoder layer (an MoE one for the MoE classes): what is
checked is per layer (the experts' grouped matmuls, the K/V head broadcast of each attention
call), and a layer costs about a third of an export. Two-layer ONNX exports after an llm-drop:
qwen2_moe (two MoE layers) in tests/test_hf_zoo.py, falcon (sequential MQA) in
test_llm_drop_build below; the zoo's mixtral, olmoe, falcon and gpt_bigcode builds rely on the
exports here for their ONNX (tests/test_hf_zoo.py::test_onnx_elsewhere_is_covered)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnc.capture.program import capture
from attnc.check.fidelity import ort_runner
from attnc.export.artifacts import export_onnx
from attnc.export.onnx_fixes import prepare_for_onnx, translations
from attnc.graph.sites import SDPA, sdpa_args
from attnc.load.models import load_model

TEXT = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    max_position_embeddings=128,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=16, n_group=1, topk_group=1, first_k_dense_replace=0, n_shared_experts=1)


def _config(arch: str, layers: int = 1):
    import transformers as tf

    cfg = _config_of(tf, arch, layers)
    assert cfg.num_hidden_layers == layers
    return cfg


def _config_of(tf, arch: str, layers: int):
    text = {**TEXT, "num_hidden_layers": layers}
    if arch == "mixtral":  # 8 experts: a short input leaves some with no tokens
        return tf.MixtralConfig(**text, num_key_value_heads=2, num_local_experts=8,
                                num_experts_per_tok=2, architectures=["MixtralForCausalLM"])
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**text, **MOE, num_key_value_heads=2, num_experts=4,
                                 shared_expert_intermediate_size=64, decoder_sparse_step=1,
                                 architectures=["Qwen2MoeForCausalLM"])
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**text, **MOE, num_key_value_heads=2, head_dim=16,
                                 num_experts=4, decoder_sparse_step=1,
                                 architectures=["Qwen3MoeForCausalLM"])
    if arch == "olmoe":
        return tf.OlmoeConfig(**text, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
                              architectures=["OlmoeForCausalLM"])
    if arch in ("deepseek_v2", "deepseek_v3"):  # V2's RoPE is complex-valued
        cls = tf.DeepseekV2Config if arch == "deepseek_v2" else tf.DeepseekV3Config
        name = "DeepseekV2ForCausalLM" if arch == "deepseek_v2" else "DeepseekV3ForCausalLM"
        return cls(**text, **MOE, **MLA, num_key_value_heads=4, n_routed_experts=4,
                   architectures=[name])
    if arch.startswith("falcon"):  # K/V of one head, broadcast by SDPA against four
        return tf.FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=layers,
                               num_attention_heads=4, multi_query=True,
                               new_decoder_architecture=False, alibi=False,
                               parallel_attn=arch == "falcon", architectures=["FalconForCausalLM"])
    if arch == "gpt_bigcode":
        return tf.GPTBigCodeConfig(vocab_size=256, n_embd=64, n_layer=layers, n_head=4,
                                   n_positions=128, multi_query=True,
                                   architectures=["GPTBigCodeForCausalLM"])
    if arch == "llama_mqa":  # one K/V head, through SDPA's enable_gqa
        return tf.LlamaConfig(**text, num_key_value_heads=1, architectures=["LlamaForCausalLM"])
    raise KeyError(arch)


MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]
MQA_ARCHS = ["falcon", "gpt_bigcode", "llama_mqa"]
HANDWRITTEN = ["mqa_enable_gqa", "mqa_broadcast", "gqa_flag_equal_heads", "latent_query"]


def _hf_model(arch: str, seed: int = 0, layers: int = 1):
    import transformers as tf

    os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    cfg = _config(arch, layers)
    torch.manual_seed(seed)
    return getattr(tf, cfg.architectures[0])._from_config(cfg, attn_implementation="sdpa").eval()


def _save(arch: str, folder: Path, layers: int = 1) -> Path:
    _hf_model(arch, layers=layers).save_pretrained(str(folder), safe_serialization=True)
    return folder


def _second_inputs(names: list[str], example: tuple[torch.Tensor, ...]):
    """Batch 1 and 3 tokens (fewer routed rows than experts), and batch 3 with left padding."""
    if names[:1] != ["input_ids"] or any(n not in ("input_ids", "attention_mask") for n in names):
        return []
    out = []
    for batch, seq in ((1, 3), (3, 11)):
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, 200, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=example[-1].dtype)
        mask[-1, :4] = 0 if batch > 1 else 1
        out.append((ids, mask) if len(names) == 2 else (ids,))
    return out


def _check_onnx(program, path: Path, inputs) -> None:
    onnx.checker.check_model(onnx.load(str(path)))
    for optimize in (True, False):
        run = ort_runner(str(path), program.input_names, optimize=optimize)
        for args in inputs:
            with torch.no_grad():
                ref = program(*args)
            got = run(*args)
            assert got.shape == ref.shape
            diff = (got - ref).abs().max().item()
            assert diff <= 1e-4, f"optimize={optimize} shape={tuple(args[0].shape)}: {diff}"


def _graph_ops(program) -> set[str]:
    return {str(n.target) for n in program.gm.graph.nodes if n.op == "call_function"}


FAST = ("olmoe", "falcon")  # one per class in the quick run; the rest take 10-20 s each
FACTORY = "qwen3_moe"  # loaded from a factory file (test_factory_made_moe_exports), not a folder


def _export_and_check(arch: str, loaded, tmp_path: Path) -> None:
    program = capture(loaded)
    assert len(program.sites) == 1
    if arch in MOE_ARCHS:
        assert "transformers.grouped_mm_fallback.default" in _graph_ops(program)
    info = export_onnx(program, tmp_path / "m.onnx")
    assert info["attention_nodes"] == 1
    inputs = [loaded.example_args, *_second_inputs(program.input_names, loaded.example_args)]
    assert len(inputs) == 3
    _check_onnx(program, tmp_path / "m.onnx", inputs)


@pytest.mark.parametrize(
    "arch",
    [a if a in FAST else pytest.param(a, marks=pytest.mark.slow)
     for a in MOE_ARCHS + MQA_ARCHS if a != FACTORY],
)
def test_hf_export_matches_ort(arch, tmp_path, monkeypatch):
    if arch == "llama_mqa":
        # SDPA's own GQA (one K/V head against four query heads) rather than repeat_kv
        monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    _export_and_check(arch, load_model(str(_save(arch, tmp_path / arch))), tmp_path)


@pytest.mark.slow
def test_factory_made_moe_exports(tmp_path):
    """A factory that returns a Qwen3-MoE instance: the fix is at export, not at loading. The
    same checks as test_hf_export_matches_ort (this is qwen3_moe's export test)."""
    factory = tmp_path / "factory.py"
    factory.write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import test_export_moe_mqa as T\n\n"
        f"def make():\n    return T._hf_model({FACTORY!r}, seed=1)\n"
    )
    loaded = load_model(f"{factory}:make")
    _export_and_check(FACTORY, loaded, tmp_path)


@pytest.mark.parametrize("name", HANDWRITTEN)
def test_handwritten_broadcast_attention(name, tmp_path):
    loaded = load_model(f"{Path(__file__)}:make_{name}")
    program = capture(loaded)
    assert len(program.sites) == 2
    info = export_onnx(program, tmp_path / "m.onnx")
    assert info["attention_nodes"] == 2
    seq = loaded.example_args[0].shape[1] + 3
    other = (torch.randint(0, 100, (3, seq), generator=torch.Generator().manual_seed(3)),)
    _check_onnx(program, tmp_path / "m.onnx", [loaded.example_args, other])


def test_broadcast_rewrite_is_exact_and_targeted():
    """The rewrite turns a 1-head K/V broadcast into enable_gqa, expands a batch-1 query, drops
    enable_gqa with equal heads; the rewritten graph computes what the original does."""
    for name, want in (
        ("mqa_broadcast", {"enable_gqa": True}),
        ("gqa_flag_equal_heads", {"enable_gqa": None}),
        ("latent_query", {"expand": True}),
    ):
        loaded = load_model(f"{Path(__file__)}:make_{name}")
        program = capture(loaded)
        fixed = prepare_for_onnx(program)
        assert fixed is not program
        nodes = [n for n in fixed.gm.graph.nodes if n.target == SDPA]
        if "enable_gqa" in want:
            assert all(sdpa_args(n).get("enable_gqa") == want["enable_gqa"] for n in nodes), name
        if "expand" in want:
            q = [sdpa_args(n)["query"] for n in nodes]
            assert all(x.target == torch.ops.aten.expand.default for x in q), name
        with torch.no_grad():
            torch.testing.assert_close(
                fixed(*loaded.example_args), program(*loaded.example_args), rtol=0, atol=1e-6
            )
    plain = capture(load_model(f"{Path(__file__)}:make_mqa_enable_gqa"))
    assert prepare_for_onnx(plain) is plain  # already exportable: left alone


@pytest.mark.slow
def test_integer_histc_is_counted_in_float(tmp_path):
    """On CUDA the experts' histc counts integer ids (torchlib refuses them): the export casts."""
    loaded = load_model(str(_save("olmoe", tmp_path / "olmoe")))
    base = capture(loaded)
    program = base.clone()
    graph = program.gm.graph
    for node in [n for n in graph.nodes if n.target == torch.ops.aten.histc.default]:
        src = node.args[0]
        with graph.inserting_before(node):
            ids = graph.call_function(
                torch.ops.aten._to_copy.default, (src,), {"dtype": torch.int64}
            )
        ids.meta["val"] = src.meta["val"].to(torch.int64)
        node.replace_input_with(src, ids)
    graph.lint()
    program.gm.recompile()
    fixed = prepare_for_onnx(program)
    casts = [n for n in fixed.gm.graph.nodes if n.target == torch.ops.aten.histc.default]
    assert casts and all(n.args[0].kwargs.get("dtype") == torch.float32 for n in casts)
    with torch.no_grad():  # (the integer histc itself has no CPU kernel)
        torch.testing.assert_close(fixed(*loaded.example_args), base(*loaded.example_args))
    export_onnx(program, tmp_path / "m.onnx")
    _check_onnx(base, tmp_path / "m.onnx", [loaded.example_args])


def test_grouped_mm_translation_skips_empty_groups(tmp_path):
    """`transformers::grouped_mm_fallback` (fp32, ONNX Runtime) and `aten::_grouped_mm` (bf16,
    the ONNX reference evaluator) with an expert that gets no rows, and rows past the last."""
    from onnx.reference import ReferenceEvaluator
    from transformers.integrations import moe  # noqa: F401  (registers the op)

    class Grouped(nn.Module):
        def __init__(self, bf16: bool):
            super().__init__()
            w = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(0))
            self.w = nn.Parameter(w.bfloat16() if bf16 else w)
            self.bf16 = bf16

        def forward(self, x, offs):
            if self.bf16:
                return F.grouped_mm(x.bfloat16(), self.w, offs=offs).float()
            return torch.ops.transformers.grouped_mm_fallback(x, self.w, offs)

    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(1))
    for bf16 in (False, True):
        # expert 1 gets no rows; the fallback's rows past the last offset are zeros
        offs = torch.tensor([2, 2, 7 if bf16 else 5], dtype=torch.int32)
        model = Grouped(bf16).eval()
        with torch.no_grad():
            ref = model(x, offs)
            p = torch.onnx.export(model, (x, offs), dynamo=True, opset_version=23,
                                  custom_translation_table=translations(), optimize=False,
                                  verbose=False)
        path = tmp_path / f"g{int(bf16)}.onnx"
        p.save(str(path))
        m = onnx.load(str(path))
        onnx.checker.check_model(m)
        feed = dict(zip([i.name for i in m.graph.input], (x.numpy(), offs.numpy()), strict=True))
        if bf16:
            got = torch.from_numpy(ReferenceEvaluator(m).run(None, feed)[0])
        else:
            got = ort_runner(str(path), ["x", "offs"])(x, offs)
        assert got.shape == ref.shape and (got - ref).abs().max().item() <= 1e-4


RECIPE = """version: 1
passes:
  - id: llm-drop
    target: attention
    count: 1
fidelity: {min_cosine: -1.0}
calibration: {samples: 8, batch_size: 4, max_length: 16, source: generated}
export: {onnx: ONNX, opset: 23}
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2_moe", "falcon_sequential"])
def test_llm_drop_build(arch, tmp_path):
    """A two-layer build dropping one attention. falcon_sequential (MQA, sequential residual; the
    zoo's falcon is parallel) exports ONNX and checks it. qwen2_moe's ONNX after the same drop is
    exported and checked by tests/test_hf_zoo.py::test_llm_drop[qwen2_moe] (same class and size):
    here its build writes no model.onnx and checks the MoE's model.pt2 and original.pt2 instead
    (the grouped-mm custom op serialized and loaded back)."""
    from attnc.build import build
    from attnc.load.models import load_model

    onnx_on = arch != "qwen2_moe"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("ONNX", str(onnx_on).lower()))
    res = build(str(_save(arch, tmp_path / arch, layers=2)), str(recipe), None, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["sites_before"]) == 2 and len(report["sites_after"]) == 1
    assert report["verification"]["ok"] and len(res.program.sites) == 1
    if onnx_on:
        assert report["onnx"]["attention_nodes"] == 1
        ort = report["verification"]["comparisons"]["ONNX Runtime vs torch optimized"]
        assert ort["max_abs_diff"] <= 1e-4
        onnx.checker.check_model(onnx.load(str(tmp_path / "out" / "model.onnx")))
        return
    assert report["onnx"] is None and not (tmp_path / "out" / "model.onnx").exists()
    example = res.program.example_args  # (input_ids, attention_mask)
    with torch.no_grad():
        wants = {"model.pt2": res.program(*example),
                 "original.pt2": _hf_model(arch, layers=2)(*example).logits}
        for name, want in wants.items():
            path = str(tmp_path / "out" / name)
            ops = {str(n.target) for n in torch.export.load(path).graph.nodes}
            assert "transformers.grouped_mm_fallback.default" in ops, name
            got = load_model(path).module(*example)  # as attnc eval/bench load it
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)


# ---- hand-written SDPA models (factories for load_model) ------------------------------------


class BroadcastAttention(nn.Module):
    """Four query heads; K/V of one head (`kv_heads=1`) or four. `mode`: "gqa" passes
    enable_gqa=True; "broadcast" lets SDPA broadcast the one head; "latent" attends from a
    learned batch-1 query to the batch's keys."""

    def __init__(self, dim: int, kv_heads: int, mode: str):
        super().__init__()
        self.h, self.hkv, self.d, self.mode = 4, kv_heads, dim // 4, mode
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.d)
        self.o = nn.Linear(dim, dim)
        self.latent = nn.Parameter(torch.randn(1, self.h, 1, self.d)) if mode == "latent" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        k, v = self.kv(x).view(b, s, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4)  # (B, Hkv, S, D)
        if self.latent is not None:
            y = F.scaled_dot_product_attention(self.latent, k, v)  # (B, H, 1, D)
            return x + self.o(y.transpose(1, 2).reshape(b, 1, c))  # broadcast over positions
        q = self.q(x).view(b, s, self.h, self.d).transpose(1, 2)  # (B, H, S, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.mode == "gqa")  # (B, H, S, D)
        return x + self.o(y.transpose(1, 2).reshape(b, s, c))


class BroadcastLM(nn.Module):
    def __init__(self, kv_heads: int, mode: str, dim: int = 32, vocab: int = 128):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(BroadcastAttention(dim, kv_heads, mode) for _ in range(2))
        self.mlps = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
                                  for _ in range(2))
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids)  # (B, S, C)
        for attn, mlp in zip(self.blocks, self.mlps, strict=True):
            x = attn(x)
            x = x + mlp(x)
        return self.head(x)  # (B, S, V)


def _make(kv_heads: int, mode: str):
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    return BroadcastLM(kv_heads, mode).eval(), (ids,)


def make_mqa_enable_gqa():
    return _make(1, "gqa")


def make_mqa_broadcast():
    return _make(1, "broadcast")


def make_gqa_flag_equal_heads():
    return _make(4, "gqa")


def make_latent_query():
    return _make(4, "latent")
