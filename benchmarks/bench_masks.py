"""Weak-label speed: YOLO batches, SAM per frame, and the whole masks stage cold and from its label cache.

    .venv/bin/python benchmarks/bench_masks.py [--frames 3] [--size 640x480] [--model-type vit_b]
                                               [--device auto] [--naive]

Frames are the sample generator's (stages/sample.py: rooms with walking figures) at --size, and the
boxes are the bounding boxes of its exact masks (a perfect detector), so SAM sees realistic prompts.
Weights are random (YOLOv8s built from its .yaml, SAM from sam_model_registry without a checkpoint):
the timings are those of the real weights, the masks are not. Figures printed:

  yolo batched     PersonDetector on all frames in one predict call (labels.detector.batch)
  yolo per frame   the same frames one call each
  sam              SamBoxSegmenter: one image embedding + all of a frame's boxes in one decoder call
  sam naive        (--naive) an embedding per box, the way a per-box loop would do it
  stage cold       stages.masks.make_masks with an empty label cache: YOLO (timed, its boxes replaced by
                   the planted ones) + SAM + refine + PNGs + QA plots
  stage cached     the same run again: every frame from the label cache, no weights loaded

On CPU the lead runs it alone on the machine (2 cores); SAM's encoder dominates everything.
"""
from __future__ import annotations

import argparse
import hashlib
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--size", default="640x480", help="frame width x height")
    parser.add_argument("--model-type", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--naive", action="store_true", help="also time one SAM embedding per box")
    args = parser.parse_args()

    import numpy as np
    import torch

    from charseg import masks as stage
    from charseg.io import FRAME_COLUMNS, imread, imwrite_atomic, write_csv
    from charseg.labels import (Detections, PersonDetector, RefineConfig, SamBoxSegmenter, YoloSamLabeler,
                                     load_sam, load_yolo)
    from charseg.device import select_device

    width, height = (int(v) for v in args.size.lower().split("x"))
    device = select_device(args.device)
    half = device.type == "cuda"
    frames = render_frames(args.frames, (width, height))
    images = [f for f, _ in frames]
    n_boxes = sum(len(b) for _, b in frames)
    print(f"{len(frames)} frames {width}x{height}, {n_boxes} persons; device {device} "
          f"({torch.get_num_threads()} CPU threads){', half precision' if half else ''}; SAM {args.model_type}")

    torch.manual_seed(0)
    start = time.perf_counter()
    detector = PersonDetector(load_yolo("yolov8s.yaml"), conf=0.5, min_box_area=0.002, device=device, half=half)
    sam = load_sam(args.model_type, None, device)
    segmenter = SamBoxSegmenter(sam, half=half)
    print(f"build models (random weights)  {time.perf_counter() - start:8.2f} s")

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

    start = time.perf_counter()
    for image, boxes in frames:
        segmenter.segment(image, boxes)
    sam_time = time.perf_counter() - start
    per_frame = sam_time / len(frames)
    print(f"sam                            {1 / per_frame:8.3f} frames/s  ({per_frame:.2f} s/frame)")
    if args.naive:
        start = time.perf_counter()
        for image, boxes in frames:
            for box in boxes:
                segmenter.segment(image, box[None])
        naive = time.perf_counter() - start
        per_frame = naive / len(frames)
        print(f"sam naive (embedding per box)  {1 / per_frame:8.3f} frames/s  ({per_frame:.2f} s/frame)")

    boxes_by_pixels: dict[str, np.ndarray] = {}

    class YoloThenPlanted:
        """Runs the real YOLO (for its cost), then answers with the sample's true boxes for each frame."""

        def detect(self, batch):
            detector.detect(batch)
            found = []
            for image in batch:
                boxes = boxes_by_pixels[hashlib.sha1(image.tobytes()).hexdigest()]
                found.append(Detections(boxes, np.full(len(boxes), 0.9, np.float32)))
            return found

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rows = []
        for i, image in enumerate(images):
            frame_id = f"bench--clip--{i:08d}"
            imwrite_atomic(tmp / "frames/images" / f"{frame_id}.jpg", image)
            decoded = imread(tmp / "frames/images" / f"{frame_id}.jpg")  # what the stage will hand the detector
            boxes_by_pixels[hashlib.sha1(decoded.tobytes()).hexdigest()] = frames[i][1]
            rows.append({"id": frame_id, "character": "bench", "video": "bench/clip.mp4", "frame_index": i,
                         "timestamp": float(i), "width": width, "height": height})
        write_csv(tmp / "frames/manifest.csv", rows, FRAME_COLUMNS)
        cfg = stage.LabelsConfig(
            method="yolo_sam", detector_weights=Path("unused"), conf=0.5, min_box_area=0.002, imgsz=640, batch=16,
            sam_model_type=args.model_type, sam_checkpoint=Path("unused"), device=str(device), half=half,
            refine=RefineConfig(close_kernel=5, open_kernel=3, min_area=0.001, max_hole_area=0.001),
            import_dir=tmp / "none", mask_index="", truth_dir=None, cache_dir=tmp / "cache", qa_samples=8)

        def run_stage(labeler: YoloSamLabeler) -> float:
            start = time.perf_counter()
            stage.make_masks(tmp / "frames", tmp / "out/masks", tmp / "out/plots", tmp / "out/metrics.json", cfg,
                             labeler=labeler)
            return time.perf_counter() - start

        cold = run_stage(YoloSamLabeler(YoloThenPlanted, lambda: segmenter, {"bench": args.model_type}))
        print(f"stage cold (empty label cache) {len(images) / cold:8.3f} frames/s  ({cold / len(images):.2f} s/frame)")

        def unused():
            raise AssertionError("the cached run loaded a model")

        warm = run_stage(YoloSamLabeler(unused, unused, {"bench": args.model_type}))
        print(f"stage cached (no SAM, no YOLO) {len(images) / warm:8.2f} frames/s")


if __name__ == "__main__":
    main()
