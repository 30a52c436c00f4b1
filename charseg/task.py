"""What a model segments: the `task` param's two tasks, their classes, outputs, loss and colours.

person: one binary person mask, as charseg always did: 1 logit channel, sigmoid, Dice loss.
characters: background (id 0), each named character (the identity stage's classes.json, sorted folder
names), then `other` (any person who is none of them, last): len(classes) logit channels, softmax,
multi-class Dice + class-weighted cross entropy. Class ids are indices in `classes` everywhere: the
identity stage's class-id PNGs, the training targets, the argmax of a model and the evaluation's confusion.
"""
from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn

from charseg.config import TASKS
from charseg.errors import CharsegError, require
from charseg.io import read_json
from charseg.layout import BACKGROUND, OTHER

PERSON, CHARACTERS = TASKS
PERSON_CLASS = "person"
THRESHOLD = 0.5  # person task: a pixel is person when sigmoid(logit) > THRESHOLD


@dataclass(frozen=True)
class Task:
    """A task and its classes; class id = index in `classes`, background is 0."""
    name: str
    classes: tuple[str, ...]

    @property
    def outputs(self) -> int:
        """Model output channels: 1 for person (sigmoid), one per class for characters (softmax)."""
        return 1 if self.name == PERSON else len(self.classes)

    @property
    def characters(self) -> tuple[str, ...]:
        """The named character classes (not background, not other); () for the person task."""
        return self.classes[1:-1] if self.name == CHARACTERS else ()

    @property
    def character_ids(self) -> list[int]:
        """Class ids of `characters`: what the characters task's mIoU averages over."""
        return list(range(1, len(self.classes) - 1)) if self.name == CHARACTERS else []


def person_task() -> Task:
    return Task(PERSON, (BACKGROUND, PERSON_CLASS))


def characters_task(classes: Sequence[str]) -> Task:
    """The characters task of a class list: background first, other last, unique names in between."""
    classes = tuple(str(c) for c in classes)
    require(len(classes) >= 2 and classes[0] == BACKGROUND and classes[-1] == OTHER,
            f"the characters task's classes must start with '{BACKGROUND}' and end with '{OTHER}', got "
            f"{list(classes)}: re-run the identity stage (dvc repro identity)")
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    require(not duplicates, f"the characters task's classes name {duplicates} more than once: "
                            f"re-run the identity stage (dvc repro identity)")
    require(len(classes) <= 256, f"{len(classes)} classes do not fit the uint8 class-id PNGs (at most 254 characters)")
    return Task(CHARACTERS, classes)


def read_classes(path: str | Path) -> Task:
    """The characters task of an identity stage's classes.json ({"classes": [...], "not_found": [...]})."""
    path = Path(path)
    if not path.is_file():
        raise CharsegError(f"{path} not found: the characters task needs the identity stage's classes; "
                           f"run it first (dvc repro identity)")
    content = read_json(path)
    classes = content.get("classes") if isinstance(content, dict) else None
    require(isinstance(classes, list) and all(isinstance(c, str) for c in classes),
            f"{path}: 'classes' must be a list of class names; re-run the identity stage (dvc repro identity)")
    require(len(classes) >= 3, f"{path} names no character (classes {classes}, not found: "
                               f"{content.get('not_found', [])}): no character folder's character was found, so "
                               f"there is nothing to tell apart. Check the identity report, or use `task: person`")
    return characters_task(classes)


def task_of_checkpoint(meta: dict[str, Any]) -> Task:
    """The task a checkpoint was trained for (meta as models.load_checkpoint returns it; none: person)."""
    name = meta.get("task", PERSON)
    if name == PERSON:
        return person_task()
    require(name == CHARACTERS and meta.get("classes"),
            f"checkpoint of task {name!r} with classes {meta.get('classes')!r} is not one charseg wrote: retrain it")
    return characters_task(meta["classes"])


def require_task(task: Task, expected: str, what: str) -> None:
    """A clear error when `what` (a checkpoint, a model) was made for another task than params.yaml's."""
    if task.name != expected:
        raise CharsegError(f"{what} was trained for the '{task.name}' task but params.yaml says task: {expected}: "
                           f"retrain it in that task (dvc exp run -S task={expected}), or pass a checkpoint of "
                           f"the '{expected}' task, or set task: {task.name}")


def class_map(task: Task, logits: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) logits -> (B, H, W) int64 class ids: person sigmoid > 0.5 -> 0/1, characters argmax."""
    if task.name == PERSON:
        return (torch.sigmoid(logits[:, 0]) > THRESHOLD).long()
    return logits.argmax(dim=1)


def probabilities(task: Task, logits: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) probabilities: person sigmoid (1 channel, the person's), characters softmax over classes."""
    return torch.sigmoid(logits) if task.name == PERSON else torch.softmax(logits, dim=1)


_OTHER_GREY = (128, 128, 128)


def palette(task: Task) -> np.ndarray:
    """(len(classes), 3) uint8 RGB: background black, other grey, characters distinct saturated colours.

    Hues step by the golden angle, so any number of characters gets well-separated colours and the first
    ones do not change when characters are added."""
    colours = np.zeros((len(task.classes), 3), dtype=np.uint8)
    named = task.classes[1:-1] if task.name == CHARACTERS else task.classes[1:]
    for i in range(len(named)):
        hue = (0.0 + i * 0.381966) % 1.0
        value = 1.0 if i % 2 == 0 else 0.8  # alternate brightness: neighbours in hue differ more
        colours[1 + i] = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, value)]
    if task.name == CHARACTERS:
        colours[-1] = _OTHER_GREY
    return colours


def class_weights(pixel_counts: Sequence[int] | np.ndarray) -> torch.Tensor:
    """Cross-entropy weight per class from its pixel count on the training side.

    Inverse square root of the frequency (not median-frequency balancing's inverse frequency: with a small
    character at 0.5% of the pixels that weights it ~100x background and the model paints it everywhere;
    the square root still lifts it ~10x). Normalised so the pixel-weighted mean weight is 1, which keeps the
    loss on the scale of unweighted cross entropy. A class with no training pixel gets 0: nothing could
    teach it, and its validation pixels would otherwise dominate the validation loss (they still count in
    the mIoU)."""
    counts = np.asarray(pixel_counts, dtype=np.float64)
    require(counts.ndim == 1 and (counts >= 0).all() and counts.sum() > 0,
            f"class pixel counts must be non-negative with some pixel, got {counts.tolist()}")
    frequency = counts / counts.sum()
    weights = np.where(frequency > 0, 1 / np.sqrt(np.maximum(frequency, 1e-300)), 0.0)
    weights /= (frequency * weights).sum()
    return torch.tensor(weights, dtype=torch.float32)


class DiceCrossEntropy(nn.Module):
    """Multi-class Dice (soft, per class over the batch; classes absent from the batch's target add no Dice
    term) plus cross entropy weighted per class, averaged over the weight of the target pixels (0 when every
    target pixel has weight 0, instead of torch's NaN)."""

    def __init__(self, weights: torch.Tensor | None) -> None:
        super().__init__()
        self.dice = DiceLoss(mode="multiclass", from_logits=True)
        self.register_buffer("weights", None if weights is None else weights.float().clone())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        if self.weights is None:
            cross_entropy = F.cross_entropy(logits, target)
        else:
            weights = self.weights.to(logits.device)
            per_pixel = F.cross_entropy(logits, target, weight=weights, reduction="sum")
            cross_entropy = per_pixel / weights[target].sum().clamp_min(1e-12)
        return self.dice(logits, target) + cross_entropy


def loss(task: Task, class_weights: torch.Tensor | None = None) -> nn.Module:
    """The training and validation loss, called as loss(logits, target).

    person: Dice of the binary mask (target float (B, 1, H, W) 0/1; class_weights ignored), charseg's loss
    since the start. characters: DiceCrossEntropy (target int64 (B, H, W) class ids)."""
    if task.name == PERSON:
        return DiceLoss(mode="binary", from_logits=True)
    if class_weights is not None:
        require(class_weights.shape == (len(task.classes),),
                f"{len(task.classes)} classes but {tuple(class_weights.shape)} class weights")
    return DiceCrossEntropy(class_weights)
