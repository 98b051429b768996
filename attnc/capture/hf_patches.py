"""Patches applied while a Hugging Face model is captured, where its Python ties a dynamic axis.

LLaVA (`LlavaModel.get_image_features`, transformers 4.5x-5.x) splits the projected image
features (B, N, C) into a list with `list(image_features)` and concatenates them again
(`torch.cat(pooler_output)` -> (B*N, C)) before `masked_scatter` fills the image tokens. Iterating
a tensor unbinds its batch axis, which `torch.export` must specialise: the batch of
`pixel_values` became a constant and LLaVA exported with a fixed batch. While capturing, a forward
hook on the projector returns its output as (1, B*N, C): the list then holds one tensor, the
concatenation is the same (B*N, C), and the batch stays symbolic. The model computes exactly what
it computed before (capture's parity check runs the unpatched model against the program).
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


def _llava_models(module: torch.nn.Module) -> list[torch.nn.Module]:
    try:
        from transformers.models.llava.modeling_llava import LlavaModel
    except Exception:  # noqa: BLE001 - no transformers, or no LLaVA in it
        return []
    return [m for m in module.modules() if type(m) is LlavaModel
            and isinstance(getattr(m, "multi_modal_projector", None), torch.nn.Module)]


def _flat_features(_mod, _args, out):
    if isinstance(out, torch.Tensor) and out.dim() == 3:
        return out.reshape(1, -1, out.shape[-1])  # (B, N, C) -> (1, B*N, C)
    return out


@contextlib.contextmanager
def export_patches(module: torch.nn.Module):
    """While capturing `module`: LLaVA's projector output flattened over the batch (see above)."""
    handles = [m.multi_modal_projector.register_forward_hook(_flat_features)
               for m in _llava_models(module)]
    if handles:
        log.info("capture: LLaVA image features flattened over the batch (dynamic batch)")
    try:
        yield
    finally:
        for h in handles:
            h.remove()
