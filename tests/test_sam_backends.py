"""The SAM-family backends behind one API (labels.sam.model / runtime) and labels.method yolo_seg, through
charseg.masks.make_masks on tiny frames: real architectures with random weights, detections planted."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from charseg.config import DetectorConfig, RefineConfig, SamConfig
from charseg.errors import CharsegError
from charseg.labels import detect, weights
from charseg.labels.detect import build_labeler, union_masks
from charseg.labels.encoder_onnx import onnx_image_encoder
from charseg.labels.refine import refine_mask
from tests.test_masks import BoxSegmenter, PlantedDetector, config, make_frames, read_mask, run

# One frame with three planted persons (one SAM call with three boxes), one with nobody (no SAM call).
IDS = ["alice--clip_01--00001000", "bob--scene_2--00000000"]


def sam_file(folder: Path, name: str, builder: str) -> Path:
    """ultralytics' architecture `builder` (build_mobile_sam, build_sam2_t) with random weights, saved
    under `name` like the official file."""
    from ultralytics.models.sam import build

    path = folder / name
    if not path.is_file():
        torch.manual_seed(0)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(getattr(build, builder)(None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def sam_weights(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sam_weights")


def backend_config(tmp_path, model: str, runtime: str = "torch", image_size: int = 1024, **changes):
    (tmp_path / "weights").mkdir(exist_ok=True)
    (tmp_path / "weights/yolov8s.pt").write_bytes(b"planted detector: hashed, never loaded")
    return config(tmp_path, sam=SamConfig(model=model, checkpoint=tmp_path / "weights/sam_vit_b_01ec64.pth",
                                          runtime=runtime, image_size=image_size),
                  refine=RefineConfig(close_kernel=5, min_area=0.01), **changes)


@pytest.fixture
def planted(monkeypatch):
    """build_labeler's real segmenter for the backend, its detector planted; every image encoder pass recorded
    as ("encoder pass", its input's (height, width)) and every segment call as (boxes, masks, scores)."""
    calls = []
    make_segmenter = detect.make_segmenter

    def spying_segmenter(*args, **kwargs):
        segmenter = make_segmenter(*args, **kwargs)
        segment = segmenter.segment
        sam = segmenter.model if hasattr(segmenter, "model") else segmenter.predictor.model
        sam.image_encoder.register_forward_hook(lambda _, args, __: calls.append(("encoder pass",
                                                                                 tuple(args[0].shape[-2:]))))

        def spy(image, boxes):
            calls.append((boxes.copy(), *segment(image, boxes)))
            return calls[-1][1:]

        segmenter.segment = spy
        return segmenter

    monkeypatch.setattr(detect, "make_segmenter", spying_segmenter)
    monkeypatch.setattr(weights, "load_yolo", lambda *args, **kwargs: None)
    monkeypatch.setattr(detect, "PersonDetector", lambda *args, **kwargs: PlantedDetector())
    return calls


def check_labels_of_the_stage(tmp_path, cfg, calls, n_boxes=3):
    """One segmenter call for the frame with persons, n boxes -> n frame-sized masks and scores, and the
    written mask is the refined union of exactly those masks (the same for every backend); the encoder ran
    once, at labels.sam.image_size."""
    make_frames(tmp_path / "frames", ids=IDS)
    threads = torch.get_num_threads()
    metrics, rows, out = run(tmp_path, cfg)
    assert torch.get_num_threads() == threads, "ultralytics' device selection changed torch's CPU threads"
    encoder_pass, (boxes, masks, scores) = calls  # one image embedding for the frame's three boxes
    assert encoder_pass == ("encoder pass", (cfg.sam.image_size, cfg.sam.image_size))
    assert boxes.shape == (n_boxes, 4) and masks.shape == (n_boxes, 48, 64) and masks.dtype == bool
    assert scores.shape == (n_boxes,) and np.isfinite(scores).all()
    row = rows[IDS[0]]
    assert json.loads(row["sam_scores"]) == pytest.approx(scores.tolist(), abs=1e-4)
    expected = refine_mask(union_masks(masks, (48, 64)), cfg.refine)
    if row["status"] == "labelled":
        assert np.array_equal(read_mask(out, IDS[0]), expected)
    else:  # random weights may segment nothing: then the frame is failed, never background
        assert row["status"] == "failed" and not expected.any()
    assert rows[IDS[1]]["status"] == "empty"
    return json.loads((out / "masks/report.json").read_text())["source"]


@pytest.mark.slow
def test_mobile_sam_torch_through_the_stage(tmp_path, sam_weights, planted):
    path = sam_file(sam_weights, "mobile_sam.pt", "build_mobile_sam")
    source = check_labels_of_the_stage(tmp_path, backend_config(tmp_path, str(path)), planted)
    assert source["sam_model_type"] == "mobile_sam.pt" and "sam_runtime" not in source
    assert "sam_image_size" not in source  # 1024 is named as before the size existed: old label caches serve on


@pytest.mark.slow
def test_mobile_sam_at_a_smaller_image_size_through_the_stage(tmp_path, sam_weights, planted, monkeypatch):
    """labels.sam.image_size 640: the encoder sees 640^2, the box prompts are scaled to that input (the
    64 x 48 frame's long side to 640), and the masks still come back at the frame's size and go through the
    same union and refinement."""
    from ultralytics.models.sam.modules.encoders import PromptEncoder

    prompts = []
    encode_prompts = PromptEncoder.forward

    def recording(self, points=None, boxes=None, masks=None):
        prompts.append((tuple(self.input_image_size), boxes.clone()))
        return encode_prompts(self, points=points, boxes=boxes, masks=masks)

    monkeypatch.setattr(PromptEncoder, "forward", recording)
    path = sam_file(sam_weights, "mobile_sam.pt", "build_mobile_sam")
    source = check_labels_of_the_stage(tmp_path, backend_config(tmp_path, str(path), image_size=640), planted)
    assert source["sam_model_type"] == "mobile_sam.pt" and source["sam_image_size"] == 640
    (input_size, boxes), = prompts
    assert input_size == (640, 640)
    assert torch.allclose(boxes.reshape(-1, 4), torch.as_tensor(planted[1][0]) * 640 / 64)


@pytest.mark.slow
@pytest.mark.parametrize("image_size", [1024, 640])
def test_mobile_sam_onnx_through_the_stage_matches_torch(tmp_path, sam_weights, planted, image_size):
    path = sam_file(sam_weights, "mobile_sam.pt", "build_mobile_sam")
    cfg = backend_config(tmp_path, str(path), runtime="onnx", image_size=image_size)
    source = check_labels_of_the_stage(tmp_path, cfg, planted)
    assert source["sam_runtime"] == "onnx"
    exported = list((cfg.cache_dir / "encoders").iterdir())
    assert [p.name for p in exported] == [f"{source['sam_sha256']}-mobile_sam.pt-{image_size}.onnx"]
    onnx_masks = planted[1][1]
    planted.clear()
    check_labels_of_the_stage(tmp_path, replace(cfg, sam=replace(cfg.sam, runtime="torch")), planted)
    assert (planted[1][1] != onnx_masks).mean() < 0.01  # same model, two runtimes: the same masks


@pytest.mark.slow
def test_sam2_1_tiny_through_the_stage(tmp_path, sam_weights, planted):
    path = sam_file(sam_weights, "sam2.1_t.pt", "build_sam2_t")
    source = check_labels_of_the_stage(tmp_path, backend_config(tmp_path, str(path)), planted)
    assert source["sam_model_type"] == "sam2.1_t.pt"


@pytest.mark.slow
def test_vit_b_through_the_stage(tmp_path, planted):
    """segment-anything's full-size vit_b (random weights, ~9 s an encoder pass on 2 cores)."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    cfg = backend_config(tmp_path, "vit_b")
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), cfg.sam.checkpoint)
    assert check_labels_of_the_stage(tmp_path, cfg, planted)["sam_model_type"] == "vit_b"


def test_sam2_with_runtime_onnx_is_refused_before_any_work(tmp_path):
    cfg = backend_config(tmp_path, str(tmp_path / "weights/sam2_t.pt"), runtime="onnx")
    with pytest.raises(CharsegError, match="not sam2_t.pt.*use runtime torch"):
        build_labeler(cfg)


def test_switching_backends_never_reuses_their_labels_and_switching_back_does(tmp_path, monkeypatch):
    """The label cache key names method, backend, both weights' sha256, the runtime and the image size."""
    segmenters = []

    def counting_segmenter(*args, **kwargs):
        segmenters.append(BoxSegmenter())
        return segmenters[-1]

    monkeypatch.setattr(detect, "make_segmenter", counting_segmenter)
    monkeypatch.setattr(weights, "load_yolo", lambda *args, **kwargs: None)
    monkeypatch.setattr(detect, "PersonDetector", lambda *args, **kwargs: PlantedDetector())
    mobile, sam2 = tmp_path / "w/mobile_sam.pt", tmp_path / "w/sam2.1_t.pt"
    mobile.parent.mkdir()
    mobile.write_bytes(b"mobile")
    sam2.write_bytes(b"sam2")
    make_frames(tmp_path / "frames", ids=IDS)
    configs = {"mobile": backend_config(tmp_path, str(mobile)), "sam2": backend_config(tmp_path, str(sam2)),
               "mobile onnx": backend_config(tmp_path, str(mobile), runtime="onnx"),
               "mobile 640": backend_config(tmp_path, str(mobile), image_size=640),
               "mobile onnx 640": backend_config(tmp_path, str(mobile), runtime="onnx", image_size=640)}
    configs["mobile, other detector"] = replace(configs["mobile"], detector=replace(
        configs["mobile"].detector, weights=tmp_path / "w/yolo11n.pt"))
    (tmp_path / "w/yolo11n.pt").write_bytes(b"another detector")
    configs["yolo_seg"] = replace(configs["mobile"], method="yolo_seg")
    fingerprints = {name: build_labeler(cfg).fingerprint for name, cfg in configs.items()}
    assert len(set(fingerprints.values())) == len(fingerprints)

    for name, reused in [("mobile", False), ("sam2", False), ("mobile onnx", False), ("mobile, other detector", False),
                         ("mobile 640", False), ("mobile onnx 640", False),
                         ("mobile", True), ("sam2", True), ("mobile onnx", True), ("mobile 640", True),
                         ("mobile onnx 640", True)]:
        segmenters.clear()
        run(tmp_path, configs[name])
        assert (not segmenters) == reused, name


def test_vit_b_keeps_the_label_cache_of_earlier_versions_and_device_overrides_the_params(tmp_path):
    """vit_b on torch names exactly what it named before backends and runtimes existed, so existing label
    caches keep serving; a worker's device replaces labels.device (resolved, never loaded here)."""
    cfg = replace(backend_config(tmp_path, "vit_b"), device="cuda:7")
    cfg.sam.checkpoint.write_bytes(b"vit_b checkpoint")
    labeler = build_labeler(cfg, device="cpu")
    assert set(labeler.settings) == {"labeler", "yolo_weights", "yolo_sha256", "conf", "min_box_area", "imgsz",
                                     "sam_model_type", "sam_checkpoint", "sam_sha256", "half"}
    assert labeler.settings["sam_model_type"] == "vit_b" and labeler.settings["labeler"] == "yolo_sam"


@pytest.mark.parametrize("model, twin", [("vit_b", "sam_b.pt"), ("vit_h", "sam_h.pt")])
def test_segment_anything_models_refuse_another_image_size_and_name_the_alternative(tmp_path, model, twin):
    with pytest.raises(CharsegError, match=rf"labels.sam.image_size 640 needs an ultralytics SAM-family model: "
                                           rf"segment-anything's {model} encodes 1024\^2 only.*labels.sam.model: "
                                           rf"{twin}.*mobile_sam.pt.*labels.sam.image_size: 1024"):
        build_labeler(backend_config(tmp_path, model, image_size=640))
    assert not (tmp_path / "cache").exists()


def test_unknown_backend_lists_the_valid_ones(tmp_path):
    with pytest.raises(CharsegError, match=r"'sam3_x\.pt' is unknown.*vit_b, vit_l, vit_h.*mobile_sam\.pt.*"
                                           r"sam2\.1_t\.pt"):
        build_labeler(backend_config(tmp_path, "sam3_x.pt"))


def test_absent_sam_family_file_offline_names_it_and_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    with pytest.raises(CharsegError) as err:
        build_labeler(backend_config(tmp_path, "mobile_sam.pt"))  # a bare name: looked for in weights/
    for part in ("weights/mobile_sam.pt", "offline", "github.com/ultralytics/assets/releases", "dvc pull"):
        assert part in str(err.value)


def test_weights_of_another_backend_and_damaged_files_are_named(tmp_path, sam_weights, planted):
    sam2 = sam_file(sam_weights, "sam2.1_t.pt", "build_sam2_t")
    disguised = tmp_path / "w/mobile_sam.pt"
    disguised.parent.mkdir()
    disguised.write_bytes(sam2.read_bytes())
    make_frames(tmp_path / "frames", ids=IDS)
    with pytest.raises(CharsegError, match=r"mobile_sam\.pt do not fit labels.sam.model 'mobile_sam\.pt'.*"
                                           r"named like mobile_sam\.pt but holds another model's weights"):
        run(tmp_path, backend_config(tmp_path, str(disguised)))
    assert not (tmp_path / "out/masks").exists()

    disguised.write_bytes(sam2.read_bytes()[:5000])  # a truncated download
    with pytest.raises(CharsegError, match=r"mobile_sam\.pt.*damaged; delete it and download it again "
                                           r"\(or dvc pull\)"):
        run(tmp_path, backend_config(tmp_path, str(disguised)))

    vit_b = tmp_path / "weights/sam_vit_b_01ec64.pth"
    vit_b.parent.mkdir(exist_ok=True)
    vit_b.write_bytes(sam2.read_bytes())  # SAM 2 weights under vit_b's official name
    with pytest.raises(CharsegError, match="do not fit labels.sam.model 'vit_b'"):
        run(tmp_path, backend_config(tmp_path, "vit_b"))


def tiny_encoder() -> torch.nn.Module:
    """segment_anything's ViT image encoder, one 32-wide block: the real export path in seconds."""
    from segment_anything.build_sam import _build_sam

    torch.manual_seed(0)
    return _build_sam(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=1,
                      encoder_global_attn_indexes=[0]).image_encoder.eval()


@pytest.mark.slow
def test_onnx_encoder_matches_torch_and_is_exported_once(tmp_path, monkeypatch):
    from charseg.labels import encoder_onnx

    encoder = tiny_encoder()
    path = tmp_path / "encoders/abc-vit_b.onnx"
    onnx_encoder = onnx_image_encoder(encoder, path, ["CPUExecutionProvider"])
    image = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        expected = encoder(image)
    got = onnx_encoder(image)
    assert got.shape == expected.shape == (1, 256, 64, 64) and torch.allclose(got, expected, atol=1e-4)
    assert onnx_encoder.img_size == encoder.img_size == 1024
    assert [p.name for p in path.parent.iterdir()] == ["abc-vit_b.onnx"]  # atomically: no temporaries left

    monkeypatch.setattr(encoder_onnx, "export_encoder", lambda *a, **k: pytest.fail("exported again"))
    again = onnx_image_encoder(encoder, path, ["CPUExecutionProvider"])
    assert torch.equal(again(image), got)

    path.write_bytes(b"truncated")  # a damaged cache entry is rebuilt, never used
    monkeypatch.undo()
    assert torch.allclose(onnx_image_encoder(encoder, path, ["CPUExecutionProvider"])(image), expected, atol=1e-4)


def tiny_ultralytics_encoder(image_size: int) -> torch.nn.Module:
    """ultralytics' SAM ViT image encoder (sam_b's kind: its position embedding follows the input size), one
    32-wide block, set to `image_size` as SAMModel.set_imgsz sets it."""
    from ultralytics.models.sam.modules.encoders import ImageEncoderViT

    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=1024, embed_dim=32, depth=1, num_heads=1, global_attn_indexes=(0,),
                              use_rel_pos=True, window_size=14, out_chans=256)
    encoder.img_size = image_size
    return encoder.eval()


@pytest.mark.slow
def test_onnx_encoder_is_exported_at_the_image_size_and_refuses_another(tmp_path):
    encoder = tiny_ultralytics_encoder(640)
    path = tmp_path / "encoders/abc-sam_b.pt-640.onnx"
    onnx_encoder = onnx_image_encoder(encoder, path, ["CPUExecutionProvider"])
    image = torch.randn(1, 3, 640, 640)
    with torch.no_grad():
        expected = encoder(image)
    got = onnx_encoder(image)
    assert got.shape == expected.shape == (1, 256, 40, 40) and torch.allclose(got, expected, atol=1e-4)
    onnx_encoder.set_imgsz([640, 640])  # what ultralytics' predictor does before each frame: the same size passes
    with pytest.raises(CharsegError, match=r"exported for 640\^2 input, not \[1024, 1024\]"):
        onnx_encoder.set_imgsz([1024, 1024])

    # A file of another size under this size's name (renamed by hand) is foreign: rebuilt, never fed 1024^2.
    stale = path.with_name("abc-sam_b.pt-1024.onnx")
    path.rename(stale)
    rebuilt = onnx_image_encoder(tiny_ultralytics_encoder(1024), stale, ["CPUExecutionProvider"])
    assert rebuilt.session.get_inputs()[0].shape == [1, 3, 1024, 1024]


@pytest.mark.slow
def test_a_bad_export_is_refused(monkeypatch):
    from charseg.labels import encoder_onnx

    class Noisy(torch.nn.Module):  # every run differs: no export of it can pass the parity check
        def forward(self, x):
            return x + torch.rand_like(x)

    with pytest.raises(CharsegError, match="differs from torch.*runtime: torch"):
        encoder_onnx.export_encoder(Noisy(), 32)


# --- labels.method yolo_seg and any YOLO detector -------------------------------------------------

@pytest.fixture(scope="module")
def yolo_files(tmp_path_factory) -> dict[str, Path]:
    """Random-weights ultralytics models saved like official files (their classes are named '0', '1', ...)."""
    from ultralytics import YOLO

    folder = tmp_path_factory.mktemp("yolo")
    files = {}
    for name in ("yolo11n.yaml", "yolov8n-seg.yaml"):
        torch.manual_seed(0)
        files[name] = folder / name.replace(".yaml", ".pt")
        YOLO(name).save(files[name])
    return files


@pytest.mark.slow
def test_yolo_seg_labels_frames_with_the_models_own_masks(tmp_path, yolo_files, monkeypatch):
    """The union of the kept person instance masks, refined as for SAM; no SAM is ever built."""
    monkeypatch.setattr(detect, "make_segmenter", lambda *a, **k: pytest.fail("yolo_seg built a SAM"))
    model = weights.load_yolo(yolo_files["yolov8n-seg.yaml"], segmentation=True)
    seg = detect.PersonDetector(model, conf=0.0, min_box_area=0.0, imgsz=64)
    make_frames(tmp_path / "frames", ids=IDS)
    image = np.zeros((48, 64, 3), np.uint8)
    (found, masks), = seg.segment_persons([image])
    assert masks.shape == (len(found.boxes), 48, 64) and masks.dtype == bool

    cfg = replace(backend_config(tmp_path, "vit_b", method="yolo_seg"),
                  detector=DetectorConfig(weights=yolo_files["yolov8n-seg.yaml"], conf=0.0, min_box_area=0.0,
                                          imgsz=64, batch=2))
    labeler = build_labeler(cfg)
    assert labeler.settings["labeler"] == "yolo_seg" and "sam_sha256" not in labeler.settings
    metrics, rows, out = run(tmp_path, cfg)
    assert metrics["frames"] == 2
    for frame_id, row in rows.items():
        assert row["status"] in ("labelled", "empty", "failed") and row["sam_scores"] in ("[]", "")
        assert int(row["n_persons"]) == len(json.loads(row["boxes"]))
    stricter = replace(cfg, detector=replace(cfg.detector, conf=0.5))
    assert build_labeler(cfg).fingerprint != build_labeler(stricter).fingerprint


def test_yolo_seg_needs_a_segmentation_model(tmp_path, yolo_files):
    with pytest.raises(CharsegError, match=r"yolo11n\.pt are a 'detect' model: labels.method yolo_seg needs a "
                                           r"segmentation model"):
        weights.load_yolo(yolo_files["yolo11n.yaml"], segmentation=True)


def test_any_yolo_detector_and_seg_weights_detect_persons_by_class_name(tmp_path, yolo_files):
    for path in yolo_files.values():  # YOLO11 detection, YOLOv8 segmentation as a detector
        model = weights.load_yolo(path)
        detector = detect.PersonDetector(model, conf=0.0, min_box_area=0.0, imgsz=64)
        assert detector.person_class == 0  # names '0', '1', ...: class 0, COCO's person
        found, = detector.detect([np.zeros((48, 64, 3), np.uint8)])
        assert found.boxes.shape[1] == 4
    from ultralytics import YOLO

    animals = YOLO(yolo_files["yolo11n.yaml"])
    animals.model.names = {0: "cat", 1: "dog"}
    animals.save(tmp_path / "animals.pt")
    with pytest.raises(CharsegError, match=r"animals\.pt have no 'person' class"):
        weights.load_yolo(tmp_path / "animals.pt")
    assert weights.person_class({0: "bicycle", 1: "car", 2: "person"}, "coco_reordered.pt") == 2
    with pytest.raises(CharsegError, match=r"animals\.pt have no 'person' class \(their classes: 'cat', 'dog'\)"):
        weights.person_class({0: "cat", 1: "dog"}, "animals.pt")
