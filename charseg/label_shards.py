"""Labelling frames into the label cache: in this process, or over worker processes (labels.workers).

Every label goes into the label cache (charseg.labels.cache) the moment it is made, keyed by the frame's
bytes and the labeler's fingerprint. With labels.workers N > 1 the masks stage first lists the frames the
cache does not hold yet, cuts them into N disjoint shards and labels each shard in its own process
(`label_in_workers`); it then assembles its outputs from the cache exactly as a one-process run does, so
the outputs are the same bytes whatever N is, and an interrupted multi-worker run resumes from the cache.

Workers are spawned through charseg.workers.WorkerPool (Ctrl-C safe; a worker that dies becomes one clear
error). Each builds its own labeler with the stage's `LabelerFactory`, a module-level callable
`(cfg, device=...) -> Labeler` (so that it pickles into a spawned process): on a GPU box worker i takes
GPU i modulo the GPUs in use (labels.device auto/cuda: all visible; cuda:N: that one), and every worker
gets its share of the cores as torch threads (cores // N). Two processes labelling the same frame at once
(overlapping shards, two stages on one cache) write the same entry twice: each file is replaced
atomically and the JSON goes last, so readers only ever see whole entries.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, TypeVar

import cv2
import numpy as np
import torch
from tqdm import tqdm

from charseg.config import LabelsConfig
from charseg.device import parse_device
from charseg.errors import CharsegError
from charseg.labels.cache import LabelCache
from charseg.labels.detect import FrameLabel
from charseg.workers import WorkerPool, cpu_count

Tag = TypeVar("Tag")


class Labeler(Protocol):
    """What charseg.labels.detect.build_labeler returns: labels in order, what makes them, their hash."""
    settings: Mapping[str, Any]
    fingerprint: str

    def label(self, images: Sequence[np.ndarray]) -> Iterator[FrameLabel]: ...


# (cfg, device=None | "cpu" | "cuda:N") -> Labeler; module-level, so that it pickles into worker processes.
LabelerFactory = Callable[..., Labeler]


# ---------------------------------------------------------------------------------------------
# One frame, one batch: the cache in front of the labeler
# ---------------------------------------------------------------------------------------------

@dataclass
class FrameLookup:
    """A frame as the label cache sees it: its cached label, or its key and decoded image to label, or
    why it cannot be labelled (`failure`)."""
    key: str = ""
    label: FrameLabel | None = None
    image: np.ndarray | None = None
    failure: str = ""


def frame_key(path: Path, cache: LabelCache) -> str | None:
    """The frame's cache key, or None when the file cannot be read."""
    try:
        return cache.key(path.read_bytes())
    except OSError:
        return None


def look_up(path: Path, cache: LabelCache) -> FrameLookup:
    try:
        data = path.read_bytes()
    except OSError as err:
        return FrameLookup(failure=f"cannot read {path}: {err.strerror or err}")
    key = cache.key(data)
    cached = cache.get(key)
    if cached is not None:
        return FrameLookup(key, label=cached)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        return FrameLookup(failure=f"{path} is not a readable image")
    return FrameLookup(key, image=image)


def labels_through_cache(frames: Iterable[tuple[Tag, Path]], labeler: Labeler, cache: LabelCache,
                         batch: int) -> Iterator[tuple[Tag, FrameLookup, bool]]:
    """(tag, lookup, fresh) for each (tag, frame path): the lookup's label comes from the cache, or, for a
    miss, from the labeler (`batch` misses per call; each label is put into the cache as soon as it is
    done, so an interrupted run keeps every frame finished so far), then `fresh` is True. An unreadable
    frame comes back with its `failure` and no label. Misses come back when their batch is done, so the
    order is not the input's."""
    pending: list[tuple[Tag, FrameLookup]] = []
    for tag, path in frames:
        found = look_up(path, cache)
        if found.image is None:
            yield tag, found, False
            continue
        pending.append((tag, found))
        if len(pending) >= batch:
            yield from _label_pending(labeler, cache, pending)
    yield from _label_pending(labeler, cache, pending)


def _label_pending(labeler: Labeler, cache: LabelCache,
                   pending: list[tuple[Tag, FrameLookup]]) -> Iterator[tuple[Tag, FrameLookup, bool]]:
    batch = pending.copy()
    pending.clear()
    for (tag, found), label in zip(batch, labeler.label([found.image for _, found in batch])):
        cache.put(found.key, label)
        yield tag, FrameLookup(found.key, label=label), True


# ---------------------------------------------------------------------------------------------
# Workers: how many, where, and what each does
# ---------------------------------------------------------------------------------------------

def gpus_in_use(cfg: LabelsConfig) -> list[str]:
    """The CUDA devices labels.device lets the workers spread over: every visible GPU for auto/cuda, the one
    it names for cuda:N, none for cpu (or when no GPU is visible)."""
    device = parse_device(cfg.device, "params.yaml: labels.device")
    if (device is not None and device.type == "cpu") or not torch.cuda.is_available():
        return []
    if device is not None and device.index is not None:
        return [str(device)]
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def worker_count(cfg: LabelsConfig) -> int:
    """labels.workers as a number of processes: 0 means one per GPU in use, else 1."""
    return cfg.workers if cfg.workers > 0 else max(1, len(gpus_in_use(cfg)))


def shards(items: Sequence[Tag], n: int) -> list[list[Tag]]:
    """`n` disjoint shards covering `items`, dealt round-robin (each shard gets frames of every video, so a
    folder of empty frames does not leave one worker idle while another labels every person)."""
    return [list(items[i::n]) for i in range(n) if items[i::n]]


_progress: Any = None  # in a worker process: the parent's queue of finished-frame counts


def _init_worker(progress: Any) -> None:
    global _progress
    _progress = progress
    progress.cancel_join_thread()  # a worker stopped mid-run must not hang in exit waiting for the queue


def _report(frames: int) -> None:
    if _progress is not None and frames:
        _progress.put(frames)


def label_shard(paths: Sequence[Path], cfg: LabelsConfig, factory: LabelerFactory, device: str | None,
                threads: int | None, fingerprint: str) -> int:
    """Runs in a worker: labels the frames of `paths` the cache does not hold (another process may have
    labelled some meanwhile), labels.detector.batch at a time, into the cache; the number labelled."""
    if threads is not None:
        torch.set_num_threads(threads)
    labeler = factory(cfg, device=device)
    if labeler.fingerprint != fingerprint:
        raise CharsegError(f"a labelling worker on {device or cfg.device} built a labeler with other weights or "
                           f"settings than the stage's ({labeler.settings}): the weights files changed during "
                           f"the run? Run the stage again")
    labelled = 0
    cache = LabelCache(cfg.cache_dir, fingerprint)
    for _, _, fresh in labels_through_cache(((path, path) for path in paths), labeler, cache, cfg.detector.batch):
        labelled += fresh
        _report(1)  # cached meanwhile or unreadable counts too: the stage's own pass reports those
    return labelled


# ---------------------------------------------------------------------------------------------
# The parent: what is missing, shards, pool, progress
# ---------------------------------------------------------------------------------------------

def missing_frames(paths: Iterable[Path], cache: LabelCache) -> list[Path]:
    """The readable frames whose label the cache does not hold yet (unreadable ones are the stage's to report).
    Damaged entries count as held: the stage's own pass through the cache relabels them after the workers."""
    return [path for path in paths if (key := frame_key(path, cache)) is not None and not cache.has(key)]


@contextlib.contextmanager
def _progress_from(counts: Any, progress: tqdm) -> Iterator[None]:
    """A thread moves the workers' counts onto the progress bar until the block ends (then drains the rest)."""
    done = threading.Event()

    def drain() -> None:
        while True:
            try:
                progress.update(counts.get(timeout=0.1))
            except queue.Empty:
                if done.is_set():
                    return
            except (EOFError, OSError, ValueError):  # the queue closed or a writer died mid-message
                return

    thread = threading.Thread(target=drain, name="label-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=2.0)


def label_in_workers(paths: Sequence[Path], cfg: LabelsConfig, factory: LabelerFactory, fingerprint: str,
                     workers: int) -> int:
    """Labels every frame of `paths` the cache lacks over `workers` processes, into the cache; the number
    labelled. Fewer than two frames to label: nothing is done here (the stage's own pass labels them)."""
    missing = missing_frames(paths, LabelCache(cfg.cache_dir, fingerprint))
    parts = shards(missing, min(workers, len(missing)))
    if len(parts) < 2:
        return 0
    gpus = gpus_in_use(cfg)
    threads = max(1, cpu_count() // len(parts))  # GPU workers too: their pre- and post-processing is on the CPU
    devices = [gpus[i % len(gpus)] if gpus else None for i in range(len(parts))]
    counts = multiprocessing.get_context("spawn").Queue()
    labelled = 0
    with tqdm(total=len(missing), desc=f"labels ({len(parts)} workers)", unit="frame") as progress, \
            _progress_from(counts, progress):
        try:
            with WorkerPool(len(parts), processes=True, initializer=_init_worker, initargs=(counts,)) as pool:
                futures = [pool.submit(label_shard, part, cfg, factory, device, threads, fingerprint)
                           for part, device in zip(parts, devices)]
                for future in pool.as_completed(futures):
                    labelled += future.result()
        except CharsegError as err:
            raise CharsegError(f"labelling stopped: {err}. The frames labelled so far are in the label cache "
                               f"({cfg.cache_dir}): run the stage again to label the rest") from None
    counts.close()
    return labelled
