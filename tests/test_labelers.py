"""charseg.labels: weights resolution and loading, YOLO/SAM wrappers, refinement, cache, imports."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from charseg.config import RefineConfig
from charseg.errors import CharsegError
from charseg.io import imwrite_atomic
from charseg.labels import weights
from charseg.labels.cache import LabelCache
from charseg.labels.detect import FrameLabel, PersonDetector, SamBoxSegmenter, label_fingerprint, union_masks
from charseg.labels.imported import MaskMismatch, mask_files, read_binary_mask
from charseg.labels.refine import refine_mask
from charseg.labels.weights import load_sam, load_yolo, resolve_sam_checkpoint, resolve_yolo_weights

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_sam() -> torch.nn.Module:
    """segment_anything's own Sam with a one-block, 32-wide encoder: the real predictor code, ~0.2 s a frame."""
    from segment_anything.build_sam import _build_sam

    torch.manual_seed(0)
    return _build_sam(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=1, encoder_global_attn_indexes=[0])


# --- refinement -------------------------------------------------------------------------------

def test_refine_binarises_and_is_identity_when_off():
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 5:20] = 1
    mask[0, 0] = 7
    out = refine_mask(mask, RefineConfig())
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 255}
    assert np.array_equal(out > 0, mask > 0)


def test_refine_close_bridges_a_gap_and_open_removes_a_spur():
    mask = np.zeros((40, 40), bool)
    mask[10:30, 5:18] = mask[10:30, 19:35] = True  # one-pixel gap at column 18
    assert refine_mask(mask, RefineConfig(close_kernel=3))[11:29, 18].all()
    spur = np.zeros((40, 40), bool)
    spur[10:30, 10:30] = True
    spur[20, 30:38] = True  # one-pixel-thin line sticking out
    opened = refine_mask(spur, RefineConfig(open_kernel=3)) > 0
    assert not opened[20, 32:38].any() and opened[15:25, 15:25].all()


def test_refine_drops_small_blobs_and_fills_only_small_inner_holes():
    mask = np.zeros((100, 100), bool)
    mask[10:60, 10:60] = True
    mask[80:83, 80:83] = True           # 9 px blob
    mask[20:23, 20:23] = False          # 9 px hole
    mask[30:50, 30:50] = False          # 400 px hole
    mask[0:10, 90:100] = True           # blob touching the border: its notch is no hole
    mask[0:3, 94:97] = False
    out = refine_mask(mask, RefineConfig(min_area=0.002, max_hole_area=0.001)) > 0
    assert not out[80:83, 80:83].any()
    assert out[20:23, 20:23].all()
    assert not out[30:50, 30:50].any()
    assert not out[0:3, 94:97].any() and out[5:10, 90:100].all()
    assert refine_mask(mask, RefineConfig(max_hole_area=1.0))[30:50, 30:50].all()


def test_union_of_no_masks_is_empty():
    assert not union_masks(np.zeros((0, 4, 5), bool), (4, 5)).any()
    a, b = np.zeros((4, 5), bool), np.zeros((4, 5), bool)
    a[0, 0], b[3, 4] = True, True
    assert union_masks(np.stack([a, b]), (4, 5)).sum() == 2


# --- SAM -------------------------------------------------------------------------------------

def test_sam_segmenter_prompts_all_boxes_in_one_call():
    segmenter = SamBoxSegmenter(tiny_sam())
    calls = {"set_image": 0, "boxes": []}
    set_image, predict_torch = segmenter.predictor.set_image, segmenter.predictor.predict_torch

    def spy_set_image(*args, **kwargs):
        calls["set_image"] += 1
        return set_image(*args, **kwargs)

    def spy_predict(point_coords, point_labels, boxes=None, **kwargs):
        calls["boxes"].append(boxes.clone())
        assert point_coords is None and kwargs["multimask_output"] is False
        return predict_torch(point_coords, point_labels, boxes=boxes, **kwargs)

    segmenter.predictor.set_image, segmenter.predictor.predict_torch = spy_set_image, spy_predict
    image = cv2.cvtColor(np.random.default_rng(0).integers(0, 255, (48, 64), np.uint8), cv2.COLOR_GRAY2BGR)
    boxes = np.array([[4, 4, 30, 40], [32, 10, 60, 44], [0, 0, 64, 48]], np.float32)
    masks, scores = segmenter.segment(image, boxes)
    assert masks.shape == (3, 48, 64) and masks.dtype == bool and scores.shape == (3,)
    assert calls["set_image"] == 1 and len(calls["boxes"]) == 1
    # The boxes reach SAM in its 1024-long-side input frame: 64 px wide -> x scaled by 16.
    assert torch.allclose(calls["boxes"][0], torch.as_tensor(boxes) * 16)
    assert segmenter.predictor.features is None  # the embedding is not kept between frames


@pytest.mark.slow
def test_real_vit_b_sam_segments_a_planted_box_with_one_encoder_pass():
    """The full-size SAM vit_b (random weights: sam_model_registry["vit_b"](checkpoint=None) through
    load_sam) behind SamBoxSegmenter: one real image-encoder pass, one frame-sized mask and IoU per box."""
    torch.manual_seed(0)
    sam = load_sam("vit_b", None)
    encoder_inputs = []
    sam.image_encoder.register_forward_hook(lambda module, args, output: encoder_inputs.append(tuple(args[0].shape)))
    frame = np.full((48, 64, 3), (90, 120, 60), np.uint8)
    cv2.rectangle(frame, (20, 8), (38, 44), (40, 40, 200), thickness=-1)  # the planted "person"
    boxes = np.array([[18, 6, 40, 46]], np.float32)

    masks, scores = SamBoxSegmenter(sam).segment(frame, boxes)

    assert encoder_inputs == [(1, 3, 1024, 1024)]  # once for the frame, at SAM's own input size
    assert masks.shape == (1, 48, 64) and masks.dtype == bool
    assert scores.shape == (1,) and scores.dtype == np.float32 and np.isfinite(scores).all()


def test_load_sam_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "sam.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CharsegError, match="sam.pth.*damaged"):
        load_sam("vit_b", corrupt)
    other = tmp_path / "other.pth"
    torch.save(tiny_sam().state_dict(), other)
    with pytest.raises(CharsegError, match="do not fit labels.sam.model 'vit_b'"):
        load_sam("vit_b", other)
    with pytest.raises(CharsegError, match="vit_b, vit_l, vit_h"):
        load_sam("vit_x", None)


# --- weights resolution ----------------------------------------------------------------------

def test_missing_weights_offline_stop_with_where_and_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    path = tmp_path / "weights" / "sam_vit_b_01ec64.pth"
    with pytest.raises(CharsegError) as err:
        resolve_sam_checkpoint("vit_b", path)
    message = str(err.value)
    for part in (str(path), "offline", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
                 "dvc pull", "labels.method: import", "weights/README.md"):
        assert part in message
    with pytest.raises(CharsegError, match=r"yolov8s\.pt.*offline.*dvc pull"):
        resolve_yolo_weights(tmp_path / "weights" / "yolov8s.pt")
    import ultralytics.utils.downloads  # noqa: F401  (imported while offline: its import probes the network)

    monkeypatch.delenv("YOLO_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(CharsegError, match="not an official ultralytics file"):
        resolve_yolo_weights(tmp_path / "weights" / "my_detector.pt")
    with pytest.raises(CharsegError, match="official vit_h checkpoint but labels.sam.model is vit_b"):
        resolve_sam_checkpoint("vit_b", tmp_path / "sam_vit_h_4b8939.pth")
    assert not (tmp_path / "weights").exists()


def test_sam_download_is_verified_before_it_lands(tmp_path, monkeypatch):
    monkeypatch.delenv("YOLO_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    payload = b"pretend checkpoint bytes"
    served = []

    def fake_urlopen(url, timeout):
        served.append(url)
        response = io.BytesIO(payload)
        response.headers = {"Content-Length": str(len(payload))}
        return response

    monkeypatch.setattr(weights.urllib.request, "urlopen", fake_urlopen)
    release = weights.SAM_RELEASES["vit_b"]
    monkeypatch.setitem(weights.SAM_RELEASES, "vit_b",
                        weights.SamRelease(release.filename, release.url, hashlib.sha256(payload).hexdigest()))
    target = tmp_path / "w" / release.filename
    assert resolve_sam_checkpoint("vit_b", target) == target and target.read_bytes() == payload
    assert served == [release.url]

    monkeypatch.setitem(weights.SAM_RELEASES, "vit_b", release)  # the real hash: these bytes do not match it
    target.unlink()
    with pytest.raises(CharsegError, match="corrupt.*nothing was saved"):
        resolve_sam_checkpoint("vit_b", target)
    assert list(target.parent.iterdir()) == []


def test_official_sam_hashes_are_full_sha256():
    for model_type, release in weights.SAM_RELEASES.items():
        assert model_type in release.filename and release.url.endswith(release.filename)
        assert len(release.sha256) == 64 and int(release.sha256, 16) >= 0


# --- YOLO ------------------------------------------------------------------------------------

def test_real_yolo_from_a_local_file_detects_in_batches_without_integrations(tmp_path):
    from ultralytics import YOLO
    from ultralytics.utils import NUM_THREADS, SETTINGS

    torch.manual_seed(0)
    YOLO("yolov8n.yaml").save(tmp_path / "yolo.pt")
    model = load_yolo(resolve_yolo_weights(tmp_path / "yolo.pt"))
    detector = PersonDetector(model, conf=0.5, min_box_area=0.0, imgsz=64)
    rng = np.random.default_rng(0)
    gray = cv2.cvtColor(rng.integers(0, 255, (40, 40), np.uint8), cv2.COLOR_GRAY2BGR)
    images = [rng.integers(0, 255, (48, 64, 3), np.uint8), gray, rng.integers(0, 255, (30, 90, 3), np.uint8)]
    threads, wanted = torch.get_num_threads(), NUM_THREADS + 1  # ultralytics would set NUM_THREADS
    torch.set_num_threads(wanted)
    try:
        found = detector.detect(images)
        assert torch.get_num_threads() == wanted, "YOLO left torch's CPU thread count changed (SAM would slow down)"
    finally:
        torch.set_num_threads(threads)
    assert len(found) == 3 and all(d.boxes.shape[1] == 4 and len(d.boxes) == len(d.scores) for d in found)
    assert SETTINGS["dvc"] is False and SETTINGS["sync"] is False
    assert str(SETTINGS.file).startswith(str(REPO_ROOT))
    callbacks = [f.__module__ for fs in model.predictor.callbacks.values() for f in fs]
    assert not any("callbacks.dvc" in m or "callbacks.mlflow" in m for m in callbacks)


def test_damaged_yolo_weights_name_the_file(tmp_path):
    damaged = tmp_path / "yolov8s.pt"
    damaged.write_bytes(b"PK\x03\x04 truncated download")
    with pytest.raises(CharsegError, match=r"cannot load YOLO weights .*yolov8s\.pt.*download it again"):
        load_yolo(damaged)


class _Boxes:
    def __init__(self, xyxy, conf, cls):
        self.xyxy, self.conf, self.cls = torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4), \
            torch.tensor(conf), torch.tensor(cls, dtype=torch.float32)


class _FakeYolo:
    """Answers predict like ultralytics: one result per image, in order."""

    def __init__(self, per_image):
        self.per_image, self.calls = per_image, []

    def predict(self, images, **kwargs):
        self.calls.append((len(images), kwargs))
        return [type("Result", (), {"boxes": _Boxes(*self.per_image[i])}) for i in range(len(images))]


def test_person_detector_keeps_confident_big_persons_best_first():
    fake = _FakeYolo([
        ([[0, 0, 10, 10], [0, 0, 50, 50], [5, 5, 6, 6], [0, 0, 40, 40]], [0.6, 0.9, 0.95, 0.7], [0, 0, 0, 2]),
        ([], [], []),
    ])
    detector = PersonDetector(fake, conf=0.5, min_box_area=0.01, imgsz=320)
    first, second = detector.detect([np.zeros((100, 100, 3), np.uint8), np.zeros((60, 80, 3), np.uint8)])
    assert first.boxes.tolist() == [[0, 0, 50, 50], [0, 0, 10, 10]]  # 1 px box too small, class 2 not a person
    assert np.allclose(first.scores, [0.9, 0.6]) and second.boxes.shape == (0, 4)
    (batch, kwargs), = fake.calls
    assert batch == 2 and kwargs["classes"] == [0] and kwargs["conf"] == 0.5 and kwargs["quantize"] is None


# --- cache and fingerprint ----------------------------------------------------------------------

def test_label_cache_round_trip_and_damaged_entries_are_misses(tmp_path):
    cache = LabelCache(tmp_path, label_fingerprint({"a": 1}))
    ids = np.zeros((6, 8), np.uint16)
    ids[1:4, 2:5], ids[4:6, 6:8] = 1, 2  # two persons
    label = FrameLabel(ids, np.array([[2, 1, 5, 4], [6, 4, 8, 6]], np.float32), np.array([0.9, 0.7], np.float32),
                       np.array([0.8, 0.6], np.float32))
    key = cache.key(b"frame bytes")
    assert cache.get(key) is None and not cache.has(key)
    cache.put(key, label)
    assert cache.has(key)
    got = cache.get(key)
    assert np.array_equal(got.instances, ids) and np.array_equal(got.mask, ids > 0)
    assert got.boxes.tolist() == [[2, 1, 5, 4], [6, 4, 8, 6]]
    assert LabelCache(tmp_path, label_fingerprint({"a": 2})).key(b"frame bytes") != key
    assert cache.key(b"other frame") != key
    # An entry from before instances were kept (only the 0/255 union) serves on, one instance per blob.
    legacy = tmp_path / key[:2] / f"{key}.ids.png"
    legacy.rename(legacy.with_name(f"{key}.png"))
    imwrite_atomic(legacy.with_name(f"{key}.png"), (ids > 0).astype(np.uint8) * 255)
    assert np.array_equal(cache.get(key).instances, ids)
    (tmp_path / key[:2] / f"{key}.png").write_bytes(b"")  # e.g. a disk that filled up
    assert cache.get(key) is None
    (tmp_path / key[:2] / f"{key}.json").write_text("{trunc")
    assert cache.get(key) is None
    empty = FrameLabel(np.zeros((6, 8), bool), np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                       np.zeros(0, np.float32))
    cache.put(cache.key(b"nobody"), empty)
    assert cache.get(cache.key(b"nobody")).mask.shape == (6, 8)
    assert not (tmp_path / cache.key(b"nobody")[:2] / f"{cache.key(b'nobody')}.png").exists()


# --- imported masks ------------------------------------------------------------------------------

def test_read_binary_mask_accepts_0_1_and_0_255_and_names_every_problem(tmp_path):
    ones = np.zeros((4, 6), np.uint8)
    ones[1:3, 2:5] = 1
    imwrite_atomic(tmp_path / "ones.png", ones)
    imwrite_atomic(tmp_path / "full.png", ones * 255)
    imwrite_atomic(tmp_path / "rgb.png", cv2.cvtColor(ones * 255, cv2.COLOR_GRAY2BGR))
    for name in ("ones.png", "full.png", "rgb.png"):
        assert np.array_equal(read_binary_mask(tmp_path / name, (4, 6)), ones * 255)
    imwrite_atomic(tmp_path / "soft.png", ones * 128 + 3)
    with pytest.raises(MaskMismatch, match=r"soft\.png is not binary \(values 3, 131\)"):
        read_binary_mask(tmp_path / "soft.png", (4, 6))
    with pytest.raises(MaskMismatch, match=r"full\.png is 6x4 but its frame is 8x4"):
        read_binary_mask(tmp_path / "full.png", (4, 8))
    with pytest.raises(MaskMismatch, match="missing mask"):
        read_binary_mask(tmp_path / "nope.png", (4, 6))
    colour = np.zeros((4, 6, 3), np.uint8)
    colour[..., 2] = 255
    imwrite_atomic(tmp_path / "colour.png", colour)
    with pytest.raises(MaskMismatch, match="colour image"):
        read_binary_mask(tmp_path / "colour.png", (4, 6))


def test_mask_files_by_id_or_through_an_index(tmp_path):
    frames = [{"id": "a--v--00000000", "video": "a/v.mp4", "frame_index": "0"},
              {"id": "a--v--00001000", "video": "a/v.mp4", "frame_index": "25"}]
    assert mask_files(tmp_path, "index.csv", frames) == {f["id"]: tmp_path / f"{f['id']}.png" for f in frames}
    (tmp_path / "index.csv").write_text("video,frame_index,mask\na/v.mp4,25,a/v/000025.png\n")
    assert mask_files(tmp_path, "index.csv", frames) == {"a--v--00001000": tmp_path / "a/v/000025.png"}
    (tmp_path / "index.csv").write_text("id,mask\na--v--00000000,x.png\n")
    assert mask_files(tmp_path, "index.csv", frames) == {"a--v--00000000": tmp_path / "x.png"}
    (tmp_path / "index.csv").write_text("file,name\nx,y\n")
    with pytest.raises(CharsegError, match="needs a 'mask' column"):
        mask_files(tmp_path, "index.csv", frames)
    with pytest.raises(CharsegError, match="not found"):
        mask_files(tmp_path / "absent", "index.csv", frames)


def test_fingerprint_is_stable_and_sensitive():
    a = label_fingerprint({"conf": 0.5, "sam_sha256": "x"})
    assert a == label_fingerprint({"sam_sha256": "x", "conf": 0.5})
    assert a != label_fingerprint({"conf": 0.4, "sam_sha256": "x"})
    assert json.loads(json.dumps({"k": a}))["k"] == a


def test_read_binary_mask_takes_the_alpha_channel_when_only_it_varies(tmp_path):
    person = np.zeros((4, 6), np.uint8)
    person[1:3, 2:5] = 255
    for colour in (0, 255, (0, 0, 255)):  # black, white or red everywhere: the person is only opaque
        rgba = np.zeros((4, 6, 4), np.uint8)
        rgba[..., :3] = colour
        rgba[..., 3] = person
        imwrite_atomic(tmp_path / "alpha.png", rgba)
        assert np.array_equal(read_binary_mask(tmp_path / "alpha.png", (4, 6)), person), colour
    grey_and_alpha = np.dstack([np.repeat(person[..., None], 3, axis=2), np.full((4, 6), 255, np.uint8)])
    imwrite_atomic(tmp_path / "grey.png", grey_and_alpha)  # opaque everywhere, person in the colour channels
    assert np.array_equal(read_binary_mask(tmp_path / "grey.png", (4, 6)), person)
    sixteen = (person > 0).astype(np.uint16)  # a 16-bit 0/1 mask
    imwrite_atomic(tmp_path / "sixteen.png", sixteen)
    assert np.array_equal(read_binary_mask(tmp_path / "sixteen.png", (4, 6)), person)


def test_an_unreadable_mask_is_the_users_file_to_replace(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    with pytest.raises(MaskMismatch) as err:
        read_binary_mask(tmp_path / "broken.png", (4, 6))
    assert str(err.value) == (f"your mask file {tmp_path / 'broken.png'} in labels.import_dir is unreadable (empty "
                              f"or corrupt, not an image): replace it with a valid 0/255 PNG")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(MaskMismatch, match=r"your mask file .*empty\.png in labels\.truth_dir is unreadable"):
        read_binary_mask(tmp_path / "empty.png", None, key="labels.truth_dir")


def test_mask_folder_that_is_a_file_and_index_rows_that_disagree_are_refused(tmp_path):
    frames = [{"id": "a--v--00000000", "video": "a/v.mp4", "frame_index": "0"}]
    (tmp_path / "masks.zip").write_bytes(b"PK")
    with pytest.raises(CharsegError) as err:
        mask_files(tmp_path / "masks.zip", "index.csv", frames, key="labels.truth_dir")
    assert str(err.value) == (f"params.yaml: labels.truth_dir {tmp_path / 'masks.zip'} is a file, not a folder: put "
                              f"the masks in a folder (<frame id>.png, or listed in index.csv) and point "
                              f"labels.truth_dir at it")
    (tmp_path / "index.csv").write_text("video,frame_index,mask\na/v.mp4,0,a.png\na/v.mp4,0,a.png\nb/w.mp4,3,c.png\n")
    assert mask_files(tmp_path, "index.csv", frames) == {"a--v--00000000": tmp_path / "a.png"}  # a repeated row
    (tmp_path / "index.csv").write_text("video,frame_index,mask\na/v.mp4,0,a.png\nb/w.mp4,3,c.png\na/v.mp4,0,b.png\n")
    with pytest.raises(CharsegError) as err:
        mask_files(tmp_path, "index.csv", frames)
    assert str(err.value) == (f"{tmp_path / 'index.csv'} lists a/v.mp4 frame_index 0 twice with different masks "
                              f"(a.png and b.png, line 4): keep one row per frame")
    (tmp_path / "index.csv").write_text("id,mask\na--v--00000000,a.png\na--v--00000000,b.png\n")
    with pytest.raises(CharsegError, match=r"lists a--v--00000000 twice with different masks \(a.png and b.png, "
                                           r"line 3\): keep one row per frame"):
        mask_files(tmp_path, "index.csv", frames)
