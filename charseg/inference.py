"""Running a trained model on frames, shared by evaluate, predict and export.

A Segmenter maps a preprocessed batch to foreground probabilities at the model's img_size; it is a
PyTorch checkpoint (TorchSegmenter, here) or an ONNX file (stages/lib/onnx_model.OnnxSegmenter), and
both rebuild their preprocessing from the checkpoint metadata they carry, so callers never guess it.
Frames are resized exactly as in training (data.resize_image); probabilities are resized back to the
frame's own size (to_frame_size) *before* thresholding, so masks keep the frame's resolution and
edges are not the blocky upscale of an img_size mask.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

import cv2
import numpy as np
import torch

from charseg import models
from charseg.data import resize_image


def preprocess(images: Sequence[np.ndarray], meta: dict[str, Any]) -> np.ndarray:
    """RGB uint8 frames (any sizes) -> float32 (B, 3, S, S) batch, S = meta["img_size"], normalised
    with meta["mean"] / meta["std"] (0-1 scale, as stored in checkpoints)."""
    size = int(meta["img_size"])
    batch = np.stack([resize_image(image, size) for image in images]).astype(np.float32)
    mean = np.asarray(meta["mean"], np.float32) * 255
    std = np.asarray(meta["std"], np.float32) * 255
    return np.ascontiguousarray(((batch - mean) / std).transpose(0, 3, 1, 2))


class Segmenter(Protocol):
    """A model behind one call: preprocessed (B, 3, S, S) float32 -> probabilities (B, S, S) float32."""
    meta: dict[str, Any]  # checkpoint metadata: model_name, arch, encoder, img_size, mean, std, threshold, ...

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class TorchSegmenter:
    """A PyTorch model on one device, in eval mode, without autograd.

    amp: autocast on CUDA (bf16 where supported, else fp16), as in training; ignored on CPU, where
    autocast is slower than float32 for these convolutions. On CUDA the model runs channels-last,
    the layout cuDNN's fastest convolution kernels use.
    """

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], device: torch.device,
                 amp: bool = False) -> None:
        self.meta = meta
        self.device = device
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format).eval()
        self.amp_dtype = None
        if amp and device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    @classmethod
    def from_checkpoint(cls, path: str | Path, expect_arch: str | None = None,
                        device: torch.device = torch.device("cpu"), amp: bool = False,
                        model_name: str | None = None) -> TorchSegmenter:
        """Load models/<name>/best.pt; a missing file or another architecture is a CharsegError saying what to do
        (retraining only when `path` is model_name's train@ output: see models.load_checkpoint)."""
        model, meta = models.load_checkpoint(path, expect_arch=expect_arch, model_name=model_name,
                                             map_location=device)
        return cls(model, meta, device, amp)

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        inputs = torch.from_numpy(batch).to(self.device).contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
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
