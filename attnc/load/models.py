"""Load a model from what a user has: a .pt2, a Hugging Face directory, a factory, a state dict,
or (only when trusted) a pickled nn.Module. Every loader returns a `LoadedModel` whose module
takes positional tensors named by `input_names` and returns one tensor (or a tuple of tensors).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import pickle
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnc.errors import LoadError, UsageError
from attnc.load.inputs import ModelKind, signature_of

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    module: nn.Module
    example_args: tuple[torch.Tensor, ...]
    input_names: list[str]
    kind: ModelKind
    source: str
    tokenizer: Any = None
    config: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class OutputAdapter(nn.Module):
    """Calls `model(**dict(zip(names, inputs)))` (or positionally) and returns its main tensor.
    A Hugging Face model also gets `use_cache=False, return_dict=True` where it takes them."""

    def __init__(self, model: nn.Module, input_names: list[str], by_keyword: bool, hf: bool):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.by_keyword = by_keyword
        self.hf = hf
        sig = signature_of(model)
        fixed = {"use_cache": False, "return_dict": True} if hf else {}
        self.fixed = {k: v for k, v in fixed.items() if sig.accepts(k)}

    def forward(self, *inputs: torch.Tensor) -> Any:
        if self.by_keyword:
            out = self.model(**dict(zip(self.input_names, inputs, strict=True)), **self.fixed)
        else:
            out = self.model(*inputs, **self.fixed)
        return main_output(out)


class ByKeyword(nn.Module):
    """Calls a module that takes its inputs by name (an attnc `.pt2`) with positional inputs."""

    def __init__(self, module: nn.Module, names: list[str]):
        super().__init__()
        self.module = module
        self.names = list(names)

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.module(**dict(zip(self.names, inputs, strict=True)))


def main_output(out: Any) -> Any:
    """The tensor a user means by 'the output': logits, last_hidden_state, or the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        val = getattr(out, key, None) if not isinstance(out, dict) else out.get(key)
        if isinstance(val, torch.Tensor):
            return val
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return tuple(out)
    flat, _ = torch.utils._pytree.tree_flatten(out)
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    if not tensors:
        raise LoadError("the model's forward returned no tensor")
    return tensors[0]


# ----------------------------------------------------------------------------------------------
# entry point


def load_model(
    spec: str,
    *,
    weights: str | None = None,
    trust_pickle: bool = False,
    input_shape: list[int] | None = None,
    dtype: str = "auto",
) -> LoadedModel:
    """Load `spec`: a .pt2 file, an HF directory, `file.py:factory` / `pkg.mod:factory`, or a
    pickled module (`--trust-pickle`). `weights` is a state dict for a factory model. Hugging Face
    checkpoints load in `dtype`: "auto" (the default) keeps the checkpoint's own dtype, so a
    bf16/fp16 model is built, verified and exported in it (a log line names the CPU cost)."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if _looks_like_factory(spec):
        return _load_factory(spec, weights, input_shape)
    path = Path(spec)
    if not path.exists():
        raise LoadError(f"model not found: {spec}")
    if weights is not None:
        raise UsageError("--weights goes with a factory spec (file.py:factory or pkg.mod:factory)")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LoadError(f"{spec} is a folder without config.json, not a Hugging Face model")
        return _load_hf_dir(path, input_shape, dtype)
    if path.suffix == ".pt2":
        return _load_pt2(path, input_shape)
    if path.suffix in (".pt", ".pth", ".bin", ".pkl"):
        return _load_pickle(path, trust_pickle, input_shape)
    raise LoadError(
        f"don't know how to load {spec}",
        "give a .pt2 file, a Hugging Face folder, file.py:factory, "
        "or a pickled .pt with --trust-pickle",
    )


def _looks_like_factory(spec: str) -> bool:
    if ":" not in spec or Path(spec).exists():
        return False
    left = spec.rsplit(":", 1)[0]
    return left.endswith(".py") or all(part.isidentifier() for part in left.split("."))


# ----------------------------------------------------------------------------------------------
# Hugging Face


def _hf_kind(config: Any) -> ModelKind:
    """A first guess from the config alone, to pick an Auto class for a config.json that names
    no architecture; `wrap_hf` decides the kind from the loaded model itself."""
    from attnc.load.inputs import image_token_id

    has = lambda key: getattr(config, key, None) is not None  # noqa: E731
    if has("vision_config") and has("text_config") and image_token_id(config) is not None:
        return "vlm"
    if has("num_mel_bins") or (has("conv_kernel") and has("conv_stride")):
        return "speech"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if getattr(config, "is_decoder", False):
        return "causal-lm"
    if has("image_size") and not has("vocab_size"):
        return "vision"
    return "encoder"


def hf_model_class(config: Any, kind: ModelKind):
    import transformers as tf

    archs = getattr(config, "architectures", None) or []
    for name in archs:
        cls = getattr(tf, name, None)
        if cls is not None:
            return cls
    if kind == "causal-lm":
        return tf.AutoModelForCausalLM
    if kind == "vlm":
        return tf.AutoModelForImageTextToText
    return tf.AutoModel


DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "auto": "auto",
}


# transformers' ValueError when a class has no SDPA path (`_sdpa_can_dispatch`; Gemma-2, BLOOM, MPT,
# DeBERTa-v2, ...): those classes load with eager attention, which capture canonicalises
SDPA_REFUSED = "does not support an attention implementation through torch.nn.functional.scaled_dot"


def _from_pretrained(cls, path: Path, dtype: str) -> tuple[nn.Module, str]:
    """`cls.from_pretrained` with SDPA attention, or eager attention where the class refuses SDPA;
    returns (model, the attention implementation used)."""
    kw = dict(local_files_only=True, use_safetensors=True, dtype=DTYPES[dtype])
    try:
        return cls.from_pretrained(str(path), attn_implementation="sdpa", **kw), "sdpa"
    except Exception as exc:  # noqa: BLE001
        if not (isinstance(exc, ValueError) and SDPA_REFUSED in str(exc)):
            raise LoadError(f"cannot load the weights in {path}: {_short(exc)}") from None
    log.warning(
        "%s has no SDPA attention in transformers; loading it with eager attention "
        "(capture rewrites what it can into SDPA)",
        getattr(cls, "__name__", cls),
    )
    try:
        return cls.from_pretrained(str(path), attn_implementation="eager", **kw), "eager"
    except Exception as exc:  # noqa: BLE001
        raise LoadError(f"cannot load the weights in {path}: {_short(exc)}") from None


def _load_hf_dir(path: Path, input_shape: list[int] | None, dtype: str = "auto") -> LoadedModel:
    import transformers as tf

    try:
        config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad model folder
        raise LoadError(f"cannot read {path / 'config.json'}: {_short(exc)}") from None
    kind = _hf_kind(config)
    has_st = any(path.glob("*.safetensors"))
    if not has_st:
        raise LoadError(
            f"{path} has no .safetensors weights",
            "convert the checkpoint to safetensors; "
            "attnc does not unpickle Hugging Face .bin files",
        )
    cls = hf_model_class(config, kind)
    model, attn_impl = _from_pretrained(cls, path, dtype)
    _say_low_precision(model, path)
    tokenizer = None
    if any((path / n).exists() for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - a tokenizer is optional
            log.warning("tokenizer in %s not loaded: %s", path, _short(exc))
    loaded = wrap_hf(model.eval(), str(path), tokenizer, input_shape)
    loaded.extra["attn_implementation"] = attn_impl
    return loaded


def _say_low_precision(model: nn.Module, path: Path) -> None:
    """One line when a bf16/fp16 model is built on a machine without CUDA, with the remedy."""
    low = next((p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16,
                                                                   torch.float16)), None)
    if low is None or torch.cuda.is_available():
        return
    name = str(low).replace("torch.", "")
    log.warning(
        "%s is %s: built in %s on the CPU, where its matmuls are slow and ONNX Runtime has no "
        "%s kernels (model.onnx keeps %s; its check runs a float32-compute copy); pass --dtype "
        "float32 to build for a CPU deployment", path.name, name, name, name, name,
    )


def wrap_hf(model: nn.Module, source: str, tokenizer: Any, input_shape: list[int] | None):
    """A Hugging Face model with example inputs worked out from the model itself."""
    from attnc.load.inputs import hf_example_inputs, model_kind

    kind = model_kind(model)
    names, args = hf_example_inputs(model, kind, input_shape, tokenizer)
    adapter = OutputAdapter(model, names, by_keyword=True, hf=True).eval()
    return LoadedModel(adapter, args, names, kind, source, tokenizer, model.config)


# ----------------------------------------------------------------------------------------------
# factories, state dicts, pickles, .pt2


def _import_factory(spec: str):
    left, fn_name = spec.rsplit(":", 1)
    try:
        if left.endswith(".py"):
            file = Path(left)
            if not file.exists():
                raise LoadError(f"factory file not found: {left}")
            mod_name = f"attnc_user_{file.stem}"
            mspec = importlib.util.spec_from_file_location(mod_name, file)
            module = importlib.util.module_from_spec(mspec)
            sys.modules[mod_name] = module
            mspec.loader.exec_module(module)
        else:
            module = importlib.import_module(left)
    except LoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code failed on import
        raise LoadError(f"cannot import {left}: {_short(exc)}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise LoadError(f"{left} has no callable named {fn_name!r}")
    return fn


def _load_factory(spec: str, weights: str | None, input_shape: list[int] | None) -> LoadedModel:
    """`fn()` returns a model, or (model, example_inputs[, tokenizer]) with example_inputs a tensor,
    a tuple of tensors (positional) or a dict of keyword tensors. Given examples are the truth:
    they are named from the forward signature, never replaced by a guess."""
    fn = _import_factory(spec)
    try:
        made = fn()
    except Exception as exc:  # noqa: BLE001
        raise LoadError(f"factory {spec} failed: {_short(exc)}") from None
    example = None
    tokenizer = None
    if isinstance(made, tuple):
        model, *rest = made
        for item in rest:
            if isinstance(item, torch.Tensor):
                example = (item,)
            elif isinstance(item, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in item):
                example = tuple(item)
            elif isinstance(item, Mapping) and item and all(isinstance(k, str) for k in item):
                example = item  # keyword tensors (a dict, or a tokenizer's BatchEncoding)
            elif item is not None:
                tokenizer = item
    else:
        model = made
    if not isinstance(model, nn.Module):
        raise LoadError(f"factory {spec} returned {type(model).__name__}, not an nn.Module")
    if weights is not None:
        _load_state_dict(model, Path(weights))
    return from_module(model, example, tokenizer, spec, input_shape)


def from_module(
    model: nn.Module,
    example: Any = None,
    tokenizer: Any = None,
    source: str = "<module>",
    input_shape: list[int] | None = None,
) -> LoadedModel:
    """A `LoadedModel` from an `nn.Module` in hand (the Python API, and factories): `example` is
    a tensor, a tuple of tensors (positional) or a dict of keyword tensors, or None to derive
    inputs from the model's signature and config."""
    if not isinstance(model, nn.Module):
        raise LoadError(f"expected an nn.Module, got {type(model).__name__}")
    spec = source
    if isinstance(example, torch.Tensor):
        example = (example,)
    elif isinstance(example, list):
        example = tuple(example)
    model = model.eval()
    if not _is_hf(model):
        return _wrap_plain(model, spec, example, input_shape, tokenizer)
    if example is None:
        return wrap_hf(model, spec, tokenizer, input_shape)
    from attnc.load.inputs import model_kind, name_example

    names, args, by_keyword = name_example(model, example, hf=True)
    adapter = OutputAdapter(model, names, by_keyword=by_keyword, hf=True).eval()
    return LoadedModel(adapter, args, names, model_kind(model), spec, tokenizer, model.config)


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def _wrap_plain(model, source, example, input_shape, tokenizer=None) -> LoadedModel:
    from attnc.load.inputs import name_example, plain_example_inputs

    if example is None:
        example = plain_example_inputs(model, [], input_shape)
    names, args, by_keyword = name_example(model, example)
    adapter = OutputAdapter(model, names, by_keyword=by_keyword, hf=False).eval()
    return LoadedModel(adapter, args, names, "custom", source, tokenizer, None)


def read_tensor_file(path: Path) -> Any:
    """Tensors from a .safetensors or torch file, never running pickled code (weights_only)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _load_state_dict(model: nn.Module, path: Path) -> None:
    if not path.exists():
        raise LoadError(f"weights file not found: {path}")
    try:
        sd = read_tensor_file(path)
    except Exception as exc:  # noqa: BLE001
        raise LoadError(f"cannot read state dict {path}: {_short(exc)}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise LoadError(f"{path} does not hold a state dict")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise LoadError(f"state dict {path} does not fit the model: {_short(exc)}") from None


def _load_pickle(path: Path, trust: bool, input_shape) -> LoadedModel:
    if not zipfile.is_zipfile(path) and path.stat().st_size == 0:
        raise LoadError(f"{path} is empty")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        if "Weights only load failed" not in str(exc):
            raise LoadError(f"{path} is corrupt or truncated: {_short(exc)}") from None
        if not trust:
            raise LoadError(
                f"{path} is a pickled object; unpickling it runs arbitrary code",
                "pass --trust-pickle only if you trust where the file came from",
            ) from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001
            raise LoadError(f"{path} could not be unpickled: {_short(exc2)}") from None
    if isinstance(obj, dict):
        raise LoadError(
            f"{path} holds a state dict, not a model",
            "give a factory that builds the model and pass the file with --weights",
        )
    if not isinstance(obj, nn.Module):
        raise LoadError(f"{path} holds a {type(obj).__name__}, not an nn.Module")
    obj = obj.eval()
    if _is_hf(obj):
        return wrap_hf(obj, str(path), None, input_shape)
    return _wrap_plain(obj, str(path), None, input_shape)


def _load_pt2(path: Path, input_shape) -> LoadedModel:
    import attnc.kernels  # noqa: F401  (registers the attnc:: ops a build's .pt2 calls)

    try:
        ep = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise LoadError(f"{path} is not a readable .pt2 file: {_short(exc)}") from None
    module = ep.module()
    example = getattr(ep, "example_inputs", None)
    args = tuple(example[0]) + tuple((example[1] or {}).values()) if example else None
    spec = ep.call_spec.in_spec
    if spec is not None and spec.num_children == 2 and spec.child(1).num_children:
        module = ByKeyword(module, list(spec.child(1).context))  # attnc's .pt2 take names
    if not args:
        if not input_shape:
            raise LoadError(f"{path} stores no example inputs", "pass --input-shape, e.g. 2,16")
        args = (torch.randint(0, 100, tuple(input_shape)),)
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    meta = {}
    meta_file = path.with_suffix(".attnc.json")
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
    kind = meta.get("kind", "custom")
    return LoadedModel(module, args, names[: len(args)], kind, str(path), None, None, {"pt2": ep})


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) < 240 else text[:237] + "..."
