"""Read videos and sample frames by timestamp (the frames stage; predict reads with the same probe).

Frames are picked by time, not by counting: target times are k / rate, and the first frame whose
timestamp is at or after each target is kept. Stepping by `int(fps)` frames would drift (29.97 fps
stepped by 29 gives 1.03 frames per second: 62 frames from one minute instead of 60).

Speed: every frame must be decoded (inter-coded video cannot be skipped), but `grab()` only decodes,
while `retrieve()` also converts to BGR and copies to a numpy array; calling `retrieve()` for the kept
frames only is what makes sampling a fraction of the frames cheap. There is no seek per kept frame:
OpenCV's seek restarts decoding at a keyframe at least 16 frames before the target, and TV encodes
have keyframes every 2-10 s, so at 1 fps seeking decodes more than grabbing straight through. One seek
to the start of a long chunk (FrameReader.sample(start=...)) is worth it to decode chunks in parallel;
its landing is verified, see FrameReader.

Frame rate: the container's rate is used unless it is implausible (0, NaN, negative or above
MAX_PLAUSIBLE_FPS, e.g. a variable-rate MKV that reports its 1 ms time base as 1000 fps). Then the
frames' own timestamps (CAP_PROP_POS_MSEC) are used, and if those are implausible too, ASSUMED_FPS
is assumed. `VideoInfo.fps_source` says which one was used, so the stage can report it.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from charseg.errors import CharsegError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm")
MAX_PLAUSIBLE_FPS = 240.0
ASSUMED_FPS = 25.0  # PAL TV rate: used only when neither the container nor the timestamps say
_TIMESTAMP_PROBE_FRAMES = 30
# A frame counts as "at" a target time when it is at most this many target periods before it
# (absorbs float rounding of index / fps, e.g. 2997 * 1001 / 30000 == 100.0 exactly).
_EPS = 1e-6


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def plausible_fps(fps: float) -> bool:
    return math.isfinite(fps) and 0 < fps <= MAX_PLAUSIBLE_FPS


_FIX_HINT = "re-copy the file, or re-encode it (e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`), or remove it"


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    reported_fps: float    # what the container says, possibly 0, NaN or absurd
    reported_frames: int   # what the container says; 0 when unknown (can be an estimate)
    fps: float             # the rate used to time frames
    fps_source: str        # "container", "timestamps" (CAP_PROP_POS_MSEC) or "assumed"


@dataclass(frozen=True)
class SampledFrame:
    index: int             # position in decode order, counting from 0
    timestamp: float       # seconds from the start of the video
    image: np.ndarray      # always 3-channel BGR uint8


class TimestampSampler:
    """Decides, frame by frame, whether a frame is the first one at or after the next target time.

    A frame is kept exactly when it is the first in its interval [k / rate, (k + 1) / rate), so the
    decision depends only on this frame's and the previous frame's timestamps: a reader that starts
    mid-video (a chunk) passes the previous frame's timestamp as `after` and keeps the same frames.
    """

    def __init__(self, rate: float, after: float | None = None) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise CharsegError(f"sampling rate must be a positive number of frames per second, got {rate}")
        self.rate = rate
        self._next_target = 0 if after is None else math.floor(after * rate + _EPS) + 1

    def take(self, timestamp: float) -> bool:
        position = timestamp * self.rate
        if position + _EPS < self._next_target:
            return False
        # The next target is the first one strictly after this frame: with rate above the video's
        # own fps several targets fall between two frames, and each frame is kept at most once.
        self._next_target = math.floor(position + _EPS) + 1
        return True


def _as_bgr(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def _open_capture(path: Path, threads: int) -> cv2.VideoCapture:
    params = [cv2.CAP_PROP_N_THREADS, threads] if threads > 0 else []
    # Paths are passed as str: OpenCV hands the UTF-8 bytes to ffmpeg, so non-ASCII names work on Linux/macOS.
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, params)
    if not capture.isOpened():
        capture.release()
        raise CharsegError(f"{path}: cannot be opened as a video (corrupt, truncated, or not a video "
                           f"despite its extension): {_FIX_HINT}")
    return capture


def _fps_from_timestamps(path: Path, threads: int) -> float | None:
    """Median frame interval over the first frames, from the frames' own timestamps."""
    capture = _open_capture(path, threads)
    try:
        stamps = []
        while len(stamps) < _TIMESTAMP_PROBE_FRAMES and capture.grab():
            stamps.append(capture.get(cv2.CAP_PROP_POS_MSEC))
    finally:
        capture.release()
    steps = [b - a for a, b in zip(stamps, stamps[1:]) if b > a]
    if not steps:
        return None
    fps = 1000.0 / statistics.median(steps)
    return fps if plausible_fps(fps) else None


def probe(path: str | Path, threads: int = 0) -> VideoInfo:
    """Open a video and read its size, frame rate and frame count; CharsegError naming the file if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CharsegError(f"{path}: no such video file")
    if path.stat().st_size == 0:
        raise CharsegError(f"{path}: the file is empty (0 bytes), e.g. an interrupted copy: {_FIX_HINT}")
    capture = _open_capture(path, threads)
    try:
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        reported_fps = float(capture.get(cv2.CAP_PROP_FPS))
        frames = capture.get(cv2.CAP_PROP_FRAME_COUNT)
    finally:
        capture.release()
    reported_frames = int(frames) if math.isfinite(frames) and frames > 0 else 0
    if plausible_fps(reported_fps):
        fps, source = reported_fps, "container"
    else:
        measured = _fps_from_timestamps(path, threads)
        fps, source = (measured, "timestamps") if measured else (ASSUMED_FPS, "assumed")
    return VideoInfo(path, width, height, reported_fps, reported_frames, fps, source)


def looks_truncated(info: VideoInfo, frames_decoded: int) -> bool:
    """Decoding stopped clearly before the container's frame count (trusted only with the container's
    own fps: a count derived from an absurd fps is meaningless)."""
    expected = info.reported_frames
    if info.fps_source != "container" or expected == 0:
        return False
    # Containers without an index (MKV, WebM) estimate the count from the duration: allow slack.
    return frames_decoded < expected - max(2, 0.02 * expected)


class FrameReader:
    """Decode one video (or the frame range [start, stop) of it), yielding the frames sampled at `rate`.

    After iterating, `reached` is the index after the last frame decoded: for a whole video, the number
    of frames the file really has (compare with `looks_truncated`).

    A range that starts mid-video is reached by seeking (CAP_PROP_POS_FRAMES); the landing is checked
    against the frame's own timestamp, and if the container seeks inexactly the reader decodes from the
    start instead, so the frames kept never depend on how a video was cut into ranges.
    """

    def __init__(self, path: str | Path, threads: int = 0, info: VideoInfo | None = None) -> None:
        self.info = info or probe(path, threads)
        self.threads = threads
        self.reached = 0
        self.seek_fell_back = False  # for tests and benchmarks: the container could not seek exactly

    def _timestamp(self, capture: cv2.VideoCapture, index: int, previous: float | None) -> float:
        if self.info.fps_source != "timestamps":
            return index / self.info.fps
        stamp = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
        # Timestamps must increase: a repeated or backwards stamp gets one nominal frame interval.
        return stamp if previous is None or stamp > previous else previous + 1.0 / self.info.fps

    def _seek(self, capture: cv2.VideoCapture, start: int) -> tuple[cv2.VideoCapture, bool]:
        """Position so that the next grab() is frame `start`; returns (capture, whether a frame is already grabbed)."""
        fps = self.info.fps
        if capture.set(cv2.CAP_PROP_POS_FRAMES, start) and capture.grab():
            if abs(capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0 - start / fps) < 0.5 / fps:
                return capture, True
        capture.release()
        self.seek_fell_back = True
        capture = _open_capture(self.info.path, self.threads)
        for _ in range(start):
            if not capture.grab():
                break
        return capture, False

    def sample(self, rate: float, start: int = 0, stop: int | None = None) -> Iterator[SampledFrame]:
        if start and self.info.fps_source != "container":
            raise ValueError("starting mid-video needs the container's frame rate (frame index = time x fps)")
        path = self.info.path
        sampler = TimestampSampler(rate, after=(start - 1) / self.info.fps if start else None)
        capture = _open_capture(path, self.threads)
        self.reached = start
        try:
            index, previous, grabbed = start, None, False
            if start:
                capture, grabbed = self._seek(capture, start)
            while (stop is None or index < stop) and (grabbed or capture.grab()):
                grabbed = False
                timestamp = self._timestamp(capture, index, previous)
                previous = timestamp
                if sampler.take(timestamp):
                    ok, image = capture.retrieve()
                    if not ok or image is None:
                        raise CharsegError(f"{path}: frame {index} ({timestamp:.2f} s) could not be decoded: "
                                           f"the file is damaged: {_FIX_HINT}")
                    yield SampledFrame(index, timestamp, _as_bgr(image))
                index += 1
                self.reached = index
        finally:
            capture.release()
        if start == 0 and self.reached == 0:
            raise CharsegError(f"{path}: no video frame could be decoded (no video stream, or damaged "
                               f"from the start): {_FIX_HINT}")
