"""The Python API: what `attnc optimize`, `attnc inspect` and `attnc eval` do, for a build
pipeline that holds a model object and a recipe dict.

    import attnc
    res = attnc.optimize(model, {"version": 1, "passes": [{"id": "llm-drop", "count": 2}]},
                         calib="calib.jsonl", out="build/", example_inputs=batch,
                         tokenizer=tok)
    res.report["bench"], res.paths["onnx"], res.program

Errors are `attnc.errors.AttncError` subclasses (one-line `message`, optional `hint`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from attnc.errors import UsageError


@dataclass
class OptimizeResult:
    """`program`: the optimized torch program; `report`: what report.json holds; `paths`:
    the artifacts by kind (onnx, pt2, report, folder); `out_dir`: the build folder (None when
    the build went to a temporary folder that is gone)."""

    program: Any
    report: dict
    paths: dict[str, Path] = field(default_factory=dict)
    out_dir: Path | None = None


def _loaded(model: Any, example_inputs: Any, tokenizer: Any, source: str | None, options: dict):
    """A model spec string passes through; an nn.Module becomes a LoadedModel."""
    if isinstance(model, str | Path):
        return str(model)
    if isinstance(model, nn.Module):
        from attnc.load.models import from_module

        shape = options.get("input_shape")
        return from_module(model, example_inputs, tokenizer, source or type(model).__name__,
                           list(shape) if shape else None)
    raise UsageError(
        f"attnc.optimize takes an nn.Module or a model spec string, not {type(model).__name__}"
    )


def optimize(
    model: nn.Module | str | Path,
    recipe: str | Path | dict | Any,
    calib: str | Path | None = None,
    out: str | Path | None = None,
    *,
    example_inputs: Any = None,
    tokenizer: Any = None,
    source: str | None = None,
    **options: Any,
) -> OptimizeResult:
    """Build `model` (an nn.Module with `example_inputs`, a tensor / tuple / dict of keyword
    tensors, or any spec `attnc optimize` takes) as `recipe` (a path, a dict shaped like the
    YAML, or a Recipe) says. `out`: the build folder (default: a temporary one, removed after;
    the result still holds the program and report). `options`: BuildOptions fields (weights,
    trust_pickle, input_shape, dtype, force, save_original, bench (default True),
    bench_shapes, progress)."""
    from attnc.build import BuildOptions, build

    known = set(BuildOptions.__dataclass_fields__)
    bad = sorted(set(options) - known)
    if bad:
        raise UsageError(f"unknown option(s) {bad}; known: {sorted(known)}")
    options.setdefault("bench", True)
    opts = BuildOptions(**options)
    spec = _loaded(model, example_inputs, tokenizer, source, options)
    calib_s = str(calib) if calib is not None else None
    if out is not None:
        res = build(spec, recipe, calib_s, out, opts)
        return OptimizeResult(res.program, res.report, _paths(res.out_dir), res.out_dir)
    with tempfile.TemporaryDirectory(prefix="attnc-build-") as tmp:
        res = build(spec, recipe, calib_s, Path(tmp) / "build", opts)
        return OptimizeResult(res.program, res.report, {}, None)


def _paths(folder: Path) -> dict[str, Path]:
    names = {"onnx": "model.onnx", "pt2": "model.pt2", "report": "report.json",
             "report_md": "report.md", "original": "original.pt2"}
    out = {k: folder / v for k, v in names.items() if (folder / v).exists()}
    out["folder"] = folder
    return out


def inspect(
    model: nn.Module | str | Path,
    *,
    example_inputs: Any = None,
    tokenizer: Any = None,
    **options: Any,
) -> dict:
    """The attention sites attnc finds in `model` (and unmatched candidates, with reasons):
    the same data `attnc inspect --json` prints."""
    from attnc.capture.program import capture
    from attnc.load.models import load_model

    spec = _loaded(model, example_inputs, tokenizer, None, options)
    if isinstance(spec, str):
        loaded = load_model(
            spec,
            weights=options.get("weights"),
            trust_pickle=options.get("trust_pickle", False),
            input_shape=options.get("input_shape"),
        )
    else:
        loaded = spec
    program = capture(loaded)
    return {
        "kind": loaded.kind,
        "inputs": loaded.input_names,
        "dynamic_dims": program.dynamic_dims,
        "sites": [s.row() for s in program.sites],
        "candidates": [
            dict(node=c.node, module=c.module, reason=c.reason) for c in program.candidates
        ],
    }


def evaluate(model: str | Path, against: str | Path | None = None, data: str | Path | None = None,
             **options: Any) -> dict:
    """Task-level fidelity of a build (or model) against its original: what `attnc eval` does.
    `options`: onnx, samples, max_length, trust_source."""
    from attnc.check.task import evaluate as _evaluate

    return _evaluate(
        str(model),
        str(against) if against is not None else None,
        str(data) if data is not None else None,
        **options,
    )
