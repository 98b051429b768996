"""Eager attention as real models write it becomes SDPA at capture (ALiBi fused into baddbmm,
relative-position biases added before or after a (B*H, S, S) <-> (B, H, S, S) view, DeBERTa's
disentangled terms, both scale placements, float32 softmax casts, masks by add / masked_fill /
where), exactly; soft-capped scores stay a hand-written region that is still a site (and llm-drop
drops it); classes transformers refuses SDPA for load eagerly, and the report says so."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import attnc.passes.llm_drop as D
from attnc.capture.canonicalize import SDPA, canonicalize_attention
from attnc.capture.masks import score_kind
from attnc.capture.program import capture
from attnc.load.models import load_model, wrap_hf

SOFTMAX = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default}


def _config(name: str):
    import transformers as tf

    small = dict(vocab_size=128, num_hidden_layers=2, num_attention_heads=4)
    if name == "bloom":
        return tf.BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4)
    if name == "gemma2":
        return tf.Gemma2Config(
            **small, hidden_size=32, intermediate_size=64, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=64, sliding_window=4, attn_logit_softcapping=50.0,
        )
    if name == "t5":
        return tf.T5Config(
            vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8,
        )
    if name == "deberta_v2":
        return tf.DebertaV2Config(
            **small, hidden_size=32, intermediate_size=64, max_position_embeddings=64,
            relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
        )
    if name == "falcon_alibi":
        return tf.FalconConfig(
            **small, hidden_size=32, alibi=True, new_decoder_architecture=False,
            multi_query=False, parallel_attn=False, bias=True,
        )
    if name == "mpt":
        return tf.MptConfig(
            vocab_size=128, d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64
        )
    if name == "gpt2":
        return tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    if name == "bert":
        return tf.BertConfig(**small, hidden_size=32, intermediate_size=64)
    raise KeyError(name)


CLASSES = {
    "bloom": "BloomForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "t5": "T5EncoderModel",
    "deberta_v2": "DebertaV2Model",
    "falcon_alibi": "FalconForCausalLM",
    "mpt": "MptForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",
}
# score kind of every site; the kv heads; whether transformers 5 has an SDPA path for the class
EXPECT = {
    "bloom": ("alibi", 4, False),
    "gemma2": ("soft-cap", 2, False),
    "t5": ("additive-bias", 4, True),
    "deberta_v2": ("additive-bias", 4, False),
    "falcon_alibi": ("alibi", 4, True),
    "mpt": ("alibi", 4, False),
    "gpt2": ("none", 4, True),
    "bert": ("none", 4, True),
}


def _eager(name: str, seed: int = 0) -> nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    cls = getattr(tf, CLASSES[name])
    return cls._from_config(_config(name), attn_implementation="eager").eval()


def _variants(names: list[str], args: tuple) -> list[tuple]:
    """The example inputs, the same with left padding, and another batch and length."""
    out = [tuple(args)]
    padded = []
    for n, a in zip(names, args, strict=True):
        if "mask" in n:
            a = a.clone()
            a[0, :3] = 0
        padded.append(a)
    out.append(tuple(padded))
    g = torch.Generator().manual_seed(1)
    other = []
    for n, a in zip(names, args, strict=True):
        if "mask" in n:
            other.append(torch.ones(3, 9, dtype=a.dtype))
        elif n == "input_ids":
            other.append(torch.randint(1, 128, (3, 9), generator=g))
        else:
            other.append(torch.zeros(3, 9, dtype=a.dtype))
    out.append(tuple(other))
    return out


SLOW = {"bloom", "gemma2"}  # over ~10 s on two shared cores (bloom pays the first export)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in CLASSES]
)
def test_eager_attention_is_one_site_per_layer_and_exact(name):
    score, kv_heads, _ = EXPECT[name]
    loaded = wrap_hf(_eager(name), name, None, None)
    program = capture(loaded)
    sites = program.sites
    assert program.candidates == []
    assert len(sites) == 2 and len({s.module for s in sites}) == 2  # one per declared layer
    assert all((s.num_heads, s.num_kv_heads, s.head_dim) == (4, kv_heads, 8) for s in sites)
    assert [s.score for s in sites] == [score, score]
    assert all(s.row()["score"] == score for s in sites)
    assert all(s.q_proj and s.k_proj and s.v_proj and s.o_proj and s.residual_add for s in sites)
    nodes = program.gm.graph.nodes
    if score == "soft-cap":
        assert [(s.pattern, s.softcap) for s in sites] == [("region", 50.0)] * 2
        assert abs(sites[0].scale - 256**-0.5) < 1e-9  # Gemma-2's query_pre_attn_scalar
        assert [(s.causal, s.window) for s in sites] == [(True, 4), (True, None)]
        assert sum(n.target in SOFTMAX for n in nodes) == 2  # the region stays as written
    else:
        assert sum(n.target == SDPA for n in nodes) == 2
        assert not any(n.target in SOFTMAX for n in nodes)
        assert all(s.softcap is None and s.pattern == "dense" for s in sites)
    with torch.no_grad():
        for args in _variants(loaded.input_names, loaded.example_args):
            ref, got = loaded.module(*args), program(*args)
            assert (ref - got).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["falcon_alibi", "t5"])
def test_sdpa_sites_with_a_bias_in_the_mask_say_so(name):
    """Models that pass ALiBi or a relative bias to SDPA as attn_mask: the site's score kind."""
    import transformers as tf

    torch.manual_seed(0)
    cls = getattr(tf, CLASSES[name])
    model = cls._from_config(_config(name), attn_implementation="sdpa").eval()
    program = capture(wrap_hf(model, name, None, None))
    assert [s.score for s in program.sites] == [EXPECT[name][0]] * 2


def test_classes_without_sdpa_load_eagerly_and_say_so(tmp_path, caplog):
    for name in ("bloom", "gpt2"):
        _eager(name).save_pretrained(str(tmp_path / name), safe_serialization=True)
    with caplog.at_level(logging.WARNING, logger="attnc.load.models"):
        bloom = load_model(str(tmp_path / "bloom"))
    assert bloom.extra["attn_implementation"] == "eager"
    assert bloom.module.model.config._attn_implementation == "eager"
    assert any("eager attention" in r.getMessage() for r in caplog.records)
    assert load_model(str(tmp_path / "gpt2")).extra["attn_implementation"] == "sdpa"
    assert len(capture(bloom).sites) == 2


@pytest.mark.parametrize("name", ["gemma2", "bloom"])
def test_llm_drop_drops_a_region_or_rewritten_site(name):
    loaded = wrap_hf(_eager(name), name, None, None)
    program = capture(loaded)
    units = [u for u in D.find_units(program.gm) if u.kind == "attention"]
    assert [u.layer for u in units] == [0, 1]
    dropped = D.drop_units(program, [units[0].key])
    assert len(dropped.sites) == 1 and dropped.sites[0].layer == 1
    hf = loaded.module.model
    attn = hf.model.layers[0].self_attn if name == "gemma2" else hf.transformer.h[0].self_attention

    def zero(_m, _inp, out):  # BLOOM adds the residual inside its attention module
        if name == "bloom":
            return (_inp[1], *out[1:]) if isinstance(out, tuple) else _inp[1]
        return (torch.zeros_like(out[0]), *out[1:])

    hook = attn.register_forward_hook(zero)
    try:
        with torch.no_grad():
            ref = loaded.module(*loaded.example_args)
    finally:
        hook.remove()
    with torch.no_grad():
        got = dropped(*loaded.example_args)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


class _Manual(nn.Module):
    """One attention layer in the forms HF's eager code uses: q scaled before a bmm on (B*H, S, D),
    a relative bias added to the (B*H, S, S) scores before the view to (B, H, S, S), a float32
    softmax cast back, a masked_fill; or soft-capped scores with a where() mask."""

    def __init__(self, soft: str | None = None, dim: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.d, self.soft = heads, dim // heads, soft
        self.embed = nn.Embedding(64, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.rel = nn.Parameter(torch.randn(heads, 31))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, S = idx.shape
        x = self.embed(idx)  # (B, S, C)
        q, k, v = self.qkv(x).view(B, S, 3, self.h, self.d).permute(2, 0, 3, 1, 4)  # (B, H, S, D)
        keep = (idx != 0)[:, None, None, :]  # (B, 1, 1, S)
        if self.soft is None:
            qf = (q * self.d**-0.5).reshape(B * self.h, S, self.d)  # (B*H, S, D)
            s = torch.bmm(qf, k.reshape(B * self.h, S, self.d).transpose(1, 2))  # (B*H, S, S)
            pos = torch.arange(S)
            rel = self.rel[:, (pos[None, :] - pos[:, None] + 15).clamp(0, 30)]  # (H, S, S)
            s = s + rel.repeat(B, 1, 1) + self.rel[0, :S] * 0.5  # (B*H, S, S) and (S,) terms
            s = (s.view(B, self.h, S, S) + rel).view(B * self.h, S, S) * 1.5  # and (H, S, S)
            s = s.view(B, self.h, S, S).masked_fill(~keep, torch.finfo(s.dtype).min)
        else:
            s = q @ k.transpose(-1, -2) * self.d**-0.5  # (B, H, S, S)
            s = torch.tanh(s / 20.0) * 20.0 if self.soft == "cap" else torch.sigmoid(s) * 4.0
            s = torch.where(keep, s, torch.tensor(-1e9))
        p = torch.softmax(s.float(), dim=-1).to(q.dtype)
        y = p @ v  # (B, H, S, D)
        return x + self.out(y.transpose(1, 2).reshape(B, S, -1))


@pytest.mark.parametrize("soft", [None, "cap", "sigmoid"])
def test_handwritten_forms(soft):
    torch.manual_seed(0)
    model = _Manual(soft).eval()
    ids = torch.randint(1, 64, (2, 12))
    ids[1, :4] = 0
    dims = {0: torch.export.Dim("batch", max=8), 1: torch.export.Dim("seq", min=2, max=16)}
    gm = torch.export.export(model, (ids,), dynamic_shapes=(dims,), strict=False).module()
    count, candidates = canonicalize_attention(gm)
    assert candidates == []
    from attnc.graph.sites import find_sites

    sites = find_sites(gm)
    assert len(sites) == 1 and sites[0].num_heads == 4 and sites[0].head_dim == 8
    if soft is None:
        assert count == 1 and sites[0].mask == "float"
    else:
        assert count == 0 and sites[0].pattern == "region" and sites[0].mask == "bool"
        assert sites[0].score == ("soft-cap" if soft == "cap" else "other")
        assert sites[0].softcap == (20.0 if soft == "cap" else None)
        assert abs(sites[0].scale - 8**-0.5) < 1e-9
    with torch.no_grad():
        for x in (ids, torch.randint(1, 64, (3, 7))):
            assert (gm(x) - model(x)).abs().max().item() <= 1e-5


def test_handwritten_bfloat16_within_twice_torchs_own_error():
    """The float32 softmax casts of a bfloat16 model: SDPA's error against a float32 reference
    is at most twice that of the model's own bfloat16 math."""
    torch.manual_seed(0)
    model = _Manual().eval()
    ids = torch.randint(1, 64, (2, 12))
    ids[1, :4] = 0
    with torch.no_grad():
        ref = model(ids)
    low = model.to(torch.bfloat16)
    gm = torch.export.export(low, (ids,), strict=False).module()
    assert canonicalize_attention(gm) == (1, [])
    with torch.no_grad():
        own = (low(ids).float() - ref).abs().max().item()
        ours = (gm(ids).float() - ref).abs().max().item()
    assert ours <= 2 * own


def test_score_kind_reads_the_mask():
    s = 8
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    causal = torch.where(j <= i, 0.0, torch.finfo(torch.float32).min)[None, None]  # (1, 1, S, S)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])[None, :, None, None]
    assert score_kind(causal) == "none"
    assert score_kind(j <= i) == "none"
    assert score_kind(causal + slopes * j) == "alibi"
    assert score_kind(slopes * -(i - j).abs()) == "alibi"  # symmetric (encoder) ALiBi
    assert score_kind(causal + (slopes * j).bfloat16().float() + 3.0 * i) == "alibi"
    assert score_kind(causal + torch.randn(1, 4, s, s)) == "additive-bias"
