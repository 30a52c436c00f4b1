"""The tiny training set-up shared by the training tests: a fast config and the run's folders."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from charseg.config import AugmentConfig, TrainConfig
from charseg.layout import FramesDir, IdentityDir, MasksDir
from charseg.train import TrainPaths


def train_config(**changes) -> TrainConfig:
    """Two short epochs of 64 px batches on the CPU, loaders in-process; `changes` replace fields."""
    base = TrainConfig(lr=3e-3, weight_decay=1e-4, epochs=2, batch_size=8, img_size=64, seed=0,
                       warmup_epochs=0.5, min_lr_ratio=0.01, patience=0, workers=0, amp=True,
                       augment=AugmentConfig(hflip=0.5, scale=0.1, shift=0.05, color=0.2))
    return dataclasses.replace(base, **changes)


def train_paths(data: Path, run: Path) -> TrainPaths:
    """Stage folders under `data` (split.json, frames/, masks/, identity/), outputs under `run`."""
    return TrainPaths(split=data / "split.json", frames=FramesDir(data / "frames"), masks=MasksDir(data / "masks"),
                      identity=IdentityDir(data / "identity"), models=run / "models", live=run / "dvclive",
                      cache=run / ".cache")
