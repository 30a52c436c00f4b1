import csv
import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest

from charseg.config import EdaConfig
from charseg.eda import _shrunk, pick_samples, run_eda
from charseg.errors import CharsegError
from charseg.io import read_csv
from charseg.layout import FramesDir
from stages.eda import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COLUMNS = ["id", "character", "video", "frame_index", "timestamp", "width", "height"]


def noise(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def dark_textured(h, w):
    """Mean 10 (near-black at dark_mean 16) but std 10 (not near-uniform at uniform_std 8)."""
    image = np.zeros((h, w, 3), np.uint8)
    image[:, w // 2:] = 20
    return image


def write_frames(root: Path, frames: list[tuple[str, str, float, np.ndarray]]) -> Path:
    """frames: (character, video, timestamp, image) -> data/frames-like folder with a manifest."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for character, video, timestamp, image in frames:
        frame_id = f"{character}--{Path(video).stem}--{round(timestamp * 1000):08d}"
        assert cv2.imwrite(str(FramesDir(root).image(frame_id)), image)
        rows.append({"id": frame_id, "character": character, "video": f"{character}/{video}",
                     "frame_index": int(timestamp * 25), "timestamp": timestamp,
                     "width": image.shape[1], "height": image.shape[0]})
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture
def seven_frames(tmp_path):
    """alice: 2 black, 1 flat gray, 2 noise (64x48); bob: 1 dark-but-textured, 1 noise (80x45)."""
    rng = np.random.default_rng(0)
    black = np.zeros((48, 64, 3), np.uint8)
    return write_frames(tmp_path / "frames", [
        ("alice", "ep1.mp4", 0.0, black),
        ("alice", "ep1.mp4", 1.0, noise(rng, 48, 64)),
        ("alice", "ep2.mp4", 0.0, black),
        ("alice", "ep2.mp4", 1.0, np.full((48, 64, 3), 128, np.uint8)),
        ("alice", "ep2.mp4", 2.0, noise(rng, 48, 64)),
        ("bob", "pilot.mkv", 0.0, dark_textured(45, 80)),
        ("bob", "pilot.mkv", 1.0, noise(rng, 45, 80)),
    ])


def run(frames_dir: Path, tmp_path: Path, **overrides):
    settings = {"samples_per_character": 4, "dark_mean": 16, "uniform_std": 8, "workers": 2, **overrides}
    return run_eda(FramesDir(frames_dir), tmp_path / "plots", tmp_path / "eda.json", EdaConfig(**settings))


def test_counts_dark_uniform_sizes_and_balance(seven_frames, tmp_path):
    metrics = run(seven_frames, tmp_path)
    assert metrics["frames"] == 7 and metrics["characters"] == 2 and metrics["videos"] == 3
    assert metrics["near_black"] == 3  # 2 black + the dark textured one
    assert metrics["near_uniform"] == 3  # 2 black + the flat gray one
    assert metrics["near_black_fraction"] == pytest.approx(3 / 7, abs=1e-6)
    assert metrics["imbalance_ratio"] == pytest.approx(5 / 2)
    assert (metrics["per_character/alice/near_black"], metrics["per_character/alice/near_uniform"]) == (2, 3)
    assert (metrics["per_character/bob/near_black"], metrics["per_character/bob/near_uniform"]) == (1, 0)
    assert metrics["per_character/alice/videos"] == 2
    assert (metrics["width_min"], metrics["width_max"], metrics["height_min"], metrics["height_max"]) == (64, 80, 45, 48)
    assert json.loads((tmp_path / "eda.json").read_text()) == metrics
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())

    plots = tmp_path / "plots"
    assert read_csv(plots / "frames_per_character.csv") == [{"character": "alice", "frames": "5"},
                                                             {"character": "bob", "frames": "2"}]
    assert read_csv(plots / "frame_sizes.csv") == [{"width": "64", "height": "48", "frames": "5"},
                                                   {"width": "80", "height": "45", "frames": "2"}]
    flagged = {r["id"]: (r["near_black"], r["near_uniform"]) for r in read_csv(plots / "flagged_frames.csv")}
    assert flagged == {"alice--ep1--00000000": ("1", "1"), "alice--ep2--00000000": ("1", "1"),
                       "alice--ep2--00001000": ("0", "1"), "bob--pilot--00000000": ("1", "0")}
    assert all(Path(r["image"]).is_file() for r in read_csv(plots / "flagged_frames.csv"))


def test_plot_images_are_valid_pngs(seven_frames, tmp_path):
    run(seven_frames, tmp_path)
    images = tmp_path / "plots" / "images"
    names = sorted(p.name for p in images.iterdir())
    assert names == ["frame_sizes.png", "frames_per_character.png", "samples_alice.png", "samples_bob.png"]
    for path in images.iterdir():
        assert path.read_bytes()[:8] == PNG_MAGIC
        decoded = cv2.imread(str(path))
        assert decoded is not None and decoded.shape[0] > 100 and decoded.shape[1] > 100
    assert not [p for p in (tmp_path / "plots").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_thresholds_come_from_params(seven_frames, tmp_path):
    metrics = run(seven_frames, tmp_path, dark_mean=0, uniform_std=0)
    assert metrics["near_black"] == 0 and metrics["near_uniform"] == 0
    assert read_csv(tmp_path / "plots" / "flagged_frames.csv") == []


def frame_rows(videos: dict[str, int]) -> list[dict]:
    return [{"id": f"c--{v}--{t:08d}", "character": "c", "video": v, "timestamp": float(t)}
            for v, n in videos.items() for t in range(n)]


def test_samples_spread_over_videos_and_time():
    rows = frame_rows({"a.mp4": 10, "b.mp4": 10, "c.mp4": 2})
    picked = pick_samples(rows, 8)
    per_video = {v: sorted(r["timestamp"] for r in picked if r["video"] == v) for v in ("a.mp4", "b.mp4", "c.mp4")}
    assert [len(per_video[v]) for v in ("a.mp4", "b.mp4", "c.mp4")] == [3, 3, 2]
    assert per_video["a.mp4"][0] < 3 and per_video["a.mp4"][-1] > 6  # spread over the video, not its start
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert pick_samples(shuffled, 8) == picked
    assert len(pick_samples(frame_rows({"a.mp4": 3}), 8)) == 3


def test_samples_with_more_videos_than_slots_take_one_from_distinct_videos():
    rows = frame_rows({f"ep{i:02d}.mp4": 5 for i in range(20)})
    picked = pick_samples(rows, 4)
    episodes = sorted(int(r["video"][2:4]) for r in picked)
    assert len(set(episodes)) == 4 and episodes[-1] - episodes[0] >= 10  # spread, not the first four


def test_missing_or_empty_manifest(tmp_path):
    with pytest.raises(CharsegError, match="manifest.csv not found"):
        run(tmp_path / "nothing", tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "manifest.csv").write_text(",".join(COLUMNS) + "\n")
    with pytest.raises(CharsegError, match="lists no frames"):
        run(tmp_path / "empty", tmp_path)


def test_unreadable_or_missing_image_is_named_and_nothing_is_written(seven_frames, tmp_path):
    (seven_frames / "images" / "bob--pilot--00001000.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CharsegError, match="bob--pilot--00001000.jpg"):
        run(seven_frames, tmp_path)
    (seven_frames / "images" / "bob--pilot--00001000.jpg").unlink()
    with pytest.raises(CharsegError, match="bob--pilot--00001000.jpg"):
        run(seven_frames, tmp_path)
    assert not (tmp_path / "plots").exists() and not (tmp_path / "eda.json").exists()


def test_cli_reads_params(seven_frames, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("eda:\n  samples_per_character: 2\n  dark_mean: 16\n  uniform_std: 8\n  workers: 0\n")
    main(["--frames", str(seven_frames), "--plots", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"),
          "--params", str(params)])
    assert json.loads((tmp_path / "m.json").read_text())["near_black"] == 3
    params.write_text("eda:\n  samples_per_character: 0\n  dark_mean: 16\n  uniform_std: 8\n  workers: 0\n")
    with pytest.raises(CharsegError, match="eda.samples_per_character"):
        main(["--frames", str(seven_frames), "--params", str(params)])


@pytest.mark.filterwarnings("error")
def test_one_pixel_tall_frames_plot_without_warnings_or_errors(tmp_path):
    """Before: a 1 x 1000 frame was shrunk for the sample grid by fx/fy to 0 pixels tall (cv2.error), and
    the size plot's y axis spanned 1.25 px against 1250 px on x, flattening its aspect lines."""
    rng = np.random.default_rng(0)
    frames_dir = write_frames(tmp_path / "frames", [
        ("alice", "wide.mp4", 0.0, noise(rng, 1, 1000)),
        ("alice", "wide.mp4", 1.0, noise(rng, 1, 1000)),
        ("bob", "strip.mp4", 0.0, noise(rng, 1, 64)),
        ("bob", "dot.mp4", 0.0, noise(rng, 1, 1)),
    ])
    metrics = run(frames_dir, tmp_path)
    assert (metrics["height_min"], metrics["height_max"], metrics["width_max"]) == (1, 1, 1000)
    for path in (tmp_path / "plots" / "images").iterdir():
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert _shrunk(np.zeros((1, 1000, 3), np.uint8), 480).shape == (1, 480, 3)
    assert _shrunk(np.zeros((2000, 1, 3), np.uint8), 480).shape == (480, 1, 3)


def test_ctrl_c_during_frame_stats_cancels_the_queued_frames(seven_frames, tmp_path, monkeypatch):
    import os
    import signal
    import time

    import charseg.eda as eda

    paths = [seven_frames / "images" / "alice--ep1--00000000.jpg"] * 2000
    read = []
    real_stats = eda.gray_stats

    def stats(path):
        read.append(path)
        if len(read) == 20:
            os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.002)  # a real frame takes milliseconds to decode
        return real_stats(path)

    monkeypatch.setattr(eda, "gray_stats", stats)
    with pytest.raises(KeyboardInterrupt):
        list(eda.stream_stats(paths, workers=2))
    assert len(read) < 100  # the queued frames are cancelled, not read first
