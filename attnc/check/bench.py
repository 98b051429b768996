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
        return {
            "device": self.device,
            "threads": self.threads,
            "timings": [asdict(t) for t in self.timings],
        }


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


def _ort_session(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
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
                    min_seconds=cfg.min_seconds,
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
