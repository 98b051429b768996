"""Versioned YAML recipes: an ordered list of passes with their configs, fidelity bounds,
calibration and export settings. Every key is checked; errors name the key and the value.

```yaml
version: 1
passes:
  - id: llm-drop
    target: attention
    count: 2
fidelity: {min_cosine: 0.98}
calibration: {samples: 64, max_length: 128}
export: {onnx: true, opset: 23}
```
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from attnc.errors import RecipeError
from attnc.load.calibration import CalibrationConfig

RECIPE_VERSION = 1


@dataclass(frozen=True)
class FidelityBound:
    """Bounds on the optimized model against the original, on held-out calibration batches."""

    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    min_top1: float | None = None
    max_abs_diff: float | None = None
    # task-level metrics (attnc.check.task), on the held-out calibration batches
    min_embedding_cosine: float | None = None
    min_retrieval_agreement: float | None = None
    max_kl: float | None = None
    max_bits_per_byte_delta: float | None = None

    def validate(self) -> None:
        for name in ("min_cosine", "min_top1", "min_embedding_cosine", "min_retrieval_agreement"):
            v = getattr(self, name)
            if v is not None and not -1.0 <= v <= 1.0:
                raise RecipeError(f"fidelity.{name} must be within [-1, 1], got {v}")


@dataclass(frozen=True)
class ExportConfig:
    onnx: bool = True
    pt2: bool = True
    opset: int = 23
    lower_dense: bool = False
    onnx_max_abs_diff: float = 1e-3

    def validate(self) -> None:
        if self.opset < 18:
            raise RecipeError(f"export.opset must be 18 or newer, got {self.opset}")


@dataclass(frozen=True)
class PassStep:
    id: str
    config: Any


@dataclass(frozen=True)
class Recipe:
    passes: tuple[PassStep, ...]
    fidelity: FidelityBound = FidelityBound()
    calibration: CalibrationConfig = CalibrationConfig()
    export: ExportConfig = ExportConfig()
    version: int = RECIPE_VERSION
    source: str = ""
    raw: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# typed construction of frozen dataclasses from YAML mappings


def _check(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _check(value, arm, where)
            except RecipeError as exc:
                errors.append(exc)
        raise RecipeError(f"{where}: {value!r} is not a valid value") from None
    if tp is type(None):
        if value is None:
            return None
        raise RecipeError(f"{where}: expected nothing, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        raise RecipeError(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_check(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{where}: expected a string, got {value!r}")
    return value


def config_from_dict(cls: type, data: dict | None, where: str) -> Any:
    """Build frozen dataclass `cls` from `data`, naming any unknown key or bad value."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RecipeError(
            f"unknown key {unknown[0]!r} in {where}", f"known keys: {', '.join(sorted(fields))}"
        )
    kwargs = {k: _check(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def config_fields(cls: type) -> list[tuple[str, str, Any]]:
    """(name, type, default) of a config dataclass, for `attnc passes`."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        tp = hints[f.name]
        out.append((f.name, str(tp).replace("typing.", ""), default))
    return out


# ----------------------------------------------------------------------------------------------


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    from attnc.recipe.manager import get_pass

    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with 'version' and 'passes'")
    known = {"version", "passes", "fidelity", "calibration", "export", "name", "description"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(
            f"unknown key {unknown[0]!r} in {source}", f"known: {', '.join(sorted(known))}"
        )
    version = data.get("version")
    if version != RECIPE_VERSION:
        raise RecipeError(f"{source}: version must be {RECIPE_VERSION}, got {version!r}")
    raw_passes = data.get("passes")
    if raw_passes is None:
        raw_passes = []
    if not isinstance(raw_passes, list):
        raise RecipeError(f"{source}: 'passes' must be a list")
    steps = []
    for i, item in enumerate(raw_passes):
        if not isinstance(item, dict) or "id" not in item:
            raise RecipeError(f"{source}: passes[{i}] needs an 'id'")
        item = dict(item)
        pid = item.pop("id")
        info = get_pass(str(pid))
        steps.append(
            PassStep(info.id, config_from_dict(info.config_cls, item, f"passes[{i}] ({pid})"))
        )
    return Recipe(
        passes=tuple(steps),
        fidelity=config_from_dict(FidelityBound, data.get("fidelity"), "fidelity"),
        calibration=config_from_dict(CalibrationConfig, data.get("calibration"), "calibration"),
        export=config_from_dict(ExportConfig, data.get("export"), "export"),
        version=version,
        source=source,
        raw=data,
    )


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise RecipeError(f"{path} is not valid YAML: {first}") from None
    return parse_recipe(data, str(path))
