"""Predict and export in the characters task: colour masks whose colours are the classes, one 0/255 mask per
class with --per-character, overlays naming each character at its region, video, ONNX parity, and the
refusal of --per-character for a person model."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from helpers import tiny_checkpoint, write_video
from charseg import predict
from charseg.errors import CharsegError, run_cli
from charseg.export import export
from charseg.inference import TorchSegmenter, infer_class_maps, preprocess
from charseg.io import slugify
from charseg.models import IMAGENET_MEAN, IMAGENET_STD, build_model, load_checkpoint, save_checkpoint
from charseg.onnx import OnnxSegmenter
from charseg.task import characters_task, palette

IMG_SIZE = 32
CFG = {"arch": "pspnet", "encoder": "resnet18", "encoder_weights": None, "psp_out_channels": 16}
TASK = characters_task(["background", "alice", "Zoë", "other"])
VIDEO_FRAMES = 6

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict_characters")
    torch.manual_seed(1)
    model = build_model(CFG, pretrained=False, outputs=TASK.outputs)
    with torch.no_grad():  # no bias and a strong head: several classes win somewhere (seed 1: all four)
        model.segmentation_head[0].bias.zero_()
        model.segmentation_head[0].weight.mul_(100)
    checkpoint = root / "models" / "cast" / "best.pt"
    save_checkpoint(checkpoint, model, model_name="cast", cfg=CFG, img_size=IMG_SIZE, mean=IMAGENET_MEAN,
                    std=IMAGENET_STD, epoch=1, val_dice=0.0, task=TASK)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("shot_a", "shot_b"):
        cv2.imwrite(str(images / f"{name}.jpg"), rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    return {"root": root, "checkpoint": checkpoint, "images": images,
            "video": write_video(root / "clip.avi", VIDEO_FRAMES, 10.0, (64, 48)),
            "person": tiny_checkpoint(root / "person", IMG_SIZE, CFG)}


def cli(checkpoint: Path, *args: str | Path) -> None:
    run_cli(predict.main, [str(a) for a in ["--checkpoint", checkpoint, "--device", "cpu", *args]])


def colours_to_ids(colour_mask: np.ndarray) -> np.ndarray:
    """Class ids of a colour mask read by OpenCV (BGR), through the task's palette; -1 for a foreign colour."""
    ids = np.full(colour_mask.shape[:2], -1)
    for k, rgb in enumerate(palette(TASK)):
        ids[(colour_mask == rgb[::-1]).all(axis=-1)] = k
    return ids


def expected_ids(checkpoint: Path, bgr_frames: list[np.ndarray]) -> list[np.ndarray]:
    segmenter = TorchSegmenter.from_checkpoint(checkpoint)
    batch = preprocess([cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in bgr_frames], segmenter.meta)
    return infer_class_maps(segmenter, batch, [f.shape[:2] for f in bgr_frames], 0.5)


def test_images_get_colour_masks_and_one_mask_per_class(project, tmp_path, capsys):
    out = tmp_path / "out"
    cli(project["checkpoint"], "--input", project["images"], "--output", out, "--per-character")
    assert "<name>_<class>.mask.png" in capsys.readouterr().out
    suffixes = [f"_{slugify(name)}" for name in TASK.classes[1:]]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{stem}{suffix}" for stem in ("shot_a", "shot_b")
        for suffix in [".mask.png", ".overlay.jpg"] + [f"{s}.mask.png" for s in suffixes])
    for stem in ("shot_a", "shot_b"):
        frame = cv2.imread(str(project["images"] / f"{stem}.jpg"))
        ids = expected_ids(project["checkpoint"], [frame])[0]
        assert len(np.unique(ids)) > 1  # the test sees more than one class
        np.testing.assert_array_equal(colours_to_ids(cv2.imread(str(out / f"{stem}.mask.png"))), ids)
        for k, suffix in enumerate(suffixes, start=1):
            mask = cv2.imread(str(out / f"{stem}{suffix}.mask.png"), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(mask, (ids == k).astype(np.uint8) * 255)


def test_video_with_per_character_writes_the_masks_folder(project, tmp_path):
    output = tmp_path / "cast.avi"
    cli(project["checkpoint"], "--input", project["video"], "--output", output, "--per-character")
    masks = tmp_path / "cast.masks"
    names = sorted(p.name for p in masks.iterdir())
    assert len(names) == VIDEO_FRAMES * len(TASK.classes)  # a colour mask and one per class but background
    assert "000000.png" in names and "000005_alice.png" in names and f"000003_{slugify('Zoë')}.png" in names
    capture = cv2.VideoCapture(str(project["video"]))
    frames = [capture.read()[1] for _ in range(VIDEO_FRAMES)]
    capture.release()
    for index, ids in enumerate(expected_ids(project["checkpoint"], frames)):
        np.testing.assert_array_equal(colours_to_ids(cv2.imread(str(masks / f"{index:06d}.png"))), ids)
        np.testing.assert_array_equal(cv2.imread(str(masks / f"{index:06d}_alice.png"), cv2.IMREAD_UNCHANGED),
                                      (ids == 1).astype(np.uint8) * 255)
    capture = cv2.VideoCapture(str(output))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == VIDEO_FRAMES
    capture.release()


def test_overlay_tints_each_class_and_names_it_at_its_largest_region():
    frame = np.full((120, 160, 3), 128, np.uint8)
    ids = np.zeros((120, 160), np.uint8)
    ids[10:110, 80:150] = 1   # alice's large region, centred at (115, 60)
    ids[5:15, 5:15] = 1       # and a small one far away
    ids[60:100, 10:40] = 3    # other
    rendering = predict.Rendering(TASK)
    out = rendering.overlay(frame, ids)
    alice_bgr = palette(TASK)[1][::-1].astype(float)
    assert np.allclose(out[100, 90], 0.55 * 128 + 0.45 * alice_bgr, atol=2)  # tinted, away from the name
    black = (out == 0).all(axis=-1)  # the names' outlines: nothing else in this frame is black
    assert black[50:70, 85:145].any() and black[70:90, 10:40].any()
    assert not black[:30, :40].any() and not black[:, :5].any()  # not at alice's small region


def test_per_character_needs_a_characters_model(project, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(project["person"], "--input", project["images"], "--output", tmp_path / "out", "--per-character")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--per-character: pspnet was trained for the person task" in error and "task=characters" in error
    with pytest.raises(CharsegError, match=r"--per-character: .* trained for the person task.*task=characters"):
        predict.check_task_options(TorchSegmenter.from_checkpoint(project["person"]), "pspnet", per_character=True,
                                   threshold=None)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # exports a model to ONNX
def test_export_of_a_characters_model_keeps_its_classes_and_matches_torch(project, tmp_path, capsys):
    output = tmp_path / "cast.onnx"
    report = export(project["checkpoint"], output)
    assert report.max_abs_probs <= report.tolerance
    onnx_segmenter = OnnxSegmenter(output, threads=1)
    assert onnx_segmenter.task == TASK and onnx_segmenter.meta["classes"] == list(TASK.classes)
    model, meta = load_checkpoint(project["checkpoint"])
    frames = [np.random.default_rng(i).integers(0, 256, (40, 56, 3), dtype=np.uint8) for i in range(3)]
    probs = onnx_segmenter(preprocess(frames, onnx_segmenter.meta))
    torch_probs = TorchSegmenter(model, meta, torch.device("cpu"))(preprocess(frames, meta))
    assert probs.shape == (3, len(TASK.classes), IMG_SIZE, IMG_SIZE)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(probs - torch_probs).max() < 1e-3
    out = tmp_path / "onnx_out"
    run_cli(predict.main, ["--onnx", str(output), "--device", "cpu", "--input", str(project["images"]),
                           "--output", str(out)])
    frame = cv2.imread(str(project["images"] / "shot_a.jpg"))
    np.testing.assert_array_equal(colours_to_ids(cv2.imread(str(out / "shot_a.mask.png"))),
                                  expected_ids(project["checkpoint"], [frame])[0])
