"""Extract frames from the character videos, sampled by timestamp: the library of the `frames` stage
(stages/frames.py runs `extract_frames`).

Reads `<videos>/<character>/<file>` (.mp4 .avi .mkv .mov .webm, any case) and writes a FramesDir, all or
nothing: `images/<id>.jpg`, `manifest.csv` (FRAME_COLUMNS: id,character,video,frame_index,timestamp,width,
height; sorted by id) and `report.json` (per-video fps used, skipped files and why); counts go to the
metrics file. Settings: FramesConfig (params.yaml `frames:`): fps, max_side, jpeg_quality, workers,
decoder (auto: PyAV, OpenCV for a file PyAV cannot open, reported; both keep the same frames).

Bad input does not stop the stage, it is skipped and listed in report.json with a warning: a file that
is not a video, a file directly in the videos folder, a folder inside a character folder, an empty
character folder, a hidden folder (name starting with a dot), a symbolic link that is broken or loops,
a named pipe or device file, a name that is not valid UTF-8, a character + video name too long for the
frame file names on the output filesystem, and a video that cannot be decoded at all (empty, corrupt,
no frames). A video that decodes but stops clearly before its announced length (a truncated copy) keeps
the frames it has, is marked "incomplete": true in report.json and warned about; frames.fps above a
video's own rate is warned about too (every frame is kept). The stage fails only when no frame at all
results (and then keeps any previous output). Hidden files (.DS_Store, .gitkeep) are ignored silently.

A problem with the output (a full disk, a read-only folder) stops the stage: the OSError comes out as one
`error:` line (run_cli) and the temporary output is removed. So does Ctrl-C, within about a second: the
worker processes are stopped, not left to finish the queued videos (charseg/workers.py); a second
Ctrl-C kills them at once.

Speed: frames that are not kept are decoded but never converted (see charseg/video.py), frames
are written as JPEG, and videos are decoded in parallel processes; with fewer videos than workers,
long videos are also cut into time chunks decoded in parallel. The output does not depend on the
number of workers: a frame is kept by its own timestamp, wherever a chunk starts, and the manifest is
sorted.
"""
from __future__ import annotations

import errno
import math
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
from tqdm import tqdm

from charseg.config import FramesConfig
from charseg.errors import CharsegError, warn
from charseg.io import atomic_dir, imwrite_atomic, name_max, slugify, write_csv, write_json
from charseg.layout import FRAME_COLUMNS, FRAME_SUFFIX, FramesDir
from charseg.video import VIDEO_EXTENSIONS, VideoInfo, is_video_file, looks_truncated, open_reader, open_video
from charseg.workers import WorkerPool, cpu_count

MIN_CHUNK_SECONDS = 30.0  # a video is cut into parallel chunks no shorter than this
CHUNKS_PER_WORKER = 2     # a few more chunks than workers, so that they finish at about the same time
VIDEO_KINDS = " ".join(VIDEO_EXTENSIONS)


@dataclass(frozen=True)
class VideoJob:
    path: Path
    character: str
    video: str  # path relative to the videos folder, POSIX separators: the manifest's `video`

    @property
    def id_prefix(self) -> str:
        return f"{slugify(self.character)}--{slugify(self.path.stem)}"


def frame_id(id_prefix: str, timestamp: float) -> str:
    # Whole milliseconds rounded down (the sampler keeps at most one frame per 1/fps interval, fps <= 1000,
    # so two kept frames never share a millisecond); the epsilon absorbs float error like 99999.99999.
    return f"{id_prefix}--{math.floor(timestamp * 1000 + 1e-6):08d}"


def _shown(path: Path | str) -> str:
    """A path as text that can go into JSON/CSV: bytes of a non-UTF-8 name become \\x escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _kind(path: Path) -> tuple[str, str | None]:
    """'dir', 'file' (a regular file, through symlinks) or 'bad' with the reason it cannot be used."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        if path.is_symlink():
            target = _shown(os.readlink(path))
            if err.errno == errno.ELOOP:
                return "bad", f"a symbolic link loop (-> {target}): fix or remove the link"
            return "bad", (f"a symbolic link to {target}, which cannot be followed ({err.strerror}): "
                           f"fix or remove the link")
        return "bad", f"cannot be read ({err.strerror}): check its permissions"
    if stat.S_ISDIR(mode):
        return "dir", None
    if stat.S_ISREG(mode):
        return "file", None
    what = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a device file" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    return "bad", f"{what}, not a video file (reading it could block forever): remove it"


def _bad_name(path: Path) -> str | None:
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:  # os.listdir gives undecodable bytes as surrogates
        return ("its name is not valid UTF-8 (written by a system with another encoding?), so it cannot go "
                "into the manifest: rename it")
    return None


def _name_too_long(job: VideoJob, limit: int) -> str | None:
    """The frames of `job` are `<id>.jpg` (the masks stage writes `<id>.png`, as long): that name must fit."""
    name = f"{frame_id(job.id_prefix, 0)}{FRAME_SUFFIX}"
    size = len(os.fsencode(name))
    if size <= limit:
        return None
    return (f"its frame files would be named like {name[:40]}...{name[-20:]} ({size} bytes), longer than the "
            f"{limit} bytes the output filesystem allows (the frame id is <character>--<video name>--<ms>): "
            f"shorten the character folder's or the video's name")


class _Skipped:
    """The entries of the videos folder that are not used, each with the reason (report.json's `skipped`)."""

    def __init__(self, videos_root: Path) -> None:
        self.videos_root = videos_root
        self.items: list[dict[str, str]] = []

    def add(self, path: Path, reason: str) -> None:
        self.items.append({"path": _shown(path.relative_to(self.videos_root).as_posix()),
                           "reason": f"{_shown(path)}: {reason}"})

    def usable(self, path: Path) -> str | None:
        """The entry's kind ('dir' or 'file'), or None when it is skipped (and added) or ignored."""
        kind, problem = _kind(path)
        if path.name.startswith("."):
            if kind == "dir":  # a hidden file (.DS_Store, .gitkeep, the sample's marker) is ignored silently
                self.add(path, "hidden folder, skipped: remove the leading dot from its name to use it")
            return None
        problem = problem or _bad_name(path)
        if problem:
            self.add(path, problem)
            return None
        return kind


def discover(videos_root: Path, max_name: int = 255) -> tuple[list[VideoJob], list[dict[str, str]]]:
    """The videos to read, and the entries that are skipped with the reason (for report.json).

    `max_name`: the longest file name the output filesystem allows (see `name_max`).
    """
    skipped = _Skipped(videos_root)
    jobs: list[VideoJob] = []
    for entry in sorted(videos_root.iterdir()):
        kind = skipped.usable(entry)
        if kind == "dir":
            jobs += _character_videos(entry, max_name, skipped)
        elif kind is not None:
            skipped.add(entry, f"a file directly in {_shown(videos_root)} has no character: move it into "
                               f"{_shown(videos_root)}/<character>/")
    return jobs, skipped.items


def _character_videos(folder: Path, max_name: int, skipped: _Skipped) -> list[VideoJob]:
    """The usable videos of one character folder; every other entry is added to `skipped`."""
    try:
        children = sorted(folder.iterdir())
    except OSError as err:
        skipped.add(folder, f"character folder that cannot be listed ({err.strerror}): check its permissions")
        return []
    found = []
    for path in children:
        kind = skipped.usable(path)
        if kind is None:
            continue
        if kind == "dir":
            skipped.add(path, ("a folder named like a video file; " if is_video_file(path) else "")
                        + f"folders inside a character folder are not searched: move its videos up into {_shown(folder)}")
        elif not is_video_file(path):
            skipped.add(path, f"not a video file by its extension (expected one of {VIDEO_KINDS}): remove or convert it")
        else:
            job = VideoJob(path, folder.name, path.relative_to(skipped.videos_root).as_posix())
            problem = _name_too_long(job, max_name)
            if problem:
                skipped.add(path, problem)
            else:
                found.append(job)
    if not found:
        videos_skipped = any(item["path"].startswith(_shown(folder.name) + "/") for item in skipped.items)
        skipped.add(folder, "character folder with no usable video: each of its entries was skipped (see them)"
                    if videos_skipped else
                    f"character folder with no video file ({VIDEO_KINDS}): add videos or remove the folder")
    return _distinct_ids(found, skipped)


def _distinct_ids(found: list[VideoJob], skipped: _Skipped) -> list[VideoJob]:
    """`found` less the videos whose frame ids would collide with an earlier one's (same stem)."""
    by_prefix: dict[str, VideoJob] = {}
    for job in found:
        if job.id_prefix in by_prefix:
            skipped.add(job.path, f"same name as {by_prefix[job.id_prefix].video} apart from the extension, so "
                                  f"their frame ids would collide: rename one of them")
        else:
            by_prefix[job.id_prefix] = job
    return list(by_prefix.values())


def _resized(image: np.ndarray, max_side: int | None) -> np.ndarray:
    height, width = image.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class Chunk:
    """Frames [start, stop) of one video (stop None: to the end), decoded by one worker."""
    job: VideoJob
    info: VideoInfo
    start: int
    stop: int | None

    @property
    def seconds(self) -> float:
        return ((self.stop or self.info.reported_frames) - self.start) / self.info.fps


def plan_chunks(videos: list[tuple[VideoJob, VideoInfo]], n_workers: int) -> list[Chunk]:
    """Whole videos for one worker; for several, long videos are cut into ranges of at least
    MIN_CHUNK_SECONDS so that a few long episodes still keep every core busy.

    Each cut costs one seek, which decodes from the previous keyframe (up to a few seconds of video
    on typical TV encodes), hence the minimum length. The frames kept do not depend on the cuts.
    """
    def splittable(info: VideoInfo) -> bool:  # frame index <-> time needs the container's own, constant fps
        return (n_workers > 1 and info.fps_source == "container" and info.reported_frames > 0
                and info.timestamps and not info.variable_rate)

    total_seconds = sum(info.reported_frames / info.fps for _, info in videos if splittable(info))
    target_seconds = max(MIN_CHUNK_SECONDS, total_seconds / (CHUNKS_PER_WORKER * n_workers))
    chunks = []
    for job, info in videos:
        parts = max(1, int(info.reported_frames / info.fps // target_seconds)) if splittable(info) else 1
        bounds = [info.reported_frames * i // parts for i in range(parts)] + [None]
        chunks.extend(Chunk(job, info, bounds[i], bounds[i + 1]) for i in range(parts))
    return chunks


def extract_chunk(chunk: Chunk, out: FramesDir, cfg: FramesConfig, threads: int = 0) -> dict[str, Any]:
    """Write one chunk's sampled frames into `out.images`; returns its manifest rows and how far it decoded,
    or the error. On failure the frames already written by this chunk are removed."""
    job, rows, written = chunk.job, [], []
    reader = open_reader(chunk.info, threads)
    try:
        for frame in reader.sample(cfg.fps, chunk.start, chunk.stop):
            image = _resized(frame.image, cfg.max_side)
            row_id = frame_id(job.id_prefix, frame.timestamp)
            path = out.image(row_id)
            imwrite_atomic(path, image, [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality])
            written.append(path)
            rows.append({"id": row_id, "character": job.character, "video": job.video,
                         "frame_index": frame.index, "timestamp": round(frame.timestamp, 6),
                         "width": image.shape[1], "height": image.shape[0]})
    except (CharsegError, cv2.error, av.error.FFmpegError) as err:
        for path in written:
            path.unlink(missing_ok=True)
        reason = str(err) if isinstance(err, CharsegError) else \
            f"{job.path}: {chunk.info.decoder} failed to decode it ({err}): the file is damaged"
        return {"error": reason}
    return {"rows": rows, "reached": reader.reached, "damaged": getattr(reader, "damaged", []),
            "substituted": getattr(reader, "substituted", [])}


def _video_result(job: VideoJob, info: VideoInfo, parts: list[tuple[Chunk, dict[str, Any]]],
                  out: FramesDir, fps: float) -> dict[str, Any]:
    """Merge a video's chunks into its manifest rows, report entry and warnings (or a skip)."""
    errors = [result["error"] for _, result in parts if "error" in result]
    if errors:
        for _, result in parts:
            for row in result.get("rows", []):
                out.image(row["id"]).unlink(missing_ok=True)
        return {"skipped": {"path": job.video, "reason": errors[0]}}
    rows = [row for _, result in parts for row in result["rows"]]
    # The file really ends where the first chunk stopped short of its range (or where the last one ended).
    decoded = next((result["reached"] for chunk, result in parts
                    if chunk.stop is not None and result["reached"] < chunk.stop), parts[-1][1]["reached"])
    truncated = looks_truncated(info, decoded)
    damaged = sorted({round(s, 3) for _, result in parts for s in result.get("damaged", [])})
    substituted = [[round(p, 6), None if u is None else round(u, 6)]
                   for _, result in parts for p, u in result.get("substituted", [])]
    entry = {"video": job.video, "character": job.character, "frames": len(rows),
             "fps_used": round(info.fps, 6), "fps_source": info.fps_source,
             "reported_fps": info.reported_fps if math.isfinite(info.reported_fps) else None,  # JSON has no NaN
             "frames_decoded": decoded, "reported_frames": info.reported_frames,
             "width": info.width, "height": info.height, "incomplete": truncated or bool(damaged),
             "decoder": info.decoder, "decoder_fallback": info.fallback, "timestamps": info.timestamps,
             "variable_rate": info.variable_rate, "rotation": info.rotation,
             "damaged_at_s": damaged, "substituted_s": substituted}
    warnings = _video_warnings(job, info, fps, len(rows), decoded, truncated)
    warnings += _decoding_warnings(job, info, damaged, substituted)
    return {"rows": rows, "video": entry, "warnings": warnings}


def _decoding_warnings(job: VideoJob, info: VideoInfo, damaged: list[float],
                       substituted: list[list[float | None]]) -> list[str]:
    """What the PyAV reader (or the fall back from it) had to do differently from a clean decode."""
    warnings = []
    if info.fallback:
        warnings.append(f"{job.path}: PyAV could not open it, so OpenCV decoded it ({info.fallback})")
    if not info.timestamps:
        warnings.append(f"{job.path}: the video stream has no timestamps, so frames were timed by counting "
                        f"them at {info.fps:.3f} fps ({info.fps_source}): re-mux it into .mp4/.mkv for exact times")
    if damaged:
        shown = ", ".join(f"{s:.2f}" for s in damaged[:5]) + (", ..." if len(damaged) > 5 else "")
        warnings.append(f"{job.path}: {len(damaged)} damaged packet(s) skipped (at {shown} s): the frames around "
                        f"them were kept. Re-copy or re-encode it to recover the rest")
    lost = [p for p, used in substituted if used is None]
    if substituted:
        warnings.append(f"{job.path}: {len(substituted)} picked frame(s) could not be decoded; "
                        f"{len(substituted) - len(lost)} replaced by the nearest decoded frame within half a "
                        f"sampling interval (report.json substituted_s: [picked, used] seconds), {len(lost)} lost")
    return warnings


def _video_warnings(job: VideoJob, info: VideoInfo, fps: float, n_frames: int, decoded: int,
                    truncated: bool) -> list[str]:
    warnings = []
    if info.fps_source != "container":
        warnings.append(f"{job.path}: the container reports {info.reported_fps:g} fps, which is not plausible; "
                        + ("used the frames' own timestamps" if info.fps_source == "timestamps" else
                           "its timestamps are unusable too, so a frame rate was assumed")
                        + f" ({info.fps:.3f} fps)")
    if fps > info.fps * (1 + 1e-6):
        warnings.append(f"{job.path}: frames.fps {fps:g} is above the video's own {info.fps:.3f} fps, so every "
                        f"frame was kept ({n_frames} frames, not {fps:g} per second): lower frames.fps to "
                        f"{info.fps:.3f} or less to silence this")
    if truncated:
        warnings.append(f"{job.path}: decoding stopped at frame {decoded} of {info.reported_frames} "
                        f"({decoded / info.fps:.1f} s): the file looks truncated or damaged; the frames before "
                        f"that were kept. Re-copy or re-encode it to get the rest")
    return warnings


def _init_worker() -> None:
    cv2.setNumThreads(1)  # parallelism comes from the processes; avoid cores x cores threads


def _run_chunks(chunks: list[Chunk], n_workers: int, out: FramesDir, cfg: FramesConfig) -> list[dict[str, Any]]:
    """Every chunk's extract_chunk result, in the order of `chunks`. Ctrl-C, or an error such as a full disk
    (the OSError comes out as it is), stops the workers at once: see charseg/workers.py."""
    parts_of = Counter(chunk.job for chunk in chunks)
    results: list[dict[str, Any]] = [{} for _ in chunks]
    with tqdm(total=len(parts_of), desc="frames", unit="video",
              bar_format="{l_bar}{bar}| {n:.0f}/{total} videos [{elapsed}<{remaining}]") as progress:
        if n_workers == 1:
            for i, chunk in enumerate(chunks):
                results[i] = extract_chunk(chunk, out, cfg)
                progress.update(1 / parts_of[chunk.job])
            return results
        threads = max(1, cpu_count() // n_workers)  # ffmpeg decode threads per process
        with WorkerPool(n_workers, processes=True, initializer=_init_worker) as pool:
            # Longest first, so that no long chunk starts last and keeps one core busy alone.
            order = sorted(range(len(chunks)), key=lambda i: -chunks[i].seconds)
            futures = {pool.submit(extract_chunk, chunks[i], out, cfg, threads): i for i in order}
            for future in pool.as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                progress.update(1 / parts_of[chunks[i].job])
    return results


def _find_videos(videos_root: Path, out: FramesDir) -> tuple[list[VideoJob], list[dict[str, str]]]:
    """discover(), or an error saying where videos go when there are none."""
    how_to = (f"put videos in {videos_root}/<character>/<name>.mp4 (one folder per character; "
              f"{VIDEO_KINDS}), or run `charseg sample --out data/raw` for a small sample")
    if not videos_root.is_dir():
        raise CharsegError(f"videos folder {videos_root} does not exist: {how_to}")
    jobs, skipped = discover(videos_root, name_max(out.root.parent))
    if not jobs:
        for item in skipped:
            warn(f"skipped {item['reason']}")
        raise CharsegError(f"no videos found in {videos_root}: {how_to}")
    return jobs, skipped


def _probed(jobs: list[VideoJob], skipped: list[dict[str, str]],
            decoder: str) -> list[tuple[VideoJob, VideoInfo]]:
    """The jobs with their VideoInfo for `decoder` (frames.decoder); a video that cannot be opened (or has
    no video stream) is added to `skipped`."""
    videos = []
    for job in jobs:
        try:
            videos.append((job, open_video(job.path, decoder)))
        except CharsegError as err:
            skipped.append({"path": job.video, "reason": str(err)})
    return videos


def _merge(videos: list[tuple[VideoJob, VideoInfo]], chunks: list[Chunk], results: list[dict[str, Any]],
           out: FramesDir, fps: float, skipped: list[dict[str, str]]) -> tuple[list[dict], list[dict], list[str]]:
    """(manifest rows sorted by id, report entries, warnings) of every video; failed videos join `skipped`
    (sorted by path), and every skip and warning is printed."""
    rows, entries, warnings = [], [], []
    for job, info in videos:
        parts = [(chunk, result) for chunk, result in zip(chunks, results) if chunk.job == job]
        merged = _video_result(job, info, parts, out, fps)
        if "skipped" in merged:
            skipped.append(merged["skipped"])
            continue
        rows.extend(merged["rows"])
        entries.append(merged["video"])
        warnings.extend(merged["warnings"])
    skipped.sort(key=lambda item: item["path"])
    for item in skipped:
        warn(f"skipped {item['reason']}")
    for warning in warnings:
        warn(warning)
    return sorted(rows, key=lambda row: row["id"]), entries, warnings


def extract_frames(videos_root: Path, out: FramesDir, cfg: FramesConfig,
                   metrics_path: Path | None = None) -> dict[str, Any]:
    """Build `out` (images/, manifest.csv, report.json) from the videos under `videos_root`, all or nothing;
    returns the report, and writes `frames_metrics(report)` to `metrics_path` when given."""
    videos_root = Path(videos_root)
    jobs, skipped = _find_videos(videos_root, out)
    videos = _probed(jobs, skipped, cfg.decoder)
    workers = cfg.workers or cpu_count()
    chunks = plan_chunks(videos, workers)
    with atomic_dir(out.root) as tmp:
        staged = FramesDir(tmp)
        staged.images.mkdir()
        results = _run_chunks(chunks, min(workers, max(1, len(chunks))), staged, cfg)
        rows, entries, warnings = _merge(videos, chunks, results, staged, cfg.fps, skipped)
        if not rows:
            reasons = "; ".join(item["reason"] for item in skipped[:3])
            raise CharsegError(f"no frame could be extracted from the {len(jobs)} video(s) in {videos_root} "
                               f"({reasons}): fix or replace the files listed above")
        report = {"params": {"fps": cfg.fps, "max_side": cfg.max_side, "jpeg_quality": cfg.jpeg_quality,
                             "decoder": cfg.decoder},
                  "videos_processed": len(entries), "frames_written": len(rows), "videos": entries,
                  "skipped": skipped, "warnings": warnings}
        write_csv(staged.manifest, rows, FRAME_COLUMNS)
        write_json(staged.report, report)
    if metrics_path is not None:
        write_json(metrics_path, frames_metrics(report))
    return report


def frames_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a report for `dvc metrics`: videos, frames, skipped entries, frames per character."""
    per_character: Counter[str] = Counter()
    for video in report["videos"]:
        per_character[video["character"]] += video["frames"]
    return {"videos": report["videos_processed"], "frames": report["frames_written"],
            "skipped": len(report["skipped"]), "frames_per_character": dict(sorted(per_character.items()))}
