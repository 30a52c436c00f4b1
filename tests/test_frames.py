import csv
import json
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

import charseg.frames as frames
import charseg.video as video
from helpers import write_video
from charseg.config import FramesConfig
from charseg.errors import CharsegError
from charseg.io import imread
from charseg.layout import FRAME_COLUMNS, FramesDir
from charseg.video import FrameReader, TimestampSampler, probe
from charseg.sample import generate
from stages.frames import main as frames_main

NTSC = 30000 / 1001


def _extract(videos: Path, out: Path, **overrides):
    options = {"fps": 1.0, "max_side": None, "jpeg_quality": 90, "workers": 1, **overrides}
    return frames.extract_frames(videos, FramesDir(out), FramesConfig(**options))


def _manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sampler_does_not_drift_over_an_hour_of_ntsc():
    sampler = TimestampSampler(1.0)
    kept = [i for i in range(int(3600 * NTSC)) if sampler.take(i / NTSC)]
    assert len(kept) == 3600
    for k, i in enumerate(kept):  # each kept frame is the first one at or after k seconds
        assert i / NTSC >= k - 1e-9 and (i - 1) / NTSC < k
    naive = list(range(0, int(3600 * NTSC), int(NTSC)))  # the seed's every-int(fps)-th frame
    assert len(naive) == 3721


def test_sampler_above_video_rate_keeps_each_frame_once():
    sampler = TimestampSampler(60.0)
    assert [i for i in range(50) if sampler.take(i / 25)] == list(range(50))
    with pytest.raises(CharsegError):
        TimestampSampler(0)


def test_ntsc_clip_sampled_by_timestamp(tmp_path):
    write_video(tmp_path / "v" / "alice" / "clip.mp4", 300, NTSC)  # 10.01 s
    report = _extract(tmp_path / "v", tmp_path / "out")
    rows = _manifest(tmp_path / "out")
    fps = report["videos"][0]["fps_used"]
    assert abs(fps - NTSC) < 0.01
    assert [int(r["frame_index"]) for r in rows] == [math.ceil(k * fps - 1e-9) for k in range(10)]
    for k, row in enumerate(rows):
        assert k <= float(row["timestamp"]) < k + 1 / fps
        assert row["id"] == f"alice--clip--{math.floor(float(row['timestamp']) * 1000 + 1e-6):08d}"


def test_manifest_contract_with_unicode_and_spaces(tmp_path):
    write_video(tmp_path / "v" / "Zoë Ünal" / "ep 1 (final).mp4", 60, 25)
    write_video(tmp_path / "v" / "bob" / "clip_01.AVI", 30, 25, size=(80, 60))
    _extract(tmp_path / "v", tmp_path / "out")
    rows = _manifest(tmp_path / "out")
    assert list(rows[0]) == list(FRAME_COLUMNS)
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert len({r["id"] for r in rows}) == len(rows) == 3 + 2
    assert {r["video"] for r in rows} == {"Zoë Ünal/ep 1 (final).mp4", "bob/clip_01.AVI"}
    for row in rows:
        assert re.fullmatch(r"[A-Za-z0-9_-]+--[A-Za-z0-9_-]+--\d{8}", row["id"]) and "---" not in row["id"]
        image = imread(FramesDir(tmp_path / "out").image(row["id"]))
        assert image.shape == (int(row["height"]), int(row["width"]), 3)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["images", "manifest.csv", "report.json"]


def test_max_side_downscales_keeping_aspect(tmp_path):
    write_video(tmp_path / "v" / "alice" / "clip.mp4", 10, 25, size=(64, 48))
    _extract(tmp_path / "v", tmp_path / "out", max_side=32)
    row = _manifest(tmp_path / "out")[0]
    assert (row["width"], row["height"]) == ("32", "24")
    assert imread(FramesDir(tmp_path / "out").image(row["id"])).shape == (24, 32, 3)


def test_single_channel_and_bgra_frames_become_bgr():
    grey, bgra = np.full((4, 5), 7, np.uint8), np.full((4, 5, 4), 9, np.uint8)
    assert video._as_bgr(grey).shape == video._as_bgr(grey[..., None]).shape == video._as_bgr(bgra).shape == (4, 5, 3)


def test_grayscale_video_gives_bgr_frames(tmp_path):
    path = write_video(tmp_path / "v" / "alice" / "grey.avi", 30, 25, color=False)
    sampled = list(FrameReader(path).sample(1.0))
    assert len(sampled) == 2 and all(f.image.shape == (48, 64, 3) for f in sampled)
    assert np.abs(sampled[0].image[..., 0].astype(int) - sampled[0].image[..., 2]).max() <= 2
    assert _extract(tmp_path / "v", tmp_path / "out")["frames_written"] == 2


def test_absurd_container_fps_falls_back_to_timestamps_or_assumption(tmp_path):
    mkv = write_video(tmp_path / "v" / "alice" / "vfr.mkv", 60, 25)
    data = bytearray(mkv.read_bytes())
    at = data.find(bytes.fromhex("23E383"))  # Matroska DefaultDuration (ns per frame)
    width = data[at + 3] & 0x7F
    data[at + 4:at + 4 + width] = (1).to_bytes(width, "big")  # claims 1e9 fps; block timestamps stay 40 ms
    mkv.write_bytes(bytes(data))
    info = probe(mkv)
    assert info.reported_fps > 240 and info.fps_source == "timestamps" and abs(info.fps - 25) < 0.1
    write_video(tmp_path / "v" / "bob" / "fast.mp4", 60, 1000)  # 1000 fps, timestamps 1 ms apart
    report = _extract(tmp_path / "v", tmp_path / "out")
    by_video = {v["video"]: v for v in report["videos"]}
    assert by_video["alice/vfr.mkv"]["fps_source"] == "timestamps" and by_video["alice/vfr.mkv"]["frames"] == 3
    assert by_video["bob/fast.mp4"]["fps_source"] == "assumed" and by_video["bob/fast.mp4"]["fps_used"] == 25
    assert not by_video["alice/vfr.mkv"]["incomplete"]
    assert any("vfr.mkv" in w and "timestamps" in w for w in report["warnings"])
    assert any("fast.mp4" in w and "assumed" in w for w in report["warnings"])


def test_bad_inputs_are_skipped_and_reported(tmp_path, capsys):
    videos = tmp_path / "v"
    write_video(videos / "alice" / "good.mp4", 30, 25)
    (videos / "alice" / "empty.mp4").write_bytes(b"")
    (videos / "alice" / "text.mp4").write_text("not a video\n" * 20)
    (videos / "alice" / "notes.txt").write_text("hello")
    (videos / "alice" / ".DS_Store").write_bytes(b"\0")
    (videos / "alice" / "season 2").mkdir()
    write_video(videos / "alice" / "good.avi", 10, 25)  # same stem as good.mp4: ids would collide
    write_video(videos / "loose.mp4", 10, 25)
    (videos / "carol").mkdir()
    (videos / ".charseg-sample.json").write_text("{}")
    report = _extract(videos, tmp_path / "out")
    skipped = {item["path"]: item["reason"] for item in report["skipped"]}
    assert set(skipped) == {"alice/empty.mp4", "alice/text.mp4", "alice/notes.txt", "alice/season 2",
                            "alice/good.mp4", "loose.mp4", "carol"}
    assert "0 bytes" in skipped["alice/empty.mp4"] and "cannot be opened" in skipped["alice/text.mp4"]
    assert "good.avi" in skipped["alice/good.mp4"] and "collide" in skipped["alice/good.mp4"]
    assert "no video file" in skipped["carol"] and "no character" in skipped["loose.mp4"]
    for path, reason in skipped.items():
        assert str(videos / path) in reason
    err = capsys.readouterr().err
    assert all(f"warning: skipped {videos / path}" in err for path in skipped)
    assert report["frames_written"] == 1 and [v["video"] for v in report["videos"]] == ["alice/good.avi"]
    assert frames.frames_metrics(report) == {"videos": 1, "frames": 1, "skipped": 7,
                                             "frames_per_character": {"alice": 1}}


def test_truncated_video_keeps_its_frames_with_a_warning(tmp_path):
    path = write_video(tmp_path / "v" / "alice" / "cut.avi", 100, 25)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    report = _extract(tmp_path / "v", tmp_path / "out")
    video = report["videos"][0]
    assert video["incomplete"] and video["frames_decoded"] < 60 and video["reported_frames"] == 100
    assert video["frames"] == 2  # 0 s and 1 s; the rest of the 4 s is gone
    assert any("cut.avi" in w and "truncated" in w for w in report["warnings"])


def test_no_videos_is_an_error_that_says_what_to_do(tmp_path):
    with pytest.raises(CharsegError, match=r"does not exist.*charseg sample"):
        _extract(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "v" / "alice").mkdir(parents=True)
    with pytest.raises(CharsegError, match=r"no videos found in .*v: put videos in .*<character>.*charseg sample"):
        _extract(tmp_path / "v", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failure_keeps_previous_output_and_leaves_no_partial_dir(tmp_path):
    good = write_video(tmp_path / "v" / "alice" / "clip.mp4", 30, 25)
    _extract(tmp_path / "v", tmp_path / "out")
    before = _tree(tmp_path / "out")
    good.write_bytes(b"\0" * 1000)  # now every video is unreadable
    with pytest.raises(CharsegError, match=r"no frame could be extracted.*clip\.mp4"):
        _extract(tmp_path / "v", tmp_path / "out")
    assert _tree(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "v"]


def test_interrupt_mid_run_leaves_no_output(tmp_path, monkeypatch):
    write_video(tmp_path / "v" / "alice" / "a.mp4", 30, 25)
    write_video(tmp_path / "v" / "bob" / "b.mp4", 30, 25)
    real_extract = frames.extract_chunk
    calls = []

    def interrupted(chunk, *args, **kwargs):
        calls.append(chunk)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_extract(chunk, *args, **kwargs)

    monkeypatch.setattr(frames, "extract_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _extract(tmp_path / "v", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_output_does_not_depend_on_worker_count_or_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(frames, "MIN_CHUNK_SECONDS", 0.5)  # cut even these tiny clips into parallel chunks
    for i, (character, fps) in enumerate([("alice", 25), ("bob", NTSC), ("Zoë", 24000 / 1001)]):
        write_video(tmp_path / "v" / character / f"clip {i}.mp4", 40, fps, seed=i)
    write_video(tmp_path / "v" / "bob" / "long.avi", 200, NTSC, seed=9)
    jobs, _ = frames.discover(tmp_path / "v")
    chunks = frames.plan_chunks([(job, probe(job.path)) for job in jobs], n_workers=2)
    assert len(chunks) > len(jobs) and any(c.start > 0 for c in chunks)
    _extract(tmp_path / "v", tmp_path / "one", workers=1)
    _extract(tmp_path / "v", tmp_path / "two", workers=2)
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")


@pytest.mark.parametrize("suffix", [".mp4", ".avi"])
def test_reading_from_mid_video_keeps_the_same_frames(tmp_path, suffix):
    path = write_video(tmp_path / f"clip{suffix}", 120, NTSC)
    whole = [(f.index, f.timestamp) for f in FrameReader(path).sample(2.0)]
    reader = FrameReader(path)
    parts = [(f.index, f.timestamp, f.image) for f in reader.sample(2.0, 0, 47)]
    later = FrameReader(path)
    parts += [(f.index, f.timestamp, f.image) for f in later.sample(2.0, 47, None)]
    assert [(i, t) for i, t, _ in parts] == whole and not later.seek_fell_back
    assert (reader.reached, later.reached) == (47, 120)
    sequential = {f.index: f.image for f in FrameReader(path).sample(2.0)}
    assert all(np.array_equal(image, sequential[i]) for i, _, image in parts)


def test_inexact_seek_is_detected_and_replaced_by_decoding(tmp_path, monkeypatch):
    path = write_video(tmp_path / "clip.mp4", 90, 25)
    expected = [(f.index, f.timestamp) for f in FrameReader(path).sample(1.0) if f.index >= 40]
    real_open = video._open_capture

    class LandsEarly:  # a container whose seek lands 3 frames before the frame asked for
        def __init__(self, capture):
            self.capture = capture

        def set(self, prop, value):
            return self.capture.set(prop, value - 3)

        def __getattr__(self, name):
            return getattr(self.capture, name)

    monkeypatch.setattr(video, "_open_capture", lambda *args: LandsEarly(real_open(*args)))
    reader = FrameReader(path)
    assert [(f.index, f.timestamp) for f in reader.sample(1.0, 40, None)] == expected
    assert reader.seek_fell_back


def test_frame_index_matches_sample_truth(tmp_path):
    raw = tmp_path / "raw"
    generate(raw, seed=0, duration_scale=0.1)
    _extract(raw / "videos", tmp_path / "out", workers=1)
    rows = _manifest(tmp_path / "out")
    truth = {(r["video"], int(r["frame_index"])): r["mask"]
             for r in csv.DictReader(open(raw / "truth" / "index.csv", newline="", encoding="utf-8"))}
    assert {r["character"] for r in rows} >= {"alice", "bob", "Zoë"}
    for row in rows:
        mask = imread(raw / "truth" / truth[(row["video"], int(row["frame_index"]))], cv2.IMREAD_UNCHANGED)
        assert mask.shape == (int(row["height"]), int(row["width"]))


def test_main_reads_params_and_writes_numeric_metrics(tmp_path):
    write_video(tmp_path / "v" / "alice" / "clip.mp4", 60, 25)
    params = tmp_path / "params.yaml"
    params.write_text("frames:\n  fps: 2\n  max_side: 32\n  jpeg_quality: 80\n  workers: 1\n")
    frames_main(["--videos", str(tmp_path / "v"), "--out", str(tmp_path / "out"),
                 "--metrics", str(tmp_path / "m" / "frames.json"), "--params", str(params)])
    metrics = json.loads((tmp_path / "m" / "frames.json").read_text())
    assert metrics == {"videos": 1, "frames": 5, "skipped": 0, "frames_per_character": {"alice": 5}}
    params.write_text("frames:\n  fps: 0\n  max_side: null\n  jpeg_quality: 80\n  workers: 1\n")
    with pytest.raises(CharsegError, match="frames.fps"):
        frames_main(["--videos", str(tmp_path / "v"), "--out", str(tmp_path / "out"), "--params", str(params)])
