"""Labelers with known answers for the masks-stage tests, importable by spawned worker processes.

Frames show persons as bright rectangles on a dark background: PlantedDetector finds them by
thresholding, BoxSegmenter answers each box prompt with the box itself. `planted_factory` is a
module-level LabelerFactory (charseg.label_shards), so make_masks can hand it (or a functools.partial of
it) to worker processes; what the workers do is seen through `log`, a file each call appends a line to.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import cv2
import numpy as np

from charseg.config import LabelsConfig
from charseg.labels.detect import Detections, YoloSamLabeler

PLANTED_SETTINGS = {"test": "planted"}


def rect_mask(size, rects):
    mask = np.zeros(size, np.uint8)
    for x1, y1, x2, y2 in rects:
        mask[y1:y2, x1:x2] = 255
    return mask


def _log(log: Path | None, line: str) -> None:
    if log is not None:
        with open(log, "a", encoding="utf-8") as fh:  # one short append per call: whole lines across processes
            fh.write(f"{os.getpid()} {line}\n")


class PlantedDetector:
    """The bright rectangles of each frame, found by thresholding: a detector with known answers."""

    def __init__(self, log: Path | None = None):
        self.batches, self.log = [], log

    def detect(self, images):
        self.batches.append(len(images))
        _log(self.log, f"detect {len(images)}")
        found = []
        for image in images:
            bright = (image.mean(axis=2) > 128).astype(np.uint8)
            n, _, stats, _ = cv2.connectedComponentsWithStats(bright)
            boxes = [[x, y, x + w, y + h] for x, y, w, h, _ in stats[1:]]
            found.append(Detections(np.array(boxes, np.float32).reshape(-1, 4), np.full(len(boxes), 0.9, np.float32)))
        return found


class BoxSegmenter:
    """Each box prompt's mask is the box itself; counts its calls (one per frame with persons).
    On call number `fail_on_call` it raises KeyboardInterrupt (a Ctrl-C), on `die_on_call` its process is
    killed (SIGKILL, as the OOM killer does); `delay` seconds per call let two processes overlap."""

    def __init__(self, fail_on_call=None, *, die_on_call=None, delay=0.0, log: Path | None = None):
        self.calls, self.fail_on_call, self.die_on_call = 0, fail_on_call, die_on_call
        self.delay, self.log = delay, log

    def segment(self, image, boxes):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        if self.calls == self.die_on_call:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.delay)
        _log(self.log, "segment")
        masks = np.stack([rect_mask(image.shape[:2], [tuple(int(v) for v in box)]) > 0 for box in boxes])
        return masks, np.full(len(boxes), 0.75, np.float32)


def planted_factory(cfg: LabelsConfig, *, device: str | None = None, log: Path | None = None,
                    die_on_call: int | None = None, delay: float = 0.0) -> YoloSamLabeler:
    """A LabelerFactory: PlantedDetector + BoxSegmenter, with the same fingerprint in every process."""
    _log(log, f"build {device}")
    detector, segmenter = PlantedDetector(log), BoxSegmenter(die_on_call=die_on_call, delay=delay, log=log)
    return YoloSamLabeler(lambda: detector, lambda: segmenter, PLANTED_SETTINGS)


def log_lines(log: Path) -> list[tuple[int, str]]:
    """(pid, what) for every line of a planted labeler's log."""
    if not log.exists():
        return []
    return [(int(pid), what) for pid, what in (line.split(" ", 1) for line in log.read_text().splitlines())]
