"""Segmentation metrics on numpy arrays or torch tensors: binary ones from confusion counts, multi-class ones
(the characters task) from a class confusion matrix at the end of the file.

Counts are summed over everything they are given, so a caller adds batches together and gets
dataset-level scores (Dice over the whole validation set, not a mean of batch means); pass
`per_image=True` for one score per image instead.

Empty masks: a ratio whose denominator is 0 scores 1.0 when prediction and target are both empty
(nothing to find, nothing claimed) and 0.0 otherwise. So an empty prediction on a non-empty target
has precision 0 and recall 0; a non-empty prediction on an empty target has precision 0 and
recall 0; Dice and IoU are 1.0 only for two empty masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np


@dataclass(frozen=True)
class Counts:
    """Pixel counts; scalars for a whole set, or arrays with one entry per image."""
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @classmethod
    def zero(cls) -> Counts:
        return cls(*(np.int64(0) for _ in range(4)))


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor, possibly on the GPU
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.int64)


def confusion(pred: Any, target: Any, *, per_image: bool = False) -> Counts:
    """Counts of boolean masks of equal shape (H, W) or (N, ...); per_image sums over all but dim 0."""
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if pred.dtype != target.dtype or str(pred.dtype) not in ("bool", "torch.bool"):
        raise ValueError(f"masks must both be boolean, got {pred.dtype} and {target.dtype}")
    dims = tuple(range(1, pred.ndim)) if per_image else tuple(range(pred.ndim))
    tp = _numpy((pred & target).sum(dims))
    fp = _numpy((pred & ~target).sum(dims))
    fn = _numpy((~pred & target).sum(dims))
    total = np.prod(pred.shape[1:] if per_image else pred.shape, dtype=np.int64)
    return Counts(tp, fp, fn, total - tp - fp - fn)


def _ratio(num: np.ndarray, den: np.ndarray, both_empty: np.ndarray) -> float | np.ndarray:
    value = np.where(den > 0, num / np.maximum(den, 1), np.where(both_empty, 1.0, 0.0))
    return float(value) if value.ndim == 0 else value


def _both_empty(c: Counts) -> np.ndarray:
    return (c.tp + c.fp + c.fn) == 0


def dice(c: Counts) -> float | np.ndarray:
    return _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn, _both_empty(c))


def iou(c: Counts) -> float | np.ndarray:
    return _ratio(c.tp, c.tp + c.fp + c.fn, _both_empty(c))


def precision(c: Counts) -> float | np.ndarray:
    return _ratio(c.tp, c.tp + c.fp, _both_empty(c))


def recall(c: Counts) -> float | np.ndarray:
    return _ratio(c.tp, c.tp + c.fn, _both_empty(c))


_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def boundary(mask: np.ndarray) -> np.ndarray:
    """The mask's 4-connected inner contour. The frame edge is not a boundary: a character cut off
    by the frame has no contour there (cv2.erode treats outside pixels as foreground)."""
    mask = mask.astype(bool)
    return mask & ~cv2.erode(mask.astype(np.uint8), _CROSS).astype(bool)


def boundary_f1(pred: np.ndarray, target: np.ndarray, tolerance_px: float) -> float:
    """Boundary F1 (BF score) of two (H, W) boolean masks: a contour pixel of one mask is matched
    when the other mask's contour lies within `tolerance_px` (Euclidean). Empty convention as above."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} != target shape {target.shape}")
    # Work in the box around both masks (1 px margin keeps their contours): same result, far fewer
    # pixels for the distance transforms on full-size frames.
    rows, cols = np.nonzero(pred | target)
    if rows.size:
        top, left = max(rows.min() - 1, 0), max(cols.min() - 1, 0)
        pred, target = (m[top:rows.max() + 2, left:cols.max() + 2] for m in (pred, target))
    pred_edge, target_edge = boundary(pred), boundary(target)
    if not pred_edge.any() or not target_edge.any():
        return float(not pred_edge.any() and not target_edge.any())
    precision_b = _matched_share(pred_edge, target_edge, tolerance_px)
    recall_b = _matched_share(target_edge, pred_edge, tolerance_px)
    total = precision_b + recall_b
    return 0.0 if total == 0 else 2 * precision_b * recall_b / total


def _matched_share(edge: np.ndarray, reference_edge: np.ndarray, tolerance_px: float) -> float:
    # distanceTransform gives each pixel's distance to the nearest zero pixel: the reference contour.
    distance = cv2.distanceTransform((~reference_edge).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return float((distance[edge] <= tolerance_px).mean())


# ---------------------------------------------------------------------------------------------
# Multi-class (the characters task): one confusion matrix, summed like Counts, and scores from it.
# A class absent from both prediction and target has no score (NaN) and is left out of means, unlike the
# binary convention above: a character missing from a whole set says nothing about the model.

def class_confusion(pred: Any, target: Any, n_classes: int) -> np.ndarray:
    """(n, n) int64 pixel counts of class-id maps of equal shape: rows target class, columns predicted class."""
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if hasattr(pred, "detach"):  # torch: count on the tensors' device, one small array comes back
        import torch

        pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
        if pred.numel():
            low, high = int(torch.minimum(pred.min(), target.min())), int(torch.maximum(pred.max(), target.max()))
            if low < 0 or high >= n_classes:
                raise ValueError(f"class ids must lie in [0, {n_classes}), got {low}..{high}")
        counts = torch.bincount(target * n_classes + pred, minlength=n_classes * n_classes)
        return _numpy(counts).reshape(n_classes, n_classes)
    pred, target = np.asarray(pred, dtype=np.int64).ravel(), np.asarray(target, dtype=np.int64).ravel()
    if pred.size and (min(pred.min(), target.min()) < 0 or max(pred.max(), target.max()) >= n_classes):
        raise ValueError(f"class ids must lie in [0, {n_classes}), got {min(pred.min(), target.min())}.."
                         f"{max(pred.max(), target.max())}")
    return np.bincount(target * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _per_class(matrix: np.ndarray, dice_like: bool) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    fp, fn = matrix.sum(axis=0) - tp, matrix.sum(axis=1) - tp
    den = 2 * tp + fp + fn if dice_like else tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (2 * tp if dice_like else tp) / den, np.nan)


def per_class_iou(matrix: np.ndarray) -> np.ndarray:
    """IoU of each class from a class_confusion matrix; NaN for a class in neither prediction nor target."""
    return _per_class(matrix, dice_like=False)


def per_class_dice(matrix: np.ndarray) -> np.ndarray:
    """Dice of each class from a class_confusion matrix; NaN for a class in neither prediction nor target."""
    return _per_class(matrix, dice_like=True)


def mean_iou(matrix: np.ndarray, classes_idx: Sequence[int]) -> float:
    """Mean IoU over the classes `classes_idx` that have a score (NaN when none has)."""
    scores = per_class_iou(matrix)[list(classes_idx)]
    scores = scores[~np.isnan(scores)]
    return float(scores.mean()) if scores.size else float("nan")
