"""Calibration data and streaming statistics collected through taps on the graph.

Data: JSONL text (tokenised with the model's tokenizer) or token ids, a tensor file, or generated
inputs for vision models. Batches are split into calibration and held-out parts; passes read
statistics from the first, verification uses the second.

Statistics over these batches stream through taps on the graph (`attnc.graph.taps`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from attnc.errors import CalibrationError
from attnc.load.calib_files import (
    LABELS,
    TENSOR_SUFFIXES,
    Row,
    check_calibration_file,
    check_ids,
    check_tensors,
    model_positions,  # noqa: F401 - re-exported for build.prepare
    read_rows,
    read_tensors,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationConfig:
    samples: int = 64
    max_length: int = 128
    batch_size: int = 16
    holdout: float = 0.25
    seed: int = 0
    # where the data comes from: None = --calib when given, else generated inputs for models
    # without a tokenizer; "file" = --calib is required; "generated" = random inputs, even for a
    # text model with a tokenizer
    source: Literal["file", "generated"] | None = None

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
    labels: torch.Tensor | None = None  # (B,) class labels a tensor file may carry, for eval


@dataclass
class CalibrationData:
    calib: list[Batch]
    holdout: list[Batch]
    source: str
    # where a VLM's pixels came from, for the report: real image files, a tensor file, or
    # generated (random pixels); None for models without pixel inputs
    images: str | None = None

    @property
    def num_samples(self) -> int:
        return sum(b.args[0].shape[0] for b in self.calib + self.holdout)


# ----------------------------------------------------------------------------------------------
# reading (the file checks live in attnc.load.calib_files)


def _tokenize(
    path: Path, rows: list[Row], tokenizer: Any, length: int, vocab: int | None,
    positions: int | None,
) -> list[list[int]]:
    seqs = []
    for row in rows:
        if row.ids is not None:
            check_ids(path, row.line, row.ids, vocab, positions)
            ids = list(row.ids)
        else:
            if tokenizer is None:
                raise CalibrationError(
                    f"{path} line {row.line}: the model has no tokenizer, so text cannot be used",
                    'give "input_ids" in the JSONL, or a model folder with its tokenizer',
                )
            ids = list(tokenizer(row.text, truncation=True, max_length=length)["input_ids"])
            check_ids(path, row.line, ids, vocab, None)
        seqs.append(ids[:length])
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


def _token_batches(seqs, names, cfg, pad_id, length, extra) -> list[Batch]:
    has_mask = any("mask" in n for n in names)
    if not has_mask:
        seqs = _pack(seqs, length)
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
            elif "token_type" in n:  # one segment, as a tokenizer gives for one text
                args.append(torch.zeros_like(ids))
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
                args.append(_random_ids(t, shape, g))
        batches.append(Batch(tuple(args), None))
    return batches


def _random_ids(example: torch.Tensor, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random ids like `example`. Where every example row holds the same id at a position (a
    VLM's image tokens, a decoder start token, token type 0) that id stays, and it appears
    nowhere else, so the structure the model checks (e.g. image tokens per image) holds."""
    if example.dim() != 2 or example.shape[0] < 2 or example.numel() == 0:
        hi = int(example.max()) + 1 if example.numel() else 2
        return torch.randint(0, max(hi, 2), shape, generator=g, dtype=example.dtype)
    fixed = (example == example[:1]).all(0)  # (S,) positions constant over the batch
    free = example[:, ~fixed]
    hi = max(int(free.max()) + 1 if free.numel() else 2, 2)
    out = torch.randint(0, hi, shape, generator=g, dtype=example.dtype)
    kept = set(example[0, fixed].tolist())
    if kept and free.numel():
        allowed = torch.tensor([i for i in range(hi) if i not in kept] or [0])
        out = allowed[torch.randint(0, len(allowed), shape, generator=g)].to(example.dtype)
    out[:, fixed] = example[0, fixed]
    return out


def effective_length(cfg: CalibrationConfig, positions: int | None) -> int:
    """calibration.max_length, cut to the model's positions (with a log line) when larger."""
    if positions and cfg.max_length > positions:
        log.warning(
            "calibration.max_length %d is more than the model's %d positions: "
            "sequences are cut to %d tokens",
            cfg.max_length,
            positions,
            positions,
        )
        return positions
    return cfg.max_length


def load_calibration(
    path: str | None,
    *,
    names: Sequence[str],
    example_args: tuple[torch.Tensor, ...],
    tokenizer: Any = None,
    vocab: int | None = None,
    cfg: CalibrationConfig = CalibrationConfig(),
    extra: dict[str, Callable[[int], torch.Tensor]] | None = None,
    positions: int | None = None,
    model_dir: str | None = None,
) -> CalibrationData:
    """Batches from `path` (JSONL, .pt, .safetensors; for a VLM also images: a folder, or JSONL
    lines with "image" and a prompt, `attnc.load.calib_images`, normalised as `model_dir`'s
    preprocessor_config.json says), checked against the model: token ids in `vocab`, sequences
    within `positions`, inputs named, shaped and typed like `example_args`."""
    extra = extra or {}
    pixels = "pixel_values" in names
    if path is None or path == "generated":
        batches = generated_batches(example_args, list(names), cfg)
        return _split(batches, cfg, "generated", "generated (random pixels)" if pixels else None)
    p = Path(path)
    from attnc.load.calib_images import image_batches

    got = image_batches(p, list(names), example_args, tokenizer=tokenizer, vocab=vocab,
                        positions=positions, samples=cfg.samples, batch_size=cfg.batch_size,
                        model_dir=model_dir, pad_id=_pad_id(tokenizer))
    if got is not None:
        return _split(got[0], cfg, str(p), got[1])
    images = None
    if p.suffix in TENSOR_SUFFIXES:
        data = check_tensors(p, read_tensors(p), names, example_args, vocab, positions)
        batches = _tensor_batches(data, names, cfg)
        images = "from the tensor file" if pixels else None
    else:  # read_rows refuses a missing file, a folder, an empty file, an unknown suffix
        # inputs text cannot fill (pixels, audio features) are random, shaped like the examples
        like = {
            n: (lambda b, t=t: torch.randn(b, *t.shape[1:], dtype=t.dtype))
            for n, t in zip(names, example_args, strict=True)
            if t.is_floating_point()
        }
        extra = {**like, **extra}
        if all(n in extra or "mask" in n for n in names):
            raise CalibrationError(
                f"{p}: the model takes no token ids ({', '.join(names)}), so text cannot feed it",
                "give a .pt/.safetensors file of its inputs, or leave out --calib",
            )
        rows = read_rows(p)[: cfg.samples]
        length = effective_length(cfg, positions)
        # a row longer than the positions is a mistake, unless rows are packed (no mask input)
        row_limit = positions if any("mask" in n for n in names) else None
        seqs = _tokenize(p, rows, tokenizer, length, vocab, row_limit)
        batches = _token_batches(seqs, list(names), cfg, _pad_id(tokenizer), length, extra)
        images = "generated (random pixels: the calibration file gives no images)" \
            if pixels else None
    return _split(batches, cfg, str(p), images)


def check_source(calib: str | None, cfg: CalibrationConfig) -> None:
    """--calib against the recipe's calibration.source, before the model is loaded."""
    if calib is not None and calib != "generated" and cfg.source == "generated":
        raise CalibrationError(
            f"--calib {calib} is given, but the recipe says calibration.source: generated",
            "drop --calib, or the source line from the recipe",
        )
    if calib in (None, "generated") and cfg.source == "file":
        raise CalibrationError("the recipe says calibration.source: file, but no --calib is given")
    if calib is not None and calib != "generated":
        check_calibration_file(calib)


def refuse_random_text(calib: str | None, cfg: CalibrationConfig, loaded: Any) -> None:
    """A text model with a tokenizer is not calibrated on random ids unless the recipe says so:
    random ids mislead both the passes' statistics and the verification."""
    if calib is not None or cfg.source == "generated":
        return
    if loaded.tokenizer is None or loaded.kind in ("vision", "speech"):
        return
    raise CalibrationError(
        f"{loaded.source} is a text model with a tokenizer: pass --calib with sample text "
        "(JSONL lines of {\"text\": ...})",
        "random token ids mislead the passes and the verification; to use them anyway, set "
        "calibration: {source: generated} in the recipe",
    )


def _tensor_batches(data: dict[str, torch.Tensor], names, cfg) -> list[Batch]:
    n = min(int(data[names[0]].shape[0]), cfg.samples)
    batches = []
    labels = data.get(LABELS) if LABELS not in names else None
    for i in range(0, n, cfg.batch_size):
        args = tuple(data[k][i : i + cfg.batch_size] for k in names)
        mask = next((data[k][i : i + cfg.batch_size] for k in names if "mask" in k), None)
        lab = None if labels is None else labels[i : i + cfg.batch_size]
        batches.append(Batch(args, mask, lab))
    return batches


def _split(batches: list[Batch], cfg: CalibrationConfig, source: str,
           images: str | None = None) -> CalibrationData:
    if not batches:
        raise CalibrationError(f"no calibration batches from {source}")
    if cfg.holdout <= 0:  # no held-out part: verification reuses the calibration batches
        return CalibrationData(batches, batches, source, images)
    if len(batches) == 1:
        b = batches[0]
        n = b.args[0].shape[0]
        if n < 2:
            return CalibrationData([b], [b], source, images)
        cut = max(1, int(round(n * (1 - cfg.holdout))))
        cut = min(cut, n - 1)
        part = lambda lo, hi: Batch(
            tuple(a[lo:hi] for a in b.args),
            None if b.token_mask is None else b.token_mask[lo:hi],
            None if b.labels is None else b.labels[lo:hi],
        )
        return CalibrationData([part(0, cut)], [part(cut, n)], source, images)
    n_hold = max(1, int(round(len(batches) * cfg.holdout))) if cfg.holdout > 0 else 0
    n_hold = min(n_hold, len(batches) - 1)
    calib = batches[: len(batches) - n_hold]
    hold = batches[len(batches) - n_hold :] or calib[-1:]
    return CalibrationData(calib, hold, source, images)


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
            if t.is_floating_point():  # pixel values and the like: static dims must match
                want = [static(a, i) for a in range(1, t.dim())]
                if any(w is not None and w != t.shape[a + 1] for a, w in enumerate(want)):
                    shape = ", ".join("any" if w is None else str(w) for w in want)
                    raise CalibrationError(
                        f"{data.source}: {names[i]!r} holds samples of shape "
                        f"{tuple(t.shape[1:])}; the model takes ({shape})"
                    )
                continue
            size = static(1, i) if t.dim() == 2 else None
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
        return Batch(tuple(args), mask, b.labels)

    def regroup(batches: list[Batch]) -> list[Batch]:
        size = static(0, 0)
        if size is None or not batches:
            return batches
        cols = [torch.cat([b.args[i] for b in batches]) for i in range(len(names))]
        masks = (
            None if batches[0].token_mask is None else torch.cat([b.token_mask for b in batches])
        )
        labels = (
            torch.cat([b.labels for b in batches])
            if all(b.labels is not None for b in batches) else None
        )
        n = cols[0].shape[0]
        out = []
        for start in range(0, n, size):
            idx = torch.arange(start, start + size) % n
            out.append(Batch(tuple(c[idx] for c in cols), None if masks is None else masks[idx],
                             None if labels is None else labels[idx]))
        return out

    calib = regroup([fix_seq(b) for b in data.calib])
    hold = regroup([fix_seq(b) for b in data.holdout])
    return CalibrationData(calib, hold, data.source, data.images)
