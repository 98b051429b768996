"""Layer-by-layer calibration: llm-drop's attention scores computed block by block from the
safetensors (one block's weights at a time) equal the scores the captured graph's taps give."""

from __future__ import annotations

import pytest
import torch

from attnc.capture.program import capture
from attnc.load.calibration import Batch
from attnc.load.models import load_model
from attnc.load.sequential import attention_cosines
from attnc.recipe.manager import PassContext


@pytest.mark.slow
def test_sequential_scores_equal_graph_scores(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnc.passes.llm_drop import find_units, score_units

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    g = torch.Generator().manual_seed(1)
    batches = []
    for n in (9, 12):  # the second batch padded on the right
        ids = torch.randint(0, 97, (2, n), generator=g)
        mask = torch.ones_like(ids)
        mask[1, n - 3:] = 0
        batches.append(Batch((ids, mask), mask))
    seq = attention_cosines(tmp_path / "m", batches, ["input_ids", "attention_mask"])
    loaded = load_model(str(tmp_path / "m"))
    program = capture(loaded)
    units = [u for u in find_units(program.gm) if u.kind == "attention"]
    ctx = PassContext(calibration=type("C", (), {"calib": batches})())
    graph = score_units(program, units, ctx)
    assert sorted(seq) == [u.layer for u in units] == [0, 1, 2]
    for u in units:
        assert abs(seq[u.layer] - graph[u.key]) < 1e-6, (u.key, seq[u.layer], graph[u.key])
