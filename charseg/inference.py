"""Running a trained model on frames, shared by evaluate, predict and export.

A Segmenter maps a preprocessed batch to probabilities at the model's img_size (person task: the
foreground probability (B, S, S), sigmoid; characters task: one channel per class (B, C, S, S), softmax,
charseg.task); it is a
PyTorch checkpoint (TorchSegmenter, here) or an ONNX file (charseg.onnx.OnnxSegmenter), and both
rebuild their preprocessing from the checkpoint metadata they carry, so callers never guess it.
Frames are resized (data.resize_image) and normalised (data.normalize) exactly as in training;
probabilities are resized back to the frame's own size (to_frame_size) *before* thresholding, so
masks keep the frame's resolution and edges are not the blocky upscale of an img_size mask.
`class_ids` is the one place where probabilities become classes (person: above the threshold; characters:
the most probable class), for evaluate and predict alike.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

import cv2
import numpy as np
import torch

from charseg import models
from charseg.config import PARAMS_FILE, load_config
from charseg.data import normalize, resize_image
from charseg.device import Precision
from charseg.task import PERSON, Task, class_map, person_task, probabilities, task_of_checkpoint


def preprocess(images: Sequence[np.ndarray], meta: dict[str, Any]) -> np.ndarray:
    """RGB uint8 frames (any sizes) -> float32 (B, 3, S, S) batch, S = meta["img_size"], normalised
    with meta["mean"] / meta["std"] (0-1 scale, as stored in checkpoints) by data.normalize, as in training."""
    size = int(meta["img_size"])
    batch = np.stack([resize_image(image, size) for image in images]).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(normalize(batch, meta["mean"], meta["std"]), dtype=np.float32)


def configured_arch(name: str | None, params_file: str | Path | None = None) -> str | None:
    """params.yaml's arch for model `name`, to check a checkpoint or ONNX file against; None (no check) without
    a name, or without a params file (params_file None: ./params.yaml when there is one: the checkpoint and the
    ONNX metadata record their arch, so predict and export run anywhere). A name the file does not define is an
    error listing the ones it does."""
    if name is None:
        return None
    if params_file is None:
        if not PARAMS_FILE.is_file():
            return None
        params_file = PARAMS_FILE
    return load_config(params_file).model_config(name).arch


class Segmenter(Protocol):
    """A model behind one call: preprocessed (B, 3, S, S) float32 -> probabilities float32, (B, S, S) for the
    person task, (B, C, S, S) for the characters task (see segmenter_task)."""
    meta: dict[str, Any]  # checkpoint metadata: model_name, arch, encoder, img_size, mean, std, threshold, task, ...

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def segmenter_task(segmenter: Segmenter) -> Task:
    """The task a segmenter's model was trained for, from its metadata (none recorded: the person task)."""
    return task_of_checkpoint(segmenter.meta)


def logits_to_probabilities(task: Task, logits: torch.Tensor) -> np.ndarray:
    """(B, C, S, S) model output -> what a Segmenter returns: person (B, S, S) sigmoid, characters (B, C, S, S)
    softmax (charseg.task.probabilities), float32 on the CPU."""
    probs = probabilities(task, logits.float())
    return (probs[:, 0] if task.name == PERSON else probs).cpu().numpy()


class TorchSegmenter:
    """A PyTorch model on one device, in eval mode, without autograd, at the device's Precision
    (charseg.device: with amp, autocast on CUDA as in training; channels-last on CUDA)."""

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], device: torch.device,
                 amp: bool = False) -> None:
        self.meta = meta
        self.task = task_of_checkpoint(meta)
        self.device = device
        self.precision = Precision.for_device(device, amp)
        self.model = model.to(device, memory_format=self.precision.memory_format).eval()

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return self.precision.amp_dtype

    @classmethod
    def from_checkpoint(cls, path: str | Path, expect_arch: str | None = None,
                        device: torch.device = torch.device("cpu"), amp: bool = False,
                        model_name: str | None = None) -> TorchSegmenter:
        """Load a checkpoint (models/<name>/best.pt or any other); a missing file or another architecture than
        `expect_arch` is a CharsegError saying what to do (retraining only when `path` is model_name's train@
        output: see models.load_checkpoint)."""
        model, meta = models.load_checkpoint(path, expect_arch=expect_arch, model_name=model_name,
                                             map_location=device)
        return cls(model, meta, device, amp)

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        inputs = torch.from_numpy(batch).to(self.device).contiguous(memory_format=self.precision.memory_format)
        with self.precision.autocast():
            logits = self.model(inputs)
        return logits_to_probabilities(self.task, logits)


def to_frame_size(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (S, S) probability map, or of each channel of a (C, S, S) one, to the frame's
    (H, W); threshold or argmax only after this."""
    height, width = size
    probs = np.asarray(probs, np.float32)
    if probs.ndim == 2:
        return cv2.resize(probs, (width, height), interpolation=cv2.INTER_LINEAR)
    # cv2 resizes all channels in one call when they are last (up to 512 of them; classes are at most 256).
    resized = cv2.resize(np.ascontiguousarray(probs.transpose(1, 2, 0)), (width, height),
                         interpolation=cv2.INTER_LINEAR)
    return resized.reshape(height, width, -1).transpose(2, 0, 1)


def predict_proba(segmenter: Segmenter, image: np.ndarray) -> np.ndarray:
    """Probabilities of one RGB frame at the frame's own size: (H, W) foreground (person), (C, H, W) per class."""
    return to_frame_size(segmenter(preprocess([image], segmenter.meta))[0], image.shape[:2])


def binary_mask(probs: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 0/255 mask of probabilities strictly above the threshold (0 -> everything, 1 -> nothing)."""
    return class_ids(person_task(), probs, threshold) * np.uint8(255)


def class_ids(task: Task, probs: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 (H, W) class ids of one frame's probabilities (as predict_proba gives them): person 1 where the
    probability is strictly above `threshold`, else 0; characters the most probable class (task.class_map:
    softmax keeps the order of the logits, so its argmax is theirs; `threshold` does not apply)."""
    if task.name == PERSON:
        return (probs > threshold).view(np.uint8)
    return class_map(task, torch.from_numpy(np.ascontiguousarray(probs))[None])[0].numpy().astype(np.uint8)


class Smoother:
    """Exponential moving average of probabilities over consecutive inferred frames; alpha is the newest
    frame's weight (None: off). Averaging before the threshold stops edge pixels near it from flipping
    every frame; a small alpha also makes the mask lag behind fast motion. Applied at img_size, before
    to_frame_size: cheaper, and the same result, since bilinear resizing is linear."""

    def __init__(self, alpha: float | None) -> None:
        self.alpha = alpha
        self.state: np.ndarray | None = None

    def __call__(self, probs: np.ndarray) -> np.ndarray:
        if self.alpha is not None:
            self.state = probs if self.state is None else self.alpha * probs + (1 - self.alpha) * self.state
            return self.state
        return probs


def infer_class_maps(segmenter: Segmenter, batch: np.ndarray, sizes: Sequence[tuple[int, int]], threshold: float,
                     smoother: Smoother | None = None) -> list[np.ndarray]:
    """One model call on a preprocessed batch -> uint8 class ids (class_ids) per frame at that frame's (H, W)."""
    task = segmenter_task(segmenter)
    smooth = smoother or (lambda probs: probs)
    return [class_ids(task, to_frame_size(smooth(p), size), threshold) for p, size in zip(segmenter(batch), sizes)]


def infer_masks(segmenter: Segmenter, batch: np.ndarray, sizes: Sequence[tuple[int, int]], threshold: float,
                smoother: Smoother | None = None) -> list[np.ndarray]:
    """A person-task model on a preprocessed batch -> a 0/255 mask per frame at that frame's (H, W)."""
    return [ids * np.uint8(255) for ids in infer_class_maps(segmenter, batch, sizes, threshold, smoother)]
