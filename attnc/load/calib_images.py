"""Calibration on real images for a VLM: a folder of images, or JSONL lines with an image path
and a prompt.

    {"image": "photos/cat.jpg", "text": "<image> what is in the picture?"}
    {"image": "photos/dog.png", "input_ids": [1, 3, 44, 24, 10, 4]}

Image paths are relative to the JSONL file's folder. The prompt holds the image token once (it
is expanded to the model's image tokens, as LLaVA's processor does) or as many times as the
model takes. A folder gives one sample per image file, each with the example inputs' token ids.
Each image is fitted inside the model's pixel canvas keeping its aspect ratio and centred on the
mean colour (LLaVA's `expand2square`, so non-square images have padding patches), then scaled to
[0, 1] and normalised with the model's `image_mean`/`image_std` (its preprocessor_config.json,
else CLIP's). Rows are left-padded (the last position is each prompt's last token).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnc.errors import CalibrationError
from attnc.load.calib_files import JSONL_SUFFIXES, _row, check_ids

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageRow:
    image: Path
    line: int | None  # JSONL line, None for a folder's file
    ids: tuple[int, ...] | None = None
    text: str | None = None


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def read_image_rows(path: str | Path) -> list[ImageRow] | None:
    """The image samples of `path` (a folder, or JSONL lines with "image"), or None when `path`
    is a calibration file of another kind. Every image file must exist."""
    p = Path(path)
    if p.is_dir():
        files = _image_files(p)
        if not files:
            raise CalibrationError(
                f"{p} is a folder with no image files, not a calibration file",
                f"a folder of images ({', '.join(IMAGE_SUFFIXES)}) calibrates a VLM; else give "
                ".jsonl, .pt or .safetensors")
        return [ImageRow(f, None) for f in files]
    if p.suffix not in JSONL_SUFFIXES or not p.is_file():
        return None
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        return None  # read_rows says what is wrong with it
    rows: list[ImageRow] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            return None if not rows else _bad(p, i, "not valid JSON")
        if not isinstance(data, dict) or "image" not in data:
            if rows:
                _bad(p, i, 'no "image" (every line of an image file names one)')
            return None
        img = data["image"]
        if not isinstance(img, str) or not img:
            _bad(p, i, f'"image" must be a path, got {img!r}')
        file = (p.parent / img) if not Path(img).is_absolute() else Path(img)
        if not file.is_file():
            _bad(p, i, f"image file not found: {file}")
        base = _row(p, i, json.dumps({k: v for k, v in data.items() if k != "image"}))
        rows.append(ImageRow(file, i, base.ids, base.text))
    return rows or None


def _bad(p: Path, line: int, what: str):
    raise CalibrationError(f"{p} line {line}: {what}")


def _norm(model_dir: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = Path(model_dir) / "preprocessor_config.json" if model_dir else None
    if cfg is not None and cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
            mean, std = data.get("image_mean"), data.get("image_std")
            if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std):
                return tuple(map(float, mean)), tuple(map(float, std))
        except (OSError, ValueError):
            pass
    return CLIP_MEAN, CLIP_STD


def pixels(file: Path, chans: int, h: int, w: int, mean, std) -> torch.Tensor:
    """(chans, h, w) float32: the image fitted inside h x w, centred on the mean colour."""
    try:
        from PIL import Image
    except ImportError:
        raise CalibrationError("calibration images need Pillow", "pip install pillow") from None
    try:
        with Image.open(file) as im:
            img = im.convert("RGB" if chans == 3 else "L")
    except Exception as exc:  # noqa: BLE001 - any decoding failure is one line
        raise CalibrationError(f"cannot read image {file}: {' '.join(str(exc).split())[:120]}")\
            from None
    s = min(w / img.width, h / img.height)
    size = (max(1, round(img.width * s)), max(1, round(img.height * s)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    fill = tuple(int(m * 255) for m in mean[:chans])
    canvas = Image.new(img.mode, (w, h), fill if chans == 3 else fill[0])
    canvas.paste(img, ((w - size[0]) // 2, (h - size[1]) // 2))  # expand2square
    x = torch.from_numpy(np.asarray(canvas, dtype=np.float32).copy()) / 255.0
    x = x.reshape(h, w, chans).permute(2, 0, 1)  # (C, H, W)
    m = torch.tensor(mean[:chans]).view(-1, 1, 1)
    sd = torch.tensor(std[:chans]).view(-1, 1, 1)
    return (x - m) / sd


def _prompt(row: ImageRow, tokenizer: Any, image_token: int, n_img: int, example: list[int],
            vocab: int | None, positions: int | None) -> list[int]:
    if row.line is None:
        return list(example)
    where = f"{row.image.name} (line {row.line})"
    if row.ids is not None:
        ids = list(row.ids)
    elif tokenizer is None:
        raise CalibrationError(f"line {row.line}: the model has no tokenizer, so the prompt "
                               "text cannot be used", 'give "input_ids" with the image token')
    else:
        ids = list(tokenizer(row.text)["input_ids"])
    count = ids.count(image_token)
    if count == 1:
        at = ids.index(image_token)
        ids = ids[:at] + [image_token] * n_img + ids[at + 1:]
    elif count != n_img:
        raise CalibrationError(
            f"{where}: the prompt holds the image token ({image_token}) {count} times; "
            f"it needs it once (expanded to {n_img}) or {n_img} times")
    check_ids(row.image, row.line, ids, vocab, positions)
    return ids


def image_batches(path: str | Path, names: list[str], example_args, *, tokenizer: Any,
                  vocab: int | None, positions: int | None, samples: int, batch_size: int,
                  model_dir: str | None, pad_id: int) -> tuple[list, str] | None:
    """Batches (`attnc.load.calibration.Batch`) from real images, and a description of them
    for the report; None when `path` holds no images."""
    from attnc.load.calibration import Batch

    rows = read_image_rows(path)
    if rows is None:
        return None
    if "input_ids" not in names or "pixel_values" not in names:
        raise CalibrationError(f"{path}: images calibrate a VLM (inputs input_ids and "
                               f"pixel_values); this model takes {', '.join(names)}")
    ids_ex = example_args[names.index("input_ids")]
    pix_ex = example_args[names.index("pixel_values")]
    if pix_ex.dim() != 4:
        raise CalibrationError(f"{path}: images need (batch, channels, height, width) pixels; "
                               f"the model takes {tuple(pix_ex.shape)}")
    chans, h, w = (int(x) for x in pix_ex.shape[1:])
    image_token, n_img = _image_token(ids_ex)
    mean, std = _norm(model_dir)
    rows = rows[:samples]
    example = ids_ex[0].tolist()
    seqs = [_prompt(r, tokenizer, image_token, n_img, example, vocab, positions) for r in rows]
    pix = [pixels(r.image, chans, h, w, mean, std).to(pix_ex.dtype) for r in rows]
    batches = []
    for i in range(0, len(rows), batch_size):
        chunk = seqs[i:i + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad_id, dtype=ids_ex.dtype)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, s in enumerate(chunk):  # left padding
            ids[r, width - len(s):], mask[r, width - len(s):] = torch.tensor(s), 1
        feed = {"input_ids": ids, "pixel_values": torch.stack(pix[i:i + batch_size])}
        args = []
        for n, ex in zip(names, example_args, strict=True):
            if n in feed:
                args.append(feed[n])
            elif "mask" in n:
                args.append(mask.to(ex.dtype))
            else:
                raise CalibrationError(f"{path}: images cannot fill the model's input {n!r}")
        batches.append(Batch(tuple(args), mask))
    prompts = "the example inputs' token ids" if rows[0].line is None else "from the file"
    return batches, f"real ({len(rows)} image files from {path}; prompts {prompts})"


def _image_token(ids: torch.Tensor) -> tuple[int, int]:
    """The id the example inputs repeat in their longest run (the image token), and the run's
    length (the image tokens per image)."""
    row = ids[0].tolist()
    best, run, prev, best_n = None, 0, None, 0
    for t in row:
        run = run + 1 if t == prev else 1
        prev = t
        if run > best_n:
            best, best_n = t, run
    if best is None or best_n < 2:
        raise CalibrationError("cannot find the image tokens in the model's example inputs")
    return int(best), int(best_n)
