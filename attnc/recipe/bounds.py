"""Fidelity bounds: the keys a recipe's `fidelity` section takes, which metric each reads and
for which kinds of model it is measured, and the default task-level bound a build gets when its
recipe sets none (`attnc passes` prints it; the report records which bound was used)."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

from attnc.errors import RecipeError

log = logging.getLogger(__name__)

# bound key -> (metric it reads, "min" or "max", model kinds that measure it (None: every kind),
# what it means). The README's recipe section documents the same keys.
BOUND_KEYS: dict[str, tuple[str, str, frozenset[str] | None, str]] = {
    "min_cosine": ("cosine", "min", None, "per-token cosine of the output vs the original"),
    "min_sqnr_db": ("sqnr_db", "min", None, "signal-to-quantization-noise ratio of the output"),
    "max_abs_diff": ("max_abs_diff", "max", None, "largest absolute difference of the output"),
    "min_top1": (
        "top1",
        "min",
        frozenset({"causal-lm", "vlm"}),
        "argmax agreement of the logits with the original",
    ),
    "min_embedding_cosine": (
        "embedding_cosine",
        "min",
        frozenset({"encoder", "vision", "speech", "seq2seq", "custom"}),
        "cosine of mean-pooled, normalised embeddings",
    ),
    "min_retrieval_agreement": (
        "retrieval_agreement",
        "min",
        frozenset({"encoder", "custom"}),
        "share of held-out samples whose nearest neighbour is unchanged",
    ),
    "min_prediction_agreement": (
        "prediction_agreement",
        "min",
        frozenset({"encoder", "vision", "speech", "custom"}),
        "share of samples whose predicted class (argmax of a (B, C) output) is unchanged",
    ),
    "max_kl": ("kl", "max", frozenset({"causal-lm", "vlm"}), "KL(original || optimized) per token"),
    "max_bits_per_byte_delta": (
        "bits_per_byte_delta",
        "max",
        frozenset({"causal-lm", "vlm"}),
        "absolute rise of held-out bits per byte",
    ),
    "max_bpb_increase": (
        "bits_per_byte_increase",
        "max",
        frozenset({"causal-lm", "vlm"}),
        "relative rise of held-out bits per byte (0.1 = 10% more)",
    ),
}


@dataclass(frozen=True)
class FidelityBound:
    """Bounds on the optimized model against the original, on held-out calibration batches
    (each key is described in BOUND_KEYS). A build whose recipe sets none of them gets the task
    bound of DEFAULT_BOUNDS for its kind of model."""

    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    min_top1: float | None = None
    max_abs_diff: float | None = None
    # task-level metrics (attnc.check.task), on the held-out calibration batches
    min_embedding_cosine: float | None = None
    min_retrieval_agreement: float | None = None
    min_prediction_agreement: float | None = None
    max_kl: float | None = None
    max_bits_per_byte_delta: float | None = None
    max_bpb_increase: float | None = None

    def validate(self) -> None:
        for name in ("min_cosine", "min_embedding_cosine"):
            v = getattr(self, name)
            if v is not None and not -1.0 <= v <= 1.0:
                raise RecipeError(f"fidelity.{name} must be within [-1, 1], got {v}")
        for name in ("min_top1", "min_retrieval_agreement", "min_prediction_agreement"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise RecipeError(f"fidelity.{name} is a share: it must be within [0, 1], got {v}")
        for name in ("max_abs_diff", "max_kl", "max_bits_per_byte_delta", "max_bpb_increase"):
            v = getattr(self, name)
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise RecipeError(f"fidelity.{name} must be 0 or more, got {v}")
        v = self.min_sqnr_db
        if v is not None and not math.isfinite(v):
            raise RecipeError(f"fidelity.min_sqnr_db must be a finite number, got {v}")

    def set_bounds(self) -> dict[str, float]:
        """The bounds that are set."""
        return {k: v for k, v in vars(self).items() if v is not None}


# the task-level bound an approximate build gets when its recipe sets none (`attnc passes`)
DEFAULT_BOUNDS: dict[str, FidelityBound] = {
    "causal-lm": FidelityBound(max_bpb_increase=0.10),
    "vlm": FidelityBound(max_bpb_increase=0.10),
    "encoder": FidelityBound(min_embedding_cosine=0.90),
    "vision": FidelityBound(min_embedding_cosine=0.90),
    "speech": FidelityBound(min_embedding_cosine=0.90),
    "seq2seq": FidelityBound(min_embedding_cosine=0.90),
    "custom": FidelityBound(min_embedding_cosine=0.90),
}
# a build of exact passes only (or none) must still match the original
EXACT_BOUND = FidelityBound(min_cosine=0.999)


def describe_default_bounds() -> str:
    groups: dict[str, list[str]] = {}
    for kind, bound in DEFAULT_BOUNDS.items():
        text = ", ".join(f"{k}: {v:g}" for k, v in bound.set_bounds().items())
        groups.setdefault(text, []).append(kind)
    parts = [f"{'/'.join(kinds)} {{{text}}}" for text, kinds in groups.items()]
    exact = ", ".join(f"{k}: {v:g}" for k, v in EXACT_BOUND.set_bounds().items())
    return "; ".join(parts) + f"; exact passes only {{{exact}}}"


def resolve_fidelity(recipe: Any, kind: str, exact: bool) -> Any:
    """The Recipe with the bound its build verifies: every key must be measurable for a model
    of `kind`; a recipe without a bound gets DEFAULT_BOUNDS[kind] (EXACT_BOUND when every pass
    is exact), so no build is ever 'met' against nothing."""
    for key in recipe.fidelity.set_bounds():
        kinds = BOUND_KEYS[key][2]
        if kinds is not None and kind not in kinds:
            raise RecipeError(
                f"fidelity.{key} is not measured for a {kind} model "
                f"(it applies to {', '.join(sorted(kinds))})",
                f"bounds for a {kind} model: "
                + ", ".join(k for k, v in BOUND_KEYS.items() if v[2] is None or kind in v[2]),
            )
    if recipe.fidelity.set_bounds():
        return recipe
    bound = EXACT_BOUND if exact else DEFAULT_BOUNDS.get(kind, DEFAULT_BOUNDS["custom"])
    source = "default (exact passes)" if exact else f"default ({kind})"
    log.warning(
        "the recipe sets no fidelity bound: verifying against the %s bound %s",
        source,
        bound.set_bounds(),
    )
    return dataclasses.replace(recipe, fidelity=bound, fidelity_source=source)
