"""labels.workers: labelling over worker processes gives the same bytes as one process, survives a killed
worker, and two processes labelling the same frames at once leave a sound label cache."""
from __future__ import annotations

import os
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from charseg import label_shards
from charseg.errors import CharsegError
from charseg.label_shards import gpus_in_use, label_shard, shards, worker_count
from charseg.labels.cache import LabelCache
from charseg.labels.detect import YoloSamLabeler, label_fingerprint
from charseg.layout import FramesDir, MasksDir
from charseg.masks import make_masks
from charseg.workers import WorkerPool
from planted_labels import PLANTED_SETTINGS, log_lines, planted_factory, rect_mask
from test_masks import FRAMES, config, make_frames

PERSON_FRAMES = sum(1 for *_, persons in FRAMES.values() if persons)


def run_stage(tmp_path: Path, name: str, cfg, **kwargs) -> Path:
    """make_masks into tmp_path/<name>; that folder."""
    out = tmp_path / name
    make_masks(FramesDir(tmp_path / "frames"), MasksDir(out / "masks"), out / "plots", out / "metrics.json", cfg,
               **kwargs)
    return out


def output_bytes(out: Path) -> dict[str, bytes]:
    """Every file of the masks folder, and the metrics, by relative path."""
    files = [p for p in (out / "masks").rglob("*") if p.is_file()] + [out / "metrics.json"]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def segment_pids(log: Path) -> list[int]:
    return [pid for pid, what in log_lines(log) if what == "segment"]


def assert_sound_cache(cache_dir: Path) -> int:
    """Every entry of the planted labeler's cache reads back whole, with the planted boxes' mask and no
    temporary file left; the number of entries."""
    cache = LabelCache(cache_dir, label_fingerprint(PLANTED_SETTINGS))
    entries = list(cache_dir.rglob("*.json"))
    for entry in entries:
        label = cache.get(entry.stem)
        assert label is not None, entry
        expected = rect_mask(label.mask.shape, [tuple(int(v) for v in box) for box in label.boxes]) > 0
        assert np.array_equal(label.mask, expected), entry
    assert not [p for p in cache_dir.rglob("*") if ".tmp" in p.name]
    return len(entries)


@pytest.fixture
def reference(tmp_path):
    """The frames, and the outputs of a one-process run on them (its own cache)."""
    make_frames(tmp_path / "frames")
    out = run_stage(tmp_path, "one", config(tmp_path, cache_dir=tmp_path / "cache_one"),
                    labeler_factory=partial(planted_factory, log=tmp_path / "one.log"))
    assert set(segment_pids(tmp_path / "one.log")) == {os.getpid()}  # workers: 1 labels in this process
    return output_bytes(out)


@pytest.mark.slow
def test_two_worker_processes_write_the_same_bytes_as_one(tmp_path, reference):
    log = tmp_path / "two.log"
    out = run_stage(tmp_path, "two", config(tmp_path, workers=2, batch=1),
                    labeler_factory=partial(planted_factory, log=log, delay=0.3))
    assert output_bytes(out) == reference
    builds = [pid for pid, what in log_lines(log) if what.startswith("build")]
    assert builds[0] == os.getpid() and len(builds) == 3  # the stage's (fingerprint only) + one per shard
    workers = set(segment_pids(log))
    assert len(segment_pids(log)) == PERSON_FRAMES and os.getpid() not in workers and 1 <= len(workers) <= 2
    assert assert_sound_cache(tmp_path / "cache") == len(FRAMES)


@pytest.mark.slow
def test_a_damaged_cache_entry_is_relabelled_by_the_stage_after_the_workers(tmp_path, reference):
    cfg = config(tmp_path, workers=2, batch=1)
    run_stage(tmp_path, "first", cfg, labeler_factory=planted_factory)
    damaged = sorted((tmp_path / "cache").rglob("*.ids.png"))[0]  # a person frame's instance map
    damaged.write_bytes(b"")  # e.g. a disk that filled up
    log = tmp_path / "again.log"
    out = run_stage(tmp_path, "again", cfg, labeler_factory=partial(planted_factory, log=log))
    assert output_bytes(out) == reference
    # The workers skip what the cache lists (missing_frames reads no PNG); the stage's own pass finds the
    # damaged entry unreadable and labels that one frame in this process.
    assert segment_pids(log) == [os.getpid()]
    assert assert_sound_cache(tmp_path / "cache") == len(FRAMES)


@pytest.mark.slow
def test_a_killed_worker_is_a_clear_error_and_the_rerun_completes(tmp_path, reference):
    cfg = config(tmp_path, workers=2, batch=1)
    # Shards are dealt round-robin over the rows (person, empty, 3 persons, person): the first worker's
    # second SAM call, on the 3-person frame, kills it after its first frame is cached.
    with pytest.raises(CharsegError, match=r"worker process ended abruptly \(exit code -9.*label cache.*again"):
        run_stage(tmp_path, "out", cfg, labeler_factory=partial(planted_factory, die_on_call=2))
    assert not (tmp_path / "out/masks").exists()
    cached = assert_sound_cache(tmp_path / "cache")
    cache = LabelCache(tmp_path / "cache", label_fingerprint(PLANTED_SETTINGS))
    cached_persons = sum(len(cache.get(p.stem).boxes) > 0 for p in (tmp_path / "cache").rglob("*.json"))
    assert cached >= 1 and cached_persons >= 1

    log = tmp_path / "rerun.log"
    out = run_stage(tmp_path, "out", cfg, labeler_factory=partial(planted_factory, log=log))
    assert output_bytes(out) == reference
    assert len(segment_pids(log)) == PERSON_FRAMES - cached_persons  # nothing cached is labelled again


@pytest.mark.slow
def test_two_processes_labelling_the_same_frames_at_once_leave_a_sound_cache(tmp_path, reference):
    cfg = config(tmp_path)
    paths = sorted((tmp_path / "frames/images").iterdir())
    factory = partial(planted_factory, log=tmp_path / "both.log", delay=0.3)
    fingerprint = label_fingerprint(PLANTED_SETTINGS)
    with WorkerPool(2, processes=True) as pool:
        futures = [pool.submit(label_shard, paths, cfg, factory, None, 1, fingerprint) for _ in range(2)]
        labelled = [future.result() for future in pool.as_completed(futures)]
    assert len(FRAMES) <= sum(labelled) <= 2 * len(FRAMES)
    assert assert_sound_cache(tmp_path / "cache") == len(FRAMES)

    def never():
        raise AssertionError("a frame was labelled again although both processes cached it")

    out = run_stage(tmp_path, "out", cfg, labeler=YoloSamLabeler(never, never, PLANTED_SETTINGS))
    assert output_bytes(out) == reference


def test_workers_0_on_a_cpu_box_is_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert worker_count(config(tmp_path, workers=0)) == 1
    assert worker_count(config(tmp_path, workers=3)) == 3
    make_frames(tmp_path / "frames")
    log = tmp_path / "log"
    run_stage(tmp_path, "out", config(tmp_path, workers=0), labeler_factory=partial(planted_factory, log=log))
    assert {pid for pid, _ in log_lines(log)} == {os.getpid()}
    assert len(segment_pids(log)) == PERSON_FRAMES


def test_workers_0_means_one_per_gpu_in_use(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert gpus_in_use(config(tmp_path, device="auto")) == ["cuda:0", "cuda:1", "cuda:2"]
    assert worker_count(config(tmp_path, device="cuda", workers=0)) == 3
    assert gpus_in_use(config(tmp_path, device="cuda:1")) == ["cuda:1"]
    assert worker_count(config(tmp_path, device="cuda:1", workers=0)) == 1
    assert gpus_in_use(config(tmp_path, device="cpu")) == [] and worker_count(config(tmp_path, workers=0)) == 1


def test_shards_are_disjoint_and_cover_every_frame():
    items = list(range(11))
    parts = shards(items, 3)
    assert [len(p) for p in parts] == [4, 4, 3] and sorted(sum(parts, [])) == items
    assert shards(items[:2], 3) == [[0], [1]] and shards([], 2) == []


def test_fewer_than_two_frames_to_label_stay_in_this_process(tmp_path, monkeypatch):
    make_frames(tmp_path / "frames", ids=list(FRAMES)[:1])
    monkeypatch.setattr(label_shards, "WorkerPool", lambda *a, **k: pytest.fail("worker processes started"))
    log = tmp_path / "log"
    run_stage(tmp_path, "out", replace(config(tmp_path), workers=4), labeler_factory=partial(planted_factory, log=log))
    assert segment_pids(log) == [os.getpid()]
