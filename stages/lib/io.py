"""Files that are either complete or absent: every stage writes through these helpers.

A file is written to a temporary sibling and renamed into place (rename is atomic on one
filesystem), so a crash or Ctrl-C never leaves a truncated PNG, CSV or JSON that looks finished.
A whole output directory is built the same way with `atomic_dir`.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import cv2
import numpy as np

from .errors import CharsegError


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _tmp_sibling(path: Path, is_dir: bool = False, suffix: str = ".tmp") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp create 0600/0700; outputs shared on a team's GPU box need the usual umask modes.
    tmp.chmod((0o777 if is_dir else 0o666) & ~_umask())
    return tmp


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CharsegError(f"{path} not found: run the stage that produces it first (dvc repro)")
    return json.loads(path.read_text(encoding="utf-8"))


def write_csv(path: str | Path, rows: Iterable[dict[str, Any]], fieldnames: Sequence[str]) -> None:
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(fieldnames), extrasaction="raise")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_csv(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise CharsegError(f"{path} not found: run the stage that produces it first (dvc repro)")
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


FRAME_COLUMNS = ("id", "character", "video", "frame_index", "timestamp", "width", "height")


def read_manifest(path: str | Path, required: Sequence[str] = FRAME_COLUMNS) -> list[dict[str, Any]]:
    """Rows of a frames or masks manifest, checked: not empty, columns present, ids unique, timestamps numbers."""
    path = Path(path)
    rows = read_csv(path)
    redo = "re-run the stage that wrote it (dvc repro)"
    if not rows:
        raise CharsegError(f"{path} lists no frames: add videos under data/raw/videos/<character>/ and {redo}")
    missing = [c for c in required if c not in rows[0]]
    if missing:
        raise CharsegError(f"{path} lacks column(s) {', '.join(missing)}: {redo}")
    repeated = sorted(i for i, n in Counter(r["id"] for r in rows).items() if n > 1)
    if repeated:
        raise CharsegError(f"{path} lists {len(repeated)} id(s) more than once (e.g. {', '.join(repeated[:5])}): {redo}")
    if "timestamp" in required:
        for row in rows:
            try:
                row["timestamp"] = float(row["timestamp"])
            except ValueError:
                raise CharsegError(f"{path}: frame {row['id']!r} has timestamp {row['timestamp']!r}, "
                                   f"not a number: {redo}") from None
    return rows


def imwrite_atomic(path: str | Path, image: np.ndarray, params: Sequence[int] = ()) -> None:
    """Encode in memory, then write+rename: a killed process never leaves a half image."""
    path = Path(path)
    ok, buf = cv2.imencode(path.suffix, image, list(params))
    if not ok:
        raise CharsegError(f"could not encode image for {path}")
    write_bytes_atomic(path, buf.tobytes())


def imread(path: str | Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    """cv2.imread that works with non-ASCII paths and raises instead of returning None."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise CharsegError(f"cannot read image {path}: {err}") from err
    image = cv2.imdecode(data, flags) if data.size else None
    if image is None:
        raise CharsegError(f"{path} is not a readable image (empty or corrupt): re-run the stage that wrote it")
    return image


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file read in 1 MiB blocks (weights and checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling file for a writer that opens files by name itself (cv2.VideoWriter);
    it replaces `path` only if the block finishes without error, and is deleted otherwise.

    The temporary name keeps the real suffix (`.out.mp4.x1y2.tmp.mp4`): such writers pick the container
    from it.
    """
    path = Path(path)
    tmp = _tmp_sibling(path, suffix=f".tmp{path.suffix}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block finishes without error."""
    path = Path(path)
    tmp = _tmp_sibling(path, is_dir=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove(path)
    os.replace(tmp, path)


def slugify(text: str) -> str:
    """A filesystem-safe ASCII name; a name that had to change gets a short hash of the original.

    'alice' -> 'alice'; 'Zoë Ünal 02' -> 'Zoe_Unal_02-<6 hex>'.
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^A-Za-z0-9]+", "_", ascii_text).strip("_")
    if slug != text:
        # Distinct originals must never collide ('Amélie' vs 'Amelie', or two all-CJK names).
        slug = f"{slug}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:6]}" if slug else \
            hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
    return slug
