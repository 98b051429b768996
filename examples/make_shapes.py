"""Procedural shape images for the tiny ViT (examples/models/attnc-tiny-vit).

Each image is a 64x64 RGB canvas with one large **target shape** (8 classes) of a random size,
rotation, position and bright colour on a dark textured background (gradient, value noise, stripes
or checkers), plus a few small clutter marks of any colour. The label is the target shape's class.
The shape is brighter than the background in every channel, as digits are in MNIST: with random
contrast a 4-layer ViT stayed at chance for 8,000 training images, with this polarity it learns.
Telling a ring from a disc, a frame from a square or a star from a cross at 3-10 patches across
needs the shape's outline and interior, i.e. the spatial arrangement of several neighbouring
patches, not a colour or a texture statistic (background, colour and clutter are drawn
independently of the class).

Everything is deterministic: image `i` of split `s` is drawn from
``numpy.random.default_rng([SPLIT_SEEDS[s], i])``, so the training stream (split "train",
indices 0, 1, 2, ...) never overlaps the fixed held-out split ("eval", indices 0..N-1) or the
calibration split ("calib").

Usage::

    from make_shapes import make_batch, CLASSES
    pixel_values, labels = make_batch("eval", range(256))   # (256, 3, 64, 64) in [-1, 1], (256,)

    python examples/make_shapes.py --out examples/data   # writes vit_calib.pt and vit_eval.pt
    python examples/make_shapes.py --preview sheet.png   # 32 held-out images, 4 x 8
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

IMAGE_SIZE = 64
CLASSES = ("circle", "ring", "square", "frame", "triangle", "cross", "star", "crescent")
SPLIT_SEEDS = {"train": 0, "eval": 1, "calib": 2}
MEAN = STD = 0.5  # pixel_values = (rgb / 255 - 0.5) / 0.5, as ViTImageProcessor's defaults

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5


# ----------------------------------------------------------------------------- backgrounds


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Value noise: a random (cells+1)^2 grid bilinearly upsampled to the canvas, in [0, 1]."""
    grid = rng.random((cells + 1, cells + 1, 3)).astype(np.float32)
    t = np.linspace(0, cells, IMAGE_SIZE, dtype=np.float32)
    i0 = np.minimum(t.astype(int), cells - 1)
    f = (t - i0)[:, None]
    rows = grid[i0] * (1 - f[..., None]) + grid[i0 + 1] * f[..., None]  # (H, cells+1, 3)
    cols = rows[:, i0] * (1 - f.T[..., None]) + rows[:, i0 + 1] * f.T[..., None]
    return cols


def _background(rng: np.random.Generator) -> np.ndarray:
    """A (H, W, 3) float background in [0, 1]: gradient, value noise, stripes or checkers."""
    kind = rng.integers(4)
    base = rng.random(3).astype(np.float32)
    other = rng.random(3).astype(np.float32)
    if kind == 0:  # linear gradient at a random angle
        a = rng.uniform(0, 2 * math.pi)
        t = (np.cos(a) * _XX + np.sin(a) * _YY) / IMAGE_SIZE
        t = (t - t.min()) / (t.max() - t.min() + 1e-6)
        img = base * (1 - t[..., None]) + other * t[..., None]
    elif kind == 1:  # smooth value noise
        img = 0.35 * base + 0.65 * _smooth_noise(rng, int(rng.integers(2, 7)))
    elif kind == 2:  # stripes at a random angle and period
        a, period = rng.uniform(0, math.pi), rng.uniform(4, 14)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (np.cos(a) * _XX + np.sin(a) * _YY) / period)
        c = rng.uniform(0.2, 0.6)
        img = base * (1 - c * t[..., None]) + other * (c * t[..., None])
    else:  # checkerboard with a random cell size
        cell = int(rng.integers(3, 11))
        t = ((_XX // cell + _YY // cell) % 2).astype(np.float32)
        c = rng.uniform(0.15, 0.5)
        img = base * (1 - c * t[..., None]) + other * (c * t[..., None])
    img = img + rng.normal(0, rng.uniform(0.0, 0.06), img.shape).astype(np.float32)
    return 0.05 + 0.4 * img  # dark: every channel of every shape colour is brighter


# ----------------------------------------------------------------------------- shapes


def _polygon_mask(u: np.ndarray, v: np.ndarray, n: int, r: float) -> np.ndarray:
    """Regular n-gon of circumradius r in local coordinates (u, v), one vertex up."""
    inner = r * math.cos(math.pi / n)  # apothem
    ang = np.arctan2(v, u)
    # distance to the edge along the nearest edge normal
    k = np.floor((ang + math.pi / 2 + math.pi / n) / (2 * math.pi / n))
    normal = k * 2 * math.pi / n - math.pi / 2
    return u * np.cos(normal) + v * np.sin(normal) <= inner


def _star_mask(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Five-pointed star, outer radius r, notches at 0.45 r, straight edges."""
    half = math.pi / 5  # angle from a point to the next notch
    ang = np.mod(np.arctan2(v, u) + math.pi / 2, 2 * half)
    phi = np.where(ang > half, 2 * half - ang, ang)  # folded: 0 at a point, half at a notch
    ax, ay = r, 0.0
    bx, by = 0.45 * r * math.cos(half), 0.45 * r * math.sin(half)
    ex, ey = bx - ax, by - ay
    # the ray at angle phi meets the edge A-B at t = (E x A) / (E x d)
    boundary = (ex * ay - ey * ax) / (ex * np.sin(phi) - ey * np.cos(phi))
    return np.hypot(u, v) <= boundary


def shape_mask(cls: int, cx: float, cy: float, r: float, rot: float, rng=None) -> np.ndarray:
    """Boolean (H, W) mask of shape class `cls` centred at (cx, cy), size r, rotated by rot."""
    dx, dy = _XX - cx, _YY - cy
    c, s = math.cos(rot), math.sin(rot)
    u, v = c * dx + s * dy, -s * dx + c * dy
    rad = np.hypot(u, v)
    name = CLASSES[cls]
    if name == "circle":
        return rad <= r
    if name == "ring":
        return (rad <= r) & (rad >= 0.55 * r)
    if name == "square":
        h = r * 0.85
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if name == "frame":
        h = r * 0.85
        outer = (np.abs(u) <= h) & (np.abs(v) <= h)
        return outer & ~((np.abs(u) <= 0.55 * h) & (np.abs(v) <= 0.55 * h))
    if name == "triangle":
        return _polygon_mask(u, v, 3, r * 1.1)
    if name == "cross":
        w = 0.3 * r
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
    if name == "star":
        return _star_mask(u, v, r * 1.1)
    if name == "crescent":
        return (rad <= r) & (np.hypot(u - 0.45 * r, v) > 0.8 * r)
    raise ValueError(f"unknown class {cls}")


def make_image(split: str, index: int, difficulty: float = 1.0) -> tuple[np.ndarray, int]:
    """Image `index` of `split`: (H, W, 3) uint8 RGB and its class id.

    `difficulty` in [0, 1] (1 = the real task, used for every held-out image) scales the
    background's texture contrast, the clutter count and the smallest shape size; it changes
    values only, never which random numbers are drawn, so the class, colours and positions of an
    image are the same at every difficulty. Training ramps it up (a curriculum)."""
    d = float(min(max(difficulty, 0.0), 1.0))
    rng = np.random.default_rng([SPLIT_SEEDS[split], int(index)])
    label = int(rng.integers(len(CLASSES)))
    img = _background(rng)
    if d < 1.0:  # flatten the texture toward its mean colour
        mean = img.mean(axis=(0, 1), keepdims=True)
        img = mean + d * (img - mean)
    r = 20.0 - (13.0 - 5.0 * (1.0 - d)) * float(rng.random())  # r in [7 + 5 (1 - d), 20]
    margin = r * 1.15
    cx = float(rng.uniform(margin, IMAGE_SIZE - margin))
    cy = float(rng.uniform(margin, IMAGE_SIZE - margin))
    rot = float(rng.uniform(0, 2 * math.pi))
    mask = shape_mask(label, cx, cy, r, rot)
    colour = (0.55 + 0.45 * rng.random(3)).astype(np.float32)
    img[mask] = colour + rng.normal(0, 0.02, (int(mask.sum()), 3)).astype(np.float32)
    # clutter: 0-4 small dots or short bars on the background (never over the shape, so a dot
    # cannot turn a disc into a ring)
    for _ in range(int(round(int(rng.integers(0, 5)) * d))):
        kind = rng.integers(2)
        px, py = rng.uniform(2, IMAGE_SIZE - 2, 2)
        if kind == 0:
            m = np.hypot(_XX - px, _YY - py) <= rng.uniform(1.0, 2.5)
        else:
            a, length = rng.uniform(0, math.pi), rng.uniform(3, 8)
            along = np.cos(a) * (_XX - px) + np.sin(a) * (_YY - py)
            across = -np.sin(a) * (_XX - px) + np.cos(a) * (_YY - py)
            m = (np.abs(along) <= length / 2) & (np.abs(across) <= 0.8)
        img[m & ~mask] = rng.random(3).astype(np.float32)
    return (img.clip(0, 1) * 255 + 0.5).astype(np.uint8), label


def to_pixel_values(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 normalized like ViTImageProcessor."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN) / STD


def make_batch(
    split: str, indices: Iterable[int], difficulty: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values (N, 3, 64, 64) float32 in [-1, 1] and labels (N,) int64."""
    pairs = [make_image(split, i, difficulty) for i in indices]
    images = np.stack([p[0] for p in pairs])
    labels = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return to_pixel_values(images), labels


def write_splits(out: Path, n_calib: int = 256, n_eval: int = 256) -> None:
    """examples/data/vit_calib.pt {"pixel_values"} and vit_eval.pt {"pixel_values", "labels"}
    (pixels in fp16). The calibration file holds only the model's input, because attnc's
    calibration reader refuses tensors that are not inputs of the model (labels included)."""
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("calib", n_calib), ("eval", n_eval)):
        pix, lab = make_batch(split, range(n))
        # fp16 halves the files; its error (< 5e-4) is far below one 8-bit level (2/255)
        pix = pix.to(torch.float16).contiguous()
        data = {"pixel_values": pix, "labels": lab} if split == "eval" else {"pixel_values": pix}
        torch.save(data, out / f"vit_{split}.pt")


def _png(rgb: np.ndarray) -> bytes:
    """A minimal RGB PNG encoder (no Pillow needed), for the --preview contact sheet."""
    import struct
    import zlib

    h, w = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + (chunk(b"IEND", b""))
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--preview", type=Path, help="write a PNG contact sheet of 32 eval images")
    args = ap.parse_args()
    if args.preview:
        imgs = np.stack([make_image("eval", i)[0] for i in range(32)])
        sheet = imgs.reshape(4, 8, IMAGE_SIZE, IMAGE_SIZE, 3).transpose(0, 2, 1, 3, 4)
        sheet = sheet.reshape(4 * IMAGE_SIZE, 8 * IMAGE_SIZE, 3)
        args.preview.write_bytes(_png(sheet))
        return
    write_splits(args.out, args.calib, args.eval)


if __name__ == "__main__":
    main()
