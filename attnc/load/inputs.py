"""Example inputs from a model's kind: token ids (+ mask), pixel values, or both for a VLM.

Batch 2 and sequence 16 by default: export specializes sizes 0 and 1, so examples avoid them.
`--input-shape` overrides the (batch, seq) or (batch, channels, height, width) shape.
"""

from __future__ import annotations

from typing import Any

import torch

from attnc.errors import UsageError

DEFAULT_BATCH, DEFAULT_SEQ = 2, 16


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def token_inputs(
    vocab: int, batch: int, seq: int, low: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(low, max(vocab, low + 1), (batch, seq), generator=_gen())
    mask = torch.ones(batch, seq, dtype=torch.long)
    return ids, mask


def _batch_seq(input_shape: list[int] | None) -> tuple[int, int]:
    if not input_shape:
        return DEFAULT_BATCH, DEFAULT_SEQ
    if len(input_shape) != 2 or min(input_shape) < 1:
        raise UsageError(f"--input-shape for a text model is batch,seq; got {input_shape}")
    return input_shape[0], input_shape[1]


def _pixels(cfg: Any, batch: int, input_shape: list[int] | None) -> torch.Tensor:
    if input_shape and len(input_shape) == 4:
        return torch.randn(*input_shape, generator=_gen())
    size = getattr(cfg, "image_size", 224)
    chans = getattr(cfg, "num_channels", 3)
    return torch.randn(batch, chans, size, size, generator=_gen())


def vlm_image_tokens(config: Any) -> int:
    n = getattr(config, "image_seq_length", None)
    if n:
        return int(n)
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    if getattr(config, "vision_feature_select_strategy", "default") == "full":
        n += 1
    return n


def vlm_ids(config: Any, batch: int, prefix: int, suffix: int) -> torch.Tensor:
    vocab = config.text_config.vocab_size
    image_id = (
        config.image_token_id if hasattr(config, "image_token_id") else config.image_token_index
    )
    n_img = vlm_image_tokens(config)
    ids = torch.randint(0, vocab, (batch, prefix + n_img + suffix), generator=_gen())
    ids[ids == image_id] = (image_id + 1) % vocab
    ids[:, prefix : prefix + n_img] = image_id
    return ids


def example_inputs_for(
    kind: str, config: Any, input_shape: list[int] | None
) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """Input names and example tensors for a Hugging Face model of `kind`."""
    if kind == "vision":
        batch = input_shape[0] if input_shape else DEFAULT_BATCH
        return ["pixel_values"], (_pixels(config, batch, input_shape),)
    if kind == "vlm":
        batch, seq = _batch_seq(input_shape)
        ids = vlm_ids(config, batch, prefix=4, suffix=max(seq - 4, 2))
        mask = torch.ones_like(ids)
        pix = _pixels(config.vision_config, batch, None)
        return ["input_ids", "attention_mask", "pixel_values"], (ids, mask, pix)
    batch, seq = _batch_seq(input_shape)
    vocab = getattr(config, "vocab_size", 1000)
    ids, mask = token_inputs(vocab, batch, seq)
    return ["input_ids", "attention_mask"], (ids, mask)


def plain_example_inputs(model: torch.nn.Module, params: list, input_shape: list[int] | None):
    """A hand-written model with no example inputs: token ids if it has an embedding table,
    else a float tensor of `--input-shape`."""
    emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    if emb is not None:
        batch, seq = _batch_seq(input_shape)
        return (token_inputs(emb.num_embeddings, batch, seq)[0],)
    if not input_shape:
        raise UsageError(
            "cannot guess example inputs for this model",
            "pass --input-shape or return (model, example_inputs) from the factory",
        )
    return (torch.randn(*input_shape, generator=_gen()),)
