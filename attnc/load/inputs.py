"""Example inputs worked out from the model itself, never from its class name: the forward
signature, `main_input_name`, the config (vocabulary, positions, image and audio geometry, image
token id) and the tokenizer when there is one. A factory's own example inputs always win.

Batch 2 and sequence 16 by default: export specializes sizes 0 and 1, so examples avoid them.
`--input-shape` overrides the shape of the main input: (batch, seq) for text and VLMs,
(batch, channels, height, width) for images, (batch, samples) for raw audio, the full feature shape
for audio features.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from attnc.errors import LoadError, UsageError

log = logging.getLogger(__name__)

ModelKind = Literal["causal-lm", "encoder", "seq2seq", "vision", "speech", "vlm", "custom"]

DEFAULT_BATCH, DEFAULT_SEQ = 2, 16
AUDIO_INPUTS = ("input_features", "input_values")
FACTORY_HINT = (
    "return (model, example_inputs) from a factory (file.py:factory), with example_inputs a "
    "tuple of tensors or a dict such as {'input_ids': ..., 'pixel_values': ...}"
)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# what the model's forward takes


@dataclass(frozen=True)
class Signature:
    names: tuple[str, ...]  # named parameters, in order
    positional: tuple[str, ...]  # those that can be passed positionally
    var_positional: bool
    var_keyword: bool

    def accepts(self, name: str) -> bool:
        return name in self.names or self.var_keyword

    def takes(self, name: str) -> bool:
        """Named explicitly (not only swallowed by **kwargs)."""
        return name in self.names


def signature_of(model: torch.nn.Module) -> Signature:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature
        return Signature((), (), True, True)
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    pos = [p.name for p in named if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return Signature(
        tuple(p.name for p in named),
        tuple(pos),
        any(p.kind == p.VAR_POSITIONAL for p in params),
        any(p.kind == p.VAR_KEYWORD for p in params),
    )


def class_name(model: torch.nn.Module) -> str:
    return type(model).__name__


def image_token_id(config: Any) -> int | None:
    for key in ("image_token_id", "image_token_index"):
        val = getattr(config, key, None)
        if isinstance(val, int):
            return val
    return None


def model_kind(model: torch.nn.Module) -> ModelKind:
    """The kind of a Hugging Face model, from what its forward takes and what it computes."""
    cfg = model.config
    sig = signature_of(model)
    main = getattr(model, "main_input_name", "input_ids")
    if main in AUDIO_INPUTS:
        return "speech"
    text, image = sig.takes("input_ids"), sig.takes("pixel_values") or main == "pixel_values"
    if image and text and image_token_id(cfg) is not None:
        return "vlm"
    if image and not text:
        return "vision"
    if getattr(cfg, "is_encoder_decoder", False) and sig.takes("decoder_input_ids"):
        return "seq2seq"
    if text:
        gen = getattr(model, "can_generate", None)
        # a model that generates returns next-token logits; a base decoder returns hidden states,
        # which are compared like an encoder's
        return "causal-lm" if callable(gen) and gen() else "encoder"
    return "custom"


# ----------------------------------------------------------------------------------------------
# shapes


def batch_seq(input_shape: list[int] | None) -> tuple[int, int]:
    if not input_shape:
        return DEFAULT_BATCH, DEFAULT_SEQ
    if len(input_shape) != 2 or min(input_shape) < 1:
        raise UsageError(f"--input-shape for a text model is batch,seq; got {input_shape}")
    return input_shape[0], input_shape[1]


def text_config(cfg: Any) -> Any:
    get = getattr(cfg, "get_text_config", None)
    try:
        return get(decoder=True) if callable(get) else cfg
    except TypeError:
        return get()


def max_positions(cfg: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_target_positions"):
        val = getattr(cfg, key, None)
        if isinstance(val, int) and val > 0:
            return val
    return None


def fit_seq(seq: int, limit: int | None, given: bool, what: str = "sequence") -> int:
    if limit is None or seq <= limit:
        return seq
    if given:
        raise UsageError(
            f"--input-shape asks for a {what} of {seq}; the model takes at most {limit}"
        )
    return limit


def special_ids(cfg: Any) -> set[int]:
    """Token ids a random example must avoid: image/video/special markers change the structure."""
    out = set()
    for c in {id(cfg): cfg, id(text_config(cfg)): text_config(cfg)}.values():
        for key, val in vars(c).items():
            if key.endswith(("_token_id", "_token_index")) and isinstance(val, int):
                out.add(val)
    return out


def token_ids(vocab: int, shape: tuple[int, ...], avoid: set[int] = frozenset()) -> torch.Tensor:
    allowed = torch.tensor([i for i in range(vocab) if i not in avoid] or [0])
    return allowed[torch.randint(0, len(allowed), shape, generator=seeded())]


def token_inputs(
    vocab: int, batch: int, seq: int, low: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(low, max(vocab, low + 1), (batch, seq), generator=seeded())
    mask = torch.ones(batch, seq, dtype=torch.long)
    return ids, mask


def vocab_size(model: torch.nn.Module, cfg: Any) -> int:
    vocab = getattr(text_config(cfg), "vocab_size", None) or getattr(cfg, "vocab_size", None)
    if not vocab:
        emb = getattr(model, "get_input_embeddings", lambda: None)()
        vocab = getattr(emb, "num_embeddings", None)
    if not vocab:
        raise LoadError(
            f"cannot work out the vocabulary size of {class_name(model)} for example token ids",
            FACTORY_HINT,
        )
    return int(vocab)


def image_geometry(model: torch.nn.Module, cfg: Any, vlm: bool = False) -> tuple[int, int, int]:
    """(channels, height, width) from the (vision) config."""
    size = getattr(cfg, "image_size", None)
    if isinstance(size, (list, tuple)) and len(size) == 2:
        h, w = int(size[0]), int(size[1])
    elif isinstance(size, int):
        h = w = size
    else:
        if vlm:
            raise LoadError(
                f"cannot work out the image inputs of {class_name(model)}: its vision config has "
                "no image_size (pixels of another layout, e.g. flattened patches with a grid)",
                FACTORY_HINT,
            )
        raise LoadError(
            f"cannot work out the image size of {class_name(model)}: its config has no image_size",
            "pass --input-shape batch,channels,height,width, or " + FACTORY_HINT,
        )
    return int(getattr(cfg, "num_channels", 3)), h, w


def _pixels(model, cfg: Any, batch: int, input_shape: list[int] | None) -> torch.Tensor:
    if input_shape and len(input_shape) == 4:
        patch = getattr(cfg, "patch_size", None)
        patch = patch if isinstance(patch, int) else None
        if min(input_shape) < 1 or (patch and (input_shape[2] % patch or input_shape[3] % patch)):
            raise UsageError(
                f"--input-shape {input_shape} is not an image batch this model takes",
                f"batch,channels,height,width with height and width multiples of {patch}",
            )
        return torch.randn(*input_shape, generator=seeded())
    if input_shape and len(input_shape) != 1:
        raise UsageError(
            f"--input-shape for an image model is batch or batch,channels,height,width; "
            f"got {input_shape}"
        )
    chans, h, w = image_geometry(model, cfg)
    return torch.randn(batch, chans, h, w, generator=seeded())


# ----------------------------------------------------------------------------------------------
# inputs by kind


def hf_example_inputs(
    model: torch.nn.Module, kind: ModelKind, input_shape: list[int] | None, tokenizer: Any = None
) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """Input names and example tensors for a Hugging Face model of `kind`."""
    cfg = model.config
    sig = signature_of(model)
    main = getattr(model, "main_input_name", "input_ids")
    if kind == "vision":
        batch = input_shape[0] if input_shape else DEFAULT_BATCH
        inputs = {main: _pixels(model, cfg, batch, input_shape)}
    elif kind == "speech":
        from attnc.load.media_inputs import speech_inputs

        inputs = speech_inputs(model, cfg, main, input_shape)
    elif kind == "vlm":
        from attnc.load.media_inputs import vlm_inputs

        inputs = vlm_inputs(model, cfg, sig, input_shape)
    elif kind in ("causal-lm", "encoder", "seq2seq"):
        inputs = _text_inputs(model, cfg, sig, input_shape, tokenizer)
        if sig.takes("pixel_values"):  # a dual encoder (text and images, no image tokens)
            vcfg = getattr(cfg, "vision_config", cfg)
            inputs["pixel_values"] = _pixels(model, vcfg, inputs["input_ids"].shape[0], None)
    else:
        if input_shape:  # the user says what the main input looks like
            inputs = {main: torch.randn(*input_shape, generator=seeded())}
        else:
            raise LoadError(
                f"cannot work out the example inputs of {class_name(model)} (main input {main!r})",
                "pass --input-shape for a single float input, or " + FACTORY_HINT,
            )
    if getattr(cfg, "is_encoder_decoder", False) and sig.takes("decoder_input_ids"):
        batch = next(iter(inputs.values())).shape[0]
        inputs["decoder_input_ids"] = _decoder_ids(model, cfg, batch, input_shape)
    unknown = [n for n in inputs if not sig.takes(n)]
    if unknown:
        raise LoadError(
            f"{class_name(model)}.forward takes no {unknown[0]!r}; attnc cannot build its inputs",
            FACTORY_HINT,
        )
    return list(inputs), tuple(inputs.values())


def _text_inputs(model, cfg, sig: Signature, input_shape, tokenizer) -> dict[str, torch.Tensor]:
    tcfg = text_config(cfg)
    batch, seq = batch_seq(input_shape)
    seq = fit_seq(seq, max_positions(tcfg), bool(input_shape))
    ids = token_ids(vocab_size(model, cfg), (batch, seq), special_ids(cfg))
    out = {"input_ids": ids}
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
    emits = getattr(tok, "model_input_names", None)
    if sig.takes("attention_mask") and (emits is None or "attention_mask" in emits):
        out["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    if sig.takes("token_type_ids"):
        # keep it where the tokenizer emits it (so the exported model takes tokenizer output),
        # or, without a tokenizer, where the model has more than one token type (BERT)
        types = getattr(tcfg, "type_vocab_size", 0) or 0
        if (emits is not None and "token_type_ids" in emits) or (emits is None and types > 1):
            out["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return out


def _decoder_ids(model, cfg, batch: int, input_shape) -> torch.Tensor:
    _, seq = batch_seq(input_shape if input_shape and len(input_shape) == 2 else None)
    if getattr(model, "main_input_name", "input_ids") in AUDIO_INPUTS:
        seq = DEFAULT_SEQ  # the audio input's shape says nothing about the transcript
    seq = max(2, seq - 4)  # differs from the encoder's length, so export keeps the two apart
    limit = getattr(cfg, "max_target_positions", None) or max_positions(text_config(cfg))
    seq = min(seq, limit) if limit else seq
    vocab = vocab_size(model, cfg)
    ids = token_ids(vocab, (batch, seq), special_ids(cfg))
    start = getattr(cfg, "decoder_start_token_id", None)
    if isinstance(start, int) and 0 <= start < vocab:
        ids[:, 0] = start
    return ids


# ----------------------------------------------------------------------------------------------
# a factory's example inputs, and models without any


def name_example(
    model: torch.nn.Module, example: tuple | Mapping, hf: bool = False
) -> tuple[list[str], tuple[torch.Tensor, ...], bool]:
    """Names for a factory's example inputs, from the forward signature: (names, tensors,
    by_keyword). A dict is passed by keyword; a tuple positionally. A Hugging Face model's
    **kwargs carry flags, not inputs, so its dict keys must be named parameters."""
    sig = signature_of(model)
    if isinstance(example, Mapping):
        items = list(example.items())
        bad = [k for k, v in items if not isinstance(v, torch.Tensor)]
        if bad:
            raise LoadError(f"the factory's example input {bad[0]!r} is not a tensor")
        fits = sig.takes if hf else sig.accepts
        unknown = [k for k, _ in items if not isinstance(k, str) or not fits(k)]
        if unknown:
            raise LoadError(
                f"the factory's example input {unknown[0]!r} is not a parameter of "
                f"{class_name(model)}.forward",
                f"it takes {', '.join(sig.names) or 'no named inputs'}",
            )
        return [k for k, _ in items], tuple(v for _, v in items), True
    example = tuple(example)
    if not all(isinstance(t, torch.Tensor) for t in example):
        raise LoadError("the factory's example inputs must all be tensors")
    if len(example) > len(sig.positional) and not sig.var_positional:
        raise LoadError(
            f"the factory gives {len(example)} example inputs; {class_name(model)}.forward takes "
            f"{len(sig.positional)} positionally",
            "return a dict of keyword tensors instead",
        )
    names = list(sig.positional[: len(example)])
    names += [f"input_{i}" for i in range(len(names), len(example))]
    return names, example, False


def plain_example_inputs(model: torch.nn.Module, params: list, input_shape: list[int] | None):
    """A hand-written model with no example inputs: token ids if it has an embedding table,
    else a float tensor of `--input-shape`."""
    emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    if emb is not None:
        batch, seq = batch_seq(input_shape)
        return (token_inputs(emb.num_embeddings, batch, seq)[0],)
    if not input_shape:
        raise UsageError(
            "cannot guess example inputs for this model",
            "pass --input-shape or return (model, example_inputs) from the factory",
        )
    return (torch.randn(*input_shape, generator=seeded()),)
