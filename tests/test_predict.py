"""The predict command on a tiny random checkpoint and tiny clips: image, folder and video round trips,
thresholds, --every and --smooth, the pipelined video path against a plain loop, interrupted writes,
and every bad input a user can hit."""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import tiny_checkpoint, write_video
from charseg import predict
from charseg.errors import CharsegError, run_cli
from charseg.inference import TorchSegmenter, infer_masks, preprocess
from charseg.video import probe

IMG_SIZE = 32
CFG = {"arch": "pspnet", "encoder": "resnet18", "encoder_weights": None, "psp_out_channels": 16}
VIDEO_SIZE, VIDEO_FPS, VIDEO_FRAMES = (64, 48), 12.5, 10  # (width, height): not square, not img_size

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    checkpoint = tiny_checkpoint(root, IMG_SIZE, CFG)
    params = root / "params.yaml"
    params.write_text("models:\n  pspnet: {arch: pspnet, encoder: resnet18, encoder_weights: null}\n"
                      "  unet: {arch: unetpp, encoder: resnet18, encoder_weights: null}\n")
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    cv2.imwrite(str(images / "shot_a.jpg"), rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    cv2.imwrite(str(images / "shot_b.png"), rng.integers(0, 256, (30, 20), dtype=np.uint8))  # greyscale
    (images / "notes.txt").write_text("not an image")
    (images / "sub").mkdir()
    return {"root": root, "checkpoint": checkpoint, "params": params, "images": images,
            "avi": write_video(root / "clip.avi", VIDEO_FRAMES, VIDEO_FPS, VIDEO_SIZE),
            "mp4": write_video(root / "clip.mp4", VIDEO_FRAMES, VIDEO_FPS, VIDEO_SIZE, seed=1)}


@pytest.fixture(scope="module")
def segmenter(project) -> TorchSegmenter:
    return TorchSegmenter.from_checkpoint(project["checkpoint"], expect_arch="pspnet")


def cli(project: dict[str, Path], *args: str | Path, model: str = "pspnet", checkpoint: bool = True) -> None:
    argv = ["--params", project["params"], "--model", model, "--device", "cpu", *args]
    run_cli(predict.main, [str(a) for a in argv + (["--checkpoint", project["checkpoint"]] if checkpoint else [])])


def read_video(path: Path) -> tuple[list[np.ndarray], float]:
    capture = cv2.VideoCapture(str(path))
    fps, frames = capture.get(cv2.CAP_PROP_FPS), []
    while (frame := capture.read()[1]) is not None:
        frames.append(frame)
    capture.release()
    return frames, fps


def read_masks(folder: Path) -> list[np.ndarray]:
    return [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted(folder.glob("*.png"))]


class FakeSegmenter:
    """A Segmenter whose k-th frame (counting every frame it is given) gets the map probs_for(k)."""

    def __init__(self, probs_for, fail_after: int | None = None, error: BaseException = RuntimeError("model broke")):
        self.meta = {"img_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "threshold": 0.5}
        self.probs_for, self.fail_after, self.error = probs_for, fail_after, error
        self.seen = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        assert batch.shape[1:] == (3, 16, 16) and batch.dtype == np.float32
        if self.fail_after is not None and self.seen + len(batch) > self.fail_after:
            raise self.error
        out = np.stack([self.probs_for(self.seen + i) for i in range(len(batch))]).astype(np.float32)
        self.seen += len(batch)
        return out


def band(k: int) -> np.ndarray:
    """Foreground in columns [2k, 2k + 2) of the 16 x 16 map: each frame's mask is different."""
    probs = np.zeros((16, 16), np.float32)
    probs[:, 2 * k % 16:2 * k % 16 + 2] = 1
    return probs


def test_image_folder_round_trip(project, tmp_path, capsys):
    out = tmp_path / "out"
    cli(project, "--input", project["images"], "--output", out)
    assert sorted(p.name for p in out.iterdir()) == ["shot_a.mask.png", "shot_a.overlay.jpg",
                                                     "shot_b.mask.png", "shot_b.overlay.jpg"]
    for stem, size in [("shot_a", (40, 56)), ("shot_b", (30, 20))]:
        mask = cv2.imread(str(out / f"{stem}.mask.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == size and set(np.unique(mask)) <= {0, 255}
        assert cv2.imread(str(out / f"{stem}.overlay.jpg")).shape == (*size, 3)
    captured = capsys.readouterr()
    assert "skipped 2 non-image entries: notes.txt, sub" in captured.err
    assert captured.out.startswith("predict: 2 image(s) -> ") and "images/s" in captured.out
    (out / "shot_a.mask.png").unlink()
    cli(project, "--input", project["images"], "--output", out, "--overwrite")  # a folder of our outputs only
    assert len(list(out.iterdir())) == 4 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_single_image_and_colliding_stems(project, tmp_path):
    cli(project, "--input", project["images"] / "shot_a.jpg", "--output", tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["shot_a.mask.png", "shot_a.overlay.jpg"]
    paths = [Path("x/a.jpg"), Path("x/A.png"), Path("x/b.jpg")]
    assert predict.output_stems(paths) == {p: p.name for p in paths}  # a vs A collide on macOS/Windows
    assert predict.output_stems(paths[1:]) == {paths[1]: "A", paths[2]: "b"}


def test_threshold_zero_marks_everything_and_one_nothing(project, segmenter, tmp_path):
    coverage = []
    for threshold in (0.0, 0.3, 0.5, 0.7, 1.0):
        out = tmp_path / f"t{threshold}"
        predict.predict_images(segmenter, [project["images"] / "shot_a.jpg"], out, threshold=threshold,
                               progress=False)
        coverage.append((cv2.imread(str(out / "shot_a.mask.png"), cv2.IMREAD_UNCHANGED) > 0).mean())
    assert coverage[0] == 1.0 and coverage[-1] == 0.0 and coverage == sorted(coverage, reverse=True)


@pytest.mark.parametrize("source, suffix", [("avi", ".avi"), ("mp4", ".mp4"), ("avi", ".webm")])
def test_video_round_trip_keeps_frame_count_size_and_fps(project, tmp_path, capsys, source, suffix):
    out = tmp_path / f"overlay{suffix}"
    cli(project, "--input", project[source], "--output", out, "--save-masks", "--batch-size", "3")
    frames, fps = read_video(out)
    assert len(frames) == VIDEO_FRAMES and fps == pytest.approx(VIDEO_FPS)
    assert frames[0].shape == (VIDEO_SIZE[1], VIDEO_SIZE[0], 3)
    masks = read_masks(tmp_path / "overlay.masks")
    assert len(masks) == VIDEO_FRAMES and (tmp_path / "overlay.masks" / "000000.png").is_file()
    assert all(m.shape == (VIDEO_SIZE[1], VIDEO_SIZE[0]) and set(np.unique(m)) <= {0, 255} for m in masks)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "overlay.masks"])  # no temp left
    assert f"predict: {VIDEO_FRAMES} frames of" in capsys.readouterr().out
    cli(project, "--input", project[source], "--output", out, "--save-masks", "--overwrite", "--every", "4")
    assert len(read_video(out)[0]) == VIDEO_FRAMES and len(read_masks(tmp_path / "overlay.masks")) == VIDEO_FRAMES
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "overlay.masks"])


def test_pipelined_video_equals_a_sequential_loop(project, segmenter, tmp_path):
    out = tmp_path / "pipelined.avi"
    result = predict.predict_video(segmenter, probe(project["avi"]), out, threshold=0.5, batch_size=4,
                                   masks_dir=tmp_path / "masks", progress=False)
    assert (result.frames, result.inferred) == (VIDEO_FRAMES, VIDEO_FRAMES)
    source, _ = read_video(project["avi"])
    reference = tmp_path / "reference.avi"
    writer = cv2.VideoWriter(str(reference), cv2.VideoWriter_fourcc(*"MJPG"), VIDEO_FPS, VIDEO_SIZE)
    expected_masks = []
    for start in range(0, len(source), 4):  # read -> infer -> write, one batch after the other
        chunk = source[start:start + 4]
        batch = preprocess([cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in chunk], segmenter.meta)
        for frame, mask in zip(chunk, infer_masks(segmenter, batch, [f.shape[:2] for f in chunk], 0.5)):
            writer.write(predict.overlay(frame, mask))
            expected_masks.append(mask)
    writer.release()
    assert all(np.array_equal(a, b) for a, b in zip(read_masks(tmp_path / "masks"), expected_masks, strict=True))
    got, want = read_video(out)[0], read_video(reference)[0]
    assert len(got) == len(want) == VIDEO_FRAMES and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert any(m.any() for m in expected_masks)  # the comparison covered some foreground


def test_every_nth_frame_is_inferred_and_the_others_reuse_its_mask(project, tmp_path):
    fake = FakeSegmenter(band)
    result = predict.predict_video(fake, probe(project["avi"]), tmp_path / "out.avi", threshold=0.5, every=3,
                                   batch_size=2, masks_dir=tmp_path / "masks", progress=False)
    assert (result.frames, result.inferred, fake.seen) == (VIDEO_FRAMES, 4, 4)  # frames 0, 3, 6, 9
    masks = read_masks(tmp_path / "masks")
    assert len(masks) == len(read_video(tmp_path / "out.avi")[0]) == VIDEO_FRAMES
    for index, mask in enumerate(masks):
        assert np.array_equal(mask, masks[index - index % 3])
    assert not np.array_equal(masks[0], masks[3])


def test_one_inferred_frame_serves_more_frames_than_the_pending_cap(tmp_path):
    video = write_video(tmp_path / "long.avi", 40, VIDEO_FPS, VIDEO_SIZE)
    fake = FakeSegmenter(band)
    result = predict.predict_video(fake, probe(video), tmp_path / "out.avi", threshold=0.5, every=100, batch_size=8,
                                   masks_dir=tmp_path / "masks", progress=False)
    masks = read_masks(tmp_path / "masks")
    assert (result.frames, result.inferred, len(masks)) == (40, 1, 40)  # cap: 32 waiting frames
    assert all(np.array_equal(m, masks[0]) for m in masks)


def test_smoothing_removes_flicker(project, tmp_path):
    flicker = lambda k: np.full((16, 16), 0.6 if k % 2 else 0.3, np.float32)  # noqa: E731  mean below 0.5
    coverage = {}
    for smooth in (None, 0.3):
        masks_dir = tmp_path / f"masks{smooth}"
        predict.predict_video(FakeSegmenter(flicker), probe(project["avi"]), tmp_path / f"{smooth}.avi",
                              threshold=0.5, smooth=smooth, masks_dir=masks_dir, progress=False)
        coverage[smooth] = [int(m.max() > 0) for m in read_masks(masks_dir)]
    assert coverage[None] == [k % 2 for k in range(VIDEO_FRAMES)]
    assert coverage[0.3] == [0] * VIDEO_FRAMES  # the moving average stays below 0.5 throughout


@pytest.mark.parametrize("failure", ["model", "interrupt", "writer"])
def test_a_failed_video_write_leaves_nothing_that_looks_complete(project, tmp_path, monkeypatch, failure):
    out, masks_dir = tmp_path / "out.mp4", tmp_path / "out.masks"
    out.write_bytes(b"previous result")  # as with --overwrite: kept until a new one is complete
    fake = FakeSegmenter(band, fail_after=None if failure == "writer" else 5,
                         error=KeyboardInterrupt() if failure == "interrupt" else RuntimeError("model broke"))
    if failure == "writer":
        calls = []

        def broken_overlay(frame, mask):
            calls.append(1)
            if len(calls) == 4:
                raise OSError("disk full")
            return frame
        monkeypatch.setattr(predict, "overlay", broken_overlay)
    expected = {"model": RuntimeError, "interrupt": KeyboardInterrupt, "writer": OSError}[failure]
    with pytest.raises(expected):
        predict.predict_video(fake, probe(project["avi"]), out, threshold=0.5, batch_size=2, masks_dir=masks_dir,
                              progress=False)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temp video, no masks folder


@pytest.mark.slow  # exports a model to ONNX
def test_onnx_model_runs_like_the_checkpoint(project, segmenter, tmp_path, monkeypatch):
    onnx_model = pytest.importorskip("charseg.onnx")
    path = tmp_path / "pspnet.onnx"
    onnx_model.export_onnx(segmenter.model, segmenter.meta, path)
    cli(project, "--input", project["images"], "--output", tmp_path / "torch")
    cli(project, "--input", project["images"], "--output", tmp_path / "onnx", "--onnx", path, checkpoint=False)
    for torch_mask, onnx_mask in zip(read_masks(tmp_path / "torch"), read_masks(tmp_path / "onnx"), strict=True):
        assert (torch_mask == onnx_mask).mean() > 0.999  # pixels right at the threshold may differ
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the .onnx file alone is enough
    run_cli(predict.main, [str(a) for a in ["--onnx", path, "--device", "cpu", "--input", project["images"],
                                            "--output", tmp_path / "onnx_alone"]])
    assert all(np.array_equal(a, b) for a, b in zip(read_masks(tmp_path / "onnx"), read_masks(tmp_path / "onnx_alone"),
                                                    strict=True))


def test_checkpoint_alone_runs_from_any_directory(project, tmp_path, monkeypatch, capsys):
    """No params.yaml, no --model: the checkpoint records its arch and preprocessing."""
    monkeypatch.chdir(tmp_path)
    run_cli(predict.main, [str(a) for a in ["--checkpoint", project["checkpoint"], "--device", "cpu",
                                            "--input", project["images"] / "shot_a.jpg", "--output", "out"]])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["shot_a.mask.png", "shot_a.overlay.jpg"]
    assert "(pspnet, torch on cpu)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_cli(predict.main, ["--input", str(project["images"]), "--output", "out2"])
    assert "give --model NAME, --checkpoint PATH or --onnx PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(predict.main, ["--onnx", "--input", str(project["images"]), "--output", "out2"])
    assert "--onnx without a PATH runs exports/NAME.onnx: give --model NAME" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def bad_inputs(project: dict[str, Path], tmp: Path) -> list[tuple[list, dict, str]]:
    """(CLI args, cli() options, expected message) per user mistake; files are created as needed."""
    corrupt_image = tmp / "corrupt" / "broken.jpg"
    corrupt_image.parent.mkdir()
    corrupt_image.write_bytes(b"not a jpeg at all")
    (tmp / "corrupt.mp4").write_bytes(b"\x00" * 2048)
    (tmp / "notes.txt").write_text("hello")
    (tmp / "no_images").mkdir()
    (tmp / "no_images" / "readme.md").write_text("x")
    empty = cv2.VideoWriter(str(tmp / "empty.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    empty.release()
    (tmp / "exists.mp4").write_bytes(b"x")
    (tmp / "home").mkdir()
    (tmp / "home" / "thesis.pdf").write_bytes(b"x")
    (tmp / "wrong_params.yaml").write_text("models:\n  pspnet: {arch: unetpp}\n")
    video, image = project["avi"], project["images"] / "shot_a.jpg"
    return [
        (["--input", video, "--output", tmp / "o.mp4"], {"model": "nope"}, "unknown model 'nope'.*pspnet, unet"),
        (["--input", video, "--output", tmp / "o.mp4"], {"checkpoint": False},
         r"models/pspnet/best.pt not found: train it with `dvc repro train@pspnet` \(or fetch it with `dvc pull`\)"),
        (["--input", video, "--output", tmp / "o.mp4", "--checkpoint", tmp / "gone.pt"], {"checkpoint": False},
         "--checkpoint .*gone.pt: no such file"),
        (["--input", video, "--output", tmp / "o.mp4"], {"model": "unet"},
         "holds a 'pspnet' model but params.yaml says arch 'unetpp'"),
        (["--input", tmp / "corrupt", "--output", tmp / "o"], {}, "broken.jpg is not a readable image"),
        (["--input", tmp / "corrupt.mp4", "--output", tmp / "o.mp4"], {}, "corrupt.mp4: cannot be opened as a video"),
        (["--input", tmp / "notes.txt", "--output", tmp / "o.mp4"], {}, "notes.txt is neither an image"),
        (["--input", tmp / "empty.avi", "--output", tmp / "o.mp4"], {}, "empty.avi: the video has no frame"),
        (["--input", tmp / "no_images", "--output", tmp / "o"], {}, "no_images holds no images"),
        (["--input", tmp / "absent.mp4", "--output", tmp / "o.mp4"], {}, "absent.mp4: no such file or folder"),
        (["--input", video, "--output", tmp / "exists.mp4"], {}, "exists.mp4 already exists: pass --overwrite"),
        (["--input", image, "--output", tmp / "home", "--overwrite"], {}, "refusing to replace .*home.*thesis.pdf"),
        (["--input", project["images"], "--output", project["images"], "--overwrite"], {}, "would replace the input"),
        (["--input", video, "--output", tmp / "o.flv"], {}, r"needs one of the suffixes \.mp4 \(mp4v\)"),
        (["--input", image, "--output", tmp / "o.png"], {}, "for images it is a folder"),
        (["--input", video, "--output", tmp / "o.mp4", "--onnx", tmp / "m.onnx"], {"checkpoint": False},
         r"m.onnx not found: write it with `charseg export --model pspnet`"),
        (["--input", video, "--output", tmp / "o.mp4", "--params", tmp / "wrong_params.yaml"], {},
         "holds a 'pspnet' model but params.yaml says arch 'unetpp'"),
        (["--input", video, "--output", tmp / "o.mp4", "--threshold", "1.5"], {}, r"--threshold must be in \[0, 1\]"),
        (["--input", video, "--output", tmp / "o.mp4", "--every", "0"], {}, "--every must be at least 1"),
        (["--input", video, "--output", tmp / "o.mp4", "--smooth", "0"], {}, r"--smooth must be in \(0, 1\]"),
        (["--input", video, "--output", tmp / "o.mp4", "--batch-size", "0"], {}, "--batch-size must be at least 1"),
    ]


def test_every_bad_input_is_one_clear_error_line(project, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default checkpoint models/pspnet/best.pt is absent here
    for args, options, message in bad_inputs(project, tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            cli(project, *args, **options)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and err[-1].startswith("error: "), (args, err)
        assert sum(line.startswith("error: ") for line in err) == 1
        assert re.search(message, err[-1]), (message, err[-1])
        assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "o").exists()


def test_a_video_without_frames_fails_in_the_reader_and_leaves_nothing(segmenter, tmp_path):
    empty = cv2.VideoWriter(str(tmp_path / "empty.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    empty.release()
    with pytest.raises(CharsegError, match="no frame"):
        predict.predict_video(segmenter, probe(tmp_path / "empty.avi"), tmp_path / "o.avi", threshold=0.5,
                              progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.avi"]
