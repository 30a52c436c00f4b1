"""The masks stage on tiny frames: planted detections, label cache, interruptions, bad input, imports, QA."""
from __future__ import annotations

import csv
import importlib
import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from charseg import masks as stage
from charseg.config import DetectorConfig, LabelsConfig, Params, RefineConfig, SamConfig, load_config
from charseg.errors import CharsegError
from charseg.io import imread, imwrite_atomic, write_csv
from charseg.labels import detect, weights
from charseg.labels.cache import LabelCache
from charseg.labels.detect import YoloSamLabeler
from charseg.layout import LABEL_COLUMNS, FramesDir, MasksDir
from planted_labels import BoxSegmenter, PlantedDetector, rect_mask
from stages.masks import main as stage_main

REPO_ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("id", "character", "video", "frame_index", "timestamp", "width", "height")

# Persons are bright rectangles (x1, y1, x2, y2) on a dark frame, aligned to JPEG's 8x8 blocks so
# that the frame's pixels stay clearly inside or outside them after compression.
FRAMES = {
    "alice--clip_01--00000000": ("alice", "alice/clip_01.mp4", 0, (48, 64), [(8, 8, 24, 40)]),
    "alice--clip_01--00001000": ("alice", "alice/clip_01.mp4", 30, (48, 64), [(8, 8, 24, 40), (40, 16, 56, 40),
                                                                             (56, 0, 64, 8)]),
    "bob--scene_2--00000000": ("bob", "bob/scene 2.mkv", 0, (40, 80), []),
    "bob--scene_2--00001000": ("bob", "bob/scene 2.mkv", 25, (40, 80), [(16, 8, 40, 32)]),
}
GRAYSCALE = {"bob--scene_2--00001000"}  # stored as a single-channel JPEG


def frame_image(size, persons):
    image = np.full((*size, 3), 30, np.uint8)
    for x1, y1, x2, y2 in persons:
        image[y1:y2, x1:x2] = 230
    return image


def make_frames(root: Path, ids=None) -> Path:
    """A frames-stage output (images/<id>.jpg + manifest.csv), rows deliberately not in id order."""
    ids = list(FRAMES) if ids is None else ids
    rows = []
    for frame_id in reversed(ids):
        character, video, index, size, persons = FRAMES[frame_id]
        image = frame_image(size, persons)
        if frame_id in GRAYSCALE:
            image = image[..., 0]
        imwrite_atomic(root / "images" / f"{frame_id}.jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        rows.append({"id": frame_id, "character": character, "video": video, "frame_index": index,
                     "timestamp": index / 30, "width": size[1], "height": size[0]})
    write_csv(root / "manifest.csv", rows, COLUMNS)
    return root


def planted_labeler(segmenter=None, settings=None):
    detector, segmenter = PlantedDetector(), segmenter or BoxSegmenter()
    return YoloSamLabeler(lambda: detector, lambda: segmenter, settings or {"test": "planted"}), detector, segmenter


def config(tmp_path, *, batch=2, **changes) -> LabelsConfig:
    cfg = LabelsConfig(
        method="yolo_sam", device="cpu", half=False, workers=1,
        detector=DetectorConfig(weights=tmp_path / "weights/yolov8s.pt", conf=0.5, min_box_area=0.0, imgsz=64,
                                batch=batch),
        sam=SamConfig(model="vit_b", checkpoint=tmp_path / "weights/sam_vit_b_01ec64.pth"),
        refine=RefineConfig(min_area=0.03), import_dir=tmp_path / "import", mask_index="index.csv",
        truth_dir=None, cache_dir=tmp_path / "cache", keep_empty=True, qa_samples=4)
    return replace(cfg, **changes)


def run(tmp_path, cfg, labeler=None, frames=None):
    out = tmp_path / "out"
    metrics = stage.make_masks(FramesDir(frames or tmp_path / "frames"), MasksDir(out / "masks"), out / "plots",
                               out / "metrics.json", cfg, labeler=labeler)
    with open(out / "masks/manifest.csv", newline="") as fh:
        rows = {r["id"]: r for r in csv.DictReader(fh)}
    return metrics, rows, out


def read_mask(out, frame_id):
    return imread(out / "masks/images" / f"{frame_id}.png", cv2.IMREAD_UNCHANGED)


def test_planted_persons_become_clean_masks_named_by_frame_id(tmp_path):
    make_frames(tmp_path / "frames")
    labeler, detector, segmenter = planted_labeler()
    metrics, rows, out = run(tmp_path, config(tmp_path), labeler)

    # The 8x8 "person" in a corner of the second frame is prompted, then dropped by refine.min_area.
    expected = {frame_id: rect_mask(size, [p for p in persons if p != (56, 0, 64, 8)])
                for frame_id, (_, _, _, size, persons) in FRAMES.items()}
    for frame_id, mask in expected.items():
        written = read_mask(out, frame_id)
        assert written.dtype == np.uint8 and written.ndim == 2 and np.array_equal(written, mask), frame_id
    assert sorted(p.name for p in (out / "masks/images").iterdir()) == sorted(f"{i}.png" for i in FRAMES)

    two = rows["alice--clip_01--00001000"]
    assert two["status"] == "labelled" and two["n_persons"] == "3"
    assert sorted(json.loads(two["boxes"])) == [[8, 8, 24, 40], [40, 16, 56, 40], [56, 0, 64, 8]]
    assert json.loads(two["sam_scores"]) == [0.75] * 3
    assert float(two["coverage"]) == pytest.approx((16 * 32 + 16 * 24) / (48 * 64), abs=1e-6)
    empty = rows["bob--scene_2--00000000"]
    assert empty["status"] == "empty" and empty["n_persons"] == "0" and float(empty["coverage"]) == 0
    assert rows["bob--scene_2--00001000"]["status"] == "labelled"  # the grayscale frame
    assert list(rows) == list(reversed(FRAMES))  # manifest keeps the frames manifest's rows and order
    assert set(COLUMNS) | set(LABEL_COLUMNS) == set(next(iter(rows.values())))

    assert segmenter.calls == 3 and detector.batches == [2, 2]  # SAM only where persons are; YOLO in batches
    assert metrics == {"frames": 4, "labelled": 3, "empty": 1, "failed": 0,
                       "mean_coverage": pytest.approx(metrics["mean_coverage"]), "mean_persons": 1.25,
                       "mean_sam_score": 0.75}
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["coverage_hist.png", "overlays_alice.png", "overlays_bob.png", "persons_hist.png"]
    grid = imread(out / "plots/overlays_alice.png")
    assert grid.shape[1] == stage.TILE_WIDTH * stage.GRID_COLUMNS
    report = json.loads((out / "masks/report.json").read_text())
    assert report["method"] == "yolo_sam" and report["source"]["test"] == "planted"


def test_second_run_does_no_sam_work_and_only_new_frames_are_labelled(tmp_path):
    make_frames(tmp_path / "frames", ids=list(FRAMES)[:3])
    cfg = config(tmp_path)
    run(tmp_path, cfg, planted_labeler()[0])
    first = {p.name: p.read_bytes() for p in (tmp_path / "out/masks/images").iterdir()}

    def never():
        raise AssertionError("weights loaded although every frame is cached")

    cached_only = YoloSamLabeler(never, never, {"test": "planted"})
    run(tmp_path, cfg, cached_only)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out/masks/images").iterdir()} == first

    _, rows, out = run(tmp_path, replace(cfg, refine=RefineConfig(close_kernel=25)), cached_only)
    assert read_mask(out, "alice--clip_01--00001000")[24, 32] == 255  # closing bridged the two persons

    make_frames(tmp_path / "frames")  # a new video's frames join the old ones (same bytes)
    labeler, detector, segmenter = planted_labeler()
    run(tmp_path, cfg, labeler)
    assert segmenter.calls == 1 and detector.batches == [1]

    labeler, _, segmenter = planted_labeler(settings={"test": "other weights"})
    run(tmp_path, cfg, labeler)
    assert segmenter.calls == 3


def test_interrupted_run_keeps_no_output_and_resumes_from_the_cache(tmp_path):
    make_frames(tmp_path / "frames")
    cfg = config(tmp_path, batch=4)  # one batch: what SAM finished before the interrupt is cached all the same
    labeler, _, _ = planted_labeler(BoxSegmenter(fail_on_call=2))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, cfg, labeler)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no partial masks folder, no temp dirs
    entries = list((tmp_path / "cache").rglob("*.json"))
    assert len(entries) == 2 and not list((tmp_path / "cache").rglob("*.tmp"))  # a person frame, an empty one

    labeler, _, segmenter = planted_labeler()
    metrics, _, _ = run(tmp_path, cfg, labeler)
    assert segmenter.calls == 2 and metrics["labelled"] == 3


def test_vanished_and_corrupt_frames_fail_alone_and_are_retried(tmp_path):
    frames = make_frames(tmp_path / "frames")
    gone, corrupt = frames / "images/alice--clip_01--00000000.jpg", frames / "images/bob--scene_2--00001000.jpg"
    saved = gone.read_bytes(), corrupt.read_bytes()
    gone.unlink()
    corrupt.write_bytes(saved[1][:20])
    metrics, rows, out = run(tmp_path, config(tmp_path), planted_labeler()[0])
    assert metrics["failed"] == 2 and metrics["labelled"] == 1 and metrics["empty"] == 1
    assert "cannot read" in rows[gone.stem]["note"] and "not a readable image" in rows[corrupt.stem]["note"]
    assert not (out / "masks/images" / f"{gone.stem}.png").exists()

    gone.write_bytes(saved[0])
    corrupt.write_bytes(saved[1])
    labeler, _, segmenter = planted_labeler()
    metrics, _, _ = run(tmp_path, config(tmp_path), labeler)
    assert metrics["failed"] == 0 and segmenter.calls == 2


def test_damaged_sam_checkpoint_stops_the_run_without_partial_masks(tmp_path):
    make_frames(tmp_path / "frames")
    damaged = tmp_path / "sam_vit_b_01ec64.pth"
    damaged.write_bytes(b"\x80\x02 half a pickle")
    labeler = YoloSamLabeler(PlantedDetector, lambda: detect.SamBoxSegmenter(weights.load_sam("vit_b", damaged)),
                             {"test": "damaged"})
    with pytest.raises(CharsegError, match="sam_vit_b_01ec64.pth.*damaged"):
        run(tmp_path, config(tmp_path), labeler)
    assert list((tmp_path / "out").iterdir()) == []


def test_persons_whose_mask_refines_away_are_failed_not_background(tmp_path):
    make_frames(tmp_path / "frames")
    _, rows, out = run(tmp_path, config(tmp_path, refine=RefineConfig(min_area=0.9)), planted_labeler()[0])
    assert rows["alice--clip_01--00000000"]["status"] == "failed"
    assert "empty after refinement" in rows["alice--clip_01--00000000"]["note"]
    assert rows["bob--scene_2--00000000"]["status"] == "empty"


def test_sam_is_prompted_once_per_frame_with_the_planted_box(tmp_path, monkeypatch):
    """segment_anything's real Sam, loader and predictor, with a one-block encoder standing in for vit_b's
    twelve (a vit_b encoder pass costs 10-40 s on shared CPUs; benchmarks/bench_masks.py runs the real one)."""
    from segment_anything import sam_model_registry
    build_sam = importlib.import_module("segment_anything.build_sam")  # the package shadows it with a function

    def tiny_vit_b(checkpoint=None):
        torch.manual_seed(4)  # with these random weights the planted box gets a partial mask (labelled)
        return build_sam._build_sam(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=1,
                                    encoder_global_attn_indexes=[0])

    monkeypatch.setitem(sam_model_registry, "vit_b", tiny_vit_b)
    checkpoint = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(tiny_vit_b().state_dict(), checkpoint)
    segmenter = detect.SamBoxSegmenter(weights.load_sam("vit_b", checkpoint))
    outputs = []
    segment = segmenter.segment

    def spy(image, boxes):
        outputs.append((boxes.copy(), *segment(image, boxes)))
        return outputs[-1][1:]

    segmenter.segment = spy
    make_frames(tmp_path / "frames", ids=["alice--clip_01--00000000", "bob--scene_2--00000000"])
    labeler = YoloSamLabeler(PlantedDetector, lambda: segmenter, {"test": "sam"})
    cfg = config(tmp_path, refine=RefineConfig())
    metrics, rows, out = run(tmp_path, cfg, labeler)

    (boxes, masks, scores), = outputs  # one encoder pass: the frame with nobody never reaches SAM
    assert boxes.tolist() == [[8, 8, 24, 40]] and masks.shape == (1, 48, 64) and scores.shape == (1,)
    row = rows["alice--clip_01--00000000"]
    assert json.loads(row["sam_scores"]) == pytest.approx(scores.tolist(), abs=1e-4)
    cache = LabelCache(cfg.cache_dir, labeler.fingerprint)
    cached = cache.get(cache.key((tmp_path / "frames/images/alice--clip_01--00000000.jpg").read_bytes()))
    assert np.array_equal(cached.mask, masks.any(axis=0))
    if row["status"] == "labelled":
        assert np.array_equal(read_mask(out, row["id"]) > 0, masks.any(axis=0))
    else:  # random weights may segment nothing; then the frame must not pass as background
        assert row["status"] == "failed" and not masks.any()
    assert rows["bob--scene_2--00000000"]["status"] == "empty"


def write_params(tmp_path, **labels_changes) -> Path:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    labels = params["labels"]
    for key, value in labels_changes.items():
        section, _, name = key.rpartition(".")
        (labels[section] if section else labels)[name] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def stage_args(tmp_path, params):
    out = tmp_path / "out"
    return ["--frames", str(tmp_path / "frames"), "--out", str(out / "masks"), "--plots", str(out / "plots"),
            "--metrics", str(out / "metrics.json"), "--params", str(params)]


def test_real_yolo_through_the_stage_never_loads_sam_when_nobody_is_found(tmp_path, monkeypatch):
    from ultralytics import YOLO

    torch.manual_seed(0)
    YOLO("yolov8n.yaml").save(tmp_path / "yolo.pt")  # random weights: no confident person anywhere
    (tmp_path / "my_sam.pth").write_bytes(b"only hashed, never loaded")
    monkeypatch.setattr(weights, "load_sam", lambda *a, **k: pytest.fail("SAM loaded for frames without persons"))
    make_frames(tmp_path / "frames")
    params = write_params(tmp_path, **{"detector.weights": str(tmp_path / "yolo.pt"), "detector.imgsz": 64,
                                       "sam.checkpoint": str(tmp_path / "my_sam.pth"), "device": "cpu",
                                       "cache_dir": str(tmp_path / "cache")})
    stage_main(stage_args(tmp_path, params))
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert metrics["frames"] == 4 and metrics["empty"] == 4 and metrics["mean_persons"] == 0


def test_missing_weights_stop_before_any_output(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    make_frames(tmp_path / "frames")
    (tmp_path / "out/masks").mkdir(parents=True)
    (tmp_path / "out/masks/previous.txt").write_text("kept")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights/yolov8s.pt").write_bytes(b"present")
    params = write_params(tmp_path, **{"detector.weights": str(tmp_path / "weights/yolov8s.pt"),
                                       "sam.checkpoint": str(tmp_path / "weights/sam_vit_b_01ec64.pth")})
    with pytest.raises(CharsegError, match=r"sam_vit_b_01ec64\.pth not found .*offline.*labels.method: import"):
        stage_main(stage_args(tmp_path, params))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["masks"]
    assert [p.name for p in (tmp_path / "out/masks").iterdir()] == ["previous.txt"]
    with pytest.raises(CharsegError, match="vit_b, vit_l, vit_h"):
        stage_main(stage_args(tmp_path, write_params(tmp_path, **{"sam.model": "vit_xl", "detector.weights":
                                                               str(tmp_path / "weights/yolov8s.pt")})))


def make_truth(root: Path, ids, ones_for=(), scale=1) -> Path:
    """Exact masks in the sample's layout: <character>/<video stem>/<frame_index:06d>.png + index.csv
    (scale > 1: at a larger size than the frames, as when frames.max_side shrank them)."""
    rows = []
    for frame_id in ids:
        character, video, index, size, persons = FRAMES[frame_id]
        rel = f"{character}/{Path(video).stem}/{index:06d}.png"
        mask = rect_mask((size[0] * scale, size[1] * scale), [tuple(v * scale for v in p) for p in persons])
        imwrite_atomic(root / rel, mask // 255 if frame_id in ones_for else mask)
        rows.append({"video": video, "frame_index": index, "mask": rel})
    write_csv(root / "index.csv", rows, ["video", "frame_index", "mask"])
    return root


def test_import_of_sample_layout_truth_pairs_by_video_and_frame_index(tmp_path):
    make_frames(tmp_path / "frames")
    truth = make_truth(tmp_path / "raw/truth", FRAMES, ones_for={"alice--clip_01--00000000"})
    cfg = config(tmp_path, method="import", import_dir=truth, truth_dir=truth)
    metrics, rows, out = run(tmp_path, cfg)
    for frame_id, (_, _, _, size, persons) in FRAMES.items():
        assert np.array_equal(read_mask(out, frame_id), rect_mask(size, persons))
    assert rows["bob--scene_2--00000000"]["status"] == "empty" and rows["bob--scene_2--00000000"]["n_persons"] == ""
    assert metrics == {"frames": 4, "labelled": 3, "empty": 1, "failed": 0,
                       "mean_coverage": pytest.approx(metrics["mean_coverage"]), "truth_dice": 1.0, "truth_frames": 4}
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["coverage_hist.png", "overlays_alice.png",
                                                                 "overlays_bob.png"]

    big_truth = make_truth(tmp_path / "big", FRAMES, scale=2)
    assert run(tmp_path, replace(cfg, truth_dir=big_truth))[0]["truth_dice"] == 1.0  # scored at the truth's size

    # Dice against the truth notices labels paired with the wrong frame.
    swapped = tmp_path / "swapped"
    make_truth(swapped, FRAMES)
    (swapped / "index.csv").write_text((swapped / "index.csv").read_text().replace(",0,alice", ",X,alice")
                                       .replace(",30,alice", ",0,alice").replace(",X,alice", ",30,alice"))
    metrics, rows, _ = run(tmp_path, replace(cfg, truth_dir=swapped))
    assert metrics["truth_dice"] < 1 and float(rows["alice--clip_01--00000000"]["truth_dice"]) < 1


def test_import_by_frame_id_reports_every_mismatch_by_name(tmp_path, capsys):
    make_frames(tmp_path / "frames")
    folder = tmp_path / "raw/masks"
    ids = list(FRAMES)
    for frame_id in ids:
        _, _, _, size, persons = FRAMES[frame_id]
        imwrite_atomic(folder / f"{frame_id}.png", rect_mask(size, persons) // 255)
    cfg = config(tmp_path, method="import", import_dir=folder)
    assert run(tmp_path, cfg)[0]["labelled"] == 3

    (folder / f"{ids[0]}.png").unlink()
    imwrite_atomic(folder / f"{ids[1]}.png", np.zeros((10, 10), np.uint8))
    imwrite_atomic(folder / f"{ids[2]}.png", np.full((40, 80), 128, np.uint8))
    with pytest.raises(CharsegError, match="3 of 4 frames have no usable mask"):
        run(tmp_path, cfg)
    err = capsys.readouterr().err
    assert f"{ids[0]}: missing mask" in err and f"{ids[1]}: " in err and "10x10 but its frame is 64x48" in err
    assert f"{ids[2]}: " in err and "not binary" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["masks", "metrics.json", "plots"]


def test_repo_params_parse_and_the_stage_is_wired_into_dvc_yaml():
    cfg = load_config(REPO_ROOT / "params.yaml").labels
    assert cfg.method == "yolo_sam" and cfg.sam.model == "vit_b" and cfg.detector.weights.parent.name == "weights"
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    dvc = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["masks"]
    for dep in dvc["deps"]:
        if not dep.startswith("data/"):  # data/ comes from earlier stages / the sample
            assert (REPO_ROOT / dep).exists(), dep
    assert (REPO_ROOT / "weights/README.md").is_file()
    with pytest.raises(CharsegError, match="labels.method"):
        Params({"labels": {**params["labels"], "method": "sam_only"}}).labels


def test_import_reads_a_person_painted_only_in_the_alpha_channel(tmp_path):
    make_frames(tmp_path / "frames")
    folder = tmp_path / "raw/masks"
    for frame_id, (_, _, _, size, persons) in FRAMES.items():
        rgba = np.zeros((*size, 4), np.uint8)  # black everywhere; the person is only opaque
        rgba[..., 3] = rect_mask(size, persons)
        imwrite_atomic(folder / f"{frame_id}.png", rgba)
    metrics, rows, out = run(tmp_path, config(tmp_path, method="import", import_dir=folder))
    for frame_id, (_, _, _, size, persons) in FRAMES.items():
        assert np.array_equal(read_mask(out, frame_id), rect_mask(size, persons))
    assert metrics["labelled"] == 3 and metrics["empty"] == 1


def test_empty_imported_masks_on_frames_that_show_something_are_warned_about_once(tmp_path, capsys):
    make_frames(tmp_path / "frames")
    folder = tmp_path / "raw/masks"
    for frame_id, (_, _, _, size, _) in FRAMES.items():  # every mask empty: three frames do show persons
        imwrite_atomic(folder / f"{frame_id}.png", np.zeros(size, np.uint8))
    metrics, rows, _ = run(tmp_path, config(tmp_path, method="import", import_dir=folder))
    assert metrics["empty"] == 4
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    shown = [f"{i} ({folder / (i + '.png')})" for i in ("bob--scene_2--00001000", "alice--clip_01--00001000",
                                                        "alice--clip_01--00000000")]  # manifest order
    assert warnings == [
        f"warning: 3 imported mask(s) in {folder} are empty although their frame is not uniform: {', '.join(shown)}. "
        f"They are kept as 'nobody here' frames (trained on when labels.keep_empty is true); if a person is "
        f"there, fix those files (the manifest notes them)"]
    assert rows["alice--clip_01--00000000"]["note"] == "empty mask on a non-uniform frame"
    assert rows["bob--scene_2--00000000"]["note"] == ""  # a uniform frame: empty is what it shows


def test_a_corrupt_imported_mask_is_the_users_file_to_replace(tmp_path, capsys):
    make_frames(tmp_path / "frames")
    folder = tmp_path / "raw/masks"
    for frame_id, (_, _, _, size, persons) in FRAMES.items():
        imwrite_atomic(folder / f"{frame_id}.png", rect_mask(size, persons))
    broken = folder / "alice--clip_01--00000000.png"
    broken.write_bytes(b"\x89PNG truncated")
    with pytest.raises(CharsegError, match="1 of 4 frames have no usable mask"):
        run(tmp_path, config(tmp_path, method="import", import_dir=folder))
    err = capsys.readouterr().err
    assert (f"mask mismatch: alice--clip_01--00000000: your mask file {broken} in labels.import_dir is unreadable "
            f"(empty or corrupt, not an image): replace it with a valid 0/255 PNG") in err
    assert "re-run the stage" not in err


def test_import_dir_that_is_a_file_is_refused(tmp_path):
    make_frames(tmp_path / "frames")
    archive = tmp_path / "raw/masks.zip"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"PK")
    with pytest.raises(CharsegError) as err:
        run(tmp_path, config(tmp_path, method="import", import_dir=archive))
    assert str(err.value) == (f"params.yaml: labels.import_dir {archive} is a file, not a folder: put the masks in "
                              f"a folder (<frame id>.png, or listed in index.csv) and point labels.import_dir at it")
    assert not (tmp_path / "out/masks").exists()
