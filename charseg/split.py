"""Split frames into train and validation so that no validation frame has a near-twin in train (the library of
the `split` stage; stages/split.py runs `write_split`).

Frames of one video look alike, so whole videos go to one side:
- a character with >= 2 videos gets >= 1 video on each side, choosing the set of validation videos
  whose frame count is closest to `split.val_fraction` of the character's frames. Up to 16 videos
  every assignment is tried and the seed picks among the equally good ones; above that, the best of
  32 greedy runs over seeded video orders, each polished by moving or swapping videos, is kept.
- a character with a single video is cut in time: the validation block is the end of the video, its
  start chosen so the validation share of the kept frames is closest to `val_fraction`, and train
  keeps only frames at least `split.gap_seconds` before the first validation frame (the frames in
  between are dropped and counted). The end rather than a seeded middle block: one gap, not two.
  A video too short to hold both blocks goes to train, with a warning.

The result is a pure function of the manifest rows (their order does not matter) and the params;
each character's draws come from (seed, character name), so adding a character leaves the others' split
unchanged.

The input may be the frames manifest or the masks manifest. When it has a `status` column, rows
`labelled` are kept, `empty` (no person found: an all-background mask) only when
`labels.keep_empty` is true, and `failed` never. The masks stage only reports what it found; the
split applies the choice, so toggling `labels.keep_empty` reruns the split, not the labelling.
"""
from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from charseg.config import SplitConfig
from charseg.errors import require, warn
from charseg.io import check_writable, read_manifest, write_json

REQUIRED_COLUMNS = ("id", "character", "video", "timestamp")
KNOWN_STATUSES = ("labelled", "empty", "failed")
EXACT_MAX_VIDEOS = 16  # 2**16 assignments per character is still instant
GREEDY_RESTARTS = 32


def character_rng(seed: int, character: str) -> np.random.Generator:
    name_key = int.from_bytes(hashlib.sha256(character.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, name_key])


def read_rows(manifest: Path) -> list[dict[str, Any]]:
    return read_manifest(manifest, REQUIRED_COLUMNS)


def usable_statuses(keep_empty: bool) -> set[str]:
    return {"labelled", "empty"} if keep_empty else {"labelled"}


def choose_val_videos(sizes: dict[str, int], val_fraction: float, rng: np.random.Generator) -> set[str]:
    """A proper, non-empty subset of the videos whose frames are closest to val_fraction of all."""
    videos = sorted(sizes)
    counts = np.array([sizes[v] for v in videos], dtype=np.int64)
    target = val_fraction * counts.sum()
    if len(videos) <= EXACT_MAX_VIDEOS:
        sums = np.zeros(1, dtype=np.int64)
        for count in counts:  # sums[mask] = frames of the videos whose bits are set in mask
            sums = np.concatenate([sums, sums + count])
        error = np.abs(sums - target).astype(float)
        error[[0, -1]] = np.inf  # nobody in val / everybody in val
        best = np.flatnonzero(error <= error.min() + 1e-9)
        mask = int(best[rng.integers(len(best))])
        return {v for i, v in enumerate(videos) if mask >> i & 1}
    best_val, best_error = None, np.inf
    for _ in range(GREEDY_RESTARTS):
        in_val = _greedy_then_improve(counts, target, rng.permutation(len(videos)))
        error = abs(counts[in_val].sum() - target)
        if error < best_error - 1e-9:  # ties keep the earlier run: same seed, same answer
            best_val, best_error = in_val, error
    return {v for v, chosen in zip(videos, best_val) if chosen}


def _greedy_then_improve(counts: np.ndarray, target: float, order: np.ndarray) -> np.ndarray:
    """Add videos in `order` while that gets closer to target, then apply the best single move
    (one video in, one out, or a pair swapped) until none helps. Returns the val mask."""
    in_val = np.zeros(len(counts), dtype=bool)
    total = 0
    for i in order:
        if abs(total + counts[i] - target) < abs(total - target):
            in_val[i] = True
            total += counts[i]
    if not in_val.any():
        in_val[order[0]] = True
    if in_val.all():
        in_val[order[-1]] = False
    while True:
        total = counts[in_val].sum()
        val_idx, train_idx = np.flatnonzero(in_val), np.flatnonzero(~in_val)
        moves: list[tuple[float, list[int]]] = []
        if len(val_idx) > 1:
            errors = np.abs(total - counts[val_idx] - target)
            moves.append((errors.min(), [val_idx[errors.argmin()]]))
        if len(train_idx) > 1:
            errors = np.abs(total + counts[train_idx] - target)
            moves.append((errors.min(), [train_idx[errors.argmin()]]))
        errors = np.abs(total - target - counts[val_idx][:, None] + counts[train_idx][None, :])
        out, into = np.unravel_index(errors.argmin(), errors.shape)
        moves.append((errors[out, into], [val_idx[out], train_idx[into]]))
        error, flips = min(moves, key=lambda move: move[0])
        if error >= abs(total - target) - 1e-9:
            return in_val
        in_val[flips] = ~in_val[flips]


def split_in_time(rows: list[dict[str, Any]], val_fraction: float,
                  gap_seconds: float) -> tuple[list[dict], list[dict]] | None:
    """(train, val) blocks of one video; None when it is too short to hold both blocks and the gap."""
    rows = sorted(rows, key=lambda r: (r["timestamp"], r["id"]))
    times = [r["timestamp"] for r in rows]
    best_key, best = None, None
    for start in range(1, len(rows)):  # rows[start:] is the validation block
        n_train = min(start, bisect_right(times, times[start] - gap_seconds))
        n_val = len(rows) - start
        if n_train == 0:
            continue
        # Closest share first; among equals, fewer dropped frames, then the longer train block.
        key = (abs(n_val / (n_train + n_val) - val_fraction), -(n_train + n_val), -start)
        if best_key is None or key < best_key:
            best_key, best = key, (rows[:n_train], rows[start:])
    return best


def _usable_rows(rows: list[dict[str, Any]],
                 keep_statuses: set[str]) -> tuple[dict[str, list[dict]], Counter[str]]:
    """The rows kept by their status, per character, and how many rows of each character the status drops.
    Checks that each video belongs to one character and that every status is known."""
    owners = defaultdict(set)
    for row in rows:
        owners[row["video"]].add(row["character"])
    for video in sorted(owners):
        require(len(owners[video]) == 1, f"video {video!r} is listed under several characters "
                                         f"({', '.join(sorted(owners[video]))}): each video belongs to one "
                                         f"character folder; re-run the stage that wrote the manifest")
    dropped_by_status: Counter[str] = Counter()
    usable: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        status = row.get("status")
        if status is not None:
            require(status in KNOWN_STATUSES, f"frame {row['id']!r} has status {status!r}; "
                                              f"expected one of {', '.join(KNOWN_STATUSES)}")
        if status is None or status in keep_statuses:
            usable[row["character"]].append(row)
        else:
            dropped_by_status[row["character"]] += 1
    return usable, dropped_by_status


def split_character(character: str, rows: list[dict[str, Any]], val_fraction: float, seed: int,
                    gap_seconds: float) -> tuple[list[dict], list[dict], dict[str, int], str]:
    """(train rows, val rows, video counts, how) of one character's usable rows. `how`: "videos" (whole videos
    on each side), "time" (its single video cut in time) or "train_only" (one video too short to cut)."""
    by_video: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_video[row["video"]].append(row)
    if len(by_video) >= 2:
        val_videos = choose_val_videos({v: len(r) for v, r in by_video.items()}, val_fraction,
                                       character_rng(seed, character))
        train = [r for v in by_video if v not in val_videos for r in by_video[v]]
        val = [r for v in val_videos for r in by_video[v]]
        return train, val, {"train_videos": len(by_video) - len(val_videos), "val_videos": len(val_videos)}, "videos"
    blocks = split_in_time(rows, val_fraction, gap_seconds)
    if blocks is None:
        warn(f"character {character!r} has one video with {len(rows)} usable frame(s), too short for "
             f"a train block, a {gap_seconds} s gap and a validation block: all of it goes to train "
             f"(add a second video or lower split.gap_seconds)")
        return rows, [], {"train_videos": 1}, "train_only"
    train, val = blocks
    return train, val, {"train_videos": 1, "val_videos": 1,
                        "dropped_by_gap": len(rows) - len(train) - len(val)}, "time"


def make_split(rows: list[dict[str, Any]], val_fraction: float, seed: int, gap_seconds: float,
               keep_statuses: set[str]) -> tuple[dict[str, list[str]], dict[str, float | int]]:
    """({"train": ids, "val": ids}, metrics) of the manifest rows; `val_fraction` in (0, 1) and `gap_seconds`
    >= 0 (the params schema checks both)."""
    usable, dropped_by_status = _usable_rows(rows, keep_statuses)
    train: list[str] = []
    val: list[str] = []
    per_character: dict[str, dict[str, int]] = {}
    how: Counter[str] = Counter()
    for character in sorted({r["character"] for r in rows}):
        stats = per_character[character] = {"train_frames": 0, "val_frames": 0, "train_videos": 0, "val_videos": 0,
                                            "dropped_by_gap": 0, "dropped_by_status": dropped_by_status[character]}
        char_rows = usable.get(character, [])
        if not char_rows:
            warn(f"character {character!r} has no usable frames (statuses kept: {', '.join(sorted(keep_statuses))}): "
                 f"left out of the split")
            how["skipped"] += 1
            continue
        char_train, char_val, counts, kind = split_character(character, char_rows, val_fraction, seed, gap_seconds)
        stats.update(counts, train_frames=len(char_train), val_frames=len(char_val))
        how[kind] += 1
        train += [r["id"] for r in char_train]
        val += [r["id"] for r in char_val]
    require(val, "the split has no validation frames: every character has a single video too short to cut "
                 "(see the warnings above); add videos, lower split.gap_seconds or raise split.val_fraction")
    require(train, "the split has no training frames: lower split.val_fraction or add videos")
    return {"train": sorted(train), "val": sorted(val)}, split_metrics(len(rows), per_character, how)


def split_metrics(frames_in_manifest: int, per_character: dict[str, dict[str, int]],
                  how: Counter[str]) -> dict[str, float | int]:
    """Flat, numbers-only metrics: totals, then per_character/<name>/<count>."""
    def total(name: str) -> int:
        return sum(stats[name] for stats in per_character.values())

    n_train, n_val = total("train_frames"), total("val_frames")
    metrics: dict[str, float | int] = {
        "frames_in_manifest": frames_in_manifest,
        "train_frames": n_train,
        "val_frames": n_val,
        "val_fraction_achieved": round(n_val / (n_train + n_val), 6),
        "dropped_by_gap": total("dropped_by_gap"),
        "dropped_by_status": total("dropped_by_status"),
        "train_videos": total("train_videos"),
        "val_videos": total("val_videos"),
        "characters": len(per_character) - how["skipped"],
        "characters_skipped": how["skipped"],
        "characters_train_only": how["train_only"],
        "videos_split_in_time": how["time"],
    }
    for character, stats in per_character.items():
        for name, value in stats.items():
            metrics[f"per_character/{character}/{name}"] = value
    return metrics


def write_split(manifest: Path, out: Path, metrics_path: Path, cfg: SplitConfig,
                keep_empty: bool) -> dict[str, float | int]:
    """Split the frames or masks manifest into `out` ({"train": ids, "val": ids}) and its metrics into
    `metrics_path` (both or neither); `keep_empty`: labels.keep_empty. Returns the metrics."""
    for output in (out, metrics_path):  # both or neither: a read-only metrics/ must not follow a new split
        check_writable(output)
    split, metrics = make_split(read_rows(manifest), cfg.val_fraction, cfg.seed, cfg.gap_seconds,
                                usable_statuses(keep_empty))
    write_json(out, split)
    write_json(metrics_path, metrics)
    return metrics
