"""YOLOv8 person boxes prompt SAM: the weak labels of the masks stage (labels.method yolo_sam).

Speed: SAM's image encoder dominates (about 9 s per frame for vit_b on 2 CPU cores), so it runs once
per frame, only on frames where YOLO found somebody, with all of the frame's boxes decoded in one
call. YOLO runs on batches of frames. On a GPU both run there, in half precision when asked.

Nothing here reads params.yaml: callers pass typed config, and tests plant detections by handing
`YoloSamLabeler` their own detector or segmenter. Labels are always made by what the caller asked
for: there is no fallback to another labeler.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import cv2
import numpy as np
import torch

from charseg.config import DetectorConfig, SamConfig
from charseg.device import select_device
from charseg.io import file_sha256
from charseg.labels import weights
from charseg.labels.weights import PERSON_CLASS

# Bump when labelling code changes its output for the same weights and params: old cache entries
# then simply stop matching.
LABEL_CACHE_VERSION = 1


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray   # (n, 4) float32, x1 y1 x2 y2 in frame pixels, best score first
    scores: np.ndarray  # (n,) float32


class Detector(Protocol):
    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]: ...


class Segmenter(Protocol):
    def segment(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class PersonDetector:
    """YOLO person boxes for a batch of BGR frames (any sizes) in one predict call."""

    def __init__(self, model: Any, *, conf: float, min_box_area: float, imgsz: int = 640,
                 device: torch.device | str = "cpu", half: bool = False):
        self.model = model
        self.conf, self.min_box_area, self.imgsz = conf, min_box_area, imgsz
        self.device = torch.device(device)
        self.half = half and self.device.type == "cuda"

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        if not images:
            return []
        # Ultralytics' device selection sets torch's CPU threads to cpu_count - 1 for the whole process (1 on a
        # 2-core box), which then halves SAM's speed: give the rest of the stage its threads back.
        threads = torch.get_num_threads()
        try:
            # quantize=16 is ultralytics 8.4's name for half precision (`half` is deprecated there).
            results = self.model.predict(list(images), conf=self.conf, classes=[PERSON_CLASS], imgsz=self.imgsz,
                                         device=str(self.device), quantize=16 if self.half else None, verbose=False)
        finally:
            torch.set_num_threads(threads)
        detections = []
        for image, result in zip(images, results):
            boxes = result.boxes
            xyxy = boxes.xyxy.float().cpu().numpy().reshape(-1, 4)
            scores = boxes.conf.float().cpu().numpy().reshape(-1)
            classes = boxes.cls.cpu().numpy().reshape(-1)
            area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
            keep = (classes == PERSON_CLASS) & (scores >= self.conf) & \
                (area >= self.min_box_area * image.shape[0] * image.shape[1])
            order = np.argsort(-scores[keep], kind="stable")
            detections.append(Detections(xyxy[keep][order].astype(np.float32), scores[keep][order].astype(np.float32)))
        return detections


class SamBoxSegmenter:
    """One SAM image embedding per frame, then one mask per box prompt, all boxes in one decoder call."""

    def __init__(self, sam: torch.nn.Module, *, half: bool = False):
        from segment_anything import SamPredictor

        self.predictor = SamPredictor(sam)
        self.half = half and self.predictor.device.type == "cuda"

    def segment(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, H, W) bool masks and SAM's predicted IoU per box, for a BGR frame and (n, 4) xyxy boxes."""
        device = self.predictor.device
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        # float16, not charseg.device.Precision's bf16: segment_anything's decoder was released and checked
        # in fp16, and `half` in the label cache's fingerprint means exactly this (bf16 would change the
        # labels behind the cache's back).
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.half else contextlib.nullcontext()
        try:
            with torch.inference_mode(), autocast:
                self.predictor.set_image(rgb, image_format="RGB")
                prompts = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), device=device)
                prompts = self.predictor.transform.apply_boxes_torch(prompts, rgb.shape[:2])
                masks, iou, _ = self.predictor.predict_torch(None, None, boxes=prompts, multimask_output=False)
            return masks[:, 0].cpu().numpy(), iou[:, 0].float().cpu().numpy()
        finally:
            self.predictor.reset_image()  # the embedding is 4 MB per frame: do not keep it alive


def union_masks(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: a pixel is a person if any per-box mask says so."""
    masks = np.asarray(masks, dtype=bool)
    return masks.any(axis=0) if len(masks) else np.zeros(shape, dtype=bool)


@dataclass(frozen=True)
class FrameLabel:
    mask: np.ndarray        # (H, W) bool: union of the per-box SAM masks, before refinement
    boxes: np.ndarray       # (n, 4) float32 xyxy
    box_scores: np.ndarray  # (n,) detector confidence
    sam_scores: np.ndarray  # (n,) SAM's predicted IoU of each box's mask


class YoloSamLabeler:
    """Person boxes from a detector prompt a segmenter; the per-box masks are united.

    Detector and segmenter are built on first use (from the zero-argument factories), so a run served
    entirely by the label cache loads no weights. `settings` names everything that changes the labels
    (weights file hashes and params); its hash, `fingerprint`, keys the label cache.
    """

    def __init__(self, make_detector: Callable[[], Detector], make_segmenter: Callable[[], Segmenter],
                 settings: Mapping[str, Any]):
        self._make_detector, self._make_segmenter = make_detector, make_segmenter
        self._detector: Detector | None = None
        self._segmenter: Segmenter | None = None
        self.settings = dict(settings)
        self.fingerprint = label_fingerprint(self.settings)

    @property
    def detector(self) -> Detector:
        if self._detector is None:
            self._detector = self._make_detector()
        return self._detector

    @property
    def segmenter(self) -> Segmenter:
        if self._segmenter is None:
            self._segmenter = self._make_segmenter()
        return self._segmenter

    def label(self, images: Sequence[np.ndarray]) -> Iterator[FrameLabel]:
        """One label per BGR frame, in order, each yielded as soon as it is done (so a caller can cache
        it before SAM starts on the next frame): the detector sees the whole batch, SAM only frames
        with persons."""
        for image, found in zip(images, self.detector.detect(images)):
            shape = image.shape[:2]
            if len(found.boxes):
                masks, sam_scores = self.segmenter.segment(image, found.boxes)
                mask = union_masks(masks, shape)
            else:
                mask, sam_scores = np.zeros(shape, dtype=bool), np.zeros(0, dtype=np.float32)
            yield FrameLabel(mask, found.boxes, found.scores, np.asarray(sam_scores, dtype=np.float32))


    @classmethod
    def from_files(cls, detector: DetectorConfig, sam: SamConfig, *, device: str, half: bool) -> YoloSamLabeler:
        """Resolve (and, when online and absent, download) both weights files now, load them on first use."""
        torch_device = select_device(device, "params.yaml: labels.device")
        yolo_path = weights.resolve_yolo_weights(detector.weights)
        sam_path = weights.resolve_sam_checkpoint(sam.model_type, sam.checkpoint)
        use_half = half and torch_device.type == "cuda"
        settings = {"labeler": "yolo_sam", "yolo_weights": yolo_path.name, "yolo_sha256": file_sha256(yolo_path),
                    "conf": detector.conf, "min_box_area": detector.min_box_area, "imgsz": detector.imgsz,
                    "sam_model_type": sam.model_type, "sam_checkpoint": sam_path.name,
                    "sam_sha256": file_sha256(sam_path), "half": use_half}
        return cls(lambda: PersonDetector(weights.load_yolo(yolo_path), conf=detector.conf,
                                          min_box_area=detector.min_box_area, imgsz=detector.imgsz,
                                          device=torch_device, half=use_half),
                   lambda: SamBoxSegmenter(weights.load_sam(sam.model_type, sam_path, torch_device), half=use_half),
                   settings)


def label_fingerprint(settings: Mapping[str, Any]) -> str:
    """A stable hash of what changes the labels. The device is left out on purpose: CPU and GPU
    float32 differ only by rounding noise, and a cache filled on one should serve the other."""
    blob = json.dumps({"version": LABEL_CACHE_VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
