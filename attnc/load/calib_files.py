"""Reading and checking calibration files, before and after the model is known.

`check_calibration_file(path)` needs no model: the file exists, is a known format, is not empty,
every JSONL line is a JSON object with "text" or "input_ids", a tensor file holds tensors (read
with weights_only, never unpickling code) with finite float values and one batch size.
`check_tensors(...)` and `check_ids(...)` check the contents against the model: the number of
inputs, dims, dtypes, the vocabulary and the model's positions. Every failure is one
`CalibrationError` line naming the file, the line (JSONL) or tensor, and the value.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnc.errors import CalibrationError

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".txt")
TENSOR_SUFFIXES = (".pt", ".safetensors")
# config attributes that bound a model's sequence length, in the order transformers uses them
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx", "seq_length")


@dataclass(frozen=True)
class Row:
    """One JSONL sample: its 1-based line number and either token ids or text."""

    line: int
    ids: tuple[int, ...] | None = None
    text: str | None = None


def _where(path: Path, line: int | None = None) -> str:
    return f"{path} line {line}" if line is not None else str(path)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_calibration_file(path: str | Path) -> None:
    """Every check that needs no model. Raises CalibrationError; returns nothing. A folder of
    images, or JSONL lines naming images, is checked by `attnc.load.calib_images`."""
    from attnc.load.calib_images import read_image_rows

    if Path(path).exists() and read_image_rows(path) is not None:
        return
    p = _existing(path)
    if p.suffix in JSONL_SUFFIXES:
        read_rows(p)
    else:
        read_tensors(p)


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise CalibrationError(f"calibration file not found: {path}")
    if p.is_dir():
        raise CalibrationError(f"{path} is a folder, not a calibration file")
    if p.suffix not in JSONL_SUFFIXES + TENSOR_SUFFIXES:
        raise CalibrationError(
            f"{path}: unknown calibration format {p.suffix or '(no suffix)'!r}",
            "use .jsonl (text or input_ids per line), .pt or .safetensors (tensors by input name)",
        )
    if p.stat().st_size == 0:
        raise CalibrationError(f"{path} is empty: it holds no calibration samples")
    return p


# ----------------------------------------------------------------------------------------------
# JSONL


def read_rows(path: str | Path) -> list[Row]:
    """Every non-blank line: a JSON string (text) or an object with "text" or "input_ids"."""
    p = _existing(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{p} is not UTF-8 text (byte {exc.start})") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            rows.append(_row(p, i, line))
    if not rows:
        raise CalibrationError(f"{p} holds no calibration samples (only blank lines)")
    return rows


def _row(p: Path, i: int, line: str) -> Row:
    where = _where(p, i)
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CalibrationError(
            f"{where}: not valid JSON ({exc.msg} at column {exc.colno})",
            'each line is one JSON object such as {"text": "..."} or {"input_ids": [1, 2, 3]}',
        ) from None
    if isinstance(data, str):
        data = {"text": data}
    if not isinstance(data, dict):
        raise CalibrationError(
            f"{where}: expected a JSON object, got {type(data).__name__} {_short(data)}"
        )
    if "input_ids" in data:
        ids = data["input_ids"]
        if not isinstance(ids, list) or not ids:
            raise CalibrationError(
                f'{where}: "input_ids" must be a non-empty list of integers, got {_short(ids)}'
            )
        bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool)), None)
        if bad is not None:
            raise CalibrationError(f'{where}: "input_ids" holds {_short(bad)}, not an integer')
        neg = next((t for t in ids if t < 0), None)
        if neg is not None:
            raise CalibrationError(f"{where}: token id {neg} is negative")
        return Row(i, ids=tuple(ids))
    if "text" in data:
        text = data["text"]
        if not isinstance(text, str) or not text.strip():
            raise CalibrationError(
                f'{where}: "text" must be a non-empty string, got {_short(text)}'
            )
        return Row(i, text=text)
    keys = ", ".join(sorted(map(str, data))) or "none"
    raise CalibrationError(f'{where}: each line needs "text" or "input_ids" (keys here: {keys})')


def check_ids(
    path: Path, line: int, ids: Sequence[int], vocab: int | None, positions: int | None
) -> None:
    """Token ids of one JSONL line against the model's vocabulary and positions."""
    if vocab:
        bad = next((t for t in ids if t < 0 or t >= vocab), None)
        if bad is not None:
            raise CalibrationError(
                f"{_where(path, line)}: token id {bad} is outside the vocabulary (0..{vocab - 1})"
            )
    if positions and len(ids) > positions:
        raise CalibrationError(
            f"{_where(path, line)}: {len(ids)} token ids, more than the model's {positions} "
            "positions",
            f"split the row into rows of at most {positions} ids",
        )


def model_positions(config: Any) -> int | None:
    """The longest sequence the model's position embeddings cover, when its config says."""
    if config is None:
        return None
    for cfg in (getattr(config, "text_config", None), config):
        if cfg is None:
            continue
        for key in POSITION_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


# ----------------------------------------------------------------------------------------------
# tensor files


def read_tensors(path: str | Path) -> dict[str, torch.Tensor] | list[torch.Tensor]:
    """A .pt (weights_only) or .safetensors file: a tensor, a list of tensors or a dict of them,
    with finite float values and one batch size. A single tensor comes back as a 1-list."""
    from attnc.load.models import read_tensor_file

    p = _existing(path)
    try:
        data = read_tensor_file(p)
    except Exception as exc:  # noqa: BLE001
        text = " ".join(str(exc).split())
        if "Unsupported global" in text:
            name = text.split("GLOBAL ", 1)[-1].split(" ", 1)[0] if "GLOBAL " in text else "?"
            raise CalibrationError(
                f"{p} is a pickle holding more than tensors ({name}); attnc reads calibration "
                "files with weights_only and will not unpickle it",
                "save a dict of tensors ({name: tensor}) with torch.save, or a .safetensors file",
            ) from None
        if "WeightsUnpickler error:" in text:  # torch's long message; keep its reason
            text = text.split("WeightsUnpickler error:", 1)[1].split(" Check the doc", 1)[0]
        first = text.strip()[:200] or type(exc).__name__
        raise CalibrationError(f"cannot read tensor file {p}: {first}") from None
    if isinstance(data, torch.Tensor):
        data = [data]
    elif isinstance(data, tuple):
        data = list(data)
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(
        data, list
    ) else None
    if items is None:
        raise CalibrationError(
            f"{p} holds a {type(data).__name__}; it must hold a tensor, a list of tensors or a "
            "dict of tensors named like the model's inputs"
        )
    items = list(items)
    if not items:
        raise CalibrationError(f"{p} holds no tensors")
    for key, t in items:
        if not isinstance(t, torch.Tensor):
            raise CalibrationError(f"{p}: {_key(key)} is a {type(t).__name__}, not a tensor")
        if t.dim() == 0:
            raise CalibrationError(f"{p}: {_key(key)} is a scalar; inputs are batched tensors")
        if t.is_floating_point() or t.is_complex():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                n = int((~finite).sum())
                first = [int(x) for x in (~finite).nonzero()[0]]
                raise CalibrationError(
                    f"{p}: {_key(key)} holds {n} NaN/inf value(s), the first at {first}"
                )
    sizes = {_key(k): int(t.shape[0]) for k, t in items}
    if len(set(sizes.values())) > 1:
        desc = ", ".join(f"{k} has {n}" for k, n in sizes.items())
        raise CalibrationError(f"{p}: the tensors' batch sizes differ ({desc} rows)")
    if next(iter(sizes.values())) == 0:
        raise CalibrationError(f"{p} holds no samples (batch size 0)")
    return data


LABELS = "labels"  # the one non-input key a tensor file may hold: class ids, for eval


def _key(key: Any) -> str:
    return f"tensor {key}" if isinstance(key, int) else repr(key)


def check_tensors(
    p: Path,
    data: dict[str, torch.Tensor] | list[torch.Tensor],
    names: Sequence[str],
    example_args: Sequence[torch.Tensor],
    vocab: int | None,
    positions: int | None,
) -> dict[str, torch.Tensor]:
    """Map the file's tensors onto the model's inputs and check each against its example:
    count, dims, dtype, token ids in the vocabulary, sequences within the positions, 0/1 masks.
    Returns the tensors by input name, cast to the example's dtype."""
    names = list(names)
    if isinstance(data, list):
        if len(data) != len(names):
            raise CalibrationError(
                f"{p} holds {len(data)} tensor(s); the model takes {len(names)} input(s) "
                f"({', '.join(names)})",
                "save a dict {input name: tensor}",
            )
        data = dict(zip(names, data, strict=True))
    labels = None
    if LABELS not in names and LABELS in data:  # class labels ride along, for eval's accuracy
        labels = data.pop(LABELS)
        first = next(iter(data.values()), None)
        if (labels.dim() != 1 or labels.is_floating_point() or labels.is_complex()
                or (first is not None and labels.shape[0] != first.shape[0])):
            raise CalibrationError(
                f"{p}: 'labels' must be 1-D integer class ids, one per sample; got "
                f"{str(labels.dtype).removeprefix('torch.')} {tuple(labels.shape)}"
            )
    extra = sorted(set(data) - set(names))
    if extra:
        raise CalibrationError(
            f"{p} holds {extra[0]!r}, which is not an input of the model "
            f"(inputs: {', '.join(names)})"
        )
    ids = next((data[n] for n in names if n in data and "token_type" not in n), None)
    for n in names:  # one segment, as a tokenizer gives for one text
        if n not in data and "token_type" in n and ids is not None:
            data = {**data, n: torch.zeros_like(ids)}
    missing = [n for n in names if n not in data]
    if missing:
        raise CalibrationError(
            f"{p} lacks input(s) {missing}; it has {sorted(data)}",
            f"the model takes {', '.join(names)}",
        )
    out = {}
    for name, ex in zip(names, example_args, strict=True):
        out[name] = _check_input(p, name, data[name], ex, vocab, positions)
    seq = {
        n: tuple(t.shape) for n, t in out.items() if t.dim() == 2 and not t.is_floating_point()
    }
    if len(set(seq.values())) > 1:
        desc = ", ".join(f"{n} is {tuple(s)}" for n, s in seq.items())
        raise CalibrationError(f"{p}: token inputs differ in shape ({desc})")
    if labels is not None:
        out[LABELS] = labels.long()
    return out


def _check_input(p, name, t, ex, vocab, positions) -> torch.Tensor:
    shape = tuple(t.shape)
    if t.dim() != ex.dim():
        want = "(batch, sequence)" if ex.dim() == 2 else f"like {tuple(ex.shape)}"
        raise CalibrationError(
            f"{p}: {name!r} is {t.dim()}-D {shape}; the model takes {ex.dim()}-D {want}",
            "add the batch dimension" if t.dim() == ex.dim() - 1 else None,
        )
    if ex.is_floating_point():
        if not t.is_floating_point():
            raise CalibrationError(
                f"{p}: {name!r} holds {str(t.dtype).removeprefix('torch.')} values; "
                f"the model takes floating point ({str(ex.dtype).removeprefix('torch.')})"
            )
        return t.to(ex.dtype)
    if t.is_floating_point() or t.is_complex():
        what = "a mask of 0/1 integers" if "mask" in name else "integer token ids"
        raise CalibrationError(
            f"{p}: {name!r} holds {str(t.dtype).removeprefix('torch.')} values; it must hold "
            f"{what}"
        )
    t = t.to(ex.dtype)
    if "mask" in name:
        bad = t[(t != 0) & (t != 1)]
        if bad.numel():
            raise CalibrationError(f"{p}: {name!r} holds {int(bad[0])}; a mask holds 0 or 1")
        return t
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or (vocab and hi >= vocab):
        bad_val = lo if lo < 0 else hi
        at = [int(x) for x in (t == bad_val).nonzero()[0]]
        span = f"0..{vocab - 1}" if vocab else "0 or more"
        raise CalibrationError(
            f"{p}: {name!r}{at} = {bad_val}: token id is outside the vocabulary ({span})"
        )
    if positions and t.dim() == 2 and t.shape[1] > positions:
        raise CalibrationError(
            f"{p}: {name!r} has sequences of {t.shape[1]} tokens, more than the model's "
            f"{positions} positions",
            f"cut them to at most {positions} tokens",
        )
    return t
