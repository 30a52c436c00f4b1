import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

import charseg.sample as sample
from charseg.errors import CharsegError
from charseg.io import imread

SCALE = 0.05  # clips of a fraction of a second: the layout is the same as the full sample


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _decode_all(path: Path) -> tuple[list[np.ndarray], float]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return frames, fps


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "raw"
    sample.generate(out, seed=0, duration_scale=SCALE)
    return out


def test_layout_characters_containers_and_rates(raw):
    videos = sorted(p for p in (raw / "videos").rglob("*") if p.is_file() and not p.name.startswith("."))
    per_character = {}
    for video in videos:
        per_character.setdefault(video.parent.name, []).append(video)
    assert len(per_character) >= 3
    assert sorted(len(v) for v in per_character.values())[0] == 1  # one single-clip character
    assert any(len(v) >= 2 for v in per_character.values())
    assert any(not name.isascii() or " " in name for name in per_character)
    assert len({v.suffix for v in videos}) >= 2
    rates = {round(cv2.VideoCapture(str(v)).get(cv2.CAP_PROP_FPS), 2) for v in videos}
    assert {23.98, 25.0, 29.97} <= rates
    single = next(v[0] for v in per_character.values() if len(v) == 1)
    longest = max(sample.CLIPS, key=lambda c: c.seconds)
    assert single.parent.name == longest.character and longest.seconds >= 25


def test_truth_matches_every_decoded_frame(raw):
    index = list(csv.DictReader(open(raw / "truth" / "index.csv", newline="", encoding="utf-8")))
    assert list(index[0]) == ["video", "frame_index", "mask", "character_mask"]
    by_video = {}
    for row in index:
        by_video.setdefault(row["video"], []).append(row)
    assert len(by_video) == len(sample.CLIPS)
    pixels_with_figure = empty_masks = 0
    for spec in sample.CLIPS:
        rel = f"{spec.character}/{spec.filename}"
        frames, _ = _decode_all(raw / "videos" / rel)
        rows = by_video[rel]
        assert [int(r["frame_index"]) for r in rows] == list(range(len(frames)))
        for row in rows:
            mask = imread(raw / "truth" / row["mask"], cv2.IMREAD_UNCHANGED)
            assert row["mask"] == f"{spec.character}/{Path(spec.filename).stem}/{int(row['frame_index']):06d}.png"
            assert mask.shape == frames[0].shape[:2] == (spec.size[1], spec.size[0])
            assert set(np.unique(mask)) <= {0, 255}
            pixels_with_figure += int(mask.any())
            empty_masks += int(not mask.any())
        if spec.black_first_frame:
            assert frames[0].max() < 20
            assert not imread(raw / "truth" / rows[0]["mask"], cv2.IMREAD_UNCHANGED).any()
    assert pixels_with_figure and empty_masks


def test_mask_marks_the_figure_not_the_background():
    spec = sample.CLIPS[0]
    frames = list(sample.render_clip(spec, seed=0, clip_no=0, duration_scale=0.5))
    for frame, mask in frames[1:]:
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    covered = [mask.mean() / 255 for _, mask in frames]
    assert 0 < max(covered) < 0.5


def test_same_seed_gives_identical_bytes_other_seed_differs(raw, tmp_path):
    again = tmp_path / "again"
    sample.generate(again, seed=0, duration_scale=SCALE)
    assert _files(again) == _files(raw)
    assert any(name.endswith(sample.CHARACTER_MASK_SUFFIX) for name in _files(raw / "truth"))  # compared too
    other = tmp_path / "other"
    sample.generate(other, seed=1, duration_scale=SCALE)
    assert _files(other / "truth") != _files(raw / "truth")


def test_if_empty_keeps_existing_videos(tmp_path, capsys):
    out = tmp_path / "raw"
    user_video = out / "videos" / "carol" / "mine.mp4"
    user_video.parent.mkdir(parents=True)
    user_video.write_bytes(b"user footage")
    sample.main(["--out", str(out), "--if-empty", "--duration-scale", str(SCALE)])
    assert "already holds videos" in capsys.readouterr().out
    assert [p.name for p in (out / "videos").rglob("*") if p.is_file()] == ["mine.mp4"]
    assert not (out / "truth").exists()
    with pytest.raises(CharsegError, match="mine.mp4"):  # without --if-empty: refuses to replace them
        sample.generate(out, duration_scale=SCALE)
    assert user_video.read_bytes() == b"user footage"


def test_if_empty_generates_into_empty_folder_and_regenerates_a_sample(tmp_path):
    out = tmp_path / "raw"
    (out / "videos").mkdir(parents=True)
    sample.main(["--out", str(out), "--if-empty", "--duration-scale", str(SCALE)])
    first = _files(out)
    assert any(name.endswith(".mp4") for name in first)
    sample.generate(out, seed=0, duration_scale=SCALE)  # a previous sample may be replaced
    assert _files(out) == first


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    real_render = sample.render_clip_characters

    def failing_render(spec, seed, clip_no, duration_scale=1.0):
        for i, item in enumerate(real_render(spec, seed, clip_no, duration_scale)):
            if clip_no == 2 and i == 2:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(sample, "render_clip_characters", failing_render)
    out = tmp_path / "raw"
    with pytest.raises(KeyboardInterrupt):
        sample.generate(out, duration_scale=SCALE)
    assert list(out.iterdir()) == []
