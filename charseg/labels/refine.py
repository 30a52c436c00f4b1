"""Cleaning a frame's raw person mask (labels.refine): applied after the label cache, so changing
labels.refine costs no SAM time."""
from __future__ import annotations

import cv2
import numpy as np

from charseg.config import RefineConfig


def _ellipse(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def refine_mask(mask: np.ndarray, cfg: RefineConfig) -> np.ndarray:
    """A 0/255 uint8 mask: binarised (non-zero = person), closed, opened, small blobs dropped, small holes filled."""
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    if cfg.close_kernel > 1:
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, _ellipse(cfg.close_kernel))
    if cfg.open_kernel > 1:
        binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, _ellipse(cfg.open_kernel))
    frame_area = binary.size
    if cfg.min_area > 0 and binary.any():
        n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < cfg.min_area * frame_area)
        binary[np.isin(labels, small[small > 0])] = 0
    if cfg.max_hole_area > 0 and binary.any():
        # A hole is background not connected to the frame border (4-connected, the dual of 8-connected blobs).
        n, labels, stats, _ = cv2.connectedComponentsWithStats(1 - binary, connectivity=4)
        height, width = binary.shape
        left, top = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
        right, bottom = left + stats[:, cv2.CC_STAT_WIDTH], top + stats[:, cv2.CC_STAT_HEIGHT]
        inner = (left > 0) & (top > 0) & (right < width) & (bottom < height)
        small = inner & (stats[:, cv2.CC_STAT_AREA] <= cfg.max_hole_area * frame_area)
        small[0] = False  # label 0 is the foreground itself
        binary[np.isin(labels, np.flatnonzero(small))] = 1
    return binary * np.uint8(255)



def refine_instances(instances: np.ndarray, refined: np.ndarray) -> np.ndarray:
    """The instance map (uint16, 0 = nobody) cut to the refined union `refined` (0/255): every refined person
    pixel takes the id of the nearest raw instance pixel, so pixels that closing or hole filling added join
    the person around them and the map's non-zero pixels are exactly the refined mask."""
    instances = np.asarray(instances).astype(np.uint16)
    on = refined > 0
    if not on.any() or not instances.any():
        return np.zeros(instances.shape, np.uint16)
    # Labels of the nearest zero pixel of the input, which are here the instance pixels.
    _, nearest = cv2.distanceTransformWithLabels((instances == 0).astype(np.uint8), cv2.DIST_L2, 3,
                                                 labelType=cv2.DIST_LABEL_PIXEL)
    ids_of_label = np.zeros(int(nearest.max()) + 1, np.uint16)
    ids_of_label[nearest[instances > 0]] = instances[instances > 0]
    return np.where(on, ids_of_label[nearest], 0).astype(np.uint16)
