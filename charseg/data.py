"""Training pairs: a frame and its target, paired by id, decoded once into a pre-resized cache.

The target is the masks stage's 0/255 person mask (person task: 0/1 in the cache) or the identity stage's
class-id map (characters task: the ids as they are); both stage folders name a frame's file `.file(id)`.

Why an on-disk cache (`<cache_dir>/pairs-<img_size>/<content hash>.npy`) and not arrays preloaded in
RAM: the four `train@<model>` stages run one after another, and `dvc exp run -S lr=...` reruns them;
a RAM preload would decode every full-size JPEG+PNG again in each of those processes, while the disk
cache decodes a pair once per img_size, ever. Loading one small .npy (from the OS page cache once
warm) costs far less than decoding and resizing a full frame, and DataLoader workers and DDP ranks
share it without copying. The key hashes the frame and mask *bytes* (plus img_size, the cache
format and, for class ids, the kind of target), so a relabelled mask or re-extracted frame can never be served stale, whatever DVC does to
file times. The cache lives outside every DVC output (DVC would delete it before each rerun);
deleting `.cache/` is always safe.
"""
from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TypeVar, Union

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from charseg.config import AugmentConfig
from charseg.errors import CharsegError, require
from charseg.io import imread, read_json, write_bytes_atomic
from charseg.layout import FramesDir, IdentityDir, MasksDir

# Bump when resize_pair or the cached layout changes: old cache files then simply stop matching.
CACHE_FORMAT = 1
Labels = Union[MasksDir, IdentityDir]  # a stage folder of per-frame targets: 0/255 masks or class-id maps


def _producer(labels: Labels) -> str:
    """The stage whose rerun rewrites `labels`' files, for error messages."""
    return "identity" if isinstance(labels, IdentityDir) else "masks"


def read_split(path: str | Path) -> tuple[list[str], list[str]]:
    """(train ids, val ids) from split.json; both sides must hold at least one frame."""
    split = read_json(path)
    sides = {}
    for side in ("train", "val"):
        ids = split.get(side) if isinstance(split, dict) else None
        require(isinstance(ids, list) and all(isinstance(i, str) for i in ids),
                f"{path}: '{side}' must be a list of frame ids; re-run the split stage (dvc repro split)")
        require(ids, f"{path} has no frames on the '{side}' side: a model cannot be "
                     f"{'trained' if side == 'train' else 'validated'}. Add videos, or change "
                     f"split.val_fraction in params.yaml, then dvc repro")
        sides[side] = ids
    overlap = set(sides["train"]) & set(sides["val"])
    if overlap:
        raise CharsegError(f"{path}: {len(overlap)} frame(s) are on both sides (e.g. {min(overlap)}): "
                           f"re-run the split stage (dvc repro split)")
    return sides["train"], sides["val"]


def read_pair(frames: FramesDir, labels: Labels, frame_id: str, *,
              class_ids: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A full-size frame as RGB uint8 (H, W, 3) and its target (H, W): a 0/255 mask of `labels` as bool, or
    with class_ids a class-id map as uint8 ids."""
    mask_file, stage = labels.file(frame_id), _producer(labels)
    if not mask_file.is_file():
        raise CharsegError(f"frame '{frame_id}' has no {'class map' if class_ids else 'mask'} {mask_file}: "
                           f"re-run the {stage} stage (dvc repro {stage})")
    image = cv2.cvtColor(imread(frames.image(frame_id), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    mask = imread(mask_file, cv2.IMREAD_UNCHANGED if class_ids else cv2.IMREAD_GRAYSCALE)
    require(mask.shape == image.shape[:2],
            f"{mask_file} is {'x'.join(map(str, mask.shape[1::-1]))} but its frame is {image.shape[1]}x{image.shape[0]}"
            f"{'' if mask.ndim == 2 else ' (a class map must be one uint8 channel)'}: re-run the {stage} stage "
            f"(dvc repro {stage})")
    if class_ids:
        require(mask.dtype == np.uint8, f"{mask_file} is {mask.dtype}, not uint8 class ids: re-run the {stage} "
                                        f"stage (dvc repro {stage})")
        return image, mask
    return image, mask > 127


def _interpolation(shape: tuple[int, ...], img_size: int) -> int:
    return cv2.INTER_AREA if img_size < max(shape[:2]) else cv2.INTER_LINEAR  # area when shrinking: no aliasing


def resize_image(image: np.ndarray, img_size: int) -> np.ndarray:
    """The img_size x img_size copy of a frame that the models see, in training and at inference alike."""
    return cv2.resize(image, (img_size, img_size), interpolation=_interpolation(image.shape, img_size))


def resize_pair(image: np.ndarray, mask: np.ndarray, img_size: int, *,
                class_ids: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Square img_size x img_size copies: uint8 RGB and a uint8 0/1 mask (or, with class_ids, uint8 class ids).

    The mask is resampled as coverage and thresholded at one half, so thin limbs keep their true width
    instead of nearest-neighbour jaggies. Class ids are resampled the same way, as one coverage per class
    present, and each pixel takes the class that covers most of it: never an id that was not there, and
    never a blend of two ids (ties go to the lower id).
    """
    size, interpolation = (img_size, img_size), _interpolation(image.shape, img_size)
    if not class_ids:
        small_mask = cv2.resize(mask.astype(np.uint8) * 255, size, interpolation=interpolation) >= 128
        return resize_image(image, img_size), small_mask.astype(np.uint8)
    present = np.unique(mask)
    coverage = np.stack([cv2.resize((mask == c).astype(np.float32), size, interpolation=interpolation)
                         for c in present])
    return resize_image(image, img_size), present[coverage.argmax(axis=0)].astype(np.uint8)


def _pair_key(image_bytes: bytes, mask_bytes: bytes, img_size: int, class_ids: bool = False) -> str:
    digest = hashlib.blake2b(digest_size=20)
    # The person task's key is unchanged since before class ids existed, so its cache stays valid.
    kind = "classes" if class_ids else "pair"
    for part in (f"charseg-{kind}-v{CACHE_FORMAT}-{img_size}".encode(), image_bytes, mask_bytes):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def cache_pairs(ids: Sequence[str], frames: FramesDir, labels: Labels, img_size: int,
                cache_dir: str | Path, workers: int = 0, progress: bool = True, *,
                class_ids: bool = False) -> list[Path]:
    """The cache file of each id (H, W, 4 uint8: RGB + 0/1 mask, or with class_ids RGB + class id), decoding
    only pairs not cached yet.

    Frames and targets (`labels`: the masks or identity stage folder) are paired by id; a missing file of
    either kind is an error naming one of the ids.
    workers: decoding threads (OpenCV and hashing release the GIL); 0 = one per CPU core.
    """
    missing = [i for i in ids if not (frames.image(i).is_file() and labels.file(i).is_file())]
    if missing:
        raise CharsegError(f"{len(missing)} of {len(ids)} frame id(s) lack a frame in {frames.images} or a "
                           f"{'class map' if class_ids else 'mask'} in {labels.images} (e.g. '{missing[0]}'): "
                           f"re-run the stages that write them (dvc repro)")
    out_dir = Path(cache_dir) / f"pairs-{img_size}"
    out_dir.mkdir(parents=True, exist_ok=True)

    def cache_one(frame_id: str) -> Path:
        key = _pair_key(frames.image(frame_id).read_bytes(), labels.file(frame_id).read_bytes(), img_size, class_ids)
        path = out_dir / f"{key}.npy"
        if not path.is_file():
            image, mask = resize_pair(*read_pair(frames, labels, frame_id, class_ids=class_ids), img_size,
                                      class_ids=class_ids)
            buffer = io.BytesIO()
            np.save(buffer, np.dstack([image, mask]))
            write_bytes_atomic(path, buffer.getvalue())
        return path

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(tqdm(pool.map(cache_one, ids), total=len(ids), desc=f"cache {img_size}px pairs",
                         unit="frame", leave=False, disable=not progress))


def has_foreground(cached: Sequence[Path]) -> bool:
    """Whether any cached target has a foreground pixel: a person, or any class but background (id 0)
    (stops at the first one found)."""
    return any(np.load(path, mmap_mode="r")[..., 3].any() for path in cached)


def class_pixels(cached: Sequence[Path], n_classes: int) -> np.ndarray:
    """(n_classes,) int64 pixel count of each class id over the cached targets; a CharsegError names the
    first file holding an id >= n_classes."""
    counts = np.zeros(n_classes, dtype=np.int64)
    for path in cached:
        found = np.bincount(np.load(path, mmap_mode="r")[..., 3].ravel(), minlength=n_classes)
        require(len(found) == n_classes, f"a class map holds class id {len(found) - 1} but the task has only "
                                         f"{n_classes} classes (cached as {path}): the identity stage's images and "
                                         f"classes.json disagree; re-run it (dvc repro identity)")
        counts += found
    return counts


@dataclass(frozen=True)
class Augment:
    """Train-side augmentation by the amounts of params.yaml `train.augment`, applied to frame and mask
    together so they stay aligned.

    hflip: probability of a horizontal flip; scale: zoom drawn from [1-scale, 1+scale];
    shift: translation drawn from +-shift * img_size on each axis; color: brightness, contrast and
    saturation factors drawn from [1-color, 1+color]. Zero turns a part off.
    """
    amounts: AugmentConfig

    def __call__(self, image: np.ndarray, mask: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        amounts = self.amounts
        # Draw every number up front so one item's randomness never depends on which parts are on.
        flip, zoom, shift_x, shift_y, brightness, contrast, saturation = rng.random(7)
        if flip < amounts.hflip:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if amounts.scale or amounts.shift:
            size = image.shape[0]
            zoom = 1 + amounts.scale * (2 * zoom - 1)
            center = (size - 1) / 2
            offset_x = center * (1 - zoom) + amounts.shift * (2 * shift_x - 1) * size
            offset_y = center * (1 - zoom) + amounts.shift * (2 * shift_y - 1) * size
            warp = np.array([[zoom, 0, offset_x], [0, zoom, offset_y]], dtype=np.float32)
            image = cv2.warpAffine(np.ascontiguousarray(image), warp, (size, size), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REFLECT_101)
            mask = cv2.warpAffine(np.ascontiguousarray(mask), warp, (size, size), flags=cv2.INTER_NEAREST,
                                  borderMode=cv2.BORDER_REFLECT_101)
        if amounts.color:
            # saturation s (blend with grey), contrast c (about the mean grey m), brightness b, fused into
            # b*c*s*x + b*c*(1-s)*grey + b*(1-c)*m: one rounded, saturated uint8 pass (a float chain is 10x slower)
            s, c, b = (1 + amounts.color * (2 * u - 1) for u in (saturation, contrast, brightness))
            image = np.ascontiguousarray(image)
            grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
            image = cv2.addWeighted(image, b * c * s, cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB), b * c * (1 - s),
                                    b * (1 - c) * float(grey.mean()))
        return image, mask


class PairDataset(Dataset):
    """Cached pairs as (uint8 image 3xSxS, uint8 0/1 mask 1xSxS or class ids 1xSxS); normalise on the device
    with `normalize`.

    Augmentation randomness is a pure function of (seed, epoch, index): the same whatever the number
    of DataLoader workers or DDP ranks, and a resumed run sees exactly what an uninterrupted one would.
    Call set_epoch before iterating each epoch (workers are forked afresh every epoch).
    """

    def __init__(self, cached: Sequence[Path], augment: Augment | None = None, seed: int = 0) -> None:
        self.cached = list(cached)
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = np.load(self.cached[index])
        image, mask = pair[..., :3], pair[..., 3]
        if self.augment is not None:
            image, mask = self.augment(image, mask, np.random.default_rng((self.seed, self.epoch, index)))
        return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                torch.from_numpy(np.ascontiguousarray(mask[None])))


def loader_worker_init(_worker_id: int) -> None:
    """DataLoader worker_init_fn: one OpenCV thread per worker (N workers x all-core pools oversubscribe)."""
    cv2.setNumThreads(1)


Batch = TypeVar("Batch", torch.Tensor, np.ndarray)


def normalize(images: Batch, mean: Sequence[float], std: Sequence[float]) -> Batch:
    """RGB batch (B, 3, H, W; uint8 0-255, or float on that scale) -> float32 model input, the same formula in
    training (a torch tensor, on its device) and at inference (a numpy array in, a numpy array out).
    mean/std are on the 0-1 scale (models.normalization)."""
    if isinstance(images, np.ndarray):
        array = np.ascontiguousarray(images)
        # torch.from_numpy shares memory (no copy) and warns about a read-only array (a memory map): copy that one
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
        return normalize(tensor, mean, std).numpy()
    scale = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) * 255
    shift = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) * 255
    return (images.float() - shift) / scale
