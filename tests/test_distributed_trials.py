"""The passes' trial searches over two processes (torch.distributed, gloo on CPU): each rank runs
every other batch of a trial, the per-batch scores are gathered, and both ranks end with the
trail one process makes (same scores, same pruning, same greedy choices), having run about half
the batches each. No capture here: a plain module with a knob buffer (seconds)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from attnc.recipe.trials import Objective, TrialRunner


@dataclass
class _Batch:
    args: tuple
    target: torch.Tensor


class _Prog(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("gain", torch.ones(4))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.gain


def _batches(n: int, seed: int) -> list[_Batch]:
    g = torch.Generator().manual_seed(seed)
    true_gain = torch.tensor([1.0, 0.5, 2.0, 1.0])
    out = []
    for i in range(n):
        x = torch.randn(3 + i % 2, 4, generator=g)
        out.append(_Batch((x,), x * true_gain + 0.01 * torch.randn(x.shape, generator=g)))
    return out


def _trail() -> tuple[list[dict], list[str], int]:
    prog = _Prog()
    objective = Objective(lambda out, b: (-float(((out - b.target) ** 2).sum()), out.numel()),
                          "neg. squared error")
    runner = TrialRunner(prog, objective, {"gain": prog.gain}, _batches(7, 0), _batches(5, 1),
                         prune_after=3, prune_margin=0.01)
    cands = [(f"h{i}={v}", {"gain": [v if j == i else 1.0 for j in range(4)]})
             for i in range(4) for v in (0.5, 2.0)]
    screened = runner.screen(cands)
    ranked = sorted((t for t in screened if not t.pruned), key=lambda t: -t.gain)
    kept, _ = runner.greedy(
        [(t.name, t.setting) for t in ranked],
        combine=lambda a, b: {"gain": [x * y for x, y in zip(a["gain"], b["gain"], strict=True)]})
    rows = [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds")}
            for r in runner.trail()]
    return rows, kept, prog.calls


def _worker(rank: int, world: int, init: str, out: str) -> None:
    os.environ.update(OMP_NUM_THREADS="1")
    torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=rank,
                                         world_size=world)
    try:
        torch.save(_trail(), f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_two_workers_make_the_trail_of_one(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "trail")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    rows, kept, calls = _trail()
    assert any(r["pruned"] for r in rows) and any(not r["pruned"] for r in rows)
    assert kept == ["h2=2.0", "h1=0.5"]  # the planted gains (largest first), found greedily
    for rank in (0, 1):
        rows2, kept2, calls2 = torch.load(f"{out}.{rank}", weights_only=False)
        assert rows2 == rows and kept2 == kept  # the same numbers, bit for bit
        # each rank ran about half of the batches (a pruned trial finishes its round of two)
        assert calls2 <= 0.65 * calls
