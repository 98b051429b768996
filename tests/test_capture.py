"""Capture and attention sites on every supported architecture: Hugging Face models built offline
from configs, hand-written models, and the real MiniLM."""

from __future__ import annotations

import hf_models
import models
import pytest
import torch

from attnc.capture.program import capture
from attnc.load.models import load_model, wrap_hf

# (kind, expected sites, block style of the first site, causal-lm?)
HF_EXPECT = {
    "llama": ("causal-lm", 2, "pre-norm", 2),
    "qwen2": ("causal-lm", 2, "pre-norm", 2),
    "mistral": ("causal-lm", 2, "pre-norm", 2),
    "gpt2": ("causal-lm", 2, "pre-norm", 4),
    "bert": ("encoder", 2, "post-norm", 4),
    "vit": ("vision", 2, "pre-norm", 4),
    "clip": ("vision", 2, "pre-norm", 4),
    "llava": ("vlm", 3, "pre-norm", 2),
}


_CAPTURED: dict[str, tuple] = {}


def _captured(arch: str):
    """(loaded, program) of hf_models' `arch`, built and captured once per worker: the tests
    here only read them (sites, masks, names) and run them."""
    if arch not in _CAPTURED:
        loaded = wrap_hf(hf_models.build(arch), arch, None, None)
        _CAPTURED[arch] = (loaded, capture(loaded))
    return _CAPTURED[arch]


@pytest.mark.parametrize("arch", hf_models.ARCHS)
def test_hf_capture_sites(arch):
    loaded, program = _captured(arch)
    kind, n_sites, style, kv_heads = HF_EXPECT[arch]
    assert loaded.kind == kind
    sites = program.sites
    assert len(sites) == n_sites
    assert sites[0].block_style == style
    assert all(s.residual_add and s.o_proj and s.q_proj for s in sites)
    assert sites[-1].num_kv_heads == kv_heads and sites[-1].num_heads == 4
    assert [s.layer for s in sites][-2:] == [0, 1]
    # the exported graph computes what the model computes, at the example and another shape
    with torch.no_grad():
        ref = loaded.module(*loaded.example_args)
        assert torch.equal(program(*loaded.example_args), ref)
    if "seq" in str(program.dynamic_dims) and len(loaded.input_names) == 2:
        ids = torch.randint(0, 400, (3, 11))
        args = (ids, torch.ones_like(ids))
        with torch.no_grad():
            torch.testing.assert_close(program(*args), loaded.module(*args), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "arch,causal,window",
    [
        ("llama", True, None),
        ("mistral", True, 8),
        ("gpt2", True, None),
        ("bert", False, None),
        ("vit", False, None),
    ],
)
def test_mask_analysis_finds_causal_and_windows(arch, causal, window):
    """HF passes causality as an explicit mask: the site still says causal (and the window)."""
    _, program = _captured(arch)
    assert {(s.causal, s.window) for s in program.sites} == {(causal, window)}


def test_hf_module_names_and_gqa():
    _, program = _captured("llama")
    s = program.sites[1]
    assert s.module == "model.layers.1.self_attn" and s.layer == 1
    assert (s.num_heads, s.num_kv_heads, s.head_dim) == (4, 2, 16)
    assert s.kind == "self" and s.mask == "bool"
    assert program.dynamic_dims["input_ids"] == {0: "batch", 1: "seq"}


@pytest.mark.parametrize(
    "name", ["nanogpt", "gpt_fast", "manual_gqa", "tiny_encoder", "tiny_encoder_manual", "tiny_vlm"]
)
def test_handwritten_capture(name, root):
    loaded = load_model(f"{root / 'tests' / 'models.py'}:make_{name}")
    program = capture(loaded)
    model, _ = models.ALL_HANDWRITTEN[name]()
    n_layers = sum(1 for m in model.modules() if "Attention" in type(m).__name__)
    assert len(program.sites) == n_layers >= 1
    assert all(s.residual_add is not None for s in program.sites)
    with torch.no_grad():
        torch.testing.assert_close(
            program(*loaded.example_args), loaded.module(*loaded.example_args), atol=1e-5, rtol=0
        )
    if name in ("gpt_fast", "manual_gqa"):
        assert program.sites[0].num_kv_heads < program.sites[0].num_heads


def test_nanogpt_manual_attention_becomes_sdpa(root):
    loaded = load_model(f"{root / 'tests' / 'models.py'}:make_nanogpt")
    program = capture(loaded)
    targets = [n.target for n in program.gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.scaled_dot_product_attention.default in targets
    assert not any("softmax" in str(t) for t in targets)
    assert all(s.causal for s in program.sites)
    assert program.sites[0].block_style == "pre-norm"


def test_minilm_sites(minilm):
    program = capture(minilm)
    sites = program.sites
    assert len(sites) == 6
    assert {s.block_style for s in sites} == {"post-norm"}
    assert sites[0].module == "encoder.layer.0.attention.self"
    assert (sites[0].num_heads, sites[0].head_dim) == (12, 32)
    assert program.dynamic_dims["input_ids"] == {0: "batch", 1: "seq"}
