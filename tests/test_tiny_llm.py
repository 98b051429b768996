"""The shipped tiny byte-level Llama (examples/models/attnc-tiny-llama) has real trained weights."""

from __future__ import annotations

import json
import math
import os
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(
    os.environ.get("ATTNC_TINY_LLM_DIR", ROOT / "examples" / "models" / "attnc-tiny-llama")
)
BOS_ID = 256
BPB_BOUND = 3.0  # uniform over 256 bytes is 8.0; an untrained model is ~8 bits/byte

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "model.safetensors").exists() or not (MODEL_DIR / "config.json").exists(),
    reason=f"trained model not present at {MODEL_DIR} (run examples/train_tiny_llm.py)",
)


def _heldout_windows(n_windows: int = 4, body: int = 255) -> torch.Tensor:
    split = json.loads((MODEL_DIR / "data_split.json").read_text())
    root = Path(split["root"])
    if not root.is_dir():
        root = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for name in split["val"]:
        p = root / name
        if not p.is_file():
            continue
        data = p.read_bytes()
        if len(data) >= body:
            rows.append([BOS_ID] + list(data[:body]))
        if len(rows) == n_windows:
            break
    if len(rows) < n_windows:
        pytest.skip("held-out stdlib files listed in data_split.json are not on this machine")
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def _bits_per_byte(model, ids: torch.Tensor) -> float:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="mean"
    )
    return nll.item() / math.log(2)


@pytest.fixture(scope="module")
def model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    return m.eval()


def test_files_and_size():
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert cfg["bos_token_id"] == BOS_ID
    for name in ("generation_config.json", "tokenizer_config.json", "training_log.json"):
        assert (MODEL_DIR / name).exists(), name
    size = sum(f.stat().st_size for f in MODEL_DIR.iterdir() if f.is_file())
    assert size < 15 * 1024 * 1024


def test_loads_offline_as_llama(model):
    from transformers import LlamaForCausalLM

    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    assert model.config.tie_word_embeddings


def test_heldout_bits_per_byte_is_far_below_uniform(model):
    torch.set_num_threads(1)
    ids = _heldout_windows()  # 4 x 255 held-out bytes
    bpb = _bits_per_byte(model, ids)
    assert bpb < BPB_BOUND, f"held-out bits/byte {bpb:.3f} >= {BPB_BOUND}"

    # the bound is real: the same architecture with random weights fails it
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    untrained = LlamaForCausalLM(model.config).eval()
    assert _bits_per_byte(untrained, ids) > BPB_BOUND
