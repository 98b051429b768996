"""Calibration over two processes (torch.distributed, gloo on CPU): each rank runs every other
batch and the statistics are reduced; the result equals one process over all batches, for the
attention statistics (kept mass, column sums, head norms) and llm-drop's residual cosines."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import hf_models
import pytest
import torch

import attnc.passes.llm_drop as D
from attnc.graph import stats_patterns as P
from attnc.graph.stats_collect import StatsSpec, collect_site_stats
from attnc.load import distributed
from attnc.load.calibration import Batch, CalibrationData

SPEC = StatsSpec(candidates=[P.window(4, 1), P.window(8, 0)], colsum_rows="all",
                 head_norms=True)


def _batches() -> list[Batch]:
    """Five right-padded batches of three lengths (rank 0 gets three, rank 1 two)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for S, lengths in ((16, (16, 9)), (12, (5, 12)), (20, (20, 3)), (9, (9, 9)), (14, (2, 14))):
        ids = torch.randint(0, 512, (2, S), generator=g)
        mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()
        out.append(Batch((ids, mask), mask))
    return out


def _statistics() -> dict:
    from attnc.capture.program import capture
    from attnc.load.models import wrap_hf

    torch.set_num_threads(1)
    program = capture(wrap_hf(hf_models.build("llama"), "llama", None, None), check=False)
    batches = _batches()
    sites = {k: v.to_json() for k, v in collect_site_stats(program, None, batches, SPEC).items()}
    ctx = SimpleNamespace(calibration=CalibrationData(batches, batches, "test"))
    cosines = D.score_units(program, D.find_units(program.gm), ctx)
    return {"sites": sites, "cosines": cosines}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    os.environ.update(OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=rank,
                                         world_size=world)
    try:
        assert distributed.active() and distributed.rank() == rank
        assert len(distributed.shard(_batches())) == (3 if rank == 0 else 2)
        torch.save(_statistics(), f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _same(a, b, path="") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9,
                                                                  abs_tol=1e-12), path
    else:
        assert a == b, path


@pytest.mark.slow  # three captures of a tiny Llama (one per process)
def test_two_workers_give_the_statistics_of_one(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "stats")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    one = _statistics()
    for rank in (0, 1):
        two = torch.load(f"{out}.{rank}", weights_only=False)
        _same(one, two)  # every rank ends with the statistics of all batches
    site = next(iter(one["sites"].values()))
    assert site["queries"] == sum(int(b.token_mask.sum()) for b in _batches())
    assert site["kept"] and site["colsum"] and site["head_norms"]
    assert len(one["cosines"]) >= 2


def test_single_process_is_a_no_op():
    assert not distributed.active() and distributed.world() == 1
    batches = _batches()
    assert distributed.shard(batches) == batches
    stats = {"a": object()}
    assert distributed.reduce_stats(stats) == stats
