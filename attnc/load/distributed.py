"""Calibration over several processes with torch.distributed: each rank runs its share of the
calibration batches through the same graph, and the streaming statistics are reduced so that
every rank ends with the statistics of all batches (the same numbers one process computes, up to
the order of floating-point sums).

Nothing here starts processes: `torchrun` (one machine or several) or any launcher that sets
`RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` does; `init_from_env()` joins the group
(gloo on CPU, NCCL where every rank has a GPU). Without a group every function is a no-op, so
single-process builds are unchanged.

The statistics loops (`attnc.graph.taps.run_taps`, `attnc.graph.stats_collect.
collect_site_stats`) call `shard(batches)` before the loop and `reduce_stats(stats)` after it.
The passes' trial searches (`attnc.recipe.trials.TrialRunner`) run each trial's batches in
rounds of one batch per rank and `gather` the per-batch scores, so every rank makes the same
choices from the same numbers one process sees.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from attnc.errors import CalibrationError

log = logging.getLogger(__name__)
T = TypeVar("T")


def active() -> bool:
    """True inside a process group of more than one rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world() -> int:
    return torch.distributed.get_world_size() if active() else 1


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group a launcher describes in the environment (WORLD_SIZE > 1); returns
    whether a group of several ranks is active."""
    dist = torch.distributed
    if active():
        return True
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return False
    if not dist.is_available():
        raise CalibrationError("WORLD_SIZE is set, but this torch has no torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend=backend)
    log.info("calibration on %d ranks (%s), this is rank %d", world(), backend, rank())
    return True


def shard(batches: Sequence[T]) -> list[T]:
    """This rank's batches: every `world()`-th one, starting at `rank()` (all of them alone)."""
    batches = list(batches)
    if not active():
        return batches
    if len(batches) < world():
        log.warning("%d calibration batches for %d ranks: some ranks get none", len(batches),
                    world())
    return batches[rank() :: world()]


def gather(obj: T) -> list[T]:
    """`obj` from every rank, in rank order, on every rank ([obj] alone)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    torch.distributed.all_gather_object(out, obj)
    return out


def reduce_stats(stats: Mapping[str, Any]) -> dict[str, Any]:
    """The statistics of all ranks merged, on every rank, in place: `stats` maps keys to
    accumulators (CosineStat, KeptMassAccumulator, ColumnSumAccumulator, a site of
    `collect_site_stats`); the keys must be the same on every rank. Only their numeric state
    travels (never the graph nodes or pattern functions they refer to)."""
    stats = dict(stats)
    if not active():
        return stats
    gathered: list[Any] = [None] * world()
    torch.distributed.all_gather_object(gathered, {k: _state(v) for k, v in stats.items()})
    keys = list(stats)
    if any(list(g) != keys for g in gathered):
        raise CalibrationError("the ranks collected statistics of different sites")
    for k in keys:
        acc = gathered[0][k]
        for other in gathered[1:]:
            acc = _merge(acc, other[k])
        _load(stats[k], acc)
    return stats


# ----------------------------------------------------------------------------------------------
# the numeric state of each accumulator, and how two states add up

_FIELDS = {  # kind -> fields added; "min" fields take the minimum
    "cosine": ("total", "count"),
    "kept": ("sum", "nk", "na", "count", "hist"),
    "cols": (),  # padded to the longer sequence, then added
    "site": ("queries", "norm_count"),
}


def _kind(acc: Any) -> str:
    from attnc.graph.stats import ColumnSumAccumulator, KeptMassAccumulator
    from attnc.graph.taps import CosineStat

    if isinstance(acc, CosineStat):  # and subclasses (llm-drop's ResidualCosineStat)
        return "cosine"
    if isinstance(acc, KeptMassAccumulator):
        return "kept"
    if isinstance(acc, ColumnSumAccumulator):
        return "cols"
    if type(acc).__name__ == "_Site" and hasattr(acc, "queries"):
        return "site"
    raise CalibrationError(f"cannot reduce a {type(acc).__name__} across ranks")


def _cpu(v: Any) -> Any:
    return v.detach().cpu() if isinstance(v, torch.Tensor) else v


def _state(acc: Any) -> dict[str, Any] | None:
    if acc is None:
        return None
    kind = _kind(acc)
    st: dict[str, Any] = {"kind": kind}
    if kind == "cosine":
        st.update(total=acc.total, count=acc.count)
    elif kind == "kept":
        st["heads"] = acc.heads
        if acc.heads is not None:
            st.update({f: _cpu(getattr(acc, f)) for f in (*_FIELDS["kept"], "min")})
    elif kind == "cols":
        st.update(sum=acc.sum, count=acc.count)
    else:
        st.update(queries=acc.queries, norm_count=acc.norm_count, norm_sum=_cpu(acc.norm_sum),
                  kept=_state(acc.kept), cols=_state(acc.cols))
    return st


def _merge(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return a if b is None else b
    kind = a["kind"]
    if kind == "kept":
        if b["heads"] is None:
            return a
        if a["heads"] is None:
            return b
        if a["heads"] != b["heads"] or a["sum"].shape != b["sum"].shape:
            raise CalibrationError("the ranks' kept-mass statistics have different shapes")
        a["min"] = torch.minimum(a["min"], b["min"])
    if kind == "cols":
        if b["sum"] is None:
            return a
        if a["sum"] is None:
            return b
        s = max(a["sum"].shape[1], b["sum"].shape[1])
        pad = lambda x: np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, s - x.shape[-1])])  # noqa: E731
        a["sum"] = pad(a["sum"]) + pad(b["sum"])
        a["count"] = pad(a["count"]) + pad(b["count"])
        return a
    for f in _FIELDS[kind]:
        a[f] = a[f] + b[f]
    if kind == "site":
        na, nb = a["norm_sum"], b["norm_sum"]
        a["norm_sum"] = nb if na is None else (na if nb is None else na + nb)
        a["kept"] = _merge(a["kept"], b["kept"])
        a["cols"] = _merge(a["cols"], b["cols"])
    return a


def _load(acc: Any, st: dict | None) -> None:
    """Put a merged state back into this rank's accumulator (tensors on its device)."""
    if acc is None or st is None:
        return
    kind = st["kind"]
    if kind == "site":
        acc.queries, acc.norm_count = st["queries"], st["norm_count"]
        ns = st["norm_sum"]
        acc.norm_sum = None if ns is None else ns.to(_device(acc.norm_sum))
        _load(acc.kept, st["kept"])
        _load(acc.cols, st["cols"])
        return
    if kind == "kept":
        if st["heads"] is None:
            return
        if acc.heads is None:  # this rank saw no batch: shape it like the others
            acc._init(st["heads"], torch.device("cpu"))
        for f in (*_FIELDS["kept"], "min"):
            setattr(acc, f, st[f].to(getattr(acc, f).device))
        return
    for f, v in st.items():
        if f != "kind":
            setattr(acc, f, v)


def _device(t: Any) -> torch.device:
    return t.device if isinstance(t, torch.Tensor) else torch.device("cpu")
