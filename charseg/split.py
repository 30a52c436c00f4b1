"""Split frames into train and validation so that no validation frame has a near-twin in train.

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

import argparse
import hashlib
from bisect import bisect_right
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from charseg.errors import require, run_cli, warn
from charseg.io import check_writable, read_manifest, write_json
from charseg.config import load_params, number, section

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


def make_split(rows: list[dict[str, Any]], val_fraction: float, seed: int, gap_seconds: float,
               keep_statuses: set[str]) -> tuple[dict[str, list[str]], dict[str, float | int]]:
    require(0 < val_fraction < 1, f"params.yaml: 'split.val_fraction' = {val_fraction} must be between 0 and 1 "
                                  f"(exclusive), e.g. 0.2")
    require(gap_seconds >= 0, f"params.yaml: 'split.gap_seconds' = {gap_seconds} must be >= 0")
    characters = sorted({r["character"] for r in rows})
    owners = defaultdict(set)
    for row in rows:
        owners[row["video"]].add(row["character"])
    for video in sorted(owners):
        require(len(owners[video]) == 1, f"video {video!r} is listed under several characters "
                                         f"({', '.join(sorted(owners[video]))}): each video belongs to one "
                                         f"character folder; re-run the stage that wrote the manifest")

    dropped_by_status: Counter = Counter()
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

    train: list[str] = []
    val: list[str] = []
    per_character: dict[str, dict[str, int]] = {}
    skipped, train_only, time_split = 0, 0, 0
    for character in characters:
        char_rows = usable.get(character, [])
        stats = {"train_frames": 0, "val_frames": 0, "train_videos": 0, "val_videos": 0,
                 "dropped_by_gap": 0, "dropped_by_status": dropped_by_status[character]}
        per_character[character] = stats
        if not char_rows:
            warn(f"character {character!r} has no usable frames (statuses kept: {', '.join(sorted(keep_statuses))}): "
                 f"left out of the split")
            skipped += 1
            continue
        by_video: dict[str, list[dict]] = defaultdict(list)
        for row in char_rows:
            by_video[row["video"]].append(row)
        if len(by_video) >= 2:
            val_videos = choose_val_videos({v: len(r) for v, r in by_video.items()}, val_fraction,
                                           character_rng(seed, character))
            char_train = [r for v in by_video if v not in val_videos for r in by_video[v]]
            char_val = [r for v in val_videos for r in by_video[v]]
            stats["train_videos"], stats["val_videos"] = len(by_video) - len(val_videos), len(val_videos)
        else:
            blocks = split_in_time(char_rows, val_fraction, gap_seconds)
            if blocks is None:
                warn(f"character {character!r} has one video with {len(char_rows)} usable frame(s), too short for "
                     f"a train block, a {gap_seconds} s gap and a validation block: all of it goes to train "
                     f"(add a second video or lower split.gap_seconds)")
                char_train, char_val = char_rows, []
                stats["train_videos"] = 1
                train_only += 1
            else:
                char_train, char_val = blocks
                stats["train_videos"] = stats["val_videos"] = 1
                stats["dropped_by_gap"] = len(char_rows) - len(char_train) - len(char_val)
                time_split += 1
        stats["train_frames"], stats["val_frames"] = len(char_train), len(char_val)
        train += [r["id"] for r in char_train]
        val += [r["id"] for r in char_val]

    require(val, "the split has no validation frames: every character has a single video too short to cut "
                 "(see the warnings above); add videos, lower split.gap_seconds or raise split.val_fraction")
    require(train, "the split has no training frames: lower split.val_fraction or add videos")
    metrics: dict[str, float | int] = {
        "frames_in_manifest": len(rows),
        "train_frames": len(train),
        "val_frames": len(val),
        "val_fraction_achieved": round(len(val) / (len(train) + len(val)), 6),
        "dropped_by_gap": sum(s["dropped_by_gap"] for s in per_character.values()),
        "dropped_by_status": sum(dropped_by_status.values()),
        "train_videos": sum(s["train_videos"] for s in per_character.values()),
        "val_videos": sum(s["val_videos"] for s in per_character.values()),
        "characters": len(characters) - skipped,
        "characters_skipped": skipped,
        "characters_train_only": train_only,
        "videos_split_in_time": time_split,
    }
    for character, stats in per_character.items():
        for name, value in stats.items():
            metrics[f"per_character/{character}/{name}"] = value
    return {"train": sorted(train), "val": sorted(val)}, metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=Path("data/frames/manifest.csv"),
                        help="frames or masks manifest (a 'status' column, when present, filters rows)")
    parser.add_argument("--out", type=Path, default=Path("data/split.json"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/split.json"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg = section(params, "split")
    keep_empty = params.get("labels", {}).get("keep_empty")
    require(isinstance(keep_empty, bool), f"params.yaml: 'labels.keep_empty' must be true or false, got {keep_empty!r}")
    val_fraction = number(cfg, "val_fraction", where="split")
    seed = number(cfg, "seed", lo=0, integer=True, where="split")
    gap_seconds = number(cfg, "gap_seconds", lo=0, where="split")
    for output in (args.out, args.metrics):  # both or neither: a read-only metrics/ must not follow a new split
        check_writable(output)
    split, metrics = make_split(read_rows(args.manifest), val_fraction, seed, gap_seconds,
                                usable_statuses(keep_empty))
    write_json(args.out, split)
    write_json(args.metrics, metrics)
    print(f"split: {metrics['train_frames']} train / {metrics['val_frames']} val frames "
          f"(val share {metrics['val_fraction_achieved']:.3f}), {metrics['dropped_by_gap']} dropped by the gap, "
          f"{metrics['dropped_by_status']} by status")

