"""Streaming statistics through taps on the graph: a tap is a node inserted into a copy of the
graph that hands two tensors to a `Stat` as the graph runs; nothing but running sums is kept
between batches, so calibration never holds hidden states."""

from __future__ import annotations

import abc
import copy
from collections.abc import Callable, Iterable

import torch
from torch.fx import GraphModule, Node

from attnc.load.calibration import Batch


class Stat(abc.ABC):
    """A running statistic fed (x, y, token_mask) by a tap."""

    @abc.abstractmethod
    def update(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> None: ...

    @abc.abstractmethod
    def result(self) -> float: ...


class CosineStat(Stat):
    """Mean over (non-padding) tokens of cos(x_t, y_t), computed in float32."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0.0

    def update(self, x, y, mask):
        cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, S)
        if mask is not None and mask.shape == cos.shape:
            w = mask.to(cos.dtype)
            self.total += float((cos * w).sum())
            self.count += float(w.sum())
        else:
            self.total += float(cos.sum())
            self.count += float(cos.numel())

    def result(self) -> float:
        return self.total / self.count if self.count else float("nan")


class _Recorder:
    def __init__(self, stats: dict[str, Stat]):
        self.stats = stats
        self.mask: torch.Tensor | None = None

    def __call__(self, key: str, x: torch.Tensor, y: torch.Tensor) -> None:
        self.stats[key].update(x, y, self.mask)


def _tap_fn(recorder: _Recorder):
    def attnc_tap(key, x, y):
        recorder(key, x, y)
        return None

    return attnc_tap


def run_taps(
    gm: GraphModule,
    batches: Iterable[Batch],
    taps: dict[str, tuple[str, str]],
    make_stat: Callable[[], Stat] = CosineStat,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Run `batches` through a copy of `gm` with a tap per key on (x node, y node); return each
    key's statistic. The graph `gm` itself is not modified."""
    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    stats = {k: make_stat() for k in taps}
    recorder = _Recorder(stats)
    fn = _tap_fn(recorder)
    for key, (xn, yn) in taps.items():
        x, y = by_name[xn], by_name[yn]
        later = y if _index(graph, y) > _index(graph, x) else x
        with graph.inserting_after(later):
            graph.call_function(fn, (key, x, y))
    tapped = GraphModule(gm, graph)
    from attnc.load import distributed
    from attnc.progress import track

    batches = distributed.shard(list(batches))  # this rank's share (all of them alone)
    with torch.no_grad():
        for i, batch in enumerate(track(batches, f"calibrating {len(taps)} taps", len(batches))):
            recorder.mask = batch.token_mask
            tapped(*batch.args)
            if progress:
                progress(i)
    stats = distributed.reduce_stats(stats)  # every rank's batches (no-op alone)
    return {k: s.result() for k, s in stats.items()}


def _index(graph, node: Node) -> int:
    for i, n in enumerate(graph.nodes):
        if n is node:
            return i
    return -1
