"""Example inputs for models that see images or hear audio: a VLM's token ids with one image's
worth of image tokens (counted from the model's own image features) and its pixels; raw audio sized
for the convolutional feature encoder; audio features in the layout the encoder accepts."""

from __future__ import annotations

from typing import Any

import torch

from attnc.errors import LoadError, UsageError
from attnc.load.inputs import (
    DEFAULT_BATCH,
    DEFAULT_SEQ,
    FACTORY_HINT,
    Signature,
    batch_seq,
    class_name,
    fit_seq,
    image_geometry,
    image_token_id,
    max_positions,
    seeded,
    special_ids,
    text_config,
    token_ids,
    vocab_size,
)


def vlm_inputs(model, cfg, sig: Signature, input_shape) -> dict[str, torch.Tensor]:
    """Token ids with one image's worth of image tokens, the mask, and the pixels: the number
    of image tokens is what the model's own `get_image_features` yields for one image."""
    batch, seq = batch_seq(input_shape)
    vcfg = getattr(cfg, "vision_config", None) or cfg
    chans, h, w = image_geometry(model, vcfg, vlm=True)
    n_img, extra_dims = _image_tokens(model, chans, h, w)
    img = image_token_id(cfg)
    vocab = vocab_size(model, cfg)
    prefix, suffix = 4, max(seq - 4, 2)
    ids = token_ids(vocab, (batch, prefix + n_img + suffix), special_ids(cfg))
    ids[:, prefix : prefix + n_img] = img
    fit_seq(ids.shape[1], max_positions(text_config(cfg)), bool(input_shape), "token sequence")
    out = {"input_ids": ids}
    if sig.takes("attention_mask"):
        out["attention_mask"] = torch.ones_like(ids)
    out["pixel_values"] = torch.randn(batch, *extra_dims, chans, h, w, generator=seeded())
    return out


def _image_tokens(model, chans: int, h: int, w: int) -> tuple[int, tuple[int, ...]]:
    """Image tokens per image, and the extra pixel dims ((), or (1,) for (B, N, C, H, W))."""
    get = getattr(model, "get_image_features", None)
    tried = []
    for extra in ((), (1,)):
        if get is None:
            break
        pix = torch.randn(1, *extra, chans, h, w, generator=seeded())
        try:
            with torch.no_grad():
                feats = get(pixel_values=pix)
        except Exception as exc:  # noqa: BLE001 - this layout is not the model's; try the next
            tried.append(" ".join(str(exc).split())[:120])
            continue
        n = _feature_rows(feats)
        if n:
            return n, extra
    raise LoadError(
        f"cannot work out the image inputs of {class_name(model)}: its image features do not come "
        "from (batch, channels, height, width) pixels"
        + (f" ({tried[0]})" if tried else " (it has no get_image_features)"),
        FACTORY_HINT,
    )


def _feature_rows(feats: Any) -> int:
    pooled = getattr(feats, "pooler_output", None)
    if pooled is not None:  # transformers 5: the projected features
        feats = pooled
    elif not isinstance(feats, (torch.Tensor, list, tuple)):
        feats = getattr(feats, "last_hidden_state", None)
    if isinstance(feats, torch.Tensor):
        feats = [feats]
    if not isinstance(feats, (list, tuple)):
        return 0
    return sum(t.shape[:-1].numel() for t in feats if isinstance(t, torch.Tensor) and t.dim() >= 2)


def speech_inputs(model, cfg, main: str, input_shape) -> dict[str, torch.Tensor]:
    batch = input_shape[0] if input_shape else DEFAULT_BATCH
    if main == "input_values":  # raw audio (batch, samples)
        if input_shape and len(input_shape) == 2:
            samples = input_shape[1]
        elif input_shape and len(input_shape) != 1:
            raise UsageError(f"--input-shape for raw audio is batch,samples; got {input_shape}")
        else:
            samples = _samples_for_frames(model, cfg, DEFAULT_SEQ)
        return {main: torch.randn(batch, samples, generator=seeded())}
    if input_shape and len(input_shape) == 3:
        return {main: torch.randn(*input_shape, generator=seeded())}
    if input_shape and len(input_shape) != 1:
        raise UsageError(
            f"--input-shape for audio features is batch or batch,features,frames; got {input_shape}"
        )
    shape = _feature_layout(model, cfg)
    return {main: torch.randn(batch, *shape, generator=seeded())}


def _samples_for_frames(model, cfg, frames: int) -> int:
    """Audio samples a convolutional feature encoder turns into `frames` frames."""
    kernels, strides = getattr(cfg, "conv_kernel", None), getattr(cfg, "conv_stride", None)
    if not kernels or not strides or len(kernels) != len(strides):
        raise LoadError(
            f"cannot work out the audio length {class_name(model)} takes "
            "(no conv_kernel/conv_stride in its config)",
            "pass --input-shape batch,samples, or " + FACTORY_HINT,
        )
    n = frames
    for k, s in zip(reversed(kernels), reversed(strides), strict=True):
        n = (n - 1) * s + k
    return n


def _feature_layout(model, cfg) -> tuple[int, int]:
    """(features, frames) or (frames, features) per example, whichever the encoder accepts.
    Whisper needs exactly 2 * max_source_positions frames, (batch, mel bins, frames)."""
    feats = next(
        (
            getattr(cfg, k)
            for k in ("num_mel_bins", "feature_size", "input_feat_per_channel")
            if isinstance(getattr(cfg, k, None), int)
        ),
        None,
    )
    if feats is None:
        raise LoadError(
            f"cannot work out the audio features {class_name(model)} takes "
            "(no num_mel_bins in its config)",
            "pass --input-shape batch,features,frames, or " + FACTORY_HINT,
        )
    src = getattr(cfg, "max_source_positions", None)
    frames = [2 * src, src] if isinstance(src, int) else []
    frames += [f for f in (4 * DEFAULT_SEQ, 4 * DEFAULT_SEQ + 1) if f != feats]
    candidates = [(feats, f) for f in frames] + [(f, feats) for f in frames]
    get_enc = getattr(model, "get_encoder", None)
    enc = get_enc() if callable(get_enc) and getattr(cfg, "is_encoder_decoder", False) else model
    main = getattr(model, "main_input_name", "input_features")
    for shape in candidates:
        try:
            with torch.no_grad():
                enc(**{main: torch.randn(1, *shape, generator=seeded())})
        except Exception:  # noqa: BLE001, S112 - not this layout; try the next
            continue
        return shape
    raise LoadError(
        f"cannot work out the audio feature shape {class_name(model)} takes ({feats} features)",
        "pass --input-shape batch,features,frames, or " + FACTORY_HINT,
    )
