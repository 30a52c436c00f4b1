"""Masks the user brings (labels.import_dir), and exact masks for QA (labels.truth_dir).

`mask_files` is the project's one reader of a mask folder and its optional index CSV; `read_binary_mask`
reads one such mask strictly (0/1 or 0/255, frame size, or the alpha channel of a flat colour image).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import cv2
import numpy as np

from charseg.errors import CharsegError
from charseg.layout import MASK_SUFFIX


class MaskMismatch(CharsegError):
    """One mask that cannot be used as given (missing, wrong size, not binary)."""


# A frame whose grey levels vary less than this (std, 0-255) shows nothing: an empty mask fits it.
# The same default as eda.uniform_std, the EDA stage's "near-uniform" flag.
UNIFORM_STD = 8.0


def is_uniform(image: np.ndarray) -> bool:
    """Whether a frame (grey or BGR) is a near-uniform field (black, a fade, a title card's background)."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2GRAY)
    return float(grey.std()) < UNIFORM_STD


def mask_files(folder: str | Path, index_name: str | None, frames: Sequence[Mapping[str, str]],
               *, key: str = "labels.import_dir", column: str = "mask") -> dict[str, Path]:
    """The mask file of each frame id that has one.

    Through `<folder>/<index_name>` when that CSV exists (a `mask` column, path relative to the
    folder, and either an `id` column or `video,frame_index` as in the frames manifest), else (also
    when index_name is None) `<folder>/<frame id>.png`, whether or not that file exists. Frames the
    index does not list are absent from the result; a frame the index lists twice with different
    masks is an error. `key`: the params key that named the folder, for the messages.
    """
    folder = Path(folder)
    if folder.is_file():
        raise CharsegError(f"params.yaml: {key} {folder} is a file, not a folder: put the masks in a folder "
                           f"(<frame id>.png, or listed in {index_name or 'an index CSV'}) and point {key} at it")
    if not folder.is_dir():
        raise CharsegError(f"mask folder {folder} not found: check {key} in params.yaml")
    index_path = folder / index_name if index_name else None
    if index_path is None or not index_path.is_file():
        if column != "mask":
            raise CharsegError(f"per-character masks in {folder} need an index CSV ({index_name or 'index.csv'}) "
                               f"with a '{column}' column")
        return {row["id"]: folder / (row["id"] + MASK_SUFFIX) for row in frames}
    with open(index_path, newline="", encoding="utf-8") as fh:
        index = [{**row, "mask": row.get(column)} for row in csv.DictReader(fh)]
    columns = set(index[0]) if index else set()
    if column != "mask" and column not in columns:
        raise CharsegError(f"{index_path} has no '{column}' column: per-character masks are listed there")
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


CHARACTERS_FILE = "characters.json"  # in a folder of per-character masks: {"alice": 1, "bob": 2, "other": 3}


def read_character_values(folder: str | Path, *, key: str = "labels.import_dir") -> dict[int, str]:
    """Pixel value -> character name of a folder of per-character masks (its characters.json maps each name to
    the value its pixels hold; 0 is always background, `other` names anyone who is not a character)."""
    from charseg.io import read_json

    path = Path(folder) / CHARACTERS_FILE
    if not path.is_file():
        raise CharsegError(f"{path} not found: per-character masks in {key} need it, mapping each character's "
                           f'name to its pixel value, e.g. {{"alice": 1, "bob": 2, "other": 3}}')
    mapping = read_json(path)
    if not isinstance(mapping, dict) or not all(isinstance(v, int) and 0 < v < 65536 for v in mapping.values()):
        raise CharsegError(f"{path} must map each character's name to a pixel value 1-65535 (0 is background)")
    values: dict[int, str] = {}
    for name, value in mapping.items():
        if value in values:
            raise CharsegError(f"{path} gives {values[value]!r} and {name!r} the same value {value}")
        values[value] = name
    return values


def read_character_map(path: str | Path, size: tuple[int, int] | None, values: Mapping[int, str]) -> np.ndarray:
    """A per-character mask as uint16 pixel values (0 background, else a value of `values`, from
    read_character_values) of size (height, width); MaskMismatch names an unknown value or a wrong size."""
    path = Path(path)
    if not path.is_file():
        raise MaskMismatch(f"missing mask {path}")
    data = path.read_bytes()
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if raw is None or raw.ndim != 2:
        raise MaskMismatch(f"{path} is not a single-channel PNG of character values (see characters.json)")
    if size is not None and raw.shape != tuple(size):
        raise MaskMismatch(f"{path} is {raw.shape[1]}x{raw.shape[0]} but its frame is {size[1]}x{size[0]}")
    unknown = sorted(set(np.unique(raw).tolist()) - set(values) - {0})
    if unknown:
        raise MaskMismatch(f"{path} holds value(s) {', '.join(map(str, unknown[:6]))} that characters.json does "
                           f"not name (it maps {', '.join(f'{n}={v}' for v, n in sorted(values.items()))})")
    return raw.astype(np.uint16)
