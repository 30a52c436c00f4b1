"""Files that are either complete or absent: every stage writes through these helpers.

A file is written to a temporary sibling and renamed into place (rename is atomic on one
filesystem), so a crash or Ctrl-C never leaves a truncated PNG, CSV or JSON that looks finished.
A whole output directory is built the same way with `atomic_dir`, and a file that a library writes by
name (a video) with `atomic_path`, which checks the writer's result before the rename (`check_video`).

Temp names carry the creating process id (`.<name>.<pid>-<host>-<random>.tmp<suffix>`): a run removes
the temp files that killed runs (SIGKILL, power loss) left next to its outputs, never a running writer's.
An OSError while writing names the output, not its temp file; run_cli prints it as one `error:` line.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np

from charseg.errors import CharsegError
from charseg.layout import FRAME_COLUMNS


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# Temporary siblings are named `.<target name>.<pid>-<host>-<random>.tmp<target suffix>`: the creating process
# and machine are in the name, so a later run can tell the temp files of a killed run (process gone) from
# those of a writer still running, and the real suffix stays last (video writers pick the container from it).
_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]
_TMP_NAME = re.compile(r"\..*\.(?P<pid>\d{1,10})-(?P<host>[0-9a-f]{6})-[A-Za-z0-9_]{8}\.tmp(\.[^/]*)?", re.DOTALL)
_swept: set[str] = set()  # directories this process has cleared of stale temp files


def _process_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OverflowError, ValueError, OSError):
        return False  # alive under another user, or not a pid this system can have: leave it alone
    return False


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temporary siblings in `directory` left by killed processes of this machine (SIGKILL, power
    loss: no `finally` ran); those of running writers are kept. Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed  # not there yet, or not listable: the write itself will say what is wrong
    for entry in entries:
        match = _TMP_NAME.fullmatch(entry.name)
        if match is None or match["host"] != _HOST or not _process_gone(int(match["pid"])):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass  # another run cleaned it first
        except OSError:
            continue  # e.g. a read-only folder: the write will fail with the real reason
    return removed


def name_max(directory: str | Path) -> int:
    """The longest file name (bytes) the filesystem of `directory`, or of its nearest existing parent, allows."""
    directory = Path(directory).absolute()
    while not directory.is_dir() and directory != directory.parent:
        directory = directory.parent
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), path.parent)
        raise CharsegError(f"{path}: {blocker} is a file, not a folder: choose another path") from None


def _tmp_sibling(path: Path, is_dir: bool = False, suffix: str = ".tmp", sweep: bool = False) -> Path:
    """A new temporary file (or directory) next to `path`, after removing stale ones of killed runs there
    (always when `sweep`, else once per directory and process: folders of 100,000 frames are not rescanned)."""
    _make_parent(path)
    limit = name_max(path.parent)
    if len(os.fsencode(path.name)) > limit:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(path))
    if sweep or str(path.parent) not in _swept:
        remove_stale_temps(path.parent)
        _swept.add(str(path.parent))
    prefix_tail = f".{os.getpid()}-{_HOST}-"
    room = limit - len(os.fsencode(prefix_tail + suffix)) - 1 - 8  # "." + mkstemp's 8 random characters
    name = os.fsencode(path.name)[:max(room, 1)].decode("utf-8", "ignore") or "x"  # short enough to create
    prefix = f".{name}{prefix_tail}"
    try:
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=path.parent))
        else:
            fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
            os.close(fd)
            tmp = Path(tmp_name)
    except OSError as err:  # EROFS, EACCES, ENOSPC (no inode left)...: about `path`, not its temp name
        err.filename, err.filename2 = str(path), None
        raise
    # mkstemp/mkdtemp create 0600/0700; outputs shared on a team's GPU box need the usual umask modes.
    tmp.chmod((0o777 if is_dir else 0o666) & ~_umask())
    return tmp


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _name_the_target(err: OSError, tmp: Path, path: Path) -> None:
    """An OSError about the hidden temp sibling (or a file inside a temp folder) names the real output."""
    for attr in ("filename", "filename2"):
        name = getattr(err, attr)
        if name is None:
            continue
        name = os.fsdecode(name)
        if name == str(tmp) or name.startswith(str(tmp) + os.sep):
            setattr(err, attr, str(path) + name[len(str(tmp)):])
    _name_if_unnamed(err, path)


def _name_if_unnamed(err: OSError, path: Path | str) -> None:
    if err.filename is None and err.filename2 is None and err.errno is not None:
        err.filename = str(path)  # e.g. ENOSPC from write(): the OS names no file


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """An OSError raised in the block without a file name (pathlib's exists() on a name too long, write()
    on a full disk) gets `path`, so that run_cli's line says which file."""
    try:
        yield
    except OSError as err:
        _name_if_unnamed(err, path)
        raise


@contextlib.contextmanager
def _replacing(path: Path, tmp: Path, verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """The one way outputs are written: yield `tmp`, check it, rename it over `path`; on any failure delete
    `tmp`, keep what `path` was, and let an OSError name `path` (run_cli turns it into one line)."""
    try:
        yield tmp
        if verify is not None:
            verify(tmp)
        if tmp.is_dir():
            _remove(path)  # os.replace cannot put a folder over a non-empty folder or a file
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            _remove(tmp)
        if isinstance(err, OSError):
            _name_the_target(err, tmp, path)
        raise


def check_writable(path: str | Path, *, is_dir: bool = False) -> None:
    """Fail now, before expensive work, when `path` cannot be written (read-only or full filesystem, no
    permission, a name too long, a parent that is a file, a folder where a file goes): creates its folder
    and a temp file there, and removes it."""
    path = Path(path)
    with naming(path):
        if not is_dir and path.is_dir() and not path.is_symlink():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        tmp = _tmp_sibling(path)
        try:
            tmp.write_bytes(b"\0")  # a full disk may still let an empty file be created
        except OSError as err:
            _name_the_target(err, tmp, path)
            raise
        finally:
            tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    with _replacing(path, _tmp_sibling(path)) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


_REDO = "re-run the stage that wrote it (dvc repro)"


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CharsegError(f"{path} not found: run the stage that produces it first (dvc repro)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CharsegError(f"{path} is not valid JSON (truncated or corrupt: {err.msg}: line {err.lineno} "
                           f"column {err.colno}): {_REDO}") from None
    except UnicodeDecodeError:
        raise CharsegError(f"{path} is not UTF-8 text (corrupt, or not a JSON file): {_REDO}") from None


def write_csv(path: str | Path, rows: Iterable[dict[str, Any]], fieldnames: Sequence[str]) -> None:
    path = Path(path)
    with _replacing(path, _tmp_sibling(path)) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fieldnames), extrasaction="raise")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise CharsegError(f"{path} not found: run the stage that produces it first (dvc repro)")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except UnicodeDecodeError:
        raise CharsegError(f"{path} is not UTF-8 text (corrupt, or not a CSV file): {_REDO}") from None
    except csv.Error as err:
        raise CharsegError(f"{path} is not a readable CSV file ({err}): {_REDO}") from None


def read_manifest(path: str | Path, required: Sequence[str] = FRAME_COLUMNS) -> list[dict[str, Any]]:
    """Rows of a frames or masks manifest, checked: not empty, columns present, ids unique, timestamps numbers."""
    path = Path(path)
    rows = read_csv(path)
    if not rows:
        raise CharsegError(f"{path} lists no frames: {_REDO}")
    missing = [c for c in required if c not in rows[0]]
    if missing:
        raise CharsegError(f"{path} lacks column(s) {', '.join(missing)}: {_REDO}")
    repeated = sorted(i for i, n in Counter(r["id"] for r in rows).items() if n > 1)
    if repeated:
        raise CharsegError(f"{path} lists {len(repeated)} id(s) more than once (e.g. {', '.join(repeated[:5])}): {_REDO}")
    if "timestamp" in required:
        for row in rows:
            try:
                row["timestamp"] = float(row["timestamp"])
            except ValueError:
                raise CharsegError(f"{path}: frame {row['id']!r} has timestamp {row['timestamp']!r}, "
                                   f"not a number: {_REDO}") from None
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


def _not_empty(target: Path) -> Callable[[Path], None]:
    def verify(tmp: Path) -> None:
        if tmp.stat().st_size == 0:
            raise CharsegError(f"{target}: the writer produced an empty file ({_free_space(target)}): nothing "
                               f"was written")
    return verify


def _free_space(path: Path) -> str:
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return "disk full?"
    return f"disk full? {free / 1e6:.1f} MB free there" if free < 1e9 else f"disk full? {free / 1e9:.0f} GB free there"


def check_video(tmp: Path, frames: int, *, target: Path) -> None:
    """Raise unless the video file `tmp` (written for `target`) holds `frames` frames and decodes.

    cv2.VideoWriter reports no write error: on a full disk it drops frames and the container's index (an
    mp4 without its `moov` atom plays nothing). Every packet is read back (raw, without decoding: a
    few us a frame, where decoding costs about a third of encoding), then the first and last frame are decoded.
    """
    capture = cv2.VideoCapture(str(tmp), cv2.CAP_FFMPEG)
    packets = 0
    try:
        if capture.isOpened():
            capture.set(cv2.CAP_PROP_FORMAT, -1)  # raw mode: grab() reads packets without decoding them
            while capture.grab():
                packets += 1
    finally:
        capture.release()
    decodes = False
    if packets == frames:
        capture = cv2.VideoCapture(str(tmp), cv2.CAP_FFMPEG)
        try:
            decodes = capture.read()[0]
            if decodes and frames > 1:
                capture.set(cv2.CAP_PROP_POS_FRAMES, frames - 1)
                decodes = capture.read()[0]
        finally:
            capture.release()
    if not decodes:
        found = f"{packets} of its {frames} frames" if packets != frames else "frames that do not decode"
        raise CharsegError(f"{target}: the video writer failed silently: the finished file holds {found} "
                           f"({_free_space(target)}): nothing was written; free some space or write elsewhere")


@contextlib.contextmanager
def atomic_path(path: str | Path, verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling file for a writer that opens files by name itself (cv2.VideoWriter);
    it replaces `path` only if the block finishes without error and `verify(tmp)` (default: the file is not
    empty; for videos: `lambda tmp: check_video(tmp, n, target=path)`) passes, and is deleted otherwise.

    The temporary name keeps the real suffix (`.out.mp4.<pid>-<host>-x1y2.tmp.mp4`): such writers pick the
    container from it. Temp files of killed runs next to `path` are removed first.
    """
    path = Path(path)
    tmp = _tmp_sibling(path, suffix=f".tmp{path.suffix}", sweep=True)
    with _replacing(path, tmp, verify or _not_empty(path)):
        yield tmp


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block finishes without error.
    Temp files and folders of killed runs next to `path` are removed first."""
    path = Path(path)
    tmp = _tmp_sibling(path, is_dir=True, sweep=True)
    with _replacing(path, tmp):
        yield tmp


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
