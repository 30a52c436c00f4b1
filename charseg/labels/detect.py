"""Person labels of the masks stage: YOLO person boxes prompt a SAM-family model (labels.method
yolo_sam), or a YOLO segmentation model's own person masks (yolo_seg); `build_labeler` makes either.

Speed: the SAM image encoder dominates (about 9 s per frame for vit_b on 2 CPU cores, ~1.3 s for
MobileSAM, less again in onnxruntime: labels.sam.runtime onnx), so it runs once per frame, only on
frames where YOLO found somebody, with all of the frame's boxes decoded in one call. YOLO runs on
batches of frames. On a GPU both run there, in half precision when asked.

Nothing here reads params.yaml: callers pass typed config, and tests plant detections by handing
`YoloSamLabeler` their own detector or segmenter. Labels are always made by what the caller asked
for: there is no fallback to another labeler.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import cv2
import numpy as np
import torch

from charseg.config import SAM_IMAGE_SIZE, LabelsConfig, SamConfig
from charseg.device import ort_providers, select_device
from charseg.errors import CharsegError
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
    """YOLO person boxes for a batch of BGR frames (any sizes) in one predict call. The person class is
    found by name in the model's classes (any COCO-trained YOLOv8/YOLO11/YOLO26 detection or segmentation
    weights); `segment_persons` also returns a segmentation model's person masks."""

    def __init__(self, model: Any, *, conf: float, min_box_area: float, imgsz: int = 640,
                 device: torch.device | str = "cpu", half: bool = False, source: str = "labels.detector.weights"):
        self.model = model
        self.conf, self.min_box_area, self.imgsz = conf, min_box_area, imgsz
        self.device = torch.device(device)
        self.half = half and self.device.type == "cuda"
        names = getattr(model, "names", None)
        self.person_class = weights.person_class(names, source) if names else PERSON_CLASS

    def _predict(self, images: Sequence[np.ndarray], **extra: Any) -> list[Any]:
        # Ultralytics' device selection sets torch's CPU threads to cpu_count - 1 for the whole process (1 on a
        # 2-core box), which then halves SAM's speed: give the rest of the stage its threads back.
        threads = torch.get_num_threads()
        try:
            # quantize=16 is ultralytics 8.4's name for half precision (`half` is deprecated there).
            return self.model.predict(list(images), conf=self.conf, classes=[self.person_class], imgsz=self.imgsz,
                                      device=str(self.device), quantize=16 if self.half else None, verbose=False,
                                      **extra)
        finally:
            torch.set_num_threads(threads)

    def _kept(self, image: np.ndarray, result: Any) -> tuple[np.ndarray, Detections]:
        """Indices of the result's confident, big-enough persons, best first, and their Detections."""
        boxes = result.boxes
        xyxy = boxes.xyxy.float().cpu().numpy().reshape(-1, 4)
        scores = boxes.conf.float().cpu().numpy().reshape(-1)
        classes = boxes.cls.cpu().numpy().reshape(-1)
        area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
        keep = np.flatnonzero((classes == self.person_class) & (scores >= self.conf) &
                              (area >= self.min_box_area * image.shape[0] * image.shape[1]))
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        return keep, Detections(xyxy[keep].astype(np.float32), scores[keep].astype(np.float32))

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        if not images:
            return []
        return [self._kept(image, result)[1] for image, result in zip(images, self._predict(images))]

    def segment_persons(self, images: Sequence[np.ndarray]) -> list[tuple[Detections, np.ndarray]]:
        """Each frame's kept persons and their (n, H, W) bool instance masks at the frame's size."""
        if not images:
            return []
        found = []
        for image, result in zip(images, self._predict(images, retina_masks=True)):
            keep, detections = self._kept(image, result)
            shape = image.shape[:2]
            if result.masks is None or not len(keep):
                masks = np.zeros((0, *shape), dtype=bool)
            else:
                masks = result.masks.data[torch.as_tensor(keep)].float().cpu().numpy() > 0.5
                if masks.shape[1:] != shape:  # retina masks are at the frame's size already; be sure
                    masks = np.stack([cv2.resize(m.astype(np.uint8), shape[::-1], interpolation=cv2.INTER_NEAREST)
                                      for m in masks]).astype(bool)
            found.append((detections, masks))
        return found


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


def instance_map(masks: np.ndarray, boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint16: pixel value k is the person of box k-1 (0 = nobody); its non-zero pixels are exactly
    union_masks. Where two masks overlap, the box whose bottom edge is lower wins: in a TV frame the person
    standing nearer the camera (lower feet) is the one in front."""
    ids = np.zeros(shape, dtype=np.uint16)
    masks = np.asarray(masks, dtype=bool)
    for index in np.argsort(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)[:, 3], kind="stable"):
        ids[masks[index]] = index + 1
    return ids


@dataclass(frozen=True)
class FrameLabel:
    instances: np.ndarray   # (H, W) uint16 before refinement: k = the person of boxes[k-1], 0 = nobody
    boxes: np.ndarray       # (n, 4) float32 xyxy
    box_scores: np.ndarray  # (n,) detector confidence
    sam_scores: np.ndarray  # (n,) SAM's predicted IoU of each box's mask; empty when no SAM ran (yolo_seg)

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool: the union of the persons, what the person task trains on."""
        return np.asarray(self.instances) > 0


class _Lazy:
    """A value built on first use from a zero-argument factory, so that a run served entirely by the
    label cache loads no weights."""

    def __init__(self, make: Callable[[], Any]):
        self._make, self._value = make, None

    def get(self) -> Any:
        if self._value is None:
            self._value = self._make()
        return self._value


class YoloSamLabeler:
    """Person boxes from a detector prompt a segmenter; the per-box masks are united.

    Detector and segmenter are built on first use (from the zero-argument factories). `settings` names
    everything that changes the labels (weights file hashes and params); its hash, `fingerprint`, keys
    the label cache.
    """

    def __init__(self, make_detector: Callable[[], Detector], make_segmenter: Callable[[], Segmenter],
                 settings: Mapping[str, Any]):
        self._detector, self._segmenter = _Lazy(make_detector), _Lazy(make_segmenter)
        self.settings = dict(settings)
        self.fingerprint = label_fingerprint(self.settings)

    @property
    def detector(self) -> Detector:
        return self._detector.get()

    @property
    def segmenter(self) -> Segmenter:
        return self._segmenter.get()

    def label(self, images: Sequence[np.ndarray]) -> Iterator[FrameLabel]:
        """One label per BGR frame, in order, each yielded as soon as it is done (so a caller can cache
        it before SAM starts on the next frame): the detector sees the whole batch, SAM only frames
        with persons."""
        for image, found in zip(images, self.detector.detect(images)):
            shape = image.shape[:2]
            if len(found.boxes):
                masks, sam_scores = self.segmenter.segment(image, found.boxes)
                ids = instance_map(masks, found.boxes, shape)
            else:
                ids, sam_scores = np.zeros(shape, dtype=np.uint16), np.zeros(0, dtype=np.float32)
            yield FrameLabel(ids, found.boxes, found.scores, np.asarray(sam_scores, dtype=np.float32))


class YoloSegLabeler:
    """A YOLO segmentation model's person instance masks, united (labels.method yolo_seg): no SAM, one
    predict call per batch, the fastest labeller. Same `settings`/`fingerprint` contract as YoloSamLabeler."""

    def __init__(self, make_model: Callable[[], PersonDetector], settings: Mapping[str, Any]):
        self._model = _Lazy(make_model)
        self.settings = dict(settings)
        self.fingerprint = label_fingerprint(self.settings)

    def label(self, images: Sequence[np.ndarray]) -> Iterator[FrameLabel]:
        for image, (found, masks) in zip(images, self._model.get().segment_persons(images)):
            yield FrameLabel(instance_map(masks, found.boxes, image.shape[:2]), found.boxes, found.scores,
                             np.zeros(0, np.float32))


def build_labeler(cfg: LabelsConfig, *, device: str | None = None) -> YoloSamLabeler | YoloSegLabeler:
    """The labeler labels.method asks for, for the masks stage and its workers alike: weights files are
    resolved (and, online and absent, downloaded) now, so absent ones stop the run before any work; models
    load on first use. `device` overrides cfg.device (a worker pinned to cuda:N)."""
    if cfg.method not in ("yolo_sam", "yolo_seg"):
        raise CharsegError(f"labels.method {cfg.method!r} makes no labels with models: use yolo_sam or yolo_seg")
    setting = "params.yaml: labels.device"
    torch_device = select_device(device or cfg.device, setting)
    half = cfg.half and torch_device.type == "cuda"
    det = cfg.detector
    yolo_path = weights.resolve_yolo_weights(det.weights)
    segmentation = cfg.method == "yolo_seg"

    def make_detector() -> PersonDetector:
        return PersonDetector(weights.load_yolo(yolo_path, segmentation=segmentation), conf=det.conf,
                              min_box_area=det.min_box_area, imgsz=det.imgsz, device=torch_device, half=half,
                              source=str(yolo_path))

    settings: dict[str, Any] = {"labeler": cfg.method, "yolo_weights": yolo_path.name,
                                "yolo_sha256": file_sha256(yolo_path), "conf": det.conf,
                                "min_box_area": det.min_box_area, "imgsz": det.imgsz}
    if segmentation:
        return YoloSegLabeler(make_detector, {**settings, "half": half})

    backend = check_sam_config(cfg.sam)
    sam_path = weights.resolve_sam_weights(cfg.sam.model, cfg.sam.checkpoint)
    sam_sha256 = file_sha256(sam_path)
    size = cfg.sam.image_size
    # The runtime and the input size are named only when they are not the defaults, so label caches from before
    # either existed serve on: torch at 1024 runs exactly the code that filled them.
    runtime = {"sam_runtime": cfg.sam.runtime} if cfg.sam.runtime != "torch" else {}
    image_size = {"sam_image_size": size} if size != SAM_IMAGE_SIZE else {}
    settings = {**settings, "sam_model_type": backend, "sam_checkpoint": sam_path.name, "sam_sha256": sam_sha256,
                **runtime, **image_size, "half": half}
    # An export's input size is fixed: one file per size, so two sizes never load each other's encoder.
    encoder_onnx = cfg.cache_dir / "encoders" / f"{sam_sha256}-{backend}-{size}.onnx" if runtime else None
    providers = ort_providers(str(torch_device), setting)
    return YoloSamLabeler(make_detector,
                          lambda: make_segmenter(backend, sam_path, torch_device, half, encoder_onnx, providers, size),
                          settings)


def check_sam_config(sam: SamConfig) -> str:
    """The backend labels.sam.model names, once the runtime and image size are known to work with it."""
    backend = weights.sam_backend(sam.model)
    if sam.runtime == "onnx" and weights.is_sam2(backend):
        raise CharsegError(f"params.yaml: labels.sam.runtime onnx runs single-tensor image encoders (vit_*, "
                           f"MobileSAM, SAM), not {backend}'s multi-scale one: use runtime torch for SAM 2")
    if backend in weights.SAM_RELEASES and sam.image_size != SAM_IMAGE_SIZE:
        twin = f"sam_{backend[-1]}.pt"  # ultralytics' build of the same checkpoint: vit_b -> sam_b.pt
        raise CharsegError(f"params.yaml: labels.sam.image_size {sam.image_size} needs an ultralytics SAM-family "
                           f"model: segment-anything's {backend} encodes {SAM_IMAGE_SIZE}^2 only. For the same "
                           f"{backend} at {sam.image_size} set labels.sam.model: {twin} (ultralytics' build of it, "
                           f"see weights/README.md), or mobile_sam.pt; or set labels.sam.image_size: "
                           f"{SAM_IMAGE_SIZE}")
    return backend


def make_segmenter(backend: str, path: Path, device: torch.device, half: bool, encoder_onnx: Path | None,
                   providers: list[Any] | None, image_size: int = SAM_IMAGE_SIZE) -> Segmenter:
    """The box-prompted segmenter of a SAM backend at `image_size` (vit_*: 1024 only, as check_sam_config
    made sure), its image encoder on onnxruntime when `encoder_onnx` (the cached export's path) is given."""
    from charseg.labels.encoder_onnx import onnx_image_encoder
    from charseg.labels.sam_family import UltralyticsSamSegmenter

    ultralytics = backend not in weights.SAM_RELEASES
    sam = weights.load_ultralytics_sam(path, backend) if ultralytics else weights.load_sam(backend, path)
    if ultralytics:
        # Before any export: MobileSAM's TinyViT reshapes by its layers' resolutions, which set_imgsz sets (the
        # predictor sets it again before each frame, to the same size).
        sam.set_imgsz([image_size, image_size])
    if encoder_onnx is not None:
        sam.image_encoder = onnx_image_encoder(sam.image_encoder, encoder_onnx, providers)
    if not ultralytics:
        return SamBoxSegmenter(sam.to(device), half=half)
    return UltralyticsSamSegmenter(sam, backend, image_size=image_size, device=device, half=half)


def label_fingerprint(settings: Mapping[str, Any]) -> str:
    """A stable hash of what changes the labels. The device is left out on purpose: CPU and GPU
    float32 differ only by rounding noise, and a cache filled on one should serve the other."""
    blob = json.dumps({"version": LABEL_CACHE_VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
