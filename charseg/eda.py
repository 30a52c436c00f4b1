"""Look at the extracted frames before labelling them: balance, sizes, samples and bad frames (the library of
the `eda` stage; stages/eda.py runs `run_eda`).

Reads a FramesDir's manifest.csv and every frame it lists (grayscale statistics streamed through a
bounded thread pool, so memory does not grow with the images), and writes into the plots folder:

    frames_per_character.csv   character,frames          (dvc plots: bar_horizontal)
    frame_sizes.csv            width,height,frames       (how many frames have each size)
    flagged_frames.csv         near-black / near-uniform frames, with their image paths
    images/frames_per_character.png, images/frame_sizes.png, images/samples_<character>.png

plus flat, numbers-only metrics for `dvc metrics show`. Settings: EdaConfig (params.yaml `eda:`).
"""
from __future__ import annotations

import contextlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
from matplotlib.figure import Figure
from tqdm import tqdm

from charseg.config import EdaConfig
from charseg.errors import CharsegError
from charseg.io import atomic_dir, imread, read_manifest, slugify, write_csv, write_json
from charseg.layout import FramesDir
from charseg.workers import WorkerPool, cpu_count

MANIFEST_COLUMNS = ("id", "character", "video", "timestamp")
# Frames in flight at once: enough to keep every thread busy, small enough that memory stays flat.
FRAMES_PER_BATCH = 256
SAMPLE_MAX_SIDE = 480  # sample grids are for looking at, not pixel peeping: keeps the PNGs small
SIZE_LABELS_SHOWN = 12


@dataclass(frozen=True)
class FrameStats:
    width: int
    height: int
    mean: float
    std: float


def read_frames_manifest(frames: FramesDir) -> list[dict[str, Any]]:
    return read_manifest(frames.manifest, MANIFEST_COLUMNS)


def gray_stats(path: Path) -> FrameStats:
    gray = imread(path, cv2.IMREAD_GRAYSCALE)
    mean, std = cv2.meanStdDev(gray)
    return FrameStats(width=gray.shape[1], height=gray.shape[0], mean=float(mean[0, 0]), std=float(std[0, 0]))


def stream_stats(paths: list[Path], workers: int) -> Iterator[FrameStats]:
    """Stats of each path in order; decoding runs in threads (OpenCV releases the GIL), at most
    FRAMES_PER_BATCH frames in flight. Ctrl-C or an unreadable frame cancels the queued frames at once
    instead of decoding them first (charseg/workers.py)."""
    with WorkerPool(workers, processes=False) as pool:
        yield from pool.map(gray_stats, paths, window=FRAMES_PER_BATCH)


def pick_samples(rows: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """`count` frames spread evenly over the videos, then evenly in time within each video.

    Deterministic: depends only on the rows (videos by name, frames by timestamp).
    """
    by_video: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_video[row["video"]].append(row)
    videos = [sorted(by_video[v], key=lambda r: (r["timestamp"], r["id"])) for v in sorted(by_video)]
    if len(videos) > count:
        # More videos than slots: one frame from each of `count` videos spread over the list.
        videos = [videos[int((i + 0.5) * len(videos) / count)] for i in range(count)]
    quota = [0] * len(videos)
    remaining = min(count, sum(len(v) for v in videos))
    while remaining:
        # Round-robin over videos that still have unpicked frames, so short videos cap early.
        for i, frames in enumerate(videos):
            if remaining and quota[i] < len(frames):
                quota[i] += 1
                remaining -= 1
    picked = []
    for frames, n in zip(videos, quota):
        picked += [frames[int((j + 0.5) * len(frames) / n)] for j in range(n)]
    return picked


def flags(stats: FrameStats, cfg: EdaConfig) -> tuple[bool, bool]:
    """(near-black, near-uniform): the frame's mean is below eda.dark_mean, its std below eda.uniform_std."""
    return stats.mean < cfg.dark_mean, stats.std < cfg.uniform_std


def summarize(rows: list[dict[str, Any]], stats: list[FrameStats], cfg: EdaConfig) -> dict[str, float | int]:
    """Numbers-only, flat metrics; per-character values under 'per_character/<name>/<what>'."""
    frames = Counter(r["character"] for r in rows)
    videos = Counter(character for character, _ in {(r["character"], r["video"]) for r in rows})
    dark = Counter(r["character"] for r, s in zip(rows, stats) if flags(s, cfg)[0])
    uniform = Counter(r["character"] for r, s in zip(rows, stats) if flags(s, cfg)[1])
    widths = [s.width for s in stats]
    heights = [s.height for s in stats]
    n = len(rows)
    metrics: dict[str, float | int] = {
        "frames": n,
        "characters": len(frames),
        "videos": sum(videos.values()),
        "frames_per_character_min": min(frames.values()),
        "frames_per_character_max": max(frames.values()),
        "imbalance_ratio": round(max(frames.values()) / min(frames.values()), 4),
        "near_black": sum(dark.values()),
        "near_black_fraction": round(sum(dark.values()) / n, 6),
        "near_uniform": sum(uniform.values()),
        "near_uniform_fraction": round(sum(uniform.values()) / n, 6),
        "mean_intensity": round(float(np.mean([s.mean for s in stats])), 3),
        "distinct_sizes": len(set(zip(widths, heights))),
        "width_min": min(widths), "width_max": max(widths),
        "height_min": min(heights), "height_max": max(heights),
    }
    for character in sorted(frames):
        key = f"per_character/{character}"
        metrics[f"{key}/frames"] = frames[character]
        metrics[f"{key}/videos"] = videos[character]
        metrics[f"{key}/near_black"] = dark[character]
        metrics[f"{key}/near_uniform"] = uniform[character]
    return metrics


def plot_frames_per_character(path: Path, frames: Counter, flagged: Counter) -> None:
    names = sorted(frames, key=lambda c: (frames[c], c))  # barh draws bottom-up: largest on top
    counts = [frames[c] for c in names]
    fig = Figure(figsize=(8, max(2.5, 0.32 * len(names) + 1.4)), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(names, counts, color="#4C72B0", label="frames")
    if any(flagged.values()):
        ax.barh(names, [flagged[c] for c in names], color="#DD8452", label="near-black or near-uniform")
        ax.legend(loc="lower right", fontsize=8)
    for y, count in enumerate(counts):
        ax.text(count, y, f" {count}", va="center", fontsize=8)
    ax.set_xlim(0, max(counts) * 1.12)
    ax.set_xlabel("frames")
    ax.set_ylabel("character")
    ax.tick_params(axis="y", labelsize=9 if len(names) <= 20 else 7)
    ax.set_title(f"Frames per character ({sum(counts)} frames, {len(names)} characters, "
                 f"max/min = {max(counts) / min(counts):.2f})")
    fig.savefig(path, dpi=100)


def plot_frame_sizes(path: Path, sizes: Counter) -> None:
    widths, heights = zip(*sizes)
    counts = np.array([sizes[s] for s in sizes])
    fig = Figure(figsize=(7, 5.5), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(widths, heights, s=40 + 800 * counts / counts.max(), alpha=0.6, color="#4C72B0",
               edgecolors="black", linewidths=0.5)
    for (w, h), count in sizes.most_common(SIZE_LABELS_SHOWN):
        ax.annotate(f"{w}x{h}: {count}", (w, h), textcoords="offset points", xytext=(8, 6), fontsize=8)
    # Pixels on both axes at comparable scales, at least a 16:9 box: a 1-pixel-tall (or -wide) size must
    # not shrink one axis to a pixel and flatten the aspect lines into the frame's edge.
    right, top = max(widths) * 1.25, max(heights) * 1.25
    top = max(top, right * 9 / 16)
    right = max(right, top * 9 / 16)
    for ratio, label in ((9 / 16, "16:9"), (3 / 4, "4:3")):
        ax.plot([0, right], [0, right * ratio], ls="--", lw=0.8, color="grey")
        # Label each aspect line just inside where it leaves the axes.
        x = min(right, top / ratio) * 0.96
        ax.annotate(label, (x, x * ratio), fontsize=8, color="grey", ha="right", va="bottom")
    ax.set_xlim(0, right)
    ax.set_ylim(0, top)
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title(f"Frame sizes ({len(sizes)} distinct; marker area ~ frames)")
    fig.savefig(path, dpi=100)


def _shrunk(image: np.ndarray, max_side: int) -> np.ndarray:
    """At most `max_side` pixels on the longer side, keeping the aspect; never 0 pixels on the shorter one
    (a 1 x 1920 frame becomes 1 x 480, where fx/fy scaling would round its height to 0 and fail)."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def plot_samples(path: Path, character: str, samples: list[dict[str, Any]], frames: FramesDir,
                 total_frames: int, total_videos: int) -> None:
    cols = min(4, len(samples))
    rows = -(-len(samples) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows + 0.6), layout="constrained")
    fig.suptitle(f"{character}: {len(samples)} of {total_frames} frames from {total_videos} video(s)")
    for i, row in enumerate(samples):
        image = _shrunk(imread(frames.image(row["id"])), SAMPLE_MAX_SIDE)
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        ax.set_title(row["id"], fontsize=7)
        ax.axis("off")
    fig.savefig(path, dpi=100)


def frame_stats(frames: FramesDir, rows: list[dict[str, Any]], workers: int) -> list[FrameStats]:
    """FrameStats of every row's image, in order, with a progress bar; an unreadable frame is named."""
    stats: list[FrameStats] = []
    try:
        # closing(): a KeyboardInterrupt raised here (between two frames) stops the pool now, not when the
        # generator happens to be garbage-collected.
        with contextlib.closing(stream_stats([frames.image(row["id"]) for row in rows], workers)) as stream:
            for one in tqdm(stream, total=len(rows), desc="eda: frame stats", unit="frame"):
                stats.append(one)
    except CharsegError as err:
        raise CharsegError(f"{frames.manifest} lists a frame that cannot be read: {err}") from None
    return stats


def write_tables(out: Path, rows: list[dict[str, Any]], stats: list[FrameStats], frames: FramesDir,
                 cfg: EdaConfig) -> None:
    """frames_per_character.csv, frame_sizes.csv and flagged_frames.csv into `out`."""
    per_character = Counter(r["character"] for r in rows)
    sizes = Counter((s.width, s.height) for s in stats)
    write_csv(out / "frames_per_character.csv",
              ({"character": c, "frames": n} for c, n in sorted(per_character.items(), key=lambda kv: (-kv[1], kv[0]))),
              ["character", "frames"])
    write_csv(out / "frame_sizes.csv",
              ({"width": w, "height": h, "frames": n} for (w, h), n in sorted(sizes.items())),
              ["width", "height", "frames"])
    flagged = sorted(((r, s) for r, s in zip(rows, stats) if any(flags(s, cfg))), key=lambda rs: rs[0]["id"])
    write_csv(out / "flagged_frames.csv",
              ({"id": r["id"], "character": r["character"], "video": r["video"], "timestamp": r["timestamp"],
                "mean": round(s.mean, 2), "std": round(s.std, 2), "near_black": int(flags(s, cfg)[0]),
                "near_uniform": int(flags(s, cfg)[1]), "image": frames.image(r["id"]).as_posix()}
               for r, s in flagged),
              ["id", "character", "video", "timestamp", "mean", "std", "near_black", "near_uniform", "image"])


def write_images(out: Path, rows: list[dict[str, Any]], stats: list[FrameStats], frames: FramesDir,
                 cfg: EdaConfig) -> None:
    """The PNGs under `out`: frames per character, frame sizes and one sample grid per character."""
    out.mkdir()
    flagged = Counter(r["character"] for r, s in zip(rows, stats) if any(flags(s, cfg)))
    plot_frames_per_character(out / "frames_per_character.png", Counter(r["character"] for r in rows), flagged)
    plot_frame_sizes(out / "frame_sizes.png", Counter((s.width, s.height) for s in stats))
    by_character: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_character[row["character"]].append(row)
    for character in tqdm(sorted(by_character), desc="eda: sample grids", unit="character"):
        char_rows = by_character[character]
        plot_samples(out / f"samples_{slugify(character)}.png", character,
                     pick_samples(char_rows, cfg.samples_per_character), frames,
                     len(char_rows), len({r["video"] for r in char_rows}))


def run_eda(frames: FramesDir, plots_dir: Path, metrics_path: Path, cfg: EdaConfig) -> dict[str, float | int]:
    """Write the tables and images into `plots_dir` (all or nothing) and the metrics; returns the metrics."""
    rows = read_frames_manifest(frames)
    stats = frame_stats(frames, rows, cfg.workers or cpu_count())
    metrics = summarize(rows, stats, cfg)
    with atomic_dir(plots_dir) as out:
        write_tables(out, rows, stats, frames, cfg)
        write_images(out / "images", rows, stats, frames, cfg)
    write_json(metrics_path, metrics)
    return metrics
