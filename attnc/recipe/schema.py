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
import difflib
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from attnc.errors import RecipeError
from attnc.load.calibration import CalibrationConfig
from attnc.recipe.bounds import FidelityBound

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
MAX_RECIPE_BYTES = 1 << 20


def _opset_range() -> tuple[int, int]:
    """The opsets the installed exporter writes: torch's exporter builds opset 18 and converts
    up with onnxscript's version converter, which stops at its SUPPORTED_MAX_ONNX_OPSET."""
    import onnx

    hi = onnx.defs.onnx_opset_version()
    try:
        from onnxscript.version_converter import _version_converter as vc

        hi = min(hi, int(vc.SUPPORTED_MAX_ONNX_OPSET))
    except (ImportError, AttributeError, TypeError, ValueError):  # pragma: no cover
        pass
    return 18, hi


ATTENTION_OPSET = 23  # the ONNX Attention op, which attnc:: ops translate to


@dataclass(frozen=True)
class ExportConfig:
    onnx: bool = True
    pt2: bool = True
    opset: int = 23
    lower_dense: bool = False
    onnx_max_abs_diff: float = 1e-3
    # the pooled (and normalised, as the source's modules.json says) embedding as a second ONNX
    # output `sentence_embedding`; null: on for sentence-transformers sources
    sentence_embedding: bool | None = None
    # INT8 through onnxruntime.quantization (MatMul weights; static also calibrates activations),
    # verified against the original and bounded like a pass; its cost is reported apart
    quantize: Literal["none", "int8-dynamic", "int8-static"] = "none"
    # weights in model.onnx.data beside model.onnx: null = past 512 MiB (written streaming, not
    # as one in-memory protobuf), true = always, false = never (refused past 1.5 GiB)
    external_data: bool | None = None

    def validate(self) -> None:
        if self.quantize != "none" and not self.onnx:
            raise RecipeError(
                f"export.quantize: {self.quantize} quantizes the ONNX file, but export.onnx is off"
            )
        lo, hi = _opset_range()
        if not lo <= self.opset <= hi:
            raise RecipeError(
                f"export.opset {self.opset} is outside what the installed exporter writes "
                f"({lo}..{hi})",
                f"use {ATTENTION_OPSET} (the first opset with the Attention op)",
            )
        if self.opset < ATTENTION_OPSET and self.lower_dense:
            raise RecipeError(
                f"export.opset {self.opset} cannot hold export.lower_dense: attnc:: attention "
                f"ops export as the ONNX Attention op, which needs opset {ATTENTION_OPSET}",
                f"use opset {ATTENTION_OPSET} or more, or lower_dense: false",
            )
        if self.opset < ATTENTION_OPSET:
            log.warning(
                "export.opset %d predates the ONNX Attention op (opset %d): attention exports "
                "as MatMul/Softmax",
                self.opset,
                ATTENTION_OPSET,
            )
        if not (self.onnx_max_abs_diff > 0 and math.isfinite(self.onnx_max_abs_diff)):
            raise RecipeError(
                f"export.onnx_max_abs_diff must be a positive number, got {self.onnx_max_abs_diff}"
            )


@dataclass(frozen=True)
class PassStep:
    id: str
    config: Any
    repeat: bool = False  # a pass listed again runs again only when its later step says so


@dataclass(frozen=True)
class Recipe:
    passes: tuple[PassStep, ...]
    fidelity: FidelityBound = FidelityBound()
    calibration: CalibrationConfig = CalibrationConfig()
    export: ExportConfig = ExportConfig()
    version: int = RECIPE_VERSION
    source: str = ""
    raw: dict = field(default_factory=dict)
    fidelity_source: str = "recipe"  # or "default (...)": see resolve_fidelity


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
        allowed = " or ".join(_describe(arm) for arm in typing.get_args(tp))
        raise RecipeError(f"{where}: {value!r} is not a valid value (expected {allowed})") from None
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


def _describe(tp: Any) -> str:
    """Words for a type in an error: 'an integer', 'one of a, b', 'a list of strings'."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"a list of {_describe(args[0]) if args else 'values'}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _unknown_key(key: Any, known: list[str], where: str) -> RecipeError:
    prefixed = [k for k in known if k.startswith(str(key))]  # max_bpb -> max_bpb_increase
    close = prefixed[:1] if len(prefixed) == 1 else difflib.get_close_matches(str(key), known, 1)
    hint = (f"did you mean {close[0]!r}? " if close else "") + f"known keys: {', '.join(known)}"
    return RecipeError(f"unknown key {key!r} in {where}", hint)


def config_from_dict(cls: type, data: dict | None, where: str) -> Any:
    """Build frozen dataclass `cls` from `data`, naming any unknown key or bad value."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in data if k not in fields), key=str)
    if unknown:
        raise _unknown_key(unknown[0], sorted(fields), where)
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


TOP_KEYS = ("version", "passes", "fidelity", "calibration", "export", "name", "description")


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    from attnc.recipe.manager import check_repeats, get_pass

    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise RecipeError(
            f"{source}: a recipe is a YAML mapping with 'version' and 'passes', got {got}"
        )
    unknown = sorted((k for k in data if k not in TOP_KEYS), key=str)
    if unknown:
        raise _unknown_key(unknown[0], sorted(TOP_KEYS), source)
    if "version" not in data:
        raise RecipeError(f"{source}: 'version' is missing", "start the recipe with version: 1")
    version = data["version"]
    if type(version) is not int or version != RECIPE_VERSION:
        raise RecipeError(f"{source}: version must be {RECIPE_VERSION}, got {version!r}")
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise RecipeError(f"{source}: {key} must be a string, got {data[key]!r}")
    raw_passes = data.get("passes")
    if raw_passes is None:
        raw_passes = []
    if not isinstance(raw_passes, list):
        raise RecipeError(f"{source}: 'passes' must be a list, got {type(raw_passes).__name__}")
    steps = []
    for i, item in enumerate(raw_passes):
        if not isinstance(item, dict) or "id" not in item:
            raise RecipeError(f"{source}: passes[{i}] needs an 'id' (e.g. - id: llm-drop)")
        item = dict(item)
        pid = item.pop("id")
        if not isinstance(pid, str):
            raise RecipeError(f"{source}: passes[{i}].id must be a string, got {pid!r}")
        repeat = item.pop("repeat", False)
        if not isinstance(repeat, bool):
            raise RecipeError(f"passes[{i}] ({pid}).repeat: expected true or false, got {repeat!r}")
        info = get_pass(pid)
        config = config_from_dict(info.config_cls, item, f"passes[{i}] ({pid})")
        steps.append(PassStep(info.id, config, repeat))
    check_repeats(steps)
    if not steps:
        log.warning("%s lists no passes: the build is an exact copy of the model", source)
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
    """Read a recipe file: at most 1 MB of UTF-8 YAML, no anchors or aliases (a few hundred
    bytes of aliases expand to megabytes), no key given twice."""
    from attnc.recipe.yaml_safe import load_yaml

    p = Path(path)
    if not p.exists():
        raise RecipeError(f"recipe not found: {path}")
    if p.is_dir():
        raise RecipeError(f"{path} is a folder, not a recipe file")
    if not p.is_file():
        raise RecipeError(f"{path} is not a regular file")
    size = p.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"{path} is {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,} bytes"
        )
    raw = p.read_bytes()[: MAX_RECIPE_BYTES + 1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    return parse_recipe(load_yaml(text, str(path)), str(path))
