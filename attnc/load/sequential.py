"""Layer-by-layer calibration (sequential onloading, as llm-compressor does it): statistics of a
Hugging Face decoder computed with one block's weights resident at a time.

The model is built on the meta device (no weights). The embedding is onloaded from the
safetensors, every calibration batch is run up to the first block, where a pre-hook records the
block's inputs (hidden states and the keyword arguments the model computed: masks, rotary
embeddings) and stops the forward. Then block by block: its weights are read from the
safetensors (memory-mapped), every batch's hidden states go through it, the statistic is updated,
and the block's weights are dropped (paged out and detached) before the next block is read. Peak
memory is the embedding or one block plus the hidden states of the calibration batches, not the
model.

What is measured here is llm-drop's score of each attention sublayer: the mean over real tokens
of cos(h, h + attn(norm(h))) (`attnc.graph.taps.CosineStat`, the same code the captured graph's
taps run), keyed by layer index. It covers the pre-norm decoders whose blocks call
`self_attn` once on the block input's norm and add it to the block input (Llama, Mistral, Qwen2,
Gemma...). The pass itself still scores on the captured graph; this is the building block for
models whose weights do not fit (issue 13).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from attnc.errors import CalibrationError
from attnc.graph.taps import CosineStat


class _Stop(Exception):
    """Raised by the first block's pre-hook: the batch's block inputs are recorded."""


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """{tensor name: the .safetensors file holding it} from the index, or the single file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / v for k, v in wm.items()}
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: f for k in h.keys()})  # noqa: SIM118 - safe_open has no __iter__
    if not out:
        raise CalibrationError(f"{model_dir} has no .safetensors weights")
    return out


class _Weights:
    """Onloads a module's parameters from the checkpoint and drops them again."""

    def __init__(self, model: torch.nn.Module, model_dir: Path):
        self.files = _weight_files(model_dir)
        self.prefix = {id(m): n for n, m in model.named_modules()}
        self.tied = getattr(model.config, "tie_word_embeddings", False)

    def _name(self, full: str) -> str:
        if full in self.files:
            return full
        for cand in (full.removeprefix("model."), "model." + full):  # head-less checkpoints
            if cand in self.files:
                return cand
        raise CalibrationError(f"the checkpoint has no tensor {full!r}")

    def onload(self, module: torch.nn.Module) -> None:
        from safetensors import safe_open

        pre = self.prefix[id(module)]
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for n, _ in module.named_parameters(recurse=True):
            full = f"{pre}.{n}" if pre else n
            name = self._name(full)
            by_file.setdefault(self.files[name], []).append((n, name))
        state = {}
        for f, names in by_file.items():
            with safe_open(str(f), "pt") as h:  # memory-mapped: read on first use
                state.update({n: h.get_tensor(name) for n, name in names})
        module.load_state_dict(state, strict=False, assign=True)

    def drop(self, module: torch.nn.Module) -> None:
        from attnc.export.external_data import page_out

        page_out(list(module.parameters()))
        module.to("meta")


def _meta_model(model_dir: Path, dtype: torch.dtype | None):
    """The model class of `model_dir` built on the meta device, with its non-persistent buffers
    (rotary frequencies) computed for real on the CPU."""
    import transformers as tf

    cfg = tf.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    dtype = dtype or getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa",
                                                    dtype=dtype or torch.float32)
    model.eval()
    for name, mod in list(model.named_modules()):
        if name.endswith("rotary_emb"):  # inv_freq is computed in __init__, never saved
            parent, _, attr = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            with torch.device("cpu"):
                setattr(owner, attr, type(mod)(config=mod.config))
    return model


def attention_cosines(model_dir: str | Path, batches: Iterable[Any],
                      input_names: list[str], dtype: torch.dtype | None = None,
                      ) -> dict[int, float]:
    """llm-drop's score per layer index (see the module docstring), over `batches` (objects with
    `args` in `input_names` order and `token_mask`, as `attnc.load.calibration` makes them),
    with at most one block's weights resident."""
    model_dir = Path(model_dir)
    model = _meta_model(model_dir, dtype)
    inner = model.get_submodule("model") if hasattr(model, "model") else model
    layers = getattr(inner, "layers", None)
    embed = getattr(inner, "embed_tokens", None)
    if layers is None or embed is None:
        raise CalibrationError(f"{type(model).__name__} has no model.layers / embed_tokens")
    weights = _Weights(model, model_dir)
    batches = list(batches)
    records: list[tuple[torch.Tensor, dict]] = []

    def catch(_mod, args, kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        records.append((h, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    weights.onload(embed)
    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                with contextlib.suppress(_Stop):
                    inner(**dict(zip(input_names, b.args, strict=True)), use_cache=False)
    finally:
        handle.remove()
        weights.drop(embed)
    scores: dict[int, float] = {}
    seen: dict[str, torch.Tensor] = {}  # the attention output of the batch being run

    def keep(_mod, _args, out):
        seen["a"] = out[0] if isinstance(out, tuple) else out

    for i, layer in enumerate(layers):
        weights.onload(layer)
        stat = CosineStat()
        hook = layer.self_attn.register_forward_hook(keep)
        try:
            with torch.no_grad():
                for j, (b, (h, kw)) in enumerate(zip(batches, records, strict=True)):
                    out = layer(h, **kw)
                    stat.update(h, h + seen.pop("a"), b.token_mask)  # the residual add
                    records[j] = (out[0] if isinstance(out, tuple) else out, kw)
        finally:
            hook.remove()
            weights.drop(layer)
        scores[i] = stat.result()
    return scores
