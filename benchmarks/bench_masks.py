"""Weak-label speed: YOLO batches, SAM per frame, and the whole masks stage cold and from its label cache.

    .venv/bin/python benchmarks/bench_masks.py [--frames 3] [--size 640x480] [--model-type vit_b]
                                               [--device auto] [--naive]

Frames are the sample generator's (charseg/sample.py: rooms with walking figures) at --size, and the
boxes are the bounding boxes of its exact masks (a perfect detector), so SAM sees realistic prompts.
Weights are random (YOLOv8s built from its .yaml, SAM from sam_model_registry without a checkpoint):
the timings are those of the real weights, the masks are not. Figures printed:

  yolo batched     PersonDetector on all frames in one predict call (labels.detector.batch)
  yolo per frame   the same frames one call each
  sam              SamBoxSegmenter: one image embedding + all of a frame's boxes in one decoder call
  sam naive        (--naive) an embedding per box, the way a per-box loop would do it
  stage cold       charseg.masks.make_masks with an empty label cache: YOLO (timed, its boxes replaced by
                   the planted ones) + SAM + refine + PNGs + QA plots
  stage cached     the same run again: every frame from the label cache, no weights loaded

On CPU the lead runs it alone on the machine (2 cores); SAM's encoder dominates everything.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def render_frames(n: int, size: tuple[int, int]) -> list[tuple]:
    """(BGR frame, boxes) pairs spread over a sample clip, skipping frames with nobody in them."""
    import cv2
    import numpy as np

    from charseg.sample import ClipSpec, render_clip

    spec = ClipSpec("bench", "bench.mp4", 25.0, size, seconds=max(4.0, n * 1.0), black_first_frame=False)
    frames = []
    for index, (frame, mask) in enumerate(render_clip(spec, seed=0, clip_no=0)):
        if index % 25 == 0 and mask.any():
            count, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8))
            boxes = np.array([[x, y, x + w, y + h] for x, y, w, h, _ in stats[1:]], np.float32)
            frames.append((frame, boxes))
        if len(frames) == n:
            break
    return frames


def time_yolo(detector, images: list) -> None:
    """PersonDetector on all frames in one predict call, then one call per frame."""
    detector.detect(images[:1])  # warm-up: model fusing, first-call allocations
    start = time.perf_counter()
    detector.detect(images)
    batched = time.perf_counter() - start
    start = time.perf_counter()
    for image in images:
        detector.detect([image])
    single = time.perf_counter() - start
    print(f"yolo batched                   {len(images) / batched:8.2f} frames/s")
    print(f"yolo per frame                 {len(images) / single:8.2f} frames/s")


def time_sam(segmenter, frames: list[tuple], naive: bool) -> None:
    """One embedding per frame with all its boxes; with `naive`, also one embedding per box."""
    start = time.perf_counter()
    for image, boxes in frames:
        segmenter.segment(image, boxes)
    per_frame = (time.perf_counter() - start) / len(frames)
    print(f"sam                            {1 / per_frame:8.3f} frames/s  ({per_frame:.2f} s/frame)")
    if naive:
        start = time.perf_counter()
        for image, boxes in frames:
            for box in boxes:
                segmenter.segment(image, box[None])
        per_frame = (time.perf_counter() - start) / len(frames)
        print(f"sam naive (embedding per box)  {1 / per_frame:8.3f} frames/s  ({per_frame:.2f} s/frame)")


def write_frames(frames_dir, frames: list[tuple]) -> dict:
    """The frames as a frames-stage folder; the planted boxes by the hash of each frame as the stage decodes it."""
    import hashlib

    from charseg.io import imread, imwrite_atomic, write_csv
    from charseg.layout import FRAME_COLUMNS

    boxes_by_pixels, rows = {}, []
    for i, (image, boxes) in enumerate(frames):
        frame_id = f"bench--clip--{i:08d}"
        imwrite_atomic(frames_dir.image(frame_id), image)
        decoded = imread(frames_dir.image(frame_id))  # what the stage will hand the detector
        boxes_by_pixels[hashlib.sha1(decoded.tobytes()).hexdigest()] = boxes
        rows.append({"id": frame_id, "character": "bench", "video": "bench/clip.mp4", "frame_index": i,
                     "timestamp": float(i), "width": image.shape[1], "height": image.shape[0]})
    write_csv(frames_dir.manifest, rows, FRAME_COLUMNS)
    return boxes_by_pixels


def time_stage(detector, segmenter, frames: list[tuple], device: str, half: bool, model_type: str) -> None:
    """make_masks cold (the real YOLO timed, its boxes replaced by the planted ones; SAM; refine; PNGs; QA),
    then again from the label cache."""
    import hashlib

    import numpy as np

    from charseg.config import DetectorConfig, LabelsConfig, RefineConfig, SamConfig
    from charseg.labels.detect import Detections, YoloSamLabeler
    from charseg.layout import FramesDir, MasksDir
    from charseg.masks import make_masks

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        frames_dir, masks_dir = FramesDir(tmp / "frames"), MasksDir(tmp / "out/masks")
        boxes_by_pixels = write_frames(frames_dir, frames)

        class YoloThenPlanted:
            """Runs the real YOLO (for its cost), then answers with the sample's true boxes for each frame."""

            def detect(self, batch):
                detector.detect(batch)
                found = []
                for image in batch:
                    boxes = boxes_by_pixels[hashlib.sha1(image.tobytes()).hexdigest()]
                    found.append(Detections(boxes, np.full(len(boxes), 0.9, np.float32)))
                return found

        cfg = LabelsConfig(
            method="yolo_sam", device=device, half=half, workers=1,
            detector=DetectorConfig(weights=Path("unused"), conf=0.5, min_box_area=0.002, imgsz=640, batch=16),
            sam=SamConfig(model_type=model_type, checkpoint=Path("unused")),
            refine=RefineConfig(close_kernel=5, open_kernel=3, min_area=0.001, max_hole_area=0.001),
            import_dir=tmp / "none", mask_index=None, truth_dir=None, cache_dir=tmp / "cache", keep_empty=True,
            qa_samples=8)

        def run_stage(labeler: YoloSamLabeler) -> float:
            start = time.perf_counter()
            make_masks(frames_dir, masks_dir, tmp / "out/plots", tmp / "out/metrics.json", cfg, labeler=labeler)
            return time.perf_counter() - start

        cold = run_stage(YoloSamLabeler(YoloThenPlanted, lambda: segmenter, {"bench": model_type}))
        print(f"stage cold (empty label cache) {len(frames) / cold:8.3f} frames/s  ({cold / len(frames):.2f} s/frame)")

        def unused():
            raise AssertionError("the cached run loaded a model")

        warm = run_stage(YoloSamLabeler(unused, unused, {"bench": model_type}))
        print(f"stage cached (no SAM, no YOLO) {len(frames) / warm:8.2f} frames/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--size", default="640x480", help="frame width x height")
    parser.add_argument("--model-type", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--naive", action="store_true", help="also time one SAM embedding per box")
    args = parser.parse_args()

    import torch

    from charseg import environment
    from charseg.device import select_device
    from charseg.labels.detect import PersonDetector, SamBoxSegmenter
    from charseg.labels.weights import load_sam, load_yolo

    environment.configure()  # as run_cli does for the stages: ultralytics' settings stay in the project
    width, height = (int(v) for v in args.size.lower().split("x"))
    device = select_device(args.device)
    half = device.type == "cuda"
    frames = render_frames(args.frames, (width, height))
    n_boxes = sum(len(b) for _, b in frames)
    print(f"{len(frames)} frames {width}x{height}, {n_boxes} persons; device {device} "
          f"({torch.get_num_threads()} CPU threads){', half precision' if half else ''}; SAM {args.model_type}")

    torch.manual_seed(0)
    start = time.perf_counter()
    detector = PersonDetector(load_yolo("yolov8s.yaml"), conf=0.5, min_box_area=0.002, device=device, half=half)
    segmenter = SamBoxSegmenter(load_sam(args.model_type, None, device), half=half)
    print(f"build models (random weights)  {time.perf_counter() - start:8.2f} s")

    time_yolo(detector, [image for image, _ in frames])
    time_sam(segmenter, frames, args.naive)
    time_stage(detector, segmenter, frames, str(device), half, args.model_type)


if __name__ == "__main__":
    main()
