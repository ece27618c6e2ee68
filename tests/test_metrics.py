import math

import numpy as np
import pytest
import torch

from semiseg.engine.metrics import ConfusionMatrix, format_table


def test_confusion_matrix_exact_values_with_ignore():
    target = torch.tensor([[0, 0, 1, 255],
                           [1, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 2],
                         [1, 2, 0, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    expected = torch.tensor([[1, 1, 0],   # gt 0: one right, one predicted as 1
                             [0, 2, 0],   # gt 1: both right
                             [1, 0, 1]])  # gt 2: one right, one predicted as 0
    assert cm.matrix.dtype == torch.int64
    assert torch.equal(cm.matrix, expected)

    r = cm.compute()
    # IoU = TP / (TP + FP + FN): class 0: 1/(2+2-1), class 1: 2/(2+3-2), class 2: 1/(2+1-1)
    assert r["per_class_iou"] == pytest.approx([100 / 3, 200 / 3, 50.0])
    assert r["mIoU"] == pytest.approx((100 / 3 + 200 / 3 + 50) / 3)
    assert r["pixel_acc"] == pytest.approx(400 / 6)
    assert r["per_class_acc"] == pytest.approx([50.0, 100.0, 50.0])
    assert r["mean_acc"] == pytest.approx(200 / 3)


def test_accumulates_over_updates_like_one_big_update():
    rng = np.random.default_rng(0)
    preds = [torch.from_numpy(rng.integers(0, 4, (5, 7))) for _ in range(3)]
    targets = [torch.from_numpy(rng.integers(0, 4, (5, 7))) for _ in range(3)]
    targets[1][0, :] = 255
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    for p, t in zip(preds, targets):
        a.update(p, t)
    b.update(torch.stack(preds), torch.stack(targets))
    assert torch.equal(a.matrix, b.matrix)
    assert int(a.matrix.sum()) == 3 * 35 - 7
    # split-level IoU (sum of intersections / sum of unions), not a mean of per-image IoUs
    inter = sum(((p == t) & (t == 0)).sum().item() for p, t in zip(preds, targets))
    union = sum((((p == 0) | (t == 0)) & (t != 255)).sum().item() for p, t in zip(preds, targets))
    assert a.compute()["per_class_iou"][0] == pytest.approx(100 * inter / union)


def test_absent_class_is_excluded_from_the_mean():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 0])
    cm = ConfusionMatrix(4)  # classes 2 and 3: neither in gt nor predicted
    cm.update(pred, target)
    r = cm.compute()
    assert r["per_class_iou"][2] is None and r["per_class_iou"][3] is None
    assert r["mIoU"] == pytest.approx((200 / 3 + 50) / 2)
    assert r["per_class_acc"][2] is None
    assert r["mean_acc"] == pytest.approx(75.0)


def test_class_predicted_but_absent_from_gt_counts_as_zero():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2]), torch.tensor([0, 0]))
    r = cm.compute()
    assert r["per_class_iou"] == [50.0, None, 0.0]
    assert r["mIoU"] == pytest.approx(25.0)


def test_custom_ignore_index_and_empty_matrix():
    cm = ConfusionMatrix(2, ignore_index=7)
    cm.update(torch.tensor([0, 1]), torch.tensor([7, 7]))
    assert int(cm.matrix.sum()) == 0
    r = cm.compute()
    assert math.isnan(r["mIoU"]) and math.isnan(r["pixel_acc"])
    assert r["per_class_iou"] == [None, None]


def test_out_of_range_and_shape_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="class index 5"):
        cm.update(torch.tensor([0]), torch.tensor([5]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_all_reduce_is_a_noop_without_distributed():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    before = cm.matrix.clone()
    cm.all_reduce()
    assert torch.equal(cm.matrix, before)


def test_format_table_lists_classes_and_totals():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    text = format_table(cm.compute(), ["road", "sky", "car"])
    lines = text.splitlines()
    assert lines[0].split() == ["class", "IoU", "Acc"]
    assert any(line.split() == ["road", "50.00", "50.00"] for line in lines)
    assert any(line.split() == ["car", "n/a", "n/a"] for line in lines)
    assert any(line.startswith("mIoU") and line.split()[-1] == "50.00" for line in lines)
    assert any(line.startswith("pixel acc") for line in lines)
    # from an evaluate()-style result (confusion, no per_class_acc) with missing names
    result = {"mIoU": 50.0, "per_class_iou": [50.0, 50.0], "pixel_acc": 66.7, "confusion": [[1, 1], [0, 1]]}
    text = format_table(result, None)
    assert "class_1" in text and "100.00" in text
