"""Calibration data: every input form, the held-out split, packing for mask-less models, and
conforming batches to a program's static dims."""

from __future__ import annotations

import json

import pytest
import torch

from attnc.errors import CalibrationError
from attnc.load.calibration import (
    Batch,
    CalibrationConfig,
    CalibrationData,
    conform,
    load_calibration,
)

NAMES = ["input_ids", "attention_mask"]
EXAMPLE = (torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))


def test_jsonl_ids_pad_and_split(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"input_ids": list(range(1, n))}) for n in range(3, 13)))
    data = load_calibration(
        str(f),
        names=NAMES,
        example_args=EXAMPLE,
        vocab=100,
        cfg=CalibrationConfig(samples=10, batch_size=4, holdout=0.25),
    )
    assert len(data.calib) == 2 and len(data.holdout) == 1
    b = data.calib[0]
    assert b.args[0].shape == b.args[1].shape == (4, 5)
    assert b.token_mask[0].tolist() == [1, 1, 0, 0, 0]  # right padding is masked
    # the first row holding id 5 is line 4 (ids 1..5)
    with pytest.raises(CalibrationError, match=r"line 4: token id 5 is outside the vocabulary"):
        load_calibration(str(f), names=NAMES, example_args=EXAMPLE, vocab=5)


def test_packing_without_mask_input(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"input_ids": [1] * 7}) for _ in range(6)))
    data = load_calibration(
        str(f),
        names=["idx"],
        example_args=(EXAMPLE[0],),
        cfg=CalibrationConfig(max_length=10, batch_size=8, holdout=0.0),
    )
    assert data.calib[0].args[0].shape == (4, 10)  # 42 tokens packed into rows of 10


def test_tensor_files(tmp_path):
    ids = torch.randint(0, 50, (6, 8))
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "c.pt")
    data = load_calibration(
        str(tmp_path / "c.pt"),
        names=NAMES,
        example_args=EXAMPLE,
        cfg=CalibrationConfig(batch_size=3, holdout=0.5),
    )
    assert torch.equal(torch.cat([data.calib[0].args[0], data.holdout[0].args[0]]), ids)
    from safetensors.torch import save_file

    save_file({"input_ids": ids}, str(tmp_path / "c.safetensors"))
    with pytest.raises(CalibrationError, match="lacks input"):
        load_calibration(str(tmp_path / "c.safetensors"), names=NAMES, example_args=EXAMPLE)


def test_conform_to_static_dims():
    rows = [
        Batch(
            (torch.arange(5)[None].repeat(3, 1), torch.ones(3, 5, dtype=torch.long)),
            torch.ones(3, 5, dtype=torch.long),
        )
    ]
    data = conform(CalibrationData(rows, rows, "x"), NAMES, EXAMPLE, {}, pad_id=9)
    assert [b.args[0].shape for b in data.calib] == [(2, 8), (2, 8)]
    assert data.calib[0].args[0][0].tolist() == [0, 1, 2, 3, 4, 9, 9, 9]
    assert data.calib[0].token_mask[0].tolist() == [1] * 5 + [0] * 3
    dyn = conform(
        CalibrationData(rows, rows, "x"),
        NAMES,
        EXAMPLE,
        {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
    )
    assert dyn.calib[0].args[0].shape == (3, 5)
