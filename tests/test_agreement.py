"""`charseg agreement`: two labelling backends on a sample of frames, Dice and boundary F1 between them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from charseg import agreement
from charseg.config import load_config
from charseg.errors import CharsegError
from charseg.labels import detect, weights
from charseg.labels.detect import YoloSamLabeler
from charseg.layout import FramesDir, MasksDir
from charseg.masks import make_masks
from planted_labels import BoxSegmenter, PlantedDetector
from test_masks import make_frames, write_params


class BlindSegmenter(BoxSegmenter):
    """Answers every box with an empty mask: a backend that never agrees where there is somebody."""

    def segment(self, image, boxes):
        masks, scores = super().segment(image, boxes)
        return np.zeros_like(masks), scores


def planted_backends(cfg, *, device=None):
    """A LabelerFactory: the planted boxes as masks, except for a backend named blind*; each backend its own
    fingerprint (cfg.sam.model, and the image size when not 1024), as real ones have."""
    segmenter = BlindSegmenter() if cfg.sam.model.startswith("blind") else BoxSegmenter()
    size = {"image_size": cfg.sam.image_size} if cfg.sam.image_size != 1024 else {}
    return YoloSamLabeler(PlantedDetector, lambda: segmenter, {"test": cfg.sam.model, "method": cfg.method, **size})


def run_agreement(tmp_path, a, b, *extra):
    out = tmp_path / "reports/agreement.md"
    agreement.main(["--a", a, "--b", b, "--frames", str(tmp_path / "frames"), "--params", str(tmp_path / "params.yaml"),
                    "--out", str(out), *extra])
    return out.read_text(), json.loads(out.with_suffix(".json").read_text())


@pytest.fixture
def project(tmp_path, monkeypatch):
    """Frames, and a params.yaml whose label cache is in tmp_path; the agreement's labelers planted."""
    make_frames(tmp_path / "frames")
    write_params(tmp_path, **{"cache_dir": str(tmp_path / "cache"), "device": "cpu"})  # tmp_path/params.yaml
    monkeypatch.setattr(agreement, "build_labeler", planted_backends)
    return tmp_path


def test_identical_backends_agree_at_one_and_the_stage_reuses_their_labels(project, capsys):
    text, report = run_agreement(project, "vit_b", "vit_b")
    assert report["overall"] == {"frames": 4, "dice": 1.0, "boundary_f1": 1.0, "persons_a": 3, "persons_b": 3}
    assert report["per_character"]["alice"]["frames"] == 2 and report["per_character"]["bob"]["persons_a"] == 1
    assert report["a"]["settings"] == {"test": "vit_b", "method": "yolo_sam"} and report["unreadable"] == []
    assert "| **overall** | 4 | 1.0000 | 1.0000 | 3 | 3 |" in text
    assert "# Label agreement: vit_b vs vit_b" in capsys.readouterr().out

    def never():
        raise AssertionError("the stage labelled a frame the agreement had labelled")

    cfg = load_config(project / "params.yaml").labels
    out = project / "out"
    make_masks(FramesDir(project / "frames"), MasksDir(out / "masks"), out / "plots", out / "metrics.json", cfg,
               labeler=YoloSamLabeler(never, never, {"test": "vit_b", "method": "yolo_sam"}))
    assert json.loads((out / "metrics.json").read_text())["labelled"] == 3


def test_identical_specs_with_an_image_size_agree_at_one(project):
    text, report = run_agreement(project, "mobile_sam.pt@onnx@640", "mobile_sam.pt@640@onnx")
    assert report["overall"] == {"frames": 4, "dice": 1.0, "boundary_f1": 1.0, "persons_a": 3, "persons_b": 3}
    assert report["a"]["settings"] == report["b"]["settings"] == {"test": "mobile_sam.pt", "method": "yolo_sam",
                                                                  "image_size": 640}
    assert "# Label agreement: mobile_sam.pt@onnx@640 vs mobile_sam.pt@640@onnx" in text


def test_a_backend_that_finds_nobody_disagrees_wherever_somebody_is(project):
    _, report = run_agreement(project, "vit_b", "blind.pt", "--per-character", "1")
    # One frame per character, the first of its videos: alice's with a person, bob's empty frame.
    assert report["frames"] == ["alice--clip_01--00000000", "bob--scene_2--00000000"]
    assert report["per_character"]["alice"] == {"frames": 1, "dice": 0.0, "boundary_f1": 0.0, "persons_a": 1,
                                                "persons_b": 0}
    assert report["per_character"]["bob"] == {"frames": 1, "dice": 1.0, "boundary_f1": 1.0, "persons_a": 0,
                                              "persons_b": 0}
    assert report["overall"]["dice"] == 0.0 and report["overall"]["boundary_f1"] == 0.5


def test_specs_name_the_backend_runtime_and_yolo_seg(tmp_path):
    make_frames(tmp_path / "frames")
    cfg = load_config(write_params(tmp_path)).labels
    seg = tmp_path / "yolo11n-seg.pt"
    onnx = agreement.backend_config(cfg, "mobile_sam.pt@onnx", seg)
    assert (onnx.method, onnx.sam.model, onnx.sam.runtime) == ("yolo_sam", "mobile_sam.pt", "onnx")
    vit_l = agreement.backend_config(cfg, "vit_l", seg)
    assert vit_l.sam.checkpoint == cfg.sam.checkpoint.parent / "sam_vit_l_0b3195.pth"
    yolo_seg = agreement.backend_config(cfg, "yolo_seg", seg)
    assert yolo_seg.method == "yolo_seg" and yolo_seg.detector.weights == seg and yolo_seg.refine == cfg.refine
    with pytest.raises(CharsegError, match="runtime 'tensorrt' is unknown: use torch or onnx"):
        agreement.backend_config(cfg, "mobile_sam.pt@tensorrt", seg)
    with pytest.raises(CharsegError, match="yolo_seg runs no SAM"):
        agreement.backend_config(cfg, "yolo_seg@onnx", seg)


def test_specs_name_the_image_size(tmp_path):
    make_frames(tmp_path / "frames")
    cfg = load_config(write_params(tmp_path)).labels
    seg = tmp_path / "yolo11n-seg.pt"
    for spec in ("mobile_sam.pt@onnx@640", "mobile_sam.pt@640@onnx"):
        sized = agreement.backend_config(cfg, spec, seg)
        assert (sized.sam.model, sized.sam.runtime, sized.sam.image_size) == ("mobile_sam.pt", "onnx", 640)
    plain = agreement.backend_config(cfg, "mobile_sam.pt@512", seg)
    assert (plain.sam.runtime, plain.sam.image_size) == (cfg.sam.runtime, 512)
    assert agreement.backend_config(cfg, "mobile_sam.pt", seg).sam.image_size == cfg.sam.image_size == 1024
    for spec, message in [("mobile_sam.pt@600", r"backend 'mobile_sam.pt@600': 'labels.sam.image_size' = 600 is not "
                                                r"a multiple of 32 \(the nearest are 576 and 608\)"),
                          ("mobile_sam.pt@2048", r"'labels.sam.image_size' = 2048 is outside \[256, 1024\]"),
                          ("mobile_sam.pt@640@512", "names its image size twice"),
                          ("mobile_sam.pt@onnx@torch", "names its runtime twice"),
                          ("yolo_seg@640", "yolo_seg runs no SAM, so it takes no @runtime or @SIZE")]:
        with pytest.raises(CharsegError, match=message):
            agreement.backend_config(cfg, spec, seg)


def test_a_segment_anything_model_at_another_size_stops_before_either_backend_labels(tmp_path):
    """The real build_labeler refuses vit_b@640 (ultralytics' sam_b.pt is its twin) before vit_b labels a frame."""
    make_frames(tmp_path / "frames")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights/yolov8s.pt").write_bytes(b"planted detector: hashed, never loaded")
    (tmp_path / "weights/sam_vit_b_01ec64.pth").write_bytes(b"vit_b: hashed, never loaded")
    cfg = load_config(write_params(tmp_path, **{"cache_dir": str(tmp_path / "cache"), "device": "cpu",
                                                "detector.weights": str(tmp_path / "weights/yolov8s.pt"),
                                                "sam.checkpoint": str(tmp_path / "weights/sam_vit_b_01ec64.pth")}))
    with pytest.raises(CharsegError, match="image_size 640 needs an ultralytics SAM-family model.*sam_b.pt"):
        agreement.measure_agreement(FramesDir(tmp_path / "frames"), cfg.labels, "vit_b", "vit_b@640", 2, 2.0,
                                    factory=detect.build_labeler)
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
@pytest.mark.parametrize("size", ["", "@640"])
def test_real_mobile_sam_agrees_with_itself(tmp_path, monkeypatch, size):
    """build_labeler's real MobileSAM (random weights) on planted boxes, under two file names: two
    fingerprints, so each labels every frame itself, and the same weights give the same masks; at params'
    image size and at the one the specs name."""
    from ultralytics.models.sam.build import build_mobile_sam

    torch.manual_seed(0)
    (tmp_path / "weights").mkdir()
    torch.save(build_mobile_sam(None).state_dict(), tmp_path / "weights/mobile_sam.pt")
    (tmp_path / "weights/copy_of_mobile_sam.pt").write_bytes((tmp_path / "weights/mobile_sam.pt").read_bytes())
    (tmp_path / "weights/yolov8s.pt").write_bytes(b"planted detector: hashed, never loaded")
    monkeypatch.setattr(weights, "load_yolo", lambda *args, **kwargs: None)
    monkeypatch.setattr(detect, "PersonDetector", lambda *args, **kwargs: PlantedDetector())
    make_frames(tmp_path / "frames", ids=["alice--clip_01--00000000", "bob--scene_2--00000000"])  # 1 SAM call each
    write_params(tmp_path, **{"cache_dir": str(tmp_path / "cache"), "device": "cpu",
                              "detector.weights": str(tmp_path / "weights/yolov8s.pt")})
    _, report = run_agreement(tmp_path, str(tmp_path / "weights/mobile_sam.pt") + size,
                              str(tmp_path / "weights/copy_of_mobile_sam.pt") + size)
    assert report["a"]["settings"]["sam_model_type"] == "mobile_sam.pt"
    assert report["a"]["settings"].get("sam_image_size") == report["b"]["settings"].get("sam_image_size") == \
        (int(size[1:]) if size else None)
    assert report["a"]["settings"]["sam_checkpoint"] != report["b"]["settings"]["sam_checkpoint"]
    assert report["overall"] == {"frames": 2, "dice": 1.0, "boundary_f1": 1.0, "persons_a": 1, "persons_b": 1}
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 4  # each backend's two labels, for the stage
