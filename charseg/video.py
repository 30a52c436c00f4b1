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

import heapq
import math
import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import av
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
    fps_source: str        # "container", "timestamps" (the frames' own) or "assumed"
    decoder: str = "opencv"        # "opencv" or "pyav": the reader that decodes this file (open_video)
    fallback: str | None = None    # decoder "auto": why PyAV could not open it (OpenCV was used instead)
    timestamps: bool = True        # PyAV: the stream has presentation timestamps (else frames are counted)
    variable_rate: bool = False    # PyAV: frame intervals vary (sampled by real time; never cut into chunks)
    rotation: int = 0              # PyAV: degrees turned to show the frames upright (width/height are upright)


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


# -- PyAV ------------------------------------------------------------------------------------------------
# PyAV gives each frame its presentation timestamp (pts x time_base: exact, also on variable-rate files)
# and lets the reader choose, per packet, how much decoding a frame gets. The reader demuxes a little
# ahead (_LOOKAHEAD packets, more than any decoder's reordering), so it knows every frame's presentation
# time before its packet is decoded; TimestampSampler then picks on the real timeline, and only the picked
# frames are decoded in full: the others are sent with skip_frame "NONREF" (a frame nothing refers to is
# not decoded at all; reference frames still are, or later frames would be wrong), and for intra-only
# codecs (MJPEG: every frame stands alone) they are not sent to the decoder at all. The picks are the
# frames OpenCV's reader keeps, so ids and counts do not depend on the decoder.

_LOOKAHEAD = 32  # packets demuxed ahead of the decoder; H.264/HEVC reorder at most 16 frames
DECODERS = ("auto", "pyav", "opencv")


def nearest_within(target: float, stamps: list[float], half_interval: float) -> int | None:
    """The position in `stamps` of the timestamp nearest to `target` and at most `half_interval` away
    (the earlier one on a tie), or None: the stand-in for a picked frame the decoder did not deliver."""
    best = None
    for i, stamp in enumerate(stamps):
        gap = abs(stamp - target)
        if gap <= half_interval + _EPS and (best is None or gap < abs(stamps[best] - target)):
            best = i
    return best


def _pyav_error(path: Path, err: Exception) -> CharsegError:
    return CharsegError(f"{path}: cannot be opened as a video (corrupt, truncated, or not a video despite its "
                        f"extension; PyAV: {err}): {_FIX_HINT}")


def _open_container(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError) as err:
        raise _pyav_error(path, err) from err


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    if container.streams.video:
        return container.streams.video[0]
    audio = len(container.streams.audio)
    what = f"audio only ({audio} audio stream{'s' * (audio > 1)})" if audio else "no video stream"
    raise CharsegError(f"{path}: {what}, nothing to extract frames from: remove it from the videos folder")


def probe_pyav(path: str | Path) -> VideoInfo:
    """probe() through PyAV: size (upright), frame rate, count, whether the stream has timestamps and a
    variable rate; decodes the first frames (a file that opens but cannot be decoded is an error here)."""
    path = Path(path)
    _check_file(path)
    with _open_container(path) as container:
        stream = _video_stream(container, path)
        reported_fps = float(stream.average_rate or 0)
        stamps, first = [], None
        try:
            for frame in container.decode(stream):
                first = first or frame
                if frame.pts is not None:
                    stamps.append(float(frame.pts * stream.time_base))
                if len(stamps) >= _TIMESTAMP_PROBE_FRAMES or (frame.pts is None and first is not frame):
                    break
        except av.error.FFmpegError as err:
            if first is None:
                raise _pyav_error(path, err) from err
        if first is None:
            raise CharsegError(f"{path}: no video frame could be decoded (damaged from the start): {_FIX_HINT}")
        rotation = int(first.rotation or 0) % 360
        width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
        guessed = float(stream.guessed_rate or 0)
        frames = stream.frames or (round(float(stream.duration * stream.time_base) * reported_fps)
                                   if stream.duration and plausible_fps(reported_fps) else 0)
    steps = [b - a for a, b in zip(stamps, stamps[1:]) if b > a]
    measured = 1.0 / statistics.median(steps) if steps else None
    if plausible_fps(reported_fps):
        fps, source = reported_fps, "container"
    elif measured and plausible_fps(measured):
        fps, source = measured, "timestamps"
    else:
        fps, source = ASSUMED_FPS, "assumed"
    # Intervals that differ among the first frames, or ffmpeg's base rate (the finest common one) unlike the
    # average: the frames are timed by their own timestamps only (never cut into chunks by index).
    variable = bool(steps) and (max(steps) > 1.01 * min(steps)
                                or plausible_fps(guessed) and abs(guessed - fps) > 0.01 * fps)
    return VideoInfo(path, width, height, reported_fps, frames, fps, source, decoder="pyav",
                     timestamps=bool(stamps), variable_rate=variable, rotation=rotation)


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise CharsegError(f"{path}: no such video file")
    if path.stat().st_size == 0:
        raise CharsegError(f"{path}: the file is empty (0 bytes), e.g. an interrupted copy: {_FIX_HINT}")


def open_video(path: str | Path, decoder: str = "auto") -> VideoInfo:
    """The VideoInfo of a video for the reader `decoder` names (frames.decoder): "auto" is PyAV, and OpenCV
    for a file PyAV cannot open (the reason is kept in VideoInfo.fallback, for the report)."""
    if decoder not in DECODERS:
        raise CharsegError(f"frames.decoder must be one of {', '.join(DECODERS)}, got {decoder!r}: fix params.yaml")
    if decoder == "opencv":
        return probe(path)
    try:
        return probe_pyav(path)
    except CharsegError as err:
        if decoder == "pyav" or "nothing to extract" in str(err) or "0 bytes" in str(err) or "no such" in str(err):
            raise
        info = probe(path)  # raises OpenCV's own reason when it cannot open the file either
        return VideoInfo(**{**info.__dict__, "fallback": str(err)})


def open_reader(info: VideoInfo, threads: int = 0) -> "FrameReader | PyAVFrameReader":
    """The reader for `info` (open_video chose the decoder); both sample the same frames."""
    return (PyAVFrameReader if info.decoder == "pyav" else FrameReader)(info.path, threads, info)


def _upright(frame: av.VideoFrame, rotation: int) -> np.ndarray:
    image = frame.to_ndarray(format="bgr24")
    # frame.rotation is counter-clockwise, what the display matrix says to turn the picture by to show it.
    return np.ascontiguousarray(np.rot90(image, rotation // 90)) if rotation else image


class _SeekMissed(Exception):
    """The seek landed after the chunk's first frame (an inexact index): decode from the start instead."""


@dataclass
class _Decoded:
    index: int
    timestamp: float
    frame: av.VideoFrame
    kept: bool = False


class PyAVFrameReader:
    """FrameReader's interface through PyAV: sample(rate, start, stop) yields the same frames (ids, counts),
    decoding less. After iterating: `reached` (as FrameReader); `damaged`, the seconds at which packets could
    not be decoded; `substituted`, (picked s, used s or None) for each picked frame the decoder did not
    deliver, where the nearest decoded frame within half a sampling interval stood in (None: there was none);
    `seek_fell_back` (as FrameReader)."""

    def __init__(self, path: str | Path, threads: int = 0, info: VideoInfo | None = None) -> None:
        self.info = info or probe_pyav(path)
        self.threads = threads
        self.reached = 0
        self.seek_fell_back = False
        self.damaged: list[float] = []
        self.substituted: list[tuple[float, float | None]] = []

    def _open(self) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
        container = _open_container(self.info.path)
        stream = container.streams.video[0]
        # Frame and slice threads; 0 lets ffmpeg use every core (one video), frames.py passes its share.
        stream.codec_context.thread_type = "AUTO"
        stream.codec_context.thread_count = self.threads
        return container, stream

    def sample(self, rate: float, start: int = 0, stop: int | None = None) -> Iterator[SampledFrame]:
        if start and (self.info.fps_source != "container" or self.info.variable_rate or not self.info.timestamps):
            raise ValueError("starting mid-video needs a constant container frame rate (frame index = time x fps)")
        self.reached = start
        container, stream = self._open()
        try:
            if not self.info.timestamps:
                yield from self._counting(container, stream, rate, stop)
            else:
                seeked = bool(start) and self._seek(container, stream, start)
                try:
                    yield from self._by_timestamp(container, stream, rate, start, stop, seeked)
                except _SeekMissed:
                    self.seek_fell_back = True
                    container.close()
                    container, stream = self._open()
                    yield from self._by_timestamp(container, stream, rate, start, stop, False)
        finally:
            container.close()
        if start == 0 and self.reached == 0:
            raise CharsegError(f"{self.info.path}: no video frame could be decoded (damaged from the start): "
                               f"{_FIX_HINT}")

    def _seek(self, container, stream, start: int) -> bool:
        """Seek to the keyframe at or before frame `start` (landing checked by _by_timestamp)."""
        target = (stream.start_time or 0) + int((start - 0.5) / self.info.fps / stream.time_base)
        try:
            container.seek(target, stream=stream, backward=True)
        except av.error.FFmpegError:
            self.seek_fell_back = True
            return False
        return True

    def _counting(self, container, stream, rate: float, stop: int | None) -> Iterator[SampledFrame]:
        """No timestamps: every frame is decoded and timed by its position (index / fps), as OpenCV does."""
        sampler = TimestampSampler(rate)
        try:
            for frame in container.decode(stream):
                if stop is not None and self.reached >= stop:
                    break
                index, timestamp = self.reached, self.reached / self.info.fps
                self.reached += 1
                if sampler.take(timestamp):
                    yield SampledFrame(index, timestamp, _upright(frame, self.info.rotation))
        except av.error.FFmpegError:
            self.damaged.append(self.reached / self.info.fps)

    def _by_timestamp(self, container, stream, rate: float, start: int, stop: int | None,
                      seeked: bool) -> Iterator[SampledFrame]:
        """Demux _LOOKAHEAD packets ahead, release their timestamps in presentation order to the sampler, and
        decode each packet only as far as its pick decision needs."""
        origin, time_base, fps = stream.start_time or 0, stream.time_base, self.info.fps
        context = stream.codec_context
        intra_only = bool(context.codec.intra_only)
        sampler = TimestampSampler(rate, after=(start - 1) / fps if start else None)
        first_time = (start - 0.5) / fps if start else -math.inf  # earlier frames belong to the chunk before
        queue: deque = deque()   # packets in decode order, waiting for their pick decision
        pending: list[int] = []  # their pts (a heap: released in presentation order)
        frames: dict[int, tuple[int, float, bool]] = {}  # released pts -> (index, seconds, picked), pts order
        # rescue: until when (seconds) every frame is decoded after a picked one failed to, for a stand-in
        state = {"released": None, "ended": False, "landed": not seeked, "skip": None, "rescue": -math.inf}
        previous: list[_Decoded] = []  # the last decoded frame: a stand-in candidate

        def release(pts: int) -> None:
            state["released"] = pts
            seconds = float((pts - origin) * time_base)
            if seconds < first_time:
                state["landed"] = True
                return
            if not state["landed"]:
                raise _SeekMissed
            if stop is not None and self.reached >= stop:
                state["ended"] = True
            if not state["ended"]:
                frames[pts] = (self.reached, seconds, sampler.take(seconds))
                self.reached += 1

        def decode(packet) -> Iterator[SampledFrame]:
            seconds = float((packet.pts - origin) * time_base) if packet is not None else math.inf
            wanted = packet is None or frames.get(packet.pts, (0, 0, False))[2] or seconds <= state["rescue"]
            if not wanted and (intra_only or packet.pts not in frames and state["ended"]):
                return  # nothing refers to it
            mode = "DEFAULT" if wanted else "NONREF"
            if mode != state["skip"]:
                context.skip_frame = state["skip"] = mode
            try:
                decoded = context.decode(packet)
            except av.error.FFmpegError:
                self.damaged.append(seconds if packet is not None else self.reached / fps)
                if wanted:
                    state["rescue"] = seconds + 0.5 / rate
                return
            for frame in decoded:
                if frame.pts is not None:
                    yield from self._deliver(frame, frames, previous, rate)

        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.pts is None:
                    continue
                queue.append(packet)
                heapq.heappush(pending, packet.pts)
                while len(pending) > _LOOKAHEAD:
                    release(heapq.heappop(pending))
                while queue and state["released"] is not None and queue[0].pts <= state["released"]:
                    yield from decode(queue.popleft())
                if state["ended"] and not queue:
                    break
        except av.error.FFmpegError:  # demuxing stopped: the rest of the file cannot be read
            self.damaged.append(self.reached / fps)
        while pending:
            release(heapq.heappop(pending))
        while queue:
            yield from decode(queue.popleft())
        yield from decode(None)  # the frames the decoder still holds
        yield from self._deliver(None, frames, previous, rate)  # picks never delivered, at the end

    def _deliver(self, frame: av.VideoFrame | None, frames: dict[int, tuple[int, float, bool]],
                 previous: list[_Decoded], rate: float) -> Iterator[SampledFrame]:
        """Yield `frame` if it was picked; first stand in for the picks before it that never came out of the
        decoder (dropped as damaged), with the nearest decoded frame within half a sampling interval.
        frame None: the end of the stream."""
        current, current_picked, lost = None, False, []
        while frames:
            pts = next(iter(frames))
            if frame is not None and pts > frame.pts:
                break
            index, seconds, picked = frames.pop(pts)
            if frame is not None and pts == frame.pts:
                current, current_picked = _Decoded(index, seconds, frame), picked
            elif picked:
                lost.append(seconds)
        for seconds in lost:
            target = math.floor(seconds * rate + _EPS) / rate
            candidates = [c for c in previous + [current] if c is not None and not c.kept]
            chosen = nearest_within(target, [c.timestamp for c in candidates], 0.5 / rate)
            self.substituted.append((seconds, None if chosen is None else candidates[chosen].timestamp))
            if chosen is not None:
                candidates[chosen].kept = True
                yield self._sampled(candidates[chosen])
        if current is None:
            return
        if current_picked and not current.kept:
            current.kept = True
            yield self._sampled(current)
        previous[:] = [current]

    def _sampled(self, decoded: _Decoded) -> SampledFrame:
        return SampledFrame(decoded.index, decoded.timestamp, _upright(decoded.frame, self.info.rotation))
