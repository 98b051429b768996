"""A tensor file may carry class `labels` beside the model's inputs: calibration keeps them aside
(they never reach the model) and the task metrics report accuracy of both models."""

from __future__ import annotations

import pytest
import torch

from attnc.check.task import task_metrics
from attnc.errors import CalibrationError
from attnc.load.calibration import CalibrationConfig, load_calibration


def _file(tmp_path, labels):
    p = tmp_path / "d.pt"
    torch.save({"pixel_values": torch.randn(10, 3, 8, 8), "labels": labels}, p)
    return p


def _load(p):
    ex = (torch.randn(2, 3, 8, 8),)
    cfg = CalibrationConfig(samples=10, batch_size=4, holdout=0.0)
    return load_calibration(str(p), names=["pixel_values"], example_args=ex, cfg=cfg)


def test_labels_ride_along_and_accuracy_is_measured(tmp_path):
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    data = _load(_file(tmp_path, labels))
    assert all(len(b.args) == 1 for b in data.calib)  # labels are not a model input
    assert torch.equal(torch.cat([b.labels for b in data.calib]), labels)
    w = torch.randn(3 * 8 * 8 * 3).reshape(3 * 8 * 8, 3)
    ref = lambda x: x.flatten(1) @ w  # noqa: E731
    flip = lambda x: -(x.flatten(1) @ w)  # noqa: E731
    m = task_metrics("vision", ref, ref, data.calib)
    want = float((ref(torch.cat([b.args[0] for b in data.calib])).argmax(-1) == labels)
                 .float().mean())
    assert m["accuracy_original"] == m["accuracy_optimized"] == pytest.approx(want)
    assert m["prediction_agreement"] == 1.0 and m["accuracy_drop_points"] == 0.0
    m2 = task_metrics("vision", flip, ref, data.calib)
    assert m2["prediction_agreement"] < 1.0 and m2["labelled_samples"] == 10


@pytest.mark.parametrize(
    "labels",
    [torch.randn(10), torch.zeros(10, 2, dtype=torch.long), torch.zeros(7, dtype=torch.long)],
)
def test_bad_labels_are_one_line_errors(tmp_path, labels):
    with pytest.raises(CalibrationError, match="labels"):
        _load(_file(tmp_path, labels))
