"""Training aids for examples/train_vlm.py: several questions per image and per-patch labels.

* **Several questions per image** (``questions=K``): the sequence is
  ``<bos> <image>*64 q1 <ans> a1 q2 <ans> a2 ... qK <ans>`` and the loss is taken at every
  ``<ans>``, like LLaVA's multi-turn conversations. ``q1`` is the sample's own question (the one
  make_vqa.make_sample draws, so the held-out check still applies), so the first turn has exactly
  the evaluation layout; later ones come from the same random stream.
* **Per-patch labels** for an auxiliary loss on the projector's output (the tokens the language
  model sees): for each 8x8 patch of the letterboxed canvas, the colour (background, 5 colours,
  padding), shape (background, 4 shapes) and size (background, small, big) of the object that
  covers most of its pixels (at least 4), and the patch's half of the image (left/right,
  top/bottom; padding otherwise). A linear head reads them during training only and is not saved.
"""

from __future__ import annotations

import numpy as np
import torch
from make_vqa import (
    ANS_ID,
    BOS_ID,
    CANVAS,
    COLOURS,
    GRID,
    IMAGE_ID,
    IMAGE_TOKENS,
    PAD_ID,
    PATCH,
    RADIUS,
    SEEDS,
    SHAPES,
    TOK,
    _mask,
    letterbox,
    make_question,
    make_scene,
    to_pixel_values,
)

HEADS = {"colour": len(COLOURS) + 2, "shape": len(SHAPES) + 2, "size": 4, "lr": 3, "tb": 3}


def patch_labels(objects, h: int, w: int) -> np.ndarray:
    """(IMAGE_TOKENS, 5) int64: colour, shape, size, left/right, top/bottom class per patch;
    the last class of each is "padding" (more than half the patch outside the image)."""
    top, left = (CANVAS - h) // 2, (CANVAS - w) // 2
    inside = np.zeros((CANVAS, CANVAS), np.float32)
    inside[top : top + h, left : left + w] = 1
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)
    lr = np.where(xx - left < w / 2, 0, 1)
    tb = np.where(yy - top < h / 2, 0, 1)
    best = np.zeros((GRID, GRID), np.float32)
    lab = np.zeros((GRID, GRID, 5), np.int64)
    cols = list(COLOURS)
    for shape, colour, size, x, y in objects:
        m = np.zeros((CANVAS, CANVAS), np.float32)
        m[top : top + h, left : left + w] = _mask(shape, x, y, RADIUS[size], w, h)
        cnt = m.reshape(GRID, PATCH, GRID, PATCH).sum((1, 3))
        take = (cnt >= 4) & (cnt > best)
        best = np.where(take, cnt, best)
        lab[take, 0] = cols.index(colour) + 1
        lab[take, 1] = SHAPES.index(shape) + 1
        lab[take, 2] = ("small", "big").index(size) + 1
    pad = inside.reshape(GRID, PATCH, GRID, PATCH).mean((1, 3)) < 0.5
    centre = (slice(PATCH // 2, None, PATCH), slice(PATCH // 2, None, PATCH))
    lab[..., 3] = lr[centre]
    lab[..., 4] = tb[centre]
    for k, n in enumerate(HEADS.values()):
        lab[pad, k] = n - 1
    return lab.reshape(IMAGE_TOKENS, 5)


def make_multi(split: str, index: int, k: int) -> dict:
    """The make_vqa sample ``index`` of ``split`` with k questions (the first is its own)."""
    rng = np.random.default_rng([SEEDS[split], int(index)])
    img, objects = make_scene(rng)
    h, w = img.shape[:2]
    qa = [make_question(rng, objects, w, h) for _ in range(k)]
    return {
        "image": letterbox(img),
        "size": (h, w),
        "question": qa[0][0],
        "answer": qa[0][1],
        "qa": qa,
        "patch_labels": patch_labels(objects, h, w),
    }


def collate_multi(samples: list[dict]) -> dict[str, torch.Tensor]:
    """input_ids/attention_mask left-padded; ``targets`` (N, S) holds the answer id at each
    ``<ans>`` position and -100 elsewhere; ``patch_labels`` (N, 64, 5)."""
    seqs, tgts = [], []
    for s in samples:
        ids = [BOS_ID] + [IMAGE_ID] * IMAGE_TOKENS
        tgt = [-100] * len(ids)
        for j, (q, a) in enumerate(s["qa"]):
            words = [TOK[t] for t in q.split()] + [ANS_ID]
            ids += words
            tgt += [-100] * (len(words) - 1) + [TOK[a]]
            if j + 1 < len(s["qa"]):
                ids.append(TOK[a])
                tgt.append(-100)
        seqs.append(ids)
        tgts.append(tgt)
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    tgt = torch.full((len(seqs), n), -100, dtype=torch.long)
    for i, (s, t) in enumerate(zip(seqs, tgts, strict=True)):
        ids[i, n - len(s) :] = torch.tensor(s)
        mask[i, n - len(s) :] = 1
        tgt[i, n - len(t) :] = torch.tensor(t)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": to_pixel_values(np.stack([s["image"] for s in samples])),
        "targets": tgt,
        "patch_labels": torch.from_numpy(np.stack([s["patch_labels"] for s in samples])),
    }


class AuxHead(torch.nn.Module):
    """Linear read-outs of the per-patch labels from the projector's output (training only)."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, n) for n in HEADS.values())

    def loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        f = feats.reshape(-1, feats.shape[-1])
        lab = labels.reshape(-1, labels.shape[-1])
        return sum(
            torch.nn.functional.cross_entropy(h(f), lab[:, k]) for k, h in enumerate(self.heads)
        ) / len(self.heads)
