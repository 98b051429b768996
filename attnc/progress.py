"""Progress reporting without printing: library code wraps long loops in `track()`; the CLI
installs a renderer (a rich progress bar). With none installed, `track` is a no-op pass-through."""

from __future__ import annotations

import contextlib
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
