"""Person masks for frames: YOLOv8 person boxes prompt SAM (weak labels), or masks the user brings.

Shared by the masks stage and prediction. Nothing here reads params.yaml: callers pass plain values,
and tests plant detections by handing `YoloSamLabeler` their own detector or segmenter.

Speed: SAM's image encoder dominates (about 9 s per frame for vit_b on 2 CPU cores), so it runs once
per frame, only on frames where YOLO found somebody, with all of the frame's boxes decoded in one
call. YOLO runs on batches of frames. On a GPU both run there, in half precision when asked.

Weights are plain files, shareable through the DVC remote (weights/README.md). YOLO weights come from
their local path, or from ultralytics' own download when online; the SAM checkpoint from its path, or
from Meta's official URL, checked against the published SHA-256, when online. Absent and offline, the
`resolve_*` functions stop before any work, saying where the file goes and what the alternatives are.
Labels are always made by what the caller asked for: there is no fallback to another labeler.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

from charseg.device import select_device
from charseg.errors import CharsegError
from charseg.io import file_sha256, imread, imwrite_atomic, read_json, write_json

# Ultralytics' experiment integrations stay off: its DVC callback starts a dvclive session and
# crashes outside its own training loop, and the others (and its analytics) would phone home.
ULTRALYTICS_SETTINGS = {"sync": False, "dvc": False, "clearml": False, "comet": False, "mlflow": False,
                        "raytune": False, "tensorboard": False, "wandb": False}

PERSON_CLASS = 0  # 'person' in COCO, the classes of the official YOLOv8 detection weights

# Bump when labelling code changes its output for the same weights and params: old cache entries
# then simply stop matching.
LABEL_CACHE_VERSION = 1


@dataclass(frozen=True)
class SamRelease:
    filename: str
    url: str
    sha256: str


# Meta's official checkpoints (github.com/facebookresearch/segment-anything, "Model Checkpoints").
SAM_RELEASES = {
    "vit_b": SamRelease("sam_vit_b_01ec64.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
                        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
    "vit_l": SamRelease("sam_vit_l_0b3195.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
                        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_h": SamRelease("sam_vit_h_4b8939.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
                        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
}


# ---------------------------------------------------------------------------------------------
# Weights: where they come from
# ---------------------------------------------------------------------------------------------

def is_offline() -> bool:
    """The project's offline switches (set by `make test` and CI): no download is even attempted."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("YOLO_OFFLINE", "HF_HUB_OFFLINE"))


def missing_weights_error(path: Path, what: str, source: str, reason: str) -> CharsegError:
    return CharsegError(
        f"{what} weights file {path} not found ({reason}). Either put the file at {path} (get {source} "
        f"on a machine with internet and copy it over), or, if your team shares weights through DVC, "
        f"`dvc pull {path}.dvc`, or label without weights: set labels.method: import and "
        f"labels.import_dir to a folder of your own masks. See weights/README.md")


def resolve_yolo_weights(path: str | Path) -> Path:
    """The local YOLO weights file; absent, ultralytics downloads an official one there when online."""
    path = Path(path)
    if path.is_file():
        return path
    source = f"'{path.name}' from https://github.com/ultralytics/assets/releases"
    if is_offline():
        raise missing_weights_error(path, "YOLO", source, "offline, so not downloaded")
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES, attempt_download_asset

    if path.name not in GITHUB_ASSETS_NAMES:
        raise missing_weights_error(path, "YOLO", f"your '{path.name}'", "not an official ultralytics file, so it "
                                    "cannot be downloaded")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        attempt_download_asset(str(path))
    except Exception as err:  # ultralytics raises several types for one condition: no download
        raise missing_weights_error(path, "YOLO", source, f"download failed: {err}") from err
    if not path.is_file():
        raise missing_weights_error(path, "YOLO", source, "download failed")
    return path


def check_model_type(model_type: str) -> SamRelease:
    if model_type not in SAM_RELEASES:
        raise CharsegError(f"params.yaml: labels.sam.model_type {model_type!r} is unknown: use one of "
                           f"{', '.join(SAM_RELEASES)} (with the matching labels.sam.checkpoint)")
    return SAM_RELEASES[model_type]


def resolve_sam_checkpoint(model_type: str, checkpoint: str | Path) -> Path:
    """The local SAM checkpoint; the official one is downloaded and SHA-256 checked when online and absent."""
    release = check_model_type(model_type)
    path = Path(checkpoint)
    official_type = {r.filename: t for t, r in SAM_RELEASES.items()}.get(path.name)
    if official_type not in (None, model_type):
        raise CharsegError(f"params.yaml: labels.sam.checkpoint {path} is the official {official_type} checkpoint "
                           f"but labels.sam.model_type is {model_type}: make them match")
    if path.is_file():
        return path
    source = f"{release.filename} from {release.url}"
    if path.name != release.filename:
        raise missing_weights_error(path, "SAM", source, f"and only the official {release.filename} is downloaded "
                                    f"automatically")
    if is_offline():
        raise missing_weights_error(path, "SAM", source, "offline, so not downloaded")
    try:
        download_verified(release.url, path, release.sha256)
    except (urllib.error.URLError, OSError) as err:
        raise missing_weights_error(path, "SAM", source, f"download failed: {err}") from err
    return path


def download_verified(url: str, path: Path, sha256: str) -> None:
    """Stream url into a temporary sibling and move it into place only if its SHA-256 matches."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {path.name}") as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        if digest.hexdigest() != sha256:
            raise CharsegError(f"download of {url} is corrupt (SHA-256 {digest.hexdigest()}, expected {sha256}): "
                               f"nothing was saved; try again, or download it yourself to {path}")
        os.replace(tmp_name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


# ---------------------------------------------------------------------------------------------
# Weights: loading
# ---------------------------------------------------------------------------------------------

def configure_ultralytics() -> None:
    from ultralytics.utils import SETTINGS

    changed = {key: value for key, value in ULTRALYTICS_SETTINGS.items() if SETTINGS.get(key) != value}
    if changed:
        SETTINGS.update(changed)


def load_yolo(path: str | Path) -> Any:
    """An ultralytics YOLO detection model from a local weights file (or a model .yaml: random weights)."""
    # The file is local, so ultralytics has nothing to fetch: without this, importing it probes the
    # network (a DNS lookup) to decide whether it is online.
    os.environ.setdefault("YOLO_OFFLINE", "1")
    configure_ultralytics()
    from ultralytics import YOLO

    path = Path(path)
    try:
        model = YOLO(str(path), task="detect")
    except Exception as err:  # ultralytics wraps damaged files in TypeError, RuntimeError, ...
        detail = str(err).strip()[:200]
        raise CharsegError(f"cannot load YOLO weights {path} ({type(err).__name__}: {detail}): the file is damaged "
                           f"or not a YOLO model; delete it and download it again (or dvc pull)") from err
    if model.task != "detect":
        raise CharsegError(f"YOLO weights {path} are a '{model.task}' model: labels.detector.weights needs a "
                           f"detection model such as yolov8s.pt")
    first_class = str(model.names.get(PERSON_CLASS, ""))
    # Models built from a .yaml name their classes '0', '1', ...: nothing to check there.
    if first_class != "person" and not first_class.isdigit():
        raise CharsegError(f"YOLO weights {path} call class {PERSON_CLASS} '{first_class}', not 'person': "
                           f"labels.detector.weights needs COCO-class weights such as yolov8s.pt")
    return model


def load_sam(model_type: str, checkpoint: str | Path | None, device: torch.device | str = "cpu") -> torch.nn.Module:
    """segment_anything's model for model_type with the checkpoint's weights (None: random weights)."""
    check_model_type(model_type)
    from segment_anything import sam_model_registry

    state = None
    if checkpoint is not None:  # read first: a damaged file fails before the model is built
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated zip, not a pickle, ...: one condition for the user
            raise CharsegError(f"cannot read SAM checkpoint {checkpoint} ({type(err).__name__}): the file is "
                               f"damaged; delete it and download it again (or dvc pull)") from err
    sam = sam_model_registry[model_type](checkpoint=None)
    if state is not None:
        try:
            sam.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as err:
            raise CharsegError(f"SAM checkpoint {checkpoint} does not fit labels.sam.model_type {model_type!r}: "
                               f"use the {SAM_RELEASES[model_type].filename} checkpoint, or set model_type to "
                               f"the one the file was made for") from err
    return sam.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Detection and segmentation
# ---------------------------------------------------------------------------------------------

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
    def from_files(cls, *, detector_weights: str | Path, conf: float, min_box_area: float, imgsz: int,
                   sam_model_type: str, sam_checkpoint: str | Path, device: str, half: bool) -> YoloSamLabeler:
        """Resolve (and, when online and absent, download) both weights files now, load them on first use."""
        torch_device = select_device(device, "params.yaml: labels.device")
        yolo_path = resolve_yolo_weights(detector_weights)
        sam_path = resolve_sam_checkpoint(sam_model_type, sam_checkpoint)
        use_half = half and torch_device.type == "cuda"
        settings = {"labeler": "yolo_sam", "yolo_weights": yolo_path.name, "yolo_sha256": file_sha256(yolo_path),
                    "conf": conf, "min_box_area": min_box_area, "imgsz": imgsz, "sam_model_type": sam_model_type,
                    "sam_checkpoint": sam_path.name, "sam_sha256": file_sha256(sam_path), "half": use_half}
        return cls(lambda: PersonDetector(load_yolo(yolo_path), conf=conf, min_box_area=min_box_area, imgsz=imgsz,
                                          device=torch_device, half=use_half),
                   lambda: SamBoxSegmenter(load_sam(sam_model_type, sam_path, torch_device), half=use_half),
                   settings)


def label_fingerprint(settings: Mapping[str, Any]) -> str:
    """A stable hash of what changes the labels. The device is left out on purpose: CPU and GPU
    float32 differ only by rounding noise, and a cache filled on one should serve the other."""
    blob = json.dumps({"version": LABEL_CACHE_VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Refinement
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RefineConfig:
    close_kernel: int = 0       # pixels; 0 or 1 = no closing
    open_kernel: int = 0        # pixels; 0 or 1 = no opening
    min_area: float = 0.0       # fraction of the frame area; smaller blobs are dropped
    max_hole_area: float = 0.0  # fraction of the frame area; smaller holes are filled (1 = every hole)


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


# ---------------------------------------------------------------------------------------------
# Label cache
# ---------------------------------------------------------------------------------------------

class LabelCache:
    """Content-addressed FrameLabels: `<root>/<key[:2]>/<key>.json` (+ `.png`, the raw union mask).

    The key hashes the frame's bytes with the labeler's fingerprint, so a frame already labelled
    with the same weights and params is never sent to SAM again, whichever video or run it comes
    from; refinement is applied after the cache, so changing labels.refine costs no SAM time either.
    Each file is written atomically and the JSON last: an interrupted run leaves only whole entries.
    """

    def __init__(self, root: str | Path, fingerprint: str):
        self.root, self.fingerprint = Path(root), fingerprint

    def key(self, frame_bytes: bytes) -> str:
        return hashlib.sha256(self.fingerprint.encode("ascii") + hashlib.sha256(frame_bytes).digest()).hexdigest()

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.root / key[:2]
        return folder / f"{key}.json", folder / f"{key}.png"

    def get(self, key: str) -> FrameLabel | None:
        meta_path, mask_path = self._paths(key)
        if not meta_path.is_file():
            return None
        try:
            meta = read_json(meta_path)
            shape = (int(meta["height"]), int(meta["width"]))
            if meta["has_mask"]:
                mask = imread(mask_path, cv2.IMREAD_GRAYSCALE) > 0
                if mask.shape != shape:
                    return None
            else:
                mask = np.zeros(shape, dtype=bool)
            return FrameLabel(mask, np.asarray(meta["boxes"], dtype=np.float32).reshape(-1, 4),
                              np.asarray(meta["box_scores"], dtype=np.float32),
                              np.asarray(meta["sam_scores"], dtype=np.float32))
        except (CharsegError, ValueError, KeyError, TypeError):
            return None  # an unreadable entry is a miss: the frame is labelled again and the entry rewritten

    def put(self, key: str, label: FrameLabel) -> None:
        meta_path, mask_path = self._paths(key)
        has_mask = bool(label.mask.any())
        if has_mask:
            imwrite_atomic(mask_path, label.mask.astype(np.uint8) * 255)
        write_json(meta_path, {"height": label.mask.shape[0], "width": label.mask.shape[1], "has_mask": has_mask,
                               "boxes": label.boxes.tolist(), "box_scores": label.box_scores.tolist(),
                               "sam_scores": label.sam_scores.tolist()})


# ---------------------------------------------------------------------------------------------
# Masks the user brings (and exact masks for QA)
# ---------------------------------------------------------------------------------------------

class MaskMismatch(CharsegError):
    """One mask that cannot be used as given (missing, wrong size, not binary)."""


# A frame whose grey levels vary less than this (std, 0-255) shows nothing: an empty mask fits it.
# The same default as eda.uniform_std, the EDA stage's "near-uniform" flag.
UNIFORM_STD = 8.0


def is_uniform(image: np.ndarray) -> bool:
    """Whether a frame (grey or BGR) is a near-uniform field (black, a fade, a title card's background)."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2GRAY)
    return float(grey.std()) < UNIFORM_STD


def mask_files(folder: str | Path, index_name: str, frames: Sequence[Mapping[str, str]],
               *, key: str = "labels.import_dir") -> dict[str, Path]:
    """The mask file of each frame id that has one.

    Through `<folder>/<index_name>` when that CSV exists (a `mask` column, path relative to the
    folder, and either an `id` column or `video,frame_index` as in the frames manifest), else
    `<folder>/<frame id>.png` (whether or not that file exists). Frames the index does not list are
    absent from the result; a frame the index lists twice with different masks is an error. `key`:
    the params key that named the folder, for the messages.
    """
    folder = Path(folder)
    if folder.is_file():
        raise CharsegError(f"params.yaml: {key} {folder} is a file, not a folder: put the masks in a folder "
                           f"(<frame id>.png, or listed in {index_name or 'an index CSV'}) and point {key} at it")
    if not folder.is_dir():
        raise CharsegError(f"mask folder {folder} not found: check {key} in params.yaml")
    index_path = folder / index_name if index_name else None
    if index_path is None or not index_path.is_file():
        return {row["id"]: folder / f"{row['id']}.png" for row in frames}
    with open(index_path, newline="", encoding="utf-8") as fh:
        index = list(csv.DictReader(fh))
    columns = set(index[0]) if index else set()
    if "mask" in columns and "id" in columns:
        by_id = _one_mask_each(index_path, index, lambda row: row["id"])
        found = {row["id"]: by_id.get(row["id"]) for row in frames}
    elif {"mask", "video", "frame_index"} <= columns:
        try:
            by_key = _one_mask_each(index_path, index, lambda row: (row["video"], int(row["frame_index"])))
            found = {row["id"]: by_key.get((row["video"], int(row["frame_index"]))) for row in frames}
        except ValueError as err:
            raise CharsegError(f"{index_path}: frame_index must be whole numbers ({err})") from None
    else:
        raise CharsegError(f"{index_path} needs a 'mask' column and either 'id' or 'video,frame_index' "
                           f"(it has: {', '.join(sorted(columns)) or 'nothing'}); fix it or remove it to look "
                           f"masks up as <frame id>.png")
    return {frame_id: folder / rel for frame_id, rel in found.items() if rel}


def _one_mask_each(index_path: Path, index: list[dict[str, str]], frame_of: Callable[[dict], Any]) -> dict[Any, str]:
    """frame -> mask of the index rows; one frame listed with two different masks is refused (which
    one is the person would be a guess), the same row repeated is harmless."""
    masks: dict[Any, str] = {}
    for line, row in enumerate(index, start=2):
        frame = frame_of(row)
        if frame in masks and masks[frame] != row["mask"]:
            shown = frame if isinstance(frame, str) else f"{frame[0]} frame_index {frame[1]}"
            raise CharsegError(f"{index_path} lists {shown} twice with different masks ({masks[frame]} and "
                               f"{row['mask']}, line {line}): keep one row per frame")
        masks[frame] = row["mask"]
    return masks


def read_binary_mask(path: str | Path, size: tuple[int, int] | None, *, key: str = "labels.import_dir") -> np.ndarray:
    """A user mask as 0/255 uint8 of size (height, width) (None: any size). Accepts 0/1 or 0/255 (or
    0/65535) values, single-channel or with identical colour channels, or, when the colour channels
    are flat and only the alpha channel varies, the alpha channel (a person painted only as opacity);
    anything else raises MaskMismatch. `key`: the params key of the folder the user's masks are in."""
    path = Path(path)
    if not path.is_file():
        raise MaskMismatch(f"missing mask {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise MaskMismatch(f"cannot read your mask file {path} in {key} ({err.strerror or err}): "
                           f"check its permissions") from None
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if raw is None:
        raise MaskMismatch(f"your mask file {path} in {key} is unreadable (empty or corrupt, not an image): "
                           f"replace it with a valid 0/255 PNG")
    if raw.ndim == 3:
        colour = raw[..., :3]
        flat = all(colour[..., c].min() == colour[..., c].max() for c in range(colour.shape[-1]))
        if raw.shape[-1] == 4 and flat and raw[..., 3].min() != raw[..., 3].max():
            raw = raw[..., 3]  # the alpha channel is the only one that varies: it is the mask
        elif colour.shape[-1] == 3 and not (np.array_equal(colour[..., 0], colour[..., 1])
                                            and np.array_equal(colour[..., 0], colour[..., 2])):
            raise MaskMismatch(f"{path} is a colour image: a mask must be single-channel 0/255 (or 0/1)")
        else:
            raw = colour[..., 0]
    if size is not None and raw.shape != tuple(size):
        raise MaskMismatch(f"{path} is {raw.shape[1]}x{raw.shape[0]} but its frame is {size[1]}x{size[0]}")
    values = np.unique(raw)
    for on in (1, 255, 65535):
        if set(values.tolist()) <= {0, on}:
            return (raw == on).astype(np.uint8) * 255
    shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
    raise MaskMismatch(f"{path} is not binary (values {shown}): a mask must hold only 0/1 or 0/255")
