"""Procedural visual question answering for the tiny LLaVA (examples/models/attnc-tiny-vlm).

Each sample is an image of 1-4 objects (4 shapes x 5 colours x 2 sizes, no two with the same
colour and shape) at random positions on a dark textured background of a random **aspect**
(64x64, 64x48, 48x64, 64x40, 40x64, 64x32, 32x64 pixels), letterboxed the way LLaVA's
``expand2square`` pads: centred on a 64x64 square filled with the processor's mean colour, so that
non-square images have padding patches (the 8x8-pixel patches of the bars). A question about the
image has a one-word answer:

* colour: ``what color is the big circle ?`` -> ``red``
* shape:  ``what shape is the blue object ?`` -> ``triangle``
* size:   ``what size is the red square ?`` -> ``small``
* count:  ``how many green objects ?`` / ``how many crosses ?`` / ``how many objects ?`` -> ``2``
* position (within the image, not the canvas): ``is the red circle left or right ?`` -> ``left``,
  ``is the red circle top or bottom ?`` -> ``bottom``
* relation: ``is the red circle left of the blue square ?`` / ``... above ...`` -> ``yes``/``no``
* existence: ``is there a yellow triangle ?`` -> ``yes``/``no``

Deterministic: sample ``i`` of split ``s`` is drawn from
``numpy.random.default_rng([SEEDS[s], i])``; the training stream (split "train", indices 0, 1,
...) never produces the held-out ("eval") or the calibration ("calib") samples, which come from
other seeds (and training skips any sample whose image and question equal a held-out one).

Sequence layout (word-level vocabulary ``VOCAB``): ``<bos> <image>*64 question words <ans>``; the
answer is the next token after ``<ans>``, scored by exact match.

    python examples/make_vqa.py --out examples/data     # vqa_calib.pt, vqa_eval.pt
    python examples/make_vqa.py --preview sheet.png     # 32 held-out images with their Q/A
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

CANVAS = 64
PATCH = 8
GRID = CANVAS // PATCH
IMAGE_TOKENS = GRID * GRID
SEEDS = {"train": 10, "eval": 11, "calib": 12}
SIZES = ((64, 64), (64, 48), (48, 64), (64, 40), (40, 64), (64, 32), (32, 64))  # (W, H)
# CLIP's processor: mean/std per channel; LLaVA pads with the mean colour
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PAD_RGB = tuple(int(m * 255) for m in MEAN)

SHAPES = ("circle", "square", "triangle", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLOURS = {
    "red": (0.95, 0.15, 0.1),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (0.95, 0.9, 0.1),
    "white": (0.95, 0.95, 0.95),
}
RADIUS = {"small": 3.5, "big": 7.0}
SPECIAL = ("<pad>", "<bos>", "<eos>", "<image>", "<ans>")
_WORDS = (
    "what color is the shape size object how many objects are there is a left or right top bottom "
    "of above ? yes no 0 1 2 3 4"
)
WORDS = tuple(_WORDS.split())
VOCAB = list(SPECIAL) + sorted(
    set(WORDS) | set(SHAPES) | set(PLURAL.values()) | set(COLOURS) | set(RADIUS)
)
TOK = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, ANS_ID = (TOK[s] for s in SPECIAL)
QTYPES = ("color", "shape", "size", "count", "position", "relation", "exist")


def _mask(shape: str, cx: float, cy: float, r: float, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return np.hypot(dx, dy) <= r
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "triangle":  # apex up
        return (dy <= 0.8 * r) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    t = 0.35 * r  # cross
    return ((np.abs(dx) <= r) & (np.abs(dy) <= t)) | ((np.abs(dy) <= r) & (np.abs(dx) <= t))


def make_scene(rng: np.random.Generator):
    """(H, W, 3) float image of the original size and its objects (shape, colour, size, x, y)."""
    w, h = SIZES[int(rng.integers(len(SIZES)))]
    base = rng.uniform(0.02, 0.25, 3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    grad = (np.cos(a) * xx + np.sin(a) * yy) / CANVAS
    img = base + 0.12 * grad[..., None] + rng.normal(0, 0.03, (h, w, 3)).astype(np.float32)
    objects: list[tuple[str, str, str, float, float]] = []
    taken: set[tuple[str, str]] = set()
    for _ in range(int(rng.integers(1, 5)) * 20):  # rejection sampling for non-overlap
        if len(objects) == 4 or (objects and len(objects) >= rng.integers(1, 5)):
            break
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        size = ("small", "big")[int(rng.integers(2))]
        r = RADIUS[size]
        if (colour, shape) in taken or 2 * r + 2 > min(w, h):
            continue
        x, y = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
        if any(math.hypot(x - o[3], y - o[4]) < r + RADIUS[o[2]] + 2 for o in objects):
            continue
        objects.append((shape, colour, size, float(x), float(y)))
        taken.add((colour, shape))
    for shape, colour, size, x, y in objects:
        m = _mask(shape, x, y, RADIUS[size], w, h)
        img[m] = np.asarray(COLOURS[colour], np.float32)
    return img.clip(0, 1), objects


def letterbox(img: np.ndarray) -> np.ndarray:
    """Centre on a CANVAS x CANVAS square of the pad colour (LLaVA's expand2square), uint8."""
    h, w = img.shape[:2]
    out = np.empty((CANVAS, CANVAS, 3), np.uint8)
    out[:] = PAD_RGB
    top, left = (CANVAS - h) // 2, (CANVAS - w) // 2
    out[top : top + h, left : left + w] = (img * 255 + 0.5).astype(np.uint8)
    return out


def _name(o) -> str:
    return f"{o[1]} {o[0]}"


def make_question(rng: np.random.Generator, objects, w: int, h: int) -> tuple[str, str]:
    qtype = QTYPES[int(rng.integers(len(QTYPES)))]
    o = objects[int(rng.integers(len(objects)))]
    if qtype == "color":
        same = [p for p in objects if p[0] == o[0]]
        if len(same) == 1:
            return f"what color is the {o[0]} ?", o[1]
        if sum(p[2] == o[2] for p in same) == 1:
            return f"what color is the {o[2]} {o[0]} ?", o[1]
        return f"is there a {_name(o)} ?", "yes"
    if qtype == "shape":
        if sum(p[1] == o[1] for p in objects) == 1:
            return f"what shape is the {o[1]} object ?", o[0]
        return f"what size is the {_name(o)} ?", o[2]
    if qtype == "size":
        return f"what size is the {_name(o)} ?", o[2]
    if qtype == "count":
        kind = int(rng.integers(3))
        if kind == 0:
            return "how many objects ?", str(len(objects))
        if kind == 1:
            c = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            return f"how many {c} objects ?", str(sum(p[1] == c for p in objects))
        s = SHAPES[int(rng.integers(len(SHAPES)))]
        return f"how many {PLURAL[s]} ?", str(sum(p[0] == s for p in objects))
    if qtype == "position":
        if rng.integers(2):
            return f"is the {_name(o)} left or right ?", "left" if o[3] < w / 2 else "right"
        return f"is the {_name(o)} top or bottom ?", "top" if o[4] < h / 2 else "bottom"
    if qtype == "relation" and len(objects) > 1:
        p = [q for q in objects if q is not o][int(rng.integers(len(objects) - 1))]
        if rng.integers(2):
            return f"is the {_name(o)} left of the {_name(p)} ?", "yes" if o[3] < p[3] else "no"
        return f"is the {_name(o)} above the {_name(p)} ?", "yes" if o[4] < p[4] else "no"
    # existence (and relation with a single object): half present, half absent
    if rng.integers(2):
        return f"is there a {_name(o)} ?", "yes"
    names = {(p[1], p[0]) for p in objects}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in names]
    c, s = absent[int(rng.integers(len(absent)))]
    return f"is there a {c} {s} ?", "no"


def make_sample(split: str, index: int) -> dict:
    rng = np.random.default_rng([SEEDS[split], int(index)])
    img, objects = make_scene(rng)
    h, w = img.shape[:2]
    q, a = make_question(rng, objects, w, h)
    return {"image": letterbox(img), "size": (h, w), "question": q, "answer": a}


def encode(question: str) -> list[int]:
    return [BOS_ID] + [IMAGE_ID] * IMAGE_TOKENS + [TOK[t] for t in question.split()] + [ANS_ID]


def to_pixel_values(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 normalised like CLIPImageProcessor."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def make_batch(split: str, indices: Iterable[int]) -> dict[str, torch.Tensor]:
    """input_ids (N, S) left-padded with <pad>, attention_mask (N, S), pixel_values
    (N, 3, 64, 64), image_sizes (N, 2) as (height, width) before letterboxing, labels (N,)
    the answer's token id."""
    return collate([make_sample(split, i) for i in indices])


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    seqs = [encode(s["question"]) for s in samples]
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):  # left padding: the answer is predicted at the last position
        ids[i, n - len(s) :] = torch.tensor(s)
        mask[i, n - len(s) :] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": to_pixel_values(np.stack([s["image"] for s in samples])),
        "image_sizes": torch.tensor([s["size"] for s in samples], dtype=torch.long),
        "labels": torch.tensor([TOK[s["answer"]] for s in samples], dtype=torch.long),
    }


def qtype_of(question: str) -> str:
    words = question.split()
    if words[0] == "how":
        return "count"
    if words[0] == "what":
        return {"color": "color", "shape": "shape", "size": "size"}[words[1]]
    if "there" in words:
        return "exist"
    if "or" in words:
        return "position"
    return "relation"


def write_splits(out: Path, n_calib: int = 64, n_eval: int = 512) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("calib", n_calib), ("eval", n_eval)):
        b = make_batch(split, range(n))
        b["pixel_values"] = b["pixel_values"].to(torch.float16).contiguous()
        torch.save(b, out / f"vqa_{split}.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=512)
    ap.add_argument("--preview", type=Path)
    args = ap.parse_args()
    if args.preview:
        from make_shapes import _png

        samples = [make_sample("eval", i) for i in range(32)]
        sheet = np.stack([s["image"] for s in samples]).reshape(4, 8, CANVAS, CANVAS, 3)
        sheet = sheet.transpose(0, 2, 1, 3, 4).reshape(4 * CANVAS, 8 * CANVAS, 3)
        args.preview.write_bytes(_png(sheet))
        for i, s in enumerate(samples):
            print(i, s["size"], s["question"], "->", s["answer"])
        return
    write_splits(args.out, args.calib, args.eval)


if __name__ == "__main__":
    main()
