"""The Hugging Face zoo: tiny configs of every kind of architecture attnc must handle, built
offline with random seeded weights (2 layers, hidden 32-64, 2-4 heads, vocab <= 512, images
<= 32 px, sequences <= 16), plus the hand-written models of tests/models.py. The configs live
in tests/zoo_decoders.py (decoder LMs) and tests/zoo_others.py (encoders, vision, speech,
encoder-decoders, VLMs).

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


# The configs register themselves on import (import hf_zoo, not these modules, first).
import zoo_decoders  # noqa: E402, F401
import zoo_others  # noqa: E402, F401

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
