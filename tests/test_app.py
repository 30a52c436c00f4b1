"""charseg app (issue 16): the page's functions directly, the running app through gradio_client, and the page in
a real browser (Debian's chromium, driven by Playwright)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from helpers import tiny_checkpoint, write_video
from app_server import running_app

from charseg import app
from charseg.errors import CharsegError
from charseg.layout import Layout
from charseg.models import IMAGENET_MEAN, IMAGENET_STD, build_model, load_checkpoint, save_checkpoint
from charseg.onnx import export_onnx
from charseg.predict import JPEG_QUALITY, predict_images
from charseg.task import characters_task, palette

IMG_SIZE = 32
CFG = {"arch": "pspnet", "encoder": "resnet18", "encoder_weights": None, "psp_out_channels": 16}
CAST = characters_task(["background", "alice", "Zoë", "other"])
CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def characters_checkpoint(root: Path, name: str = "cast") -> Path:
    torch.manual_seed(1)
    model = build_model(CFG, pretrained=False, outputs=CAST.outputs)
    with torch.no_grad():  # a strong head without bias: several classes win somewhere
        model.segmentation_head[0].bias.zero_()
        model.segmentation_head[0].weight.mul_(100)
    checkpoint = Layout(root).checkpoint(name)
    save_checkpoint(checkpoint, model, model_name=name, cfg=CFG, img_size=IMG_SIZE, mean=IMAGENET_MEAN,
                    std=IMAGENET_STD, epoch=1, val_dice=0.0, task=CAST)
    return checkpoint


def read_frames(path: str | Path) -> int:
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.grab():
        count += 1
    return count


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A trained project as the page finds it: two checkpoints, an ONNX export, a damaged checkpoint,
    dvclive and evaluate metrics, a split with frames, a comparison report and a plot."""
    root = tmp_path_factory.mktemp("app_project")
    layout = Layout(root)
    tiny_checkpoint(root, IMG_SIZE, CFG, name="pspnet")
    characters_checkpoint(root)
    person_model, person_meta = load_checkpoint(layout.checkpoint("pspnet"))
    export_onnx(person_model, person_meta, layout.onnx("pspnet"))
    layout.checkpoint("broken").parent.mkdir(parents=True)
    layout.checkpoint("broken").write_bytes(b"not a checkpoint")
    (layout.live / "pspnet").mkdir(parents=True)
    (layout.live / "pspnet" / "metrics.json").write_text(json.dumps({"best_val_dice": 0.8125}))
    layout.metrics("evaluate").mkdir(parents=True)
    (layout.metrics("evaluate") / "cast.json").write_text(json.dumps({"miou": 0.5, "dice": 0.7}))
    rng = np.random.default_rng(0)
    ids = [f"alice/ep1/{i:06d}" for i in range(3)]
    for frame_id in ids:
        layout.frames.image(frame_id).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(layout.frames.image(frame_id)), rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    layout.split.write_text(json.dumps({"train": ids[:1], "val": ids[1:] + ["gone/ep9/000001"]}))
    layout.reports.mkdir()
    (layout.reports / "comparison.md").write_text("# Model comparison\n\n| model | dice |\n|---|---|\n| x | 0.1 |\n")
    layout.plots("evaluate").mkdir(parents=True)
    cv2.imwrite(str(layout.plots("evaluate") / "metrics.png"), np.zeros((8, 8, 3), np.uint8))
    return root


@pytest.fixture(scope="module")
def entries(project) -> list[app.ModelEntry]:
    return app.find_models(Layout(project))


@pytest.fixture()
def frame_file(tmp_path) -> Path:
    path = tmp_path / "shot.png"
    coarse = np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    cv2.imwrite(str(path), cv2.resize(coarse, (112, 80), interpolation=cv2.INTER_CUBIC))
    return path


def test_find_models_lists_checkpoints_exports_and_damaged_files_with_their_facts(project, entries):
    by_label = {e.label: e for e in entries}
    assert set(by_label) == {"broken", "cast", "pspnet", "pspnet (onnx)"}
    assert by_label["broken"].segmenter is None and "not a readable charseg checkpoint" in by_label["broken"].error
    rows = {row[0]: dict(zip(app.MODEL_COLUMNS, row)) for row in app.model_rows(Layout(project), entries)}
    assert rows["pspnet"]["arch"] == "pspnet" and rows["pspnet"]["img_size"] == str(IMG_SIZE)
    assert rows["pspnet"]["task"] == "person" and rows["pspnet"]["score"] == "val Dice 0.812"
    assert rows["pspnet (onnx)"]["file"] == "exports/pspnet.onnx" and rows["pspnet (onnx)"]["score"] == "val Dice 0.812"
    assert rows["cast"]["task"] == "characters (2 characters)" and rows["cast"]["score"] == "eval mIoU 0.500"
    assert rows["broken"]["arch"] == "not loadable" and "retrain" in rows["broken"]["score"]
    assert all(len(row["date"]) == 16 for row in rows.values())


@pytest.mark.parametrize("label", ["pspnet", "cast", "pspnet (onnx)"])
def test_image_masks_and_overlays_are_predicts_own(entries, frame_file, tmp_path, label):
    entry = next(e for e in entries if e.label == label)
    image = app.read_frame(frame_file)
    threshold = 0.4
    result = app.segment_image(entries, [label], image, threshold, with_probabilities=True)
    predict_images(entry.segmenter, [frame_file], tmp_path / "out", threshold=threshold, progress=False)
    expected_mask = cv2.imread(str(tmp_path / "out" / "shot.mask.png"), cv2.IMREAD_UNCHANGED)
    mask, caption = result.masks[0]
    assert caption == label and mask.shape[:2] == image.shape[:2]
    np.testing.assert_array_equal(mask if mask.ndim == 2 else mask[..., ::-1], expected_mask)
    # predict writes its overlay as a JPEG: the page's overlay, encoded the same way, is the same file.
    ok, encoded = cv2.imencode(".jpg", result.overlays[0][0][..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok and encoded.tobytes() == (tmp_path / "out" / "shot.overlay.jpg").read_bytes()
    heat, _ = result.probabilities[0]
    assert heat.shape == (*image.shape[:2], 3) and heat.dtype == np.uint8


def test_several_models_side_by_side_and_a_legend_for_the_characters(entries, frame_file):
    result = app.segment_image(entries, ["pspnet", "cast"], app.read_frame(frame_file), 0.5)
    assert [caption for _, caption in result.overlays] == ["cast", "pspnet"]  # in the models table's order
    assert result.probabilities == []
    for name, colour in zip(CAST.classes[1:], palette(CAST)[1:]):
        assert name in result.legend and f"rgb{tuple(int(c) for c in colour)}" in result.legend
    assert app.segment_image(entries, ["pspnet"], app.read_frame(frame_file), 0.5).legend == ""


def test_bad_image_input_is_a_message(entries, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(CharsegError, match="bad.png is not a readable image"):
        app.read_frame(bad)
    with pytest.raises(CharsegError, match="no image"):
        app.read_frame(None)
    image = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(CharsegError, match="choose at least one model"):
        app.segment_image(entries, [], image, 0.5)
    with pytest.raises(CharsegError, match="choose at least one model"):
        app.segment_image(entries, ["broken"], image, 0.5)


def test_no_trained_model_says_which_command_makes_one(tmp_path):
    empty = app.find_models(Layout(tmp_path))
    assert empty == []
    with pytest.raises(CharsegError, match="make repro.*dvc repro.*dvc pull"):
        app.segment_image(empty, None, np.zeros((20, 30, 3), np.uint8), 0.5)
    with pytest.raises(CharsegError, match="no trained model yet"):
        app.segment_video(empty, None, write_video(tmp_path / "c.avi", 3, 5.0), 0.5, 10, tmp_path)
    text, plots = app.comparison(Layout(tmp_path))
    assert "dvc repro evaluate" in text and plots == []
    assert app.validation_frames(Layout(tmp_path)) == []


def test_video_is_predicts_overlay_video_in_webm(entries, tmp_path):
    clip = write_video(tmp_path / "clip.avi", 7, 10.0, (64, 48))
    output = app.segment_video(entries, "cast", clip, 0.5, max_mb=10, out_dir=tmp_path)
    assert output.suffix == ".webm" and output.parent.parent == tmp_path
    assert read_frames(output) == 7 and cv2.VideoCapture(str(output)).read()[1].shape == (48, 64, 3)


def test_bad_video_input_is_a_message(entries, tmp_path):
    with pytest.raises(CharsegError, match="no video"):
        app.segment_video(entries, "pspnet", None, 0.5, 10, tmp_path)
    clip = write_video(tmp_path / "clip.avi", 30, 10.0, (64, 48))
    size_mb = clip.stat().st_size / 2**20
    with pytest.raises(CharsegError, match=r"over this page's limit of .* MB \(charseg app --max-video-mb\)"):
        app.segment_video(entries, "pspnet", clip, 0.5, size_mb / 2, tmp_path)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(os.urandom(2000))
    with pytest.raises(CharsegError, match="corrupt.mp4 is not a video that can be read"):
        app.segment_video(entries, "pspnet", corrupt, 0.5, 10, tmp_path)


def test_comparison_and_validation_frames_of_the_workspace(project):
    text, plots = app.comparison(Layout(project))
    assert text.startswith("# Model comparison") and [Path(p).name for p in plots] == ["metrics.png"]
    frames = app.validation_frames(Layout(project))
    assert [Path(p).name for p in frames] == ["000001.jpg", "000002.jpg"]  # the missing frame is left out


def test_command_line_errors(tmp_path):
    for argv, message in ((["--port", "0"], "--port must be in"), (["--max-video-mb", "0"], "must be positive"),
                          (["--project", str(tmp_path / "nope")], "no such folder")):
        with pytest.raises(CharsegError, match=message):
            app.parse_args(argv)


@pytest.mark.slow
def test_running_app_through_gradio_client_gives_predicts_masks(project, frame_file, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    predict = [sys.executable, "-m", "charseg", "predict", "--model", "cast", "--input", str(frame_file),
               "--output", str(tmp_path / "predicted")]
    done = subprocess.run(predict, cwd=project, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    clip = write_video(tmp_path / "clip.avi", 60, 10.0, (64, 48))
    limit_mb = clip.stat().st_size / 2**20 / 2
    assert frame_file.stat().st_size / 2**20 < limit_mb  # the limit is on every upload: images stay under it
    with running_app(project, "--max-video-mb", f"{limit_mb:.4f}") as url:
        client = Client(url, verbose=False)
        overlays, masks, probs, legend = client.predict(handle_file(str(frame_file)), ["cast", "pspnet"], 0.5, False,
                                                        api_name="/segment_image")
        assert [m["caption"] for m in masks] == ["cast", "pspnet"]
        got = cv2.imread(masks[0]["image"], cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(got, cv2.imread(str(tmp_path / "predicted" / "shot.mask.png"),
                                                      cv2.IMREAD_UNCHANGED))
        assert "alice" in legend and len(overlays) == 2
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"not an image")
        with pytest.raises(AppError, match="bad.png is not a readable image"):
            client.predict(handle_file(str(bad)), ["cast"], 0.5, False, api_name="/segment_image")
        small = write_video(tmp_path / "small.avi", 20, 10.0, (64, 48))
        overlay = client.predict(handle_file(str(small)), "cast", 0.5, api_name="/segment_video")
        assert read_frames(overlay["video"] if isinstance(overlay, dict) else overlay) == 20
        # Refused before the upload (gradio's max_file_size), as the browser refuses it on the page.
        with pytest.raises((AppError, ValueError), match="exceeds the maximum file size"):
            client.predict(handle_file(str(clip)), "pspnet", 0.5, api_name="/segment_video")


def _chromium_missing() -> str | None:
    if not CHROMIUM.is_file():
        return (f"no {CHROMIUM}: install Debian's chromium (`apt-get install chromium`; .ci/run does) to run the "
                f"browser test")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as err:
        return f"playwright is not installed ({err}): make install"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_chromium_missing() is not None, reason=str(_chromium_missing()))
def test_browser_uploads_a_frame_and_sees_every_models_overlay(project, tmp_path):
    from playwright.sync_api import sync_playwright

    frame = tmp_path / "frame.png"
    rng = np.random.default_rng(5)
    cv2.imwrite(str(frame), cv2.resize(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), (320, 240),
                                       interpolation=cv2.INTER_NEAREST))
    shot = tmp_path / "page.png"
    # The flags Chromium needs as root on a closed network (no sandbox; no background calls to Google).
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
    with running_app(project) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=flags)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, wait_until="networkidle", timeout=60_000)
            assert page.get_by_text("pspnet (onnx)").count() >= 1  # the models table and the model choices
            page.locator("#image-input input[type=file]").set_input_files(str(frame))
            page.wait_for_selector("#image-input img", timeout=30_000)
            page.click("#segment-image")
            page.wait_for_function("document.querySelectorAll('#overlays img').length >= 3", timeout=120_000)
            page.wait_for_function("[...document.querySelectorAll('#overlays img')].every(i => i.complete && "
                                   "i.naturalWidth > 0)", timeout=30_000)
            sizes = page.evaluate("[...document.querySelectorAll('#overlays img')].map(i => [i.naturalWidth, "
                                  "i.naturalHeight])")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert sizes == [[320, 240]] * len(sizes) and len(sizes) >= 3  # each model's overlay, at the frame's size
    screenshot = cv2.imread(str(shot))
    assert screenshot is not None and screenshot.shape[1] == 1280
    assert cv2.cvtColor(screenshot, cv2.COLOR_BGR2GRAY).std() > 20, "the screenshot is blank"
    # The frame's 20 px blocks of random colour are on the page, in the upload preview and the overlays.
    saturated = (screenshot.max(axis=2).astype(int) - screenshot.min(axis=2)) > 80
    assert saturated.mean() > 0.05, f"only {saturated.mean():.1%} of the page is colourful"
