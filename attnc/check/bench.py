"""Speed of a build, measured in the same run as its baseline.

`time_pair` times two runners on the same inputs, interleaved (A, B, A, B, ...) after a warm-up,
and reports medians and the ratio baseline/candidate: a shared, noisy machine slows both alike, so
the ratio holds where absolute times drift. `bench_programs` does that for the torch programs and,
given the two ONNX files, for ONNX Runtime on CPU, at each requested input shape.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnc.errors import UsageError

Runner = Callable[..., Any]


@dataclass(frozen=True)
class BenchConfig:
    """`shapes`: (batch, sequence) pairs to time at (empty: the calibration shape);
    `repeats`: timed runs of each model per shape; `warmup`: untimed runs first;
    `min_seconds`: keep timing past `repeats` until each model has this much timed."""

    shapes: tuple[tuple[int, int], ...] = ()
    repeats: int = 15
    warmup: int = 3
    min_seconds: float = 0.0
    runtimes: tuple[str, ...] = ("onnxruntime", "torch")
    max_seconds: float | None = None  # stop a pair early (after 3 runs) past this much time

    def validate(self) -> None:
        if self.repeats < 1 or self.warmup < 0:
            raise UsageError(f"bench repeats must be >= 1 and warmup >= 0, got {self.repeats}")
        for s in self.shapes:
            if len(s) != 2 or min(s) < 1:
                raise UsageError(f"bench shapes are BATCHxSEQUENCE with both >= 1, got {s}")
        bad = set(self.runtimes) - {"onnxruntime", "torch"}
        if bad:
            raise UsageError(f"unknown bench runtime(s) {sorted(bad)}: use onnxruntime, torch")


@dataclass(frozen=True)
class Timing:
    runtime: str
    shape: tuple[tuple[int, ...], ...]
    optimized_ms: float
    original_ms: float
    speedup: float
    runs: int
    spread_optimized_ms: tuple[float, float] = (0.0, 0.0)
    spread_original_ms: tuple[float, float] = (0.0, 0.0)


@dataclass
class BenchResult:
    device: str
    threads: int
    timings: list[Timing] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = {
            "device": self.device,
            "threads": self.threads,
            "timings": [asdict(t) for t in self.timings],
        }
        if any(t.runtime.startswith("onnxruntime") for t in self.timings):
            out["ort_intra_op_spinning"] = ORT_SPINNING
        return out


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {cpu} ({os.cpu_count()} cores)"


def time_pair(
    optimized: Runner,
    original: Runner,
    args: Sequence[torch.Tensor],
    *,
    repeats: int = 15,
    warmup: int = 3,
    min_seconds: float = 0.0,
    max_seconds: float | None = None,
) -> tuple[list[float], list[float]]:
    """Interleaved wall-clock times (seconds) of `optimized(*args)` and `original(*args)`."""
    for _ in range(warmup):
        optimized(*args)
        original(*args)
    t_opt: list[float] = []
    t_orig: list[float] = []
    i = 0
    while i < repeats or min(sum(t_opt), sum(t_orig)) < min_seconds:
        # alternate which goes first, so neither always runs on a cache the other warmed
        pair = ((optimized, t_opt), (original, t_orig))
        for fn, acc in pair if i % 2 == 0 else reversed(pair):
            t0 = time.perf_counter()
            fn(*args)
            acc.append(time.perf_counter() - t0)
        i += 1
        if i >= 10 * max(repeats, 1) and min_seconds <= 0:
            break
        if max_seconds is not None and i >= 3 and sum(t_opt) + sum(t_orig) > max_seconds:
            break
    return t_opt, t_orig


def _timing(runtime: str, args, t_opt, t_orig) -> Timing:
    mo, mr = statistics.median(t_opt) * 1e3, statistics.median(t_orig) * 1e3
    q = lambda xs: (  # noqa: E731 - inter-quartile spread in ms
        statistics.quantiles(xs, n=4)[0] * 1e3 if len(xs) > 1 else xs[0] * 1e3,
        statistics.quantiles(xs, n=4)[2] * 1e3 if len(xs) > 1 else xs[0] * 1e3,
    )
    return Timing(
        runtime=runtime,
        shape=tuple(tuple(a.shape) for a in args),
        optimized_ms=mo,
        original_ms=mr,
        speedup=mr / mo if mo > 0 else float("nan"),
        runs=len(t_opt),
        spread_optimized_ms=q(t_opt),
        spread_original_ms=q(t_orig),
    )


def inputs_at(
    example_args: Sequence[torch.Tensor],
    names: Sequence[str],
    batch: int,
    seq: int,
    vocab: int | None = None,
    seq_axes: dict[str, int] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Inputs shaped like `example_args` with batch `batch` and sequence `seq` (token inputs:
    random ids below `vocab`, masks all ones, type ids zero; float inputs keep their shape past
    the batch, e.g. pixel_values)."""
    g = torch.Generator().manual_seed(0)
    seq_axes = seq_axes or {}
    out = []
    for name, t in zip(names, example_args, strict=True):
        shape = list(t.shape)
        shape[0] = batch
        if not t.is_floating_point() and t.dim() >= 2:
            shape[seq_axes.get(name, 1)] = seq
        if t.is_floating_point():
            out.append(torch.randn(shape, generator=g, dtype=t.dtype))
        elif "mask" in name:
            out.append(torch.ones(shape, dtype=t.dtype))
        elif "type" in name or "position" in name:
            out.append(torch.zeros(shape, dtype=t.dtype))
        else:
            hi = vocab or int(t.max()) + 1
            out.append(torch.randint(0, max(hi, 2), shape, generator=g, dtype=t.dtype))
    return tuple(out)


ORT_SPINNING = False  # the bench's ORT sessions' intra-op spinning, as its results record it


def _ort_session(path: str):
    """A CPU session without intra-op spinning: the bench interleaves two sessions, and a
    spinning pool slows the other's runs (benchmarks/ort_spinning_pair.py)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", str(int(ORT_SPINNING)))
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def run(*args: torch.Tensor):
        return sess.run(None, {n: a.numpy() for n, a in zip(names, args, strict=False)})

    return run


def bench_programs(
    optimized: Runner,
    original: Runner,
    shapes_args: Sequence[Sequence[torch.Tensor]],
    cfg: BenchConfig = BenchConfig(),
    *,
    onnx_optimized: str | None = None,
    onnx_original: str | None = None,
) -> BenchResult:
    """Time the optimized model against the original at each input set in `shapes_args`:
    the torch programs, and ONNX Runtime (CPU) on the two ONNX files when both are given."""
    cfg.validate()
    res = BenchResult(device=device_name(), threads=torch.get_num_threads())
    runners: list[tuple[str, Runner, Runner]] = []
    if "onnxruntime" in cfg.runtimes and onnx_optimized and onnx_original:
        runners.append(("onnxruntime-cpu", _ort_session(onnx_optimized),
                        _ort_session(onnx_original)))
    if "torch" in cfg.runtimes:
        runners.append(("torch", optimized, original))
    with torch.inference_mode():
        for args in shapes_args:
            for name, a, b in runners:
                t_opt, t_orig = time_pair(
                    a, b, args, repeats=cfg.repeats, warmup=cfg.warmup,
                    min_seconds=cfg.min_seconds, max_seconds=cfg.max_seconds,
                )
                res.timings.append(_timing(name, args, t_opt, t_orig))
    return res


def parse_shapes(text: str | None) -> tuple[tuple[int, int], ...]:
    """`"1x128,8x64"` -> ((1, 128), (8, 64))."""
    if not text:
        return ()
    shapes = []
    for part in text.split(","):
        bits = part.lower().strip().split("x")
        try:
            b, s = (int(x) for x in bits)
        except ValueError:
            raise UsageError(
                f"--shapes takes BATCHxSEQUENCE pairs like 1x128,8x64; got {part.strip()!r}"
            ) from None
        if b < 1 or s < 1:
            raise UsageError(f"--shapes needs positive sizes; got {part.strip()!r}")
        shapes.append((b, s))
    return tuple(shapes)


def bench_in_build(
    program: Any,
    original: Any,
    onnx_path: Path | None,
    args_list: Sequence[Sequence[torch.Tensor]],
    cfg: BenchConfig,
    opset: int,
    scratch: Path,
) -> BenchResult:
    """The build's own speed step: the optimized program and model.onnx against the original,
    whose ONNX file is exported into `scratch` (removed by the caller) for the same run."""
    onnx_orig = None
    if onnx_path is not None and "onnxruntime" in cfg.runtimes:
        from attnc.export.artifacts import export_onnx

        onnx_orig = scratch / "original.onnx"
        export_onnx(original, onnx_orig, opset)
    return bench_programs(
        program,
        original,
        args_list,
        cfg,
        onnx_optimized=str(onnx_path) if onnx_path else None,
        onnx_original=str(onnx_orig) if onnx_orig else None,
    )


def _onnx_inputs(path: Path, batch: int, seq: int, vocab: int) -> tuple[torch.Tensor, ...]:
    """Inputs for an ONNX file from its own input declarations: named dims `batch`/`sequence`
    (or any other dynamic dim: the sequence) take the asked sizes, static dims stay."""
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    g = torch.Generator().manual_seed(0)
    out = []
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            else:
                shape.append(batch if i == 0 or d.dim_param == "batch" else seq)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        name = inp.name
        if dtype.kind == "f":
            t = torch.randn(shape, generator=g).to(torch.from_numpy(np.zeros(0, dtype)).dtype)
        elif "mask" in name:
            t = torch.ones(shape, dtype=torch.int64)
        elif "type" in name or "position" in name:
            t = torch.zeros(shape, dtype=torch.int64)
        else:
            t = torch.randint(0, max(vocab, 2), shape, generator=g, dtype=torch.int64)
        if dtype.kind in "iu" and t.dtype != torch.int64:
            t = t.to(torch.int32)
        out.append(t)
    return tuple(out)


def bench_folder(
    folder: Path,
    cfg: BenchConfig,
    against: Path | None = None,
) -> BenchResult:
    """`attnc bench BUILD`: model.onnx / model.pt2 of a build against its original.pt2 (saved
    at build time: nothing from the folder runs as code) or `against` (a .pt2), in one run."""
    import json
    import tempfile

    cfg.validate()
    if not (folder / "report.json").is_file():
        raise UsageError(f"{folder} is not an attnc build folder (no report.json)")
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{folder}/report.json is unreadable: {exc}") from None
    orig_pt2 = against or folder / "original.pt2"
    if not orig_pt2.is_file():
        raise UsageError(
            f"{folder} has no original.pt2 to compare with",
            "pass --against ORIGINAL.pt2 (or rebuild without --no-original)",
        )
    opt_pt2 = folder / "model.pt2"
    opt_onnx = folder / "model.onnx"
    if not opt_pt2.is_file() and not opt_onnx.is_file():
        raise UsageError(f"{folder} has neither model.pt2 nor model.onnx")
    import dataclasses

    from attnc.capture.program import capture
    from attnc.load.models import load_model

    orig_loaded = load_model(str(orig_pt2))  # a .pt2 is data: loading it runs no code
    original = orig_loaded.module
    optimized = load_model(str(opt_pt2)).module if opt_pt2.is_file() else None
    vocab = _vocab_of(folder, report)
    shapes = cfg.shapes or tuple(
        tuple(s) for s in (report.get("bench") or {}).get("shapes", [(1, 64)])
    )
    runtimes = [r for r in cfg.runtimes if r != "torch" or optimized is not None]
    if not opt_onnx.is_file():
        runtimes = [r for r in runtimes if r != "onnxruntime"]
    if not runtimes:
        raise UsageError(f"{folder}: nothing to time for the runtimes asked for")
    if not opt_onnx.is_file() and not orig_loaded.input_names:
        raise UsageError(f"{folder}: no ONNX file to read the inputs from")
    cfg = BenchConfig(
        shapes, cfg.repeats, cfg.warmup, cfg.min_seconds, tuple(runtimes), cfg.max_seconds
    )
    opset = int(((report.get("recipe") or {}).get("export") or {}).get("opset", 23))
    res = BenchResult(device=device_name(), threads=torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix=".attnc-bench-", dir=folder.parent) as tmp:
        dynamic_onnx: Path | None = None
        for b, sq in shapes:
            if opt_onnx.is_file():
                args = _onnx_inputs(opt_onnx, b, sq, vocab)
            else:
                args = inputs_at(orig_loaded.example_args, orig_loaded.input_names, b, sq, vocab)
            onnx_orig = dynamic_onnx
            if "onnxruntime" in runtimes and onnx_orig is None:
                from attnc.export.artifacts import export_onnx

                # the original, captured again at this shape (dynamic when torch allows)
                prog = capture(dataclasses.replace(orig_loaded, example_args=tuple(args)))
                onnx_orig = Path(tmp) / f"original-{b}x{sq}.onnx"
                export_onnx(prog, onnx_orig, opset)
                if prog.dynamic_dims:
                    dynamic_onnx = onnx_orig
            part = bench_programs(
                optimized or original,
                original,
                [args],
                cfg,
                onnx_optimized=str(opt_onnx) if onnx_orig else None,
                onnx_original=str(onnx_orig) if onnx_orig else None,
            )
            res.timings.extend(part.timings)
    return res


def _vocab_of(folder: Path, report: dict) -> int:
    import json

    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            c = json.loads(cfg.read_text())
            v = c.get("vocab_size") or (c.get("text_config") or {}).get("vocab_size")
            if v:
                return int(v)
        except (OSError, ValueError):
            pass
    return 2
