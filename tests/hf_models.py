"""Hugging Face architectures built offline from tiny configs (random weights, seeded)."""

from __future__ import annotations

import os

import torch

TEXT = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _cfg(name: str):
    import transformers as tf

    if name == "llama":
        return tf.LlamaConfig(**TEXT, architectures=["LlamaForCausalLM"])
    if name == "qwen2":
        return tf.Qwen2Config(**TEXT, architectures=["Qwen2ForCausalLM"])
    if name == "mistral":
        return tf.MistralConfig(**TEXT, sliding_window=8, architectures=["MistralForCausalLM"])
    if name == "gpt2":
        return tf.GPT2Config(
            vocab_size=512,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            architectures=["GPT2LMHeadModel"],
        )
    if name == "bert":
        return tf.BertConfig(
            vocab_size=512,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            architectures=["BertModel"],
        )
    if name == "vit":
        return tf.ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            architectures=["ViTModel"],
        )
    if name == "clip":
        return tf.CLIPVisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            architectures=["CLIPVisionModel"],
        )
    if name == "llava":
        vision = tf.CLIPVisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
        )
        text = tf.LlamaConfig(**TEXT)
        return tf.LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=511,
            image_seq_length=16,
            architectures=["LlavaForConditionalGeneration"],
        )
    raise KeyError(name)


ARCHS = ["llama", "qwen2", "mistral", "gpt2", "bert", "vit", "clip", "llava"]


def build(name: str, seed: int = 0):
    """A tiny HF model of architecture `name`, eval mode, sdpa attention."""
    import transformers as tf

    os.environ.setdefault("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    cfg = _cfg(name)
    torch.manual_seed(seed)
    cls = getattr(tf, cfg.architectures[0])
    return cls._from_config(cfg, attn_implementation="sdpa").eval()


def save(name: str, path, seed: int = 0):
    """Write a tiny model of `name` as an HF folder (config + safetensors)."""
    model = build(name, seed)
    model.save_pretrained(str(path), safe_serialization=True)
    return path
