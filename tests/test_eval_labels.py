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


def test_prediction_agreement_needs_no_labels_and_bounds_it(tmp_path):
    from attnc.check.fidelity import meets
    from attnc.recipe.bounds import FidelityBound

    p = tmp_path / "x.pt"
    torch.save({"pixel_values": torch.randn(10, 3, 8, 8)}, p)
    data = _load(p)
    w = torch.randn(3 * 8 * 8, 3)
    ref = lambda x: x.flatten(1) @ w  # noqa: E731
    one = lambda x: (x.flatten(1) @ w) * torch.tensor([1.0, 1.0, -1.0])  # noqa: E731
    x = torch.cat([b.args[0] for b in data.calib])
    want = float((ref(x).argmax(-1) == one(x).argmax(-1)).float().mean())
    m = task_metrics("vision", one, ref, data.calib)
    assert "accuracy_original" not in m and m["prediction_agreement"] == pytest.approx(want)
    bound = FidelityBound(min_prediction_agreement=0.99)
    assert meets(task_metrics("vision", ref, ref, data.calib), bound)[0]
    assert meets(m, bound)[0] == (want >= 0.99)
    hidden = lambda x: x.flatten(1).reshape(len(x), 8, -1)  # noqa: E731  (B, S, C): no classes
    assert "prediction_agreement" not in task_metrics("vision", hidden, hidden, data.calib)
