"""Progress reporting without printing: library code wraps long loops in `track()`; the CLI
installs a renderer (a rich progress bar). With none installed, `track` is a no-op pass-through."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_renderer: Callable[[Iterable[Any], str, int | None], Iterable[Any]] | None = None


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    if _renderer is None:
        yield from items
    else:
        yield from _renderer(items, description, total)


@contextlib.contextmanager
def renderer(fn: Callable[[Iterable[Any], str, int | None], Iterable[Any]]):
    """Install `fn(items, description, total)` as the progress renderer for a block."""
    global _renderer
    old, _renderer = _renderer, fn
    try:
        yield
    finally:
        _renderer = old


# ----------------------------------------------------------------------------------------------
# stage timeline: wall time and memory per build stage, for report.json


class Timeline:
    """Stages in order: `mark(name)` ends the running stage and starts `name`. Each stage keeps
    its wall seconds, the process's resident memory at its end and the peak so far (Linux
    ru_maxrss, which only rises: the stage whose peak jumps is the one that needed the memory)."""

    def __init__(self) -> None:
        self.stages: list[dict[str, Any]] = []
        self._name: str | None = None
        self._t0 = 0.0

    def mark(self, name: str | None) -> None:
        now = time.perf_counter()
        if self._name is not None:
            released = release_heap()  # the stage's freed temporaries, before the next stage
            self.stages.append({
                "stage": self._name,
                "seconds": round(now - self._t0, 3),
                "rss_bytes": rss_bytes(),
                "peak_rss_bytes": peak_rss_bytes(),
                "heap_released_bytes": released,
            })
        self._name, self._t0 = name, now

    def as_list(self) -> list[dict[str, Any]]:
        return list(self.stages)


_timeline: Timeline | None = None


def start_timeline() -> Timeline:
    """A fresh timeline that `stage()` marks go to (one build at a time per process)."""
    global _timeline
    _timeline = Timeline()
    return _timeline


def stage(name: str | None) -> None:
    """End the current stage of the running timeline and start `name` (None: just end it)."""
    if _timeline is not None:
        _timeline.mark(name)


def stage_seconds(name: str) -> float | None:
    """Wall seconds of the finished stage `name` of the running timeline (None: not run)."""
    if _timeline is None:
        return None
    return next((s["seconds"] for s in _timeline.stages if s["stage"] == name), None)


def rss_bytes() -> int | None:
    """Resident memory of this process now (Linux), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_heap() -> int:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim`): memory a stage freed
    (exporter and serializer temporaries, a finished ONNX Runtime session) otherwise stays
    resident in malloc's arenas and adds to every later stage's peak. Returns the resident bytes
    released; 0 where there is no glibc (a no-op)."""
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return 0
    before = rss_bytes() or 0
    trim(0)
    return max(0, before - (rss_bytes() or before))


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process so far, or None where unknown."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def estimate(done: int, total: int, seconds: float) -> str:
    """'~12 s left' after `done` of `total` items took `seconds`."""
    if done <= 0 or total <= done:
        return ""
    left = seconds / done * (total - done)
    return f"~{left:.0f} s left" if left < 120 else f"~{left / 60:.1f} min left"
