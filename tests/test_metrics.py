"""Metric functions against hand-computed cases, including the empty-mask conventions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from charseg.metrics import Counts, boundary, boundary_f1, confusion, dice, iou, precision, recall


def masks(*rows: str) -> np.ndarray:
    return np.array([[ch == "#" for ch in row] for row in rows])


PRED = masks("##..",
             "##..",
             "....")
TARGET = masks(".##.",
               ".##.",
               "....")
EMPTY = np.zeros_like(PRED)


def test_counts_and_scores_by_hand():
    c = confusion(PRED, TARGET)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 2, 2, 6)
    assert dice(c) == pytest.approx(4 / 8)
    assert iou(c) == pytest.approx(2 / 6)
    assert precision(c) == pytest.approx(2 / 4)
    assert recall(c) == pytest.approx(2 / 4)


@pytest.mark.parametrize("pred, target, expected", [
    (EMPTY, TARGET, {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0}),  # empty prediction
    (PRED, EMPTY, {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0}),    # empty target
    (EMPTY, EMPTY, {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}),   # both empty
])
def test_empty_mask_conventions(pred, target, expected):
    c = confusion(pred, target)
    assert {"dice": dice(c), "iou": iou(c), "precision": precision(c), "recall": recall(c)} == expected


def test_dataset_counts_are_summed_not_averaged():
    batch_pred, batch_target = np.stack([PRED, EMPTY]), np.stack([TARGET, TARGET])
    total = confusion(batch_pred[:1], batch_target[:1]) + confusion(batch_pred[1:], batch_target[1:])
    assert total == confusion(batch_pred, batch_target)
    # Dataset Dice: 2*2 / (2*2 + 2 + 6) = 1/3, not the mean of per-image Dice (0.5 + 0) / 2.
    assert dice(total) == pytest.approx(1 / 3)
    per_image = confusion(batch_pred, batch_target, per_image=True)
    np.testing.assert_allclose(dice(per_image), [0.5, 0.0])
    np.testing.assert_allclose(iou(per_image), [1 / 3, 0.0])
    assert dice(Counts.zero() + total) == dice(total)


def test_torch_tensors_give_the_same_counts():
    assert confusion(torch.from_numpy(PRED), torch.from_numpy(TARGET)) == confusion(PRED, TARGET)
    per_image = confusion(torch.from_numpy(np.stack([PRED, EMPTY])), torch.from_numpy(np.stack([EMPTY, EMPTY])),
                          per_image=True)
    np.testing.assert_array_equal(per_image.fp, [4, 0])
    np.testing.assert_allclose(dice(per_image), [0.0, 1.0])


def test_mismatched_or_non_boolean_masks_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        confusion(PRED, TARGET[:2])
    with pytest.raises(ValueError, match="boolean"):
        confusion(PRED.astype(np.uint8), TARGET)


def square(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[top:top + side, left:left + side] = True
    return mask


def test_boundary_is_the_inner_contour_and_ignores_the_frame_edge():
    edge = boundary(square(8, 2, 2, 4))
    assert edge.sum() == 12 and not edge[3:5, 3:5].any()
    # A mask touching the frame edge has no contour along that edge.
    np.testing.assert_array_equal(boundary(square(6, 0, 0, 3)), masks("..#...", "..#...", "###...",
                                                                      "......", "......", "......"))


def test_boundary_f1_by_hand():
    target = square(20, 5, 5, 8)
    assert boundary_f1(target, target, 0) == 1.0
    shifted = square(20, 5, 6, 8)  # one pixel to the right
    # Tolerance 1 px matches every contour pixel. At 0 px only the shared stretches of the top and
    # bottom rows match: 7 + 7 of each mask's 28 contour pixels, so precision = recall = F1 = 0.5.
    assert boundary_f1(shifted, target, 1) == 1.0
    assert boundary_f1(shifted, target, 0) == pytest.approx(14 / 28)
    far = square(20, 5, 12, 8)[:, :20]
    assert boundary_f1(far, target, 2) < boundary_f1(far, target, 8) == 1.0


def test_boundary_f1_empty_conventions():
    empty, target = np.zeros((10, 10), bool), square(10, 2, 2, 4)
    assert boundary_f1(empty, empty, 2) == 1.0
    assert boundary_f1(empty, target, 2) == 0.0
    assert boundary_f1(target, empty, 2) == 0.0
