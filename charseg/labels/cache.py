"""The label cache (labels.cache_dir): SAM's answers kept by frame content, outside DVC's outputs."""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np

from charseg.errors import CharsegError
from charseg.io import imread, imwrite_atomic, read_json, write_json
from charseg.labels.detect import FrameLabel


class LabelCache:
    """Content-addressed FrameLabels: `<root>/<key[:2]>/<key>.json` (+ `.ids.png`, the raw uint16 instance map).

    The key hashes the frame's bytes with the labeler's fingerprint, so a frame already labelled
    with the same weights and params is never sent to SAM again, whichever video or run it comes
    from; refinement is applied after the cache, so changing labels.refine costs no SAM time either.
    Each file is written atomically and the JSON last: an interrupted run leaves only whole entries.
    Entries written before instances were kept hold only the union (`.png`): they are read with each
    connected blob as one instance, so the person task's labels stay exact and no frame goes back to SAM.
    """

    def __init__(self, root: str | Path, fingerprint: str):
        self.root, self.fingerprint = Path(root), fingerprint

    def key(self, frame_bytes: bytes) -> str:
        return hashlib.sha256(self.fingerprint.encode("ascii") + hashlib.sha256(frame_bytes).digest()).hexdigest()

    def _paths(self, key: str) -> tuple[Path, Path, Path]:
        folder = self.root / key[:2]
        return folder / f"{key}.json", folder / f"{key}.ids.png", folder / f"{key}.png"

    def has(self, key: str) -> bool:
        """Whether an entry for `key` was written (its JSON goes last, so one that is there is whole): without
        decoding the instance map, as get does. A damaged entry still reads as a miss in get, and is relabelled."""
        return self._paths(key)[0].is_file()

    def get(self, key: str) -> FrameLabel | None:
        meta_path, ids_path, union_path = self._paths(key)
        if not meta_path.is_file():
            return None
        try:
            meta = read_json(meta_path)
            shape = (int(meta["height"]), int(meta["width"]))
            if not meta["has_mask"]:
                ids = np.zeros(shape, dtype=np.uint16)
            elif ids_path.is_file():
                ids = imread(ids_path, cv2.IMREAD_UNCHANGED).astype(np.uint16)
            else:
                _, blobs = cv2.connectedComponents((imread(union_path, cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8))
                ids = blobs.astype(np.uint16)
            if ids.shape != shape:
                return None
            return FrameLabel(ids, np.asarray(meta["boxes"], dtype=np.float32).reshape(-1, 4),
                              np.asarray(meta["box_scores"], dtype=np.float32),
                              np.asarray(meta["sam_scores"], dtype=np.float32))
        except (CharsegError, ValueError, KeyError, TypeError):
            return None  # an unreadable entry is a miss: the frame is labelled again and the entry rewritten

    def put(self, key: str, label: FrameLabel) -> None:
        meta_path, ids_path, _ = self._paths(key)
        ids = np.asarray(label.instances).astype(np.uint16)
        has_mask = bool(ids.any())
        if has_mask:
            imwrite_atomic(ids_path, ids)
        write_json(meta_path, {"height": ids.shape[0], "width": ids.shape[1], "has_mask": has_mask,
                               "boxes": label.boxes.tolist(), "box_scores": label.box_scores.tolist(),
                               "sam_scores": label.sam_scores.tolist()})

