"""The Hugging Face zoo: tiny configs of every kind of architecture attnc must handle, built
offline with random seeded weights (2 layers, hidden 32-64, 2-4 heads, vocab <= 512, images
<= 32 px, sequences <= 16), plus the hand-written models of tests/models.py.

ZOO maps a name to an `Arch`: its config factory, model class, kind, and the number of attention
sites its config declares (`sites(config)`: one per attention call, so an encoder-decoder counts
its encoder self-, decoder self- and decoder cross-attention, and a shared-weight encoder counts
every call of the shared layer).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")


@dataclass(frozen=True)
class Arch:
    name: str
    config: Callable[[], Any]  # () -> PretrainedConfig, or None for a hand-written model
    model_class: str  # transformers class name, or tests/models.py factory name
    kind: str  # causal-lm | encoder | vision | speech | seq2seq | vlm (what it is, not a guess)
    sites: Callable[[Any], int]  # attention sites the config declares
    traits: tuple[str, ...] = ()  # what the architecture exercises
    shared_weights: bool = False  # a drop removes no parameter: the layer's weights serve others

    @property
    def handwritten(self) -> bool:
        return self.config is None


L = 2  # layers everywhere
TEXT = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=L,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
ENC = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=L,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=128,
)
VIS = dict(
    image_size=32,
    patch_size=8,
    hidden_size=64,
    num_hidden_layers=L,
    num_attention_heads=4,
    intermediate_size=128,
)


def _tf():
    import transformers as tf

    return tf


def layers(cfg) -> int:
    return cfg.num_hidden_layers


def seq2seq_sites(cfg) -> int:
    enc = getattr(cfg, "encoder_layers", None) or cfg.num_layers
    dec = getattr(cfg, "decoder_layers", None) or getattr(cfg, "num_decoder_layers", None) or enc
    return enc + 2 * dec


def vlm_sites(cfg) -> int:
    return cfg.vision_config.num_hidden_layers + cfg.text_config.num_hidden_layers


_ARCHS: list[Arch] = []


def arch(name, model_class, kind, sites=layers, traits=(), shared_weights=False):
    def register(fn):
        _ARCHS.append(Arch(name, fn, model_class, kind, sites, tuple(traits), shared_weights))
        return fn

    return register


# ---------------------------------------------------------------------------- decoder LMs


@arch("llama", "LlamaForCausalLM", "causal-lm", traits=("gqa", "rope"))
def _llama():
    return _tf().LlamaConfig(**TEXT)


@arch("mistral", "MistralForCausalLM", "causal-lm", traits=("gqa", "sliding-window"))
def _mistral():
    return _tf().MistralConfig(**TEXT, sliding_window=8)


@arch("qwen2", "Qwen2ForCausalLM", "causal-lm", traits=("gqa", "qkv-bias"))
def _qwen2():
    return _tf().Qwen2Config(**TEXT)


@arch("qwen3", "Qwen3ForCausalLM", "causal-lm", traits=("gqa", "qk-norm"))
def _qwen3():
    return _tf().Qwen3Config(**TEXT, head_dim=16)


@arch("gemma", "GemmaForCausalLM", "causal-lm", traits=("mqa", "gelu"))
def _gemma():
    return _tf().GemmaConfig(**{**TEXT, "num_key_value_heads": 1}, head_dim=16)


@arch("gemma2", "Gemma2ForCausalLM", "causal-lm", traits=("soft-capping", "sliding-window"))
def _gemma2():
    return _tf().Gemma2Config(
        **TEXT, head_dim=16, sliding_window=8, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, attn_implementation="eager",
    )


@arch("phi3", "Phi3ForCausalLM", "causal-lm", traits=("fused-qkv",))
def _phi3():
    return _tf().Phi3Config(**TEXT, pad_token_id=0)


@arch("phi", "PhiForCausalLM", "causal-lm", traits=("parallel-residual", "partial-rope"))
def _phi():
    return _tf().PhiConfig(**TEXT, partial_rotary_factor=0.5)


@arch("gpt2", "GPT2LMHeadModel", "causal-lm", traits=("absolute-position", "conv1d"))
def _gpt2():
    return _tf().GPT2Config(vocab_size=512, n_embd=64, n_layer=L, n_head=4, n_positions=128)


@arch("gptj", "GPTJForCausalLM", "causal-lm", traits=("parallel-residual",))
def _gptj():
    return _tf().GPTJConfig(
        vocab_size=512, n_embd=64, n_layer=L, n_head=4, n_positions=128, rotary_dim=8
    )


@arch("gpt_neox", "GPTNeoXForCausalLM", "causal-lm", traits=("parallel-residual",))
def _gpt_neox():
    return _tf().GPTNeoXConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=L, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=128, use_parallel_residual=True,
    )


def _falcon(**kw):
    return _tf().FalconConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=L, num_attention_heads=4,
        max_position_embeddings=128, parallel_attn=True, new_decoder_architecture=False,
        bias=False, **kw,
    )


@arch("falcon", "FalconForCausalLM", "causal-lm", traits=("parallel-residual", "mqa"))
def _falcon_mqa():
    return _falcon(multi_query=True, alibi=False)


@arch("falcon_alibi", "FalconForCausalLM", "causal-lm", traits=("parallel-residual", "alibi"))
def _falcon_alibi():
    return _falcon(multi_query=False, alibi=True)


@arch("bloom", "BloomForCausalLM", "causal-lm", traits=("alibi", "eager"))
def _bloom():
    return _tf().BloomConfig(vocab_size=512, hidden_size=64, n_layer=L, n_head=4)


@arch("mpt", "MptForCausalLM", "causal-lm", traits=("alibi", "eager"))
def _mpt():
    return _tf().MptConfig(
        vocab_size=512, d_model=64, n_layers=L, n_heads=4, max_seq_len=128, expansion_ratio=2
    )


@arch("gpt_bigcode", "GPTBigCodeForCausalLM", "causal-lm", traits=("mqa",))
def _gpt_bigcode():
    return _tf().GPTBigCodeConfig(
        vocab_size=512, n_embd=64, n_layer=L, n_head=4, n_positions=128, multi_query=True
    )


@arch("opt", "OPTForCausalLM", "causal-lm", traits=("learned-position",))
def _opt():
    return _tf().OPTConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=L, num_attention_heads=4, ffn_dim=128,
        max_position_embeddings=128, word_embed_proj_dim=64,
    )


@arch("cohere", "CohereForCausalLM", "causal-lm", traits=("parallel-residual",))
def _cohere():
    return _tf().CohereConfig(**TEXT)


@arch("stablelm", "StableLmForCausalLM", "causal-lm", traits=("partial-rope", "layernorm"))
def _stablelm():
    return _tf().StableLmConfig(**TEXT)


@arch("olmo", "OlmoForCausalLM", "causal-lm", traits=("non-parametric-norm",))
def _olmo():
    return _tf().OlmoConfig(**TEXT, pad_token_id=1)


@arch("mixtral", "MixtralForCausalLM", "causal-lm", traits=("moe",))
def _mixtral():
    return _tf().MixtralConfig(**TEXT, num_local_experts=4, num_experts_per_tok=2)


@arch("qwen2_moe", "Qwen2MoeForCausalLM", "causal-lm", traits=("moe", "shared-expert"))
def _qwen2_moe():
    return _tf().Qwen2MoeConfig(
        **TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    )


@arch("olmoe", "OlmoeForCausalLM", "causal-lm", traits=("moe", "qk-norm"))
def _olmoe():
    return _tf().OlmoeConfig(**TEXT, num_experts=4, num_experts_per_tok=2, pad_token_id=1)


# ---------------------------------------------------------------------------- encoders


@arch("bert", "BertModel", "encoder", traits=("post-norm", "absolute-position"))
def _bert():
    return _tf().BertConfig(**ENC)


@arch("roberta", "RobertaModel", "encoder", traits=("post-norm",))
def _roberta():
    return _tf().RobertaConfig(**ENC, pad_token_id=1)


@arch("xlm_roberta", "XLMRobertaModel", "encoder", traits=("post-norm",))
def _xlm_roberta():
    return _tf().XLMRobertaConfig(**ENC, pad_token_id=1)


@arch("distilbert", "DistilBertModel", "encoder", sites=lambda c: c.n_layers)
def _distilbert():
    return _tf().DistilBertConfig(
        vocab_size=512, dim=64, n_layers=L, n_heads=4, hidden_dim=128, max_position_embeddings=128
    )


@arch("albert", "AlbertModel", "encoder", traits=("shared-weights",), shared_weights=True)
def _albert():
    return _tf().AlbertConfig(**ENC, embedding_size=32, num_hidden_groups=1)


@arch("electra", "ElectraModel", "encoder", traits=("embedding-projection",))
def _electra():
    return _tf().ElectraConfig(**ENC, embedding_size=32)


@arch("deberta_v2", "DebertaV2Model", "encoder", traits=("disentangled", "relative-position"))
def _deberta_v2():
    return _tf().DebertaV2Config(
        **ENC, relative_attention=True, position_buckets=8, max_relative_positions=16,
        pos_att_type=["p2c", "c2p"],
    )


@arch("mpnet", "MPNetModel", "encoder", traits=("relative-position",))
def _mpnet():
    return _tf().MPNetConfig(**ENC)  # 32 buckets: MPNet's encoder hard-codes the count


@arch("bigbird", "BigBirdModel", "encoder", traits=("local-global",))
def _bigbird():
    # block-sparse needs seq > (5 + 2 * random blocks) * block; at 16 tokens it runs full
    return _tf().BigBirdConfig(**ENC, attention_type="original_full", block_size=4)


@arch("longformer", "LongformerModel", "encoder", traits=("local-global", "windowed"))
def _longformer():
    return _tf().LongformerConfig(**ENC, attention_window=4, pad_token_id=1)


# ---------------------------------------------------------------------------- vision


@arch("vit", "ViTModel", "vision", traits=("plain",))
def _vit():
    return _tf().ViTConfig(**VIS)


@arch("deit", "DeiTModel", "vision", traits=("distillation-token",))
def _deit():
    return _tf().DeiTConfig(**VIS)


@arch("beit", "BeitModel", "vision", traits=("relative-bias",))
def _beit():
    return _tf().BeitConfig(**VIS, use_relative_position_bias=True, use_mask_token=False)


@arch("data2vec_vision", "Data2VecVisionModel", "vision", traits=("shared-relative-bias",))
def _data2vec_vision():
    return _tf().Data2VecVisionConfig(**VIS, use_shared_relative_position_bias=True)


@arch("swin", "SwinModel", "vision", sites=lambda c: sum(c.depths), traits=("windowed",))
def _swin():
    return _tf().SwinConfig(
        image_size=32, patch_size=4, num_channels=3, embed_dim=32, depths=[2], num_heads=[2],
        window_size=4, mlp_ratio=2.0,  # 8x8 patches, 4 windows; the second layer shifts them
    )


@arch("clip_vision", "CLIPVisionModel", "vision", traits=("pre-norm", "quick-gelu"))
def _clip_vision():
    return _tf().CLIPVisionConfig(**VIS)


@arch("siglip_vision", "SiglipVisionModel", "vision", traits=("attention-pooling-head",))
def _siglip_vision():
    return _tf().SiglipVisionConfig(**VIS, vision_use_head=False)


@arch("dinov2", "Dinov2Model", "vision", traits=("layer-scale",))
def _dinov2():
    return _tf().Dinov2Config(**{**VIS, "patch_size": 4}, mlp_ratio=2)


# ---------------------------------------------------------------------------- speech


_CONV = dict(conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_feat_extract_layers=2)


@arch("wav2vec2", "Wav2Vec2Model", "speech", traits=("conv-features", "conv-position"))
def _wav2vec2():
    return _tf().Wav2Vec2Config(
        **{k: v for k, v in ENC.items() if k != "max_position_embeddings"}, **_CONV,
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
    )


@arch("hubert", "HubertModel", "speech", traits=("conv-features",))
def _hubert():
    return _tf().HubertConfig(
        **{k: v for k, v in ENC.items() if k != "max_position_embeddings"}, **_CONV,
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
    )


# ---------------------------------------------------------------------------- encoder-decoder


@arch("t5", "T5ForConditionalGeneration", "seq2seq", sites=seq2seq_sites,
      traits=("relative-bias", "cross-attention"))
def _t5():
    return _tf().T5Config(
        vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=L, num_decoder_layers=L,
        num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
    )


@arch("bart", "BartForConditionalGeneration", "seq2seq", sites=seq2seq_sites,
      traits=("post-norm", "cross-attention"))
def _bart():
    return _tf().BartConfig(
        vocab_size=512, d_model=64, encoder_layers=L, decoder_layers=L,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_position_embeddings=128,
    )


@arch("whisper", "WhisperForConditionalGeneration", "seq2seq", sites=seq2seq_sites,
      traits=("speech", "cross-attention"))
def _whisper():
    return _tf().WhisperConfig(
        vocab_size=512, num_mel_bins=16, d_model=64, encoder_layers=L, decoder_layers=L,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_source_positions=16, max_target_positions=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None,
    )


# ---------------------------------------------------------------------------- VLMs


@arch("llava", "LlavaForConditionalGeneration", "vlm", sites=vlm_sites,
      traits=("clip-vision", "llama"))
def _llava():
    tf = _tf()
    return tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(**VIS),
        text_config=tf.LlamaConfig(**TEXT),
        image_token_index=511,
        image_seq_length=16,
        vision_feature_layer=-1,  # every vision layer feeds the text model
    )


@arch("paligemma", "PaliGemmaForConditionalGeneration", "vlm", sites=vlm_sites,
      traits=("siglip-vision", "gemma", "prefix-lm"))
def _paligemma():
    tf = _tf()
    vision = tf.SiglipVisionConfig(**VIS, vision_use_head=False)
    text = tf.GemmaConfig(**{**TEXT, "num_key_value_heads": 1}, head_dim=16)
    return tf.PaliGemmaConfig(
        vision_config=vision, text_config=text, image_token_index=511, projection_dim=64,
    )


@arch("idefics3", "Idefics3ForConditionalGeneration", "vlm", sites=vlm_sites,
      traits=("5d-pixels", "pixel-shuffle", "llama"))
def _idefics3():
    tf = _tf()
    return tf.Idefics3Config(
        vision_config=tf.Idefics3VisionConfig(**VIS),
        text_config=tf.LlamaConfig(**TEXT),
        image_token_id=511,
        scale_factor=2,  # 16 patches -> 4 image tokens
    )


@arch("aya_vision", "AyaVisionForConditionalGeneration", "vlm", sites=vlm_sites,
      traits=("siglip-vision", "parallel-residual", "pixel-shuffle"))
def _aya_vision():
    tf = _tf()
    return tf.AyaVisionConfig(
        vision_config=tf.SiglipVisionConfig(**VIS, vision_use_head=False),
        text_config=tf.Cohere2Config(**TEXT),
        image_token_index=511,
        downsample_factor=2,
        vision_feature_layer=-1,
    )


# ---------------------------------------------------------------------------- hand-written

for _name, _n, _traits in [
    ("nanogpt", 2, ("manual-attention", "causal")),
    ("gpt_fast", 2, ("gqa", "rope")),
    ("manual_gqa", 2, ("manual-attention", "gqa")),
    ("tiny_encoder", 2, ("padding-mask",)),
    ("tiny_encoder_manual", 2, ("manual-attention", "padding-mask")),
    ("tiny_vlm", 3, ("vision-prefix",)),
]:
    _ARCHS.append(Arch(_name, None, f"make_{_name}", "custom", lambda c, n=_n: n, _traits))

ZOO: dict[str, Arch] = {a.name: a for a in _ARCHS}
HF = [a.name for a in _ARCHS if not a.handwritten]
HANDWRITTEN = [a.name for a in _ARCHS if a.handwritten]


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model `name`, random weights from `seed`, eval mode."""
    tf = _tf()
    a = ZOO[name]
    cfg = a.config()
    cfg.architectures = [a.model_class]
    torch.manual_seed(seed)
    cls = getattr(tf, a.model_class)
    impl = getattr(cfg, "_attn_implementation", None) or "sdpa"
    try:
        model = cls._from_config(cfg, attn_implementation=impl)
    except ValueError:  # the class has no SDPA path
        model = cls._from_config(cfg, attn_implementation="eager")
    return model.eval()


def save(name: str, folder: Path, seed: int = 0) -> Path:
    """A Hugging Face folder (config.json + model.safetensors) holding the tiny model `name`."""
    build(name, seed).save_pretrained(str(folder), safe_serialization=True)
    return folder


def spec(name: str, folder: Path | None = None) -> str:
    """What `attnc` is given for `name`: the saved folder, or tests/models.py:make_<name>."""
    a = ZOO[name]
    if a.handwritten:
        return f"{Path(__file__).parent / 'models.py'}:{a.model_class}"
    assert folder is not None
    return str(folder)


def declared_sites(name: str) -> int:
    a = ZOO[name]
    return a.sites(None if a.handwritten else a.config())
