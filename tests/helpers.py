"""Tiny video and image makers shared by the tests."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

FOURCC = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "MJPG", ".mov": "mp4v"}


def write_video(path: Path, n_frames: int, fps: float, size: tuple[int, int] = (64, 48),
                color: bool = True, seed: int = 0) -> Path:
    """A short clip of noise with a moving square; size is (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*FOURCC[path.suffix.lower()]),
                             fps, (width, height), isColor=color)
    assert writer.isOpened(), f"cannot open writer for {path}"
    rng = np.random.default_rng(seed)
    for i in range(n_frames):
        frame = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        x = (i * 2) % max(1, width - 10)
        frame[10:20, x:x + 10] = 255
        writer.write(frame if color else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
    writer.release()
    return path


TINY_PSPNET = {"arch": "pspnet", "encoder": "resnet18", "encoder_weights": None, "psp_out_channels": 16}


def tiny_checkpoint(root: Path, img_size: int, cfg: dict = TINY_PSPNET, name: str = "pspnet") -> Path:
    """models/<name>/best.pt under root: a random-weight model of `cfg`, as train@<name> would save it."""
    import torch

    from charseg.layout import Layout
    from charseg.models import IMAGENET_MEAN, IMAGENET_STD, build_model, save_checkpoint

    torch.manual_seed(0)
    checkpoint = Layout(root).checkpoint(name)
    save_checkpoint(checkpoint, build_model(cfg, pretrained=False), model_name=name, cfg=cfg,
                    img_size=img_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, epoch=1, val_dice=0.0)
    return checkpoint
