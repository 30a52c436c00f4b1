"""Running a trained model on frames, shared by evaluate, predict and export.

A Segmenter maps a preprocessed batch to foreground probabilities at the model's img_size; it is a
PyTorch checkpoint (TorchSegmenter, here) or an ONNX file (charseg.onnx.OnnxSegmenter), and both
rebuild their preprocessing from the checkpoint metadata they carry, so callers never guess it.
Frames are resized (data.resize_image) and normalised (data.normalize) exactly as in training;
probabilities are resized back to the frame's own size (to_frame_size) *before* thresholding, so
masks keep the frame's resolution and edges are not the blocky upscale of an img_size mask.
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
    """A model behind one call: preprocessed (B, 3, S, S) float32 -> probabilities (B, S, S) float32."""
    meta: dict[str, Any]  # checkpoint metadata: model_name, arch, encoder, img_size, mean, std, threshold, ...

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class TorchSegmenter:
    """A PyTorch model on one device, in eval mode, without autograd, at the device's Precision
    (charseg.device: with amp, autocast on CUDA as in training; channels-last on CUDA)."""

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], device: torch.device,
                 amp: bool = False) -> None:
        self.meta = meta
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
        return torch.sigmoid(logits.float())[:, 0].cpu().numpy()


def to_frame_size(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (S, S) probability map to the frame's (H, W); threshold only after this."""
    height, width = size
    return cv2.resize(np.asarray(probs, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def predict_proba(segmenter: Segmenter, image: np.ndarray) -> np.ndarray:
    """Foreground probability (H, W) of one RGB frame, at the frame's own size."""
    return to_frame_size(segmenter(preprocess([image], segmenter.meta))[0], image.shape[:2])


def binary_mask(probs: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 0/255 mask of probabilities strictly above the threshold (0 -> everything, 1 -> nothing)."""
    return (probs > threshold).view(np.uint8) * np.uint8(255)


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


def infer_masks(segmenter: Segmenter, batch: np.ndarray, sizes: Sequence[tuple[int, int]], threshold: float,
                smoother: Smoother | None = None) -> list[np.ndarray]:
    """One model call on a preprocessed batch -> a 0/255 mask per frame at that frame's (H, W)."""
    smooth = smoother or (lambda probs: probs)
    return [binary_mask(to_frame_size(smooth(p), size), threshold) for p, size in zip(segmenter(batch), sizes)]
