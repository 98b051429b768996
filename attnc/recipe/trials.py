"""The trial runner: score candidate settings of one captured program against an objective.

A pass that searches (sink-calibration heads, llm-drop counts, sparse thresholds) builds one
program whose knobs are runtime buffers (`knobs`: name -> a tensor the graph reads through a
get_attr node), and asks `PassContext.trials(...)` for a `TrialRunner`. A trial writes its
setting into those buffers in place, runs the batches, and puts the buffers back: no re-capture,
no recompile, one program for every trial.

- Batches: `search` scores the candidates; `check` is held apart from the search and scores the
  final choice (a greedy or joint check), so a choice is never judged on the data that made it.
- Objective: `Objective(fn, name, higher_is_better)`; `fn(outputs, batch)` gives a float or
  `(total, weight)` per batch; the score of a trial is the weighted mean over its batches.
- Computed once: the baseline (every knob as the program holds it) per batch, on each split.
- Budget: at most `budget` trials in all (and `seconds`, when given); a trial asked for past the
  budget is not run (`None`). Early stopping: a trial whose running score, after `prune_after`
  batches, is worse than the baseline on the same batches by more than `prune_margin`
  (relative) stops there and is marked pruned; a greedy check stops after `patience` rejections
  in a row.
- Several processes (torch.distributed, `attnc.load.distributed`): a trial's batches run in
  rounds of one batch per rank, and every rank gathers every batch's (total, weight) in batch
  order, so scores, pruning and the choices made are those of one process, on every rank.
- The trail: every trial (setting, score, change against the baseline, batches, seconds, kept
  or pruned) as plain data (`TrialRunner.trail()`), for the pass's report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from attnc.errors import PassError

ObjectiveFn = Callable[[Any, Any], "float | tuple[float, float]"]


@dataclass(frozen=True)
class Objective:
    fn: ObjectiveFn
    name: str
    higher_is_better: bool = True


@dataclass
class Trial:
    index: int
    name: str
    setting: dict[str, list[float]]
    split: str  # "search" or "check"
    score: float
    baseline: float
    batches: int
    seconds: float
    pruned: bool = False
    note: str = ""
    cpu_seconds: float = 0.0  # this process's CPU time: the cost on a machine shared with others

    @property
    def gain(self) -> float:
        """Improvement over the baseline in the objective's direction (> 0: better)."""
        return self.score - self.baseline

    def row(self, higher_is_better: bool) -> dict[str, Any]:
        sign = 1.0 if higher_is_better else -1.0
        return {"trial": self.index, "name": self.name, "split": self.split,
                "score": round(self.score * sign, 6), "baseline": round(self.baseline * sign, 6),
                "change": round((self.score - self.baseline) * sign, 6),
                "batches": self.batches, "seconds": round(self.seconds, 3),
                "cpu_seconds": round(self.cpu_seconds, 3),
                "pruned": self.pruned, **({"note": self.note} if self.note else {})}


@dataclass
class TrialRunner:
    """Runs trials of `program` (anything callable on a batch's args) with `knobs` flipped."""

    program: Any
    objective: Objective
    knobs: dict[str, torch.Tensor]
    search: list[Any]
    check: list[Any]
    budget: int = 512
    seconds: float | None = None
    prune_after: int | None = None
    prune_margin: float = 0.02
    patience: int | None = None
    trials: list[Trial] = field(default_factory=list)
    _base: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    _t0: float = field(default_factory=time.perf_counter)

    # ------------------------------------------------------------------ running

    def _run_batch(self, batch) -> tuple[float, float]:
        with torch.no_grad():
            out = self.program(*batch.args)
        val = self.objective.fn(out, batch)
        total, weight = val if isinstance(val, tuple) else (float(val), 1.0)
        sign = 1.0 if self.objective.higher_is_better else -1.0
        return sign * float(total), float(weight)

    def _batches(self, split: str) -> list[Any]:
        if split not in ("search", "check"):
            raise PassError(f"trials: unknown batch split {split!r}")
        return self.search if split == "search" else self.check

    def _parts(self, batches: list[Any], base: list[tuple[float, float]] | None = None,
               ) -> tuple[list[tuple[float, float]], bool]:
        """(total, weight) of each batch in order, and whether the trial was pruned (against
        `base` after `prune_after` batches). With several ranks each round runs one batch per
        rank and gathers them all: every rank gets the parts one process would."""
        from attnc.load import distributed

        world, rank = distributed.world(), distributed.rank()
        parts: list[tuple[float, float]] = []
        for start in range(0, len(batches), world):
            chunk = batches[start:start + world]
            mine = self._run_batch(chunk[rank]) if rank < len(chunk) else None
            parts += distributed.gather(mine)[: len(chunk)]
            n = self.prune_after
            if base is not None and n and start < n <= len(parts) and n < len(base):
                cur, ref = _mean(parts[:n]), _mean(base[:n])
                if cur < ref - self.prune_margin * abs(ref):
                    return parts[:n], True
        return parts, False

    def baseline_parts(self, split: str = "search") -> list[tuple[float, float]]:
        """(total, weight) per batch with the knobs as they are now: computed once per split."""
        if split not in self._base:
            self._base[split] = self._parts(self._batches(split))[0]
        return self._base[split]

    def baseline(self, split: str = "search") -> float:
        return _mean(self.baseline_parts(split))

    def left(self) -> int:
        return self.budget - len(self.trials)

    def exhausted(self) -> bool:
        over_time = self.seconds is not None and time.perf_counter() - self._t0 > self.seconds
        return self.left() <= 0 or over_time

    def run(self, name: str, setting: dict[str, torch.Tensor | Sequence[float] | float],
            split: str = "search") -> Trial | None:
        """Score `setting` (knob name -> value) on `split`; None when the budget is spent."""
        if self.exhausted():
            return None
        unknown = [k for k in setting if k not in self.knobs]
        if unknown:
            raise PassError(f"trials: no knob {unknown[0]!r} (knobs: {', '.join(self.knobs)})")
        base = self.baseline_parts(split)
        saved = {k: self.knobs[k].clone() for k in setting}
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            for k, val in setting.items():
                buf = self.knobs[k]
                buf.copy_(torch.as_tensor(val, dtype=buf.dtype).reshape(buf.shape))
            parts, pruned = self._parts(self._batches(split), base)
        finally:
            for k, val in saved.items():
                self.knobs[k].copy_(val)
        trial = Trial(len(self.trials), name, {k: _listed(v) for k, v in setting.items()},
                      split, _mean(parts), _mean(base[: len(parts)]), len(parts),
                      time.perf_counter() - t0, pruned, cpu_seconds=time.process_time() - c0)
        self.trials.append(trial)
        return trial

    # ------------------------------------------------------------------ strategies

    def screen(self, candidates: Sequence[tuple[str, dict]], split: str = "search") -> list[Trial]:
        """One trial per candidate (each against the same baseline), until the budget ends."""
        out = []
        for name, setting in candidates:
            t = self.run(name, setting, split)
            if t is None:
                break
            out.append(t)
        return out

    def greedy(self, ordered: Sequence[tuple[str, dict]],
               combine: Callable[[dict, dict], dict], split: str = "check",
               min_gain: float = 0.0) -> tuple[list[str], list[Trial]]:
        """Add candidates one at a time (best first) on `split`, keeping each one that improves
        the score of the set kept so far by more than `min_gain` (relative); `combine(a, b)`
        merges two settings. Stops after `patience` rejections in a row, or at the budget."""
        kept: list[str] = []
        current: dict = {}
        best = self.baseline(split)
        done: list[Trial] = []
        misses = 0
        for name, setting in ordered:
            trial_setting = combine(current, setting) if current else dict(setting)
            label = " + ".join([*kept, name])
            t = self.run(label, trial_setting, split)
            if t is None:
                break
            done.append(t)
            if not t.pruned and t.score > best + min_gain * abs(best):
                kept.append(name)
                current, best = trial_setting, t.score
                t.note = "kept"
                misses = 0
            else:
                t.note = "rejected"
                misses += 1
                if self.patience is not None and misses >= self.patience:
                    break
        return kept, done

    def trail(self) -> list[dict[str, Any]]:
        return [t.row(self.objective.higher_is_better) for t in self.trials]

    def per_trial_seconds(self) -> float:
        ts = [t.seconds / max(t.batches, 1) for t in self.trials]
        return sum(ts) / len(ts) if ts else 0.0


def _mean(parts: Sequence[tuple[float, float]]) -> float:
    w = sum(p[1] for p in parts)
    return sum(p[0] for p in parts) / w if w else float("nan")


def _listed(v: Any) -> list[float]:
    t = torch.as_tensor(v).reshape(-1)
    return [round(float(x), 6) for x in t]


def split_batches(batches: Sequence[Any], check_share: float = 0.5) -> tuple[list, list]:
    """(search, check): whole batches held apart; one batch of several rows is split by rows.
    PassError when there is too little data to hold a check set apart."""
    batches = list(batches)
    if len(batches) >= 2:
        n_check = min(len(batches) - 1, max(1, round(len(batches) * check_share)))
        return batches[: len(batches) - n_check], batches[len(batches) - n_check:]
    if batches and batches[0].args and batches[0].args[0].shape[0] >= 2:
        b = batches[0]
        n = b.args[0].shape[0]
        cut = max(1, n - max(1, round(n * check_share)))
        return [_rows(b, 0, cut)], [_rows(b, cut, n)]
    raise PassError("trials need at least two calibration rows: one set to search on, one held "
                    "apart to check the choice")


def _rows(b, i0: int, i1: int):
    from dataclasses import replace

    n = b.args[0].shape[0]

    def cut(t):
        return t[i0:i1] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n else t

    return replace(b, args=tuple(cut(a) for a in b.args),
                   token_mask=cut(b.token_mask) if b.token_mask is not None else None,
                   labels=cut(b.labels) if getattr(b, "labels", None) is not None else None)


def runner_from_context(ctx, program, objective: Objective, knobs: dict[str, torch.Tensor],
                        check_share: float = 0.5, **kw) -> TrialRunner:
    """A runner over the context's calibration batches (the build's holdout stays untouched for
    verification): `search` and `check` are split from `ctx.calibration.calib`."""
    data = getattr(ctx, "calibration", None)
    if data is None or not data.calib:
        raise PassError("trials need calibration data (--calib, or calibration: in the recipe)")
    search, check = split_batches(data.calib, check_share)
    return TrialRunner(program, objective, knobs, search, check, **kw)
