"""Calibration data and streaming statistics collected through taps on the graph.

Data: JSONL text (tokenised with the model's tokenizer) or token ids, a tensor file, or generated
inputs for vision models. Batches are split into calibration and held-out parts; passes read
statistics from the first, verification uses the second.

Statistics over these batches stream through taps on the graph (`attnc.graph.taps`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnc.errors import CalibrationError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationConfig:
    samples: int = 64
    max_length: int = 128
    batch_size: int = 16
    holdout: float = 0.25
    seed: int = 0

    def validate(self) -> None:
        from attnc.errors import RecipeError

        if self.samples < 1 or self.batch_size < 1:
            raise RecipeError("calibration.samples and calibration.batch_size must be at least 1")
        if self.max_length < 2:
            raise RecipeError(f"calibration.max_length must be at least 2, got {self.max_length}")
        if not 0.0 <= self.holdout < 1.0:
            raise RecipeError(f"calibration.holdout must be in [0, 1), got {self.holdout}")


@dataclass
class Batch:
    args: tuple[torch.Tensor, ...]
    token_mask: torch.Tensor | None  # (B, S) 1 for real tokens, for masked statistics


@dataclass
class CalibrationData:
    calib: list[Batch]
    holdout: list[Batch]
    source: str

    @property
    def num_samples(self) -> int:
        return sum(b.args[0].shape[0] for b in self.calib + self.holdout)


# ----------------------------------------------------------------------------------------------
# reading


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CalibrationError(f"{path} is not UTF-8 text") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
        if isinstance(row, str):
            row = {"text": row}
        if not isinstance(row, dict) or not ({"text", "input_ids"} & row.keys()):
            raise CalibrationError(f'{path}:{i}: each line needs "text" or "input_ids"')
        rows.append(row)
    if not rows:
        raise CalibrationError(f"{path} holds no calibration samples")
    return rows


def _tokenize(rows: list[dict], tokenizer: Any, cfg: CalibrationConfig) -> list[list[int]]:
    seqs = []
    for row in rows:
        if "input_ids" in row:
            ids = row["input_ids"]
            if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids) or not ids:
                raise CalibrationError('"input_ids" must be a non-empty list of integers')
        else:
            text = row["text"]
            if not isinstance(text, str) or not text.strip():
                raise CalibrationError('"text" must be a non-empty string')
            if tokenizer is None:
                raise CalibrationError(
                    "the model has no tokenizer, so text cannot be used",
                    'give "input_ids" in the JSONL, or a model folder with its tokenizer',
                )
            ids = tokenizer(text, truncation=True, max_length=cfg.max_length)["input_ids"]
        seqs.append(list(ids[: cfg.max_length]))
    return seqs


def _pad_id(tokenizer: Any) -> int:
    if tokenizer is None:
        return 0
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    return int(pid) if pid is not None else 0


def _pack(seqs: list[list[int]], length: int) -> list[list[int]]:
    """Concatenate and chunk (the reference's 'pt' mode) for models without a mask input."""
    flat = [t for s in seqs for t in s]
    if len(flat) < 2:
        raise CalibrationError("calibration data has fewer than 2 tokens")
    length = min(length, len(flat))
    return [flat[i : i + length] for i in range(0, len(flat) - length + 1, length)]


def _token_batches(seqs, names, cfg, pad_id, vocab, extra) -> list[Batch]:
    has_mask = any("mask" in n for n in names)
    if not has_mask:
        seqs = _pack(seqs, cfg.max_length)
    for s in seqs:
        bad = [t for t in s if t < 0 or (vocab and t >= vocab)]
        if bad:
            raise CalibrationError(f"token id {bad[0]} is outside the model's vocabulary ({vocab})")
    batches = []
    for i in range(0, len(seqs), cfg.batch_size):
        chunk = seqs[i : i + cfg.batch_size]
        width = max(len(s) for s in chunk)
        if not has_mask:
            width = min(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, s in enumerate(chunk):
            s = s[:width]
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        args = []
        for n in names:
            if "mask" in n:
                args.append(mask)
            elif n in extra:
                args.append(extra[n](len(chunk)))
            else:
                args.append(ids)
        batches.append(Batch(tuple(args), mask))
    return batches


def generated_batches(example_args, names, cfg: CalibrationConfig) -> list[Batch]:
    """Random inputs shaped like the examples (vision models, or no data given)."""
    g = torch.Generator().manual_seed(cfg.seed)
    batches = []
    n_batches = max(2, (cfg.samples + cfg.batch_size - 1) // cfg.batch_size)
    for _ in range(n_batches):
        args = []
        for t in example_args:
            shape = (cfg.batch_size, *t.shape[1:])
            if t.is_floating_point():
                args.append(torch.randn(shape, generator=g, dtype=t.dtype))
            elif "mask" in names[len(args)]:
                args.append(torch.ones(shape, dtype=t.dtype))
            else:
                hi = int(t.max()) + 1
                args.append(torch.randint(0, max(hi, 2), shape, generator=g, dtype=t.dtype))
        batches.append(Batch(tuple(args), None))
    return batches


def load_calibration(
    path: str | None,
    *,
    names: Sequence[str],
    example_args: tuple[torch.Tensor, ...],
    tokenizer: Any = None,
    vocab: int | None = None,
    cfg: CalibrationConfig = CalibrationConfig(),
    extra: dict[str, Callable[[int], torch.Tensor]] | None = None,
) -> CalibrationData:
    extra = extra or {}
    if path is None or path == "generated":
        batches = generated_batches(example_args, list(names), cfg)
        return _split(batches, cfg, "generated")
    p = Path(path)
    if not p.exists():
        raise CalibrationError(f"calibration file not found: {path}")
    if p.suffix in (".jsonl", ".json", ".txt"):
        rows = _read_jsonl(p)[: cfg.samples]
        seqs = _tokenize(rows, tokenizer, cfg)
        batches = _token_batches(seqs, list(names), cfg, _pad_id(tokenizer), vocab, extra)
    elif p.suffix in (".pt", ".safetensors"):
        batches = _tensor_batches(p, names, cfg)
    else:
        raise CalibrationError(
            f"unknown calibration format {p.suffix!r}: use .jsonl, .pt or .safetensors"
        )
    return _split(batches, cfg, str(p))


def _tensor_batches(p: Path, names, cfg) -> list[Batch]:
    from attnc.load.models import read_tensor_file

    try:
        data = read_tensor_file(p)
    except Exception as exc:  # noqa: BLE001
        raise CalibrationError(
            f"cannot read tensor file {p}: {str(exc).splitlines()[0][:200]}"
        ) from None
    if isinstance(data, torch.Tensor):
        data = {names[0]: data}
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CalibrationError(f"{p} must hold a tensor or a dict of tensors named like the inputs")
    missing = [n for n in names if n not in data]
    if missing:
        raise CalibrationError(f"{p} lacks input(s) {missing}; it has {sorted(data)}")
    n = min(int(data[k].shape[0]) for k in names)
    if n == 0:
        raise CalibrationError(f"{p} holds no samples")
    n = min(n, cfg.samples)
    batches = []
    for i in range(0, n, cfg.batch_size):
        args = tuple(data[k][i : i + cfg.batch_size] for k in names)
        mask = next((data[k][i : i + cfg.batch_size] for k in names if "mask" in k), None)
        batches.append(Batch(args, mask))
    return batches


def _split(batches: list[Batch], cfg: CalibrationConfig, source: str) -> CalibrationData:
    if not batches:
        raise CalibrationError(f"no calibration batches from {source}")
    if cfg.holdout <= 0:  # no held-out part: verification reuses the calibration batches
        return CalibrationData(batches, batches, source)
    if len(batches) == 1:
        b = batches[0]
        n = b.args[0].shape[0]
        if n < 2:
            return CalibrationData([b], [b], source)
        cut = max(1, int(round(n * (1 - cfg.holdout))))
        cut = min(cut, n - 1)
        part = lambda lo, hi: Batch(
            tuple(a[lo:hi] for a in b.args), None if b.token_mask is None else b.token_mask[lo:hi]
        )
        return CalibrationData([part(0, cut)], [part(cut, n)], source)
    n_hold = max(1, int(round(len(batches) * cfg.holdout))) if cfg.holdout > 0 else 0
    n_hold = min(n_hold, len(batches) - 1)
    calib = batches[: len(batches) - n_hold]
    hold = batches[len(batches) - n_hold :] or calib[-1:]
    return CalibrationData(calib, hold, source)


def conform(data: CalibrationData, names, example_args, dynamic_dims, pad_id: int = 0):
    """Reshape batches to the program's static dims: a static batch size regroups rows (the last
    group is filled by repeating rows), a static sequence length pads or truncates tokens."""

    def static(axis: int, i: int) -> int | None:
        name = names[i]
        if axis in dynamic_dims.get(name, {}):
            return None
        return int(example_args[i].shape[axis]) if example_args[i].dim() > axis else None

    def fix_seq(b: Batch) -> Batch:
        args, mask = list(b.args), b.token_mask
        for i, t in enumerate(args):
            size = static(1, i) if not t.is_floating_point() and t.dim() == 2 else None
            if size is None or t.shape[1] == size:
                continue
            if t.shape[1] > size:
                args[i] = t[:, :size]
            else:
                fill = 0 if "mask" in names[i] else pad_id
                pad = torch.full((t.shape[0], size - t.shape[1]), fill, dtype=t.dtype)
                args[i] = torch.cat([t, pad], 1)
        if mask is not None:
            mask = next((a for n, a in zip(names, args, strict=True) if "mask" in n), mask)
        return Batch(tuple(args), mask)

    def regroup(batches: list[Batch]) -> list[Batch]:
        size = static(0, 0)
        if size is None or not batches:
            return batches
        cols = [torch.cat([b.args[i] for b in batches]) for i in range(len(names))]
        masks = (
            None if batches[0].token_mask is None else torch.cat([b.token_mask for b in batches])
        )
        n = cols[0].shape[0]
        out = []
        for start in range(0, n, size):
            idx = torch.arange(start, start + size) % n
            out.append(Batch(tuple(c[idx] for c in cols), None if masks is None else masks[idx]))
        return out

    calib = regroup([fix_seq(b) for b in data.calib])
    hold = regroup([fix_seq(b) for b in data.holdout])
    return CalibrationData(calib, hold, data.source)
