"""The shipped tiny ViT (examples/models/attnc-tiny-vit) has real trained weights, a patch grid of
at least 16x16 plus a CLS token, and the held-out data in examples/data matches its generator."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(
    os.environ.get("ATTNC_TINY_VIT_DIR", ROOT / "examples" / "models" / "attnc-tiny-vit")
)
EVAL_FILE = ROOT / "examples" / "data" / "vit_eval.pt"
CALIB_FILE = ROOT / "examples" / "data" / "vit_calib.pt"
N_CLASSES = 8
ACC_BOUND = 0.65  # chance is 1/8; untrained 0.14; trained 0.766 on these 64 (0.728 on 2048)

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "model.safetensors").exists() or not (MODEL_DIR / "config.json").exists(),
    reason=f"trained model not present at {MODEL_DIR} (run examples/train_vit.py)",
)


@pytest.fixture(scope="module")
def loaded():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from attnc.load.models import load_model

    return load_model(str(MODEL_DIR))


@pytest.fixture(scope="module")
def eval_data() -> dict[str, torch.Tensor]:
    return torch.load(EVAL_FILE, weights_only=True)


def test_files_and_size():
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["ViTForImageClassification"]
    assert len(cfg["id2label"]) == N_CLASSES
    proc = json.loads((MODEL_DIR / "preprocessor_config.json").read_text())
    assert proc["size"] == {"height": cfg["image_size"], "width": cfg["image_size"]}
    for name in ("training_log.json", "README.md"):
        assert (MODEL_DIR / name).exists(), name
    size = sum(f.stat().st_size for f in MODEL_DIR.iterdir() if f.is_file())
    assert size < 15 * 1024 * 1024


def test_loads_as_vision_with_a_16x16_grid_and_cls(loaded):
    from transformers import ViTForImageClassification

    assert loaded.kind == "vision"
    assert loaded.input_names == ["pixel_values"]
    vit = loaded.module.model if hasattr(loaded.module, "model") else loaded.module
    assert isinstance(vit, ViTForImageClassification)
    cfg = vit.config
    grid = cfg.image_size // cfg.patch_size
    assert grid >= 16
    assert vit.vit.embeddings.patch_embeddings.num_patches == grid * grid
    assert vit.vit.embeddings.cls_token.shape[1] == 1
    # 1 CLS + grid^2 patch tokens reach every layer
    assert vit.vit.embeddings.position_embeddings.shape[1] == grid * grid + 1


def test_heldout_accuracy_well_above_chance(loaded, eval_data):
    pix = eval_data["pixel_values"][:64].float()
    labels = eval_data["labels"][:64]
    assert labels.unique().numel() == N_CLASSES  # every class is present
    with torch.no_grad():
        logits = loaded.module(pix)
    acc = float((logits.argmax(-1) == labels).float().mean())
    assert acc >= ACC_BOUND, f"held-out accuracy {acc:.3f} < {ACC_BOUND}: weights not trained?"


def test_data_files_match_the_generator(eval_data):
    sys.path.insert(0, str(ROOT / "examples"))
    from make_shapes import make_batch

    pix, labels = make_batch("eval", range(4))
    assert torch.equal(eval_data["labels"][:4], labels)
    assert torch.allclose(eval_data["pixel_values"][:4].float(), pix, atol=1e-3)
    calib = torch.load(CALIB_FILE, weights_only=True)
    assert set(calib) == {"pixel_values"}  # only model inputs: attnc rejects other tensors
    cpix, _ = make_batch("calib", range(2))
    assert torch.allclose(calib["pixel_values"][:2].float(), cpix, atol=1e-3)
