"""The PyAV decoding path of the frames stage (frames.decoder: auto | pyav | opencv): the same frame ids and
counts as the OpenCV path on the sample and on H.264 with B-frames, MJPG and VFR clips made with PyAV's
encoders; the nearest-frame rule; rotation; and bad input (no timestamps, a broken middle, audio only)."""
from __future__ import annotations

import csv
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import charseg.frames as frames
import charseg.video as video
from charseg.config import FramesConfig
from charseg.errors import CharsegError
from charseg.layout import FramesDir
from charseg.sample import generate
from charseg.video import FrameReader, PyAVFrameReader, nearest_within, open_video, probe_pyav

NTSC = Fraction(30000, 1001)


def encode(path: Path, n_frames: int, rate: Fraction | int = 25, codec: str = "libx264",
           options: dict | None = None, pts_ms: list[int] | None = None, rotation: int | None = None,
           size: tuple[int, int] = (96, 64), fmt: str | None = None) -> Path:
    """A clip of noise with a moving white square through PyAV's encoder; `pts_ms`: explicit (VFR) times."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, options=options or {})
        stream.width, stream.height = size
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(n_frames):
            # a fixed gradient with light grain: pure noise would make x264 choose no B-frames at all
            image = (np.add.outer(np.arange(size[1]), np.arange(size[0]))[..., None] % 200
                     + rng.integers(0, 8, (size[1], size[0], 3))).astype(np.uint8)
            image[4:16, 4 + i % 60:16 + i % 60] = 255
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


H264_BFRAMES = {"x264-params": "bframes=3:b-adapt=0:keyint=250"}  # b-adapt=0: B-frames even on noise


def _sampled(reader, rate: float, start: int = 0, stop: int | None = None) -> list[tuple[int, float]]:
    return [(f.index, round(f.timestamp, 6)) for f in reader.sample(rate, start, stop)]


def _extract(videos: Path, out: Path, **overrides) -> dict:
    options = {"fps": 1.0, "max_side": None, "jpeg_quality": 90, "workers": 1, **overrides}
    return frames.extract_frames(videos, FramesDir(out), FramesConfig(**options))


def _manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_nearest_frame_rule_on_planted_timestamps():
    assert nearest_within(1.0, [0.5, 0.96, 1.04], 0.5) == 1  # a tie goes to the earlier frame
    assert nearest_within(1.0, [0.9, 1.03], 0.5) == 1
    assert nearest_within(1.0, [0.2, 1.6], 0.5) is None       # nothing within half an interval: lost
    assert nearest_within(2.0, [1.5, 2.5], 0.5) == 0          # exactly half an interval counts
    assert nearest_within(1.0, [], 0.5) is None


def test_the_sample_gives_the_same_ids_from_both_decoders(tmp_path):
    generate(tmp_path / "raw", seed=0, duration_scale=0.1)
    by_decoder = {}
    for decoder in ("opencv", "pyav"):
        report = _extract(tmp_path / "raw" / "videos", tmp_path / decoder, decoder=decoder, fps=4.0)
        assert {v["decoder"] for v in report["videos"]} == {decoder} and not report["warnings"]
        by_decoder[decoder] = [(r["id"], r["frame_index"], r["width"], r["height"]) for r in _manifest(tmp_path / decoder)]
    assert by_decoder["opencv"] == by_decoder["pyav"] and len(by_decoder["pyav"]) > 10


@pytest.mark.parametrize("kind", ["h264-bframes", "mjpg"])
def test_generated_clips_give_the_same_frames_from_both_decoders(tmp_path, kind):
    if kind == "mjpg":
        path = encode(tmp_path / "clip.avi", 150, NTSC, codec="mjpeg")
    else:
        path = encode(tmp_path / "clip.mp4", 150, NTSC, options=H264_BFRAMES)
        with av.open(str(path)) as container:
            assert av.video.frame.PictureType.B in {frame.pict_type for frame in container.decode(video=0)}
    for rate in (1.0, 2.5, 7.0):
        opencv, pyav = FrameReader(path), PyAVFrameReader(path)
        expected = [(f.index, round(f.timestamp, 6), f.image) for f in opencv.sample(rate)]
        got = [(f.index, round(f.timestamp, 6), f.image) for f in pyav.sample(rate)]
        assert [e[:2] for e in expected] == [g[:2] for g in got] and len(got) == int(149 / NTSC * rate) + 1
        assert all(np.abs(e[2].astype(int) - g[2]).mean() < 3 for e, g in zip(expected, got))
        assert pyav.reached == opencv.reached == 150 and not pyav.substituted and not pyav.damaged


def test_chunks_of_a_pyav_video_keep_the_same_frames(tmp_path, monkeypatch):
    path = encode(tmp_path / "clip.mp4", 120, NTSC, options=H264_BFRAMES)
    whole = _sampled(PyAVFrameReader(path), 2.0)
    later = PyAVFrameReader(path)
    assert _sampled(PyAVFrameReader(path), 2.0, 0, 47) + _sampled(later, 2.0, 47) == whole
    assert later.reached == 120 and not later.seek_fell_back
    monkeypatch.setattr(frames, "MIN_CHUNK_SECONDS", 0.5)
    encode(tmp_path / "v" / "alice" / "a.mp4", 200, NTSC, options=H264_BFRAMES)
    encode(tmp_path / "v" / "bob" / "b.avi", 100, 25, codec="mjpeg")
    one = _extract(tmp_path / "v", tmp_path / "one", decoder="pyav", fps=2.0)
    two = _extract(tmp_path / "v", tmp_path / "two", decoder="pyav", fps=2.0, workers=2)
    assert _manifest(tmp_path / "one") == _manifest(tmp_path / "two") and one["frames_written"] == 14 + 8
    assert one["videos"] == two["videos"]


def test_variable_frame_rate_is_sampled_by_real_time(tmp_path):
    stamps = [0, 40, 80, 700, 1010, 1990, 2000, 2600, 3100, 3140]  # ms: bursts and gaps
    path = encode(tmp_path / "vfr.mp4", len(stamps), 25, pts_ms=stamps)
    info = probe_pyav(path)
    assert info.variable_rate and info.timestamps
    assert [f.timestamp for f in PyAVFrameReader(path).sample(200.0)] == [ms / 1000 for ms in stamps]
    # the first frame at or after each second, by its own timestamp (counting frames would give others)
    assert _sampled(PyAVFrameReader(path), 1.0) == [(0, 0.0), (4, 1.01), (6, 2.0), (8, 3.1)]
    assert _sampled(PyAVFrameReader(path), 2.0) == [(0, 0.0), (3, 0.7), (4, 1.01), (5, 1.99), (6, 2.0),
                                                      (7, 2.6), (8, 3.1)]
    assert len(frames.plan_chunks([(None, info)], n_workers=4)) == 1  # times are not index / fps: never cut


def test_rotation_metadata_gives_upright_frames_from_both_decoders(tmp_path):
    path = encode(tmp_path / "v" / "alice" / "phone.mp4", 30, 25, rotation=90, size=(96, 64))
    info = probe_pyav(path)
    assert (info.rotation, info.width, info.height) == (90, 64, 96)
    opencv = [f.image for f in FrameReader(path).sample(1.0)]
    pyav = [f.image for f in PyAVFrameReader(path).sample(1.0)]
    assert pyav[0].shape == opencv[0].shape == (96, 64, 3)
    assert np.abs(opencv[0].astype(int) - pyav[0]).mean() < 3
    # the white square drawn at the top left is at the bottom left once turned 90° counter-clockwise
    ys, xs = np.nonzero(pyav[0].min(axis=2) > 240)
    assert ys.mean() > 64 and xs.mean() < 20
    report = _extract(tmp_path / "v", tmp_path / "out", decoder="pyav")
    assert report["videos"][0]["rotation"] == 90 and _manifest(tmp_path / "out")[0]["width"] == "64"


def test_stream_without_timestamps_is_counted_and_warned(tmp_path):
    raw = encode(tmp_path / "v" / "alice" / "raw.mp4", 60, 25, fmt="h264")  # Annex B: no pts at all
    info = probe_pyav(raw)
    assert not info.timestamps and info.fps == 25
    assert _sampled(PyAVFrameReader(raw), 1.0) == [(0, 0.0), (25, 1.0), (50, 2.0)]
    report = _extract(tmp_path / "v", tmp_path / "out", decoder="pyav")
    assert report["frames_written"] == 3 and report["videos"][0]["timestamps"] is False
    assert any("no timestamps" in w and "counting" in w for w in report["warnings"])


def _break_jpeg(path: Path, frame_numbers: range) -> None:
    """Zero the JPEG data of these frames (an AVI of MJPG: one SOI marker per frame, the image up to EOI)."""
    data = bytearray(path.read_bytes())
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]
    for n in frame_numbers:
        end = data.index(b"\xff\xd9", starts[n]) + 2
        data[starts[n]:end] = bytes(end - starts[n])
    path.write_bytes(bytes(data))


def test_broken_middle_keeps_the_frames_around_it_and_reports_the_skip(tmp_path):
    path = encode(tmp_path / "v" / "alice" / "broken.avi", 100, 25, codec="mjpeg")  # 4 s
    _break_jpeg(path, range(50, 53))  # 2.00-2.08 s: the pick at 2 s and the two frames after it
    reader = PyAVFrameReader(path)
    assert _sampled(reader, 1.0) == [(0, 0.0), (25, 1.0), (53, 2.12), (75, 3.0)]
    assert reader.substituted == [(2.0, 2.12)] and reader.damaged == [2.0, 2.04, 2.08]
    report = _extract(tmp_path / "v", tmp_path / "out", decoder="pyav")
    entry = report["videos"][0]
    assert entry["frames"] == 4 and entry["incomplete"] and entry["damaged_at_s"] == [2.0, 2.04, 2.08]
    assert entry["substituted_s"] == [[2.0, 2.12]]
    assert any("3 damaged packet(s)" in w for w in report["warnings"])
    assert any("nearest decoded frame" in w for w in report["warnings"])


def test_audio_only_file_is_skipped_with_the_reason(tmp_path):
    audio = tmp_path / "v" / "alice" / "song.mp4"
    audio.parent.mkdir(parents=True)
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(20):
            samples = np.zeros((1, 1024), np.float32)
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    encode(tmp_path / "v" / "alice" / "clip.mp4", 30, 25, options=H264_BFRAMES)
    for decoder in ("auto", "pyav"):
        with pytest.raises(CharsegError, match=r"song\.mp4: audio only \(1 audio stream\).*remove it"):
            open_video(audio, decoder)
        report = _extract(tmp_path / "v", tmp_path / decoder, decoder=decoder)
        assert [item["path"] for item in report["skipped"]] == ["alice/song.mp4"]
        assert "audio only" in report["skipped"][0]["reason"] and report["frames_written"] == 2


def test_auto_falls_back_to_opencv_and_reports_it(tmp_path, monkeypatch):
    encode(tmp_path / "v" / "alice" / "a.mp4", 30, 25, options=H264_BFRAMES)
    encode(tmp_path / "v" / "alice" / "b.mp4", 30, 25, options=H264_BFRAMES)

    def refuses_b(path):
        if Path(path).name == "b.mp4":
            raise CharsegError(f"{path}: cannot be opened as a video (PyAV: planted)")
        return real_probe(path)

    real_probe = video.probe_pyav
    monkeypatch.setattr(video, "probe_pyav", refuses_b)
    report = _extract(tmp_path / "v", tmp_path / "out", decoder="auto")
    by_video = {v["video"]: v for v in report["videos"]}
    assert by_video["alice/a.mp4"]["decoder"] == "pyav" and by_video["alice/a.mp4"]["decoder_fallback"] is None
    assert by_video["alice/b.mp4"]["decoder"] == "opencv" and "planted" in by_video["alice/b.mp4"]["decoder_fallback"]
    assert any("b.mp4: PyAV could not open it, so OpenCV decoded it" in w for w in report["warnings"])
    with pytest.raises(CharsegError, match="frames.decoder must be one of auto, pyav, opencv"):
        open_video(tmp_path / "v" / "alice" / "a.mp4", "ffmpeg")
