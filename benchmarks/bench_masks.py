"""Weak-label speed per backend: labelled frames/s at 640x480 for YOLOv8n + each SAM-family backend and
yolo_seg, the whole masks stage with a cold label cache, and 1 against 2 labelling worker processes.

    .venv/bin/python benchmarks/bench_masks.py [--frames 4] [--size 640x480] [--device cpu] [--half|--no-half]
        [--backends vit_b,mobile_sam.pt,mobile_sam.pt@onnx,mobile_sam.pt@640,mobile_sam.pt@onnx@640,...]
        [--workers-backend mobile_sam.pt] [--workers-frames 4] [--json FIGURES]
    GPU mode (benchmarks/device_check.py): --device cuda --half --workers-frames 0 --json FIGURES
    smoke run (well under a minute on an idle 2-core box):
    .venv/bin/python benchmarks/bench_masks.py --frames 1 --backends mobile_sam.pt,yolo_seg --workers-frames 0

Weights: real architectures with random weights, written to a temporary folder under the official file
names (YOLOv8n and YOLOv8n-seg from their .yaml, segment-anything's vit_b, ultralytics' MobileSAM and
SAM 2.1-tiny) and loaded by the stage's own charseg.labels.detect.build_labeler: the timings are those of
the real models, the masks are not. Frames are the sample generator's (charseg/sample.py) at --size.

Detections: random YOLO weights find nobody, and then SAM would never run. So YOLO really runs on every
batch and its answer is then replaced by the person boxes of the sample's exact masks (a perfect detector,
realistic prompts): "run YOLO, then plant" rather than "time YOLO alone and add", so that the stage's own
batching, label cache and worker processes are measured as they run (the planting wraps
PersonDetector.detect in every process, workers included, through a module-level labeler factory).
yolo_seg runs its segmentation model for real and keeps its (empty) answer: its cost is the forward pass,
which does not depend on how many persons it finds.

A SPEC is `charseg agreement`'s: @onnx for labels.sam.runtime, @640 for labels.sam.image_size (the encoder's
square input; the default rows time MobileSAM at 640 and 512 besides 1024, the trained size).

Figures, each backend in the same run (ratio: frames/s over vit_b's, when vit_b is among --backends):
  labeler   build_labeler(cfg).label on all frames, labels.detector.batch at a time, models already loaded
  stage     charseg.masks.make_masks on the same frames, empty label cache: models loaded in the run, refine,
            PNGs, manifest, QA plots: what a user waits for
  (@onnx backends: the one-time encoder export, one per image size, is done and timed first, and kept out of
  both figures)
Workers: make_masks with labels.workers 1 and then 2 on --workers-backend, cold label cache each; each of
N workers gets cores // N torch threads. The 2-worker figure includes spawning the processes and loading
the models in each (~10 s on 2 busy cores), so give it enough --workers-frames to show the steady state.
The lead runs the full benchmark alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

DEFAULT_BACKENDS = ("vit_b,mobile_sam.pt,mobile_sam.pt@onnx,mobile_sam.pt@640,mobile_sam.pt@onnx@640,"
                    "mobile_sam.pt@onnx@512,sam2.1_t.pt,yolo_seg")
ULTRALYTICS_BUILDERS = {"mobile_sam.pt": "build_mobile_sam", "sam2.1_t.pt": "build_sam2_t"}


def render_frames(n: int, size: tuple[int, int]) -> list[tuple]:
    """(BGR frame, boxes) pairs spread over a sample clip, skipping frames with nobody in them."""
    import cv2
    import numpy as np

    from charseg.sample import NAMED_CHARACTERS, ClipSpec, render_clip

    # A character of the sample (render_clip draws each by its own looks): any one will do.
    spec = ClipSpec(NAMED_CHARACTERS[0], "bench.mp4", 25.0, size, seconds=max(4.0, n * 1.0), black_first_frame=False)
    frames = []
    for index, (frame, mask) in enumerate(render_clip(spec, seed=0, clip_no=0)):
        if index % 25 == 0 and mask.any():
            count, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8))
            boxes = np.array([[x, y, x + w, y + h] for x, y, w, h, _ in stats[1:]], np.float32)
            frames.append((frame, boxes))
        if len(frames) == n:
            break
    return frames


def write_frames(frames_dir, frames: list[tuple], boxes_file: Path) -> list:
    """The frames as a frames-stage folder; the planted boxes by the hash of each frame as the stage decodes
    it, in `boxes_file`; the decoded frames."""
    import hashlib

    from charseg.io import imread, imwrite_atomic, write_csv, write_json
    from charseg.layout import FRAME_COLUMNS

    boxes_by_pixels, rows, decoded = {}, [], []
    for i, (image, boxes) in enumerate(frames):
        frame_id = f"bench--clip--{i:08d}"
        imwrite_atomic(frames_dir.image(frame_id), image)
        decoded.append(imread(frames_dir.image(frame_id)))  # what the stage will hand the detector
        boxes_by_pixels[hashlib.sha1(decoded[-1].tobytes()).hexdigest()] = boxes.tolist()
        rows.append({"id": frame_id, "character": "bench", "video": "bench/clip.mp4", "frame_index": i,
                     "timestamp": float(i), "width": image.shape[1], "height": image.shape[0]})
    write_csv(frames_dir.manifest, rows, FRAME_COLUMNS)
    write_json(boxes_file, boxes_by_pixels)
    return decoded


def plant_boxes(boxes_file: str) -> None:
    """PersonDetector.detect runs YOLO as always, then answers with the planted boxes of `boxes_file` (each
    Bench has its own frames and file: a later call re-plants over the same real detector)."""
    import hashlib

    import numpy as np

    from charseg.labels import detect

    boxes_by_pixels = json.loads(Path(boxes_file).read_text())
    real_detect = getattr(detect.PersonDetector.detect, "real", detect.PersonDetector.detect)

    def detect_then_plant(self: Any, images: list) -> list:
        real_detect(self, images)  # the detector's cost, in every figure
        found = []
        for image in images:
            boxes = np.asarray(boxes_by_pixels.get(hashlib.sha1(image.tobytes()).hexdigest(), []), np.float32)
            found.append(detect.Detections(boxes.reshape(-1, 4), np.full(len(boxes), 0.9, np.float32)))
        return found

    detect_then_plant.real = real_detect  # type: ignore[attr-defined]
    detect.PersonDetector.detect = detect_then_plant


def planted_labeler(cfg: Any, *, device: str | None = None, boxes_file: str) -> Any:
    """The stage's LabelerFactory with the planted boxes: build_labeler, YOLO answered by plant_boxes."""
    from charseg.labels.detect import build_labeler

    plant_boxes(boxes_file)
    return build_labeler(cfg, device=device)


def write_weights(folder: Path, specs: list[str]) -> None:
    """Random-weight files under the official names, for the backends `specs` need."""
    import torch
    from ultralytics import YOLO

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    YOLO("yolov8n.yaml").save(folder / "yolov8n.pt")
    names = {spec.partition("@")[0] for spec in specs}
    if "yolo_seg" in names:
        YOLO("yolov8n-seg.yaml").save(folder / "yolov8n-seg.pt")
    if "vit_b" in names:
        from segment_anything import sam_model_registry

        torch.save(sam_model_registry["vit_b"]().state_dict(), folder / "sam_vit_b_01ec64.pth")
    for name in names & set(ULTRALYTICS_BUILDERS):
        from ultralytics.models.sam import build

        torch.save(getattr(build, ULTRALYTICS_BUILDERS[name])(None).state_dict(), folder / name)


def backend_cfg(base: Any, spec: str, weights: Path, cache: Path, workers: int = 1) -> Any:
    """params.yaml's labels config for `spec` (as `charseg agreement` reads it), on the random weights."""
    from charseg.agreement import backend_config

    name, at, runtime = spec.partition("@")
    path_spec = str(weights / name) + at + runtime if name in ULTRALYTICS_BUILDERS else spec
    return replace(backend_config(base, path_spec, weights / "yolov8n-seg.pt"), cache_dir=cache, workers=workers)


class Bench:
    """The frames, weights and base config of one run; times labelers and stage runs on them."""

    def __init__(self, tmp: Path, weights: Path, frames: list[tuple], device: str, half: bool | None = None):
        from charseg.config import load_config
        from charseg.layout import FramesDir

        self.tmp, self.weights, self.frames_dir = tmp, weights, FramesDir(tmp / "frames")
        self.boxes_file = tmp / "boxes.json"
        self.images = write_frames(self.frames_dir, frames, self.boxes_file)
        labels = load_config(REPO_ROOT / "params.yaml").labels
        self.base = replace(labels, device=device, half=labels.half if half is None else half,
                            detector=replace(labels.detector, weights=weights / "yolov8n.pt", imgsz=640),
                            sam=replace(labels.sam, model="vit_b", checkpoint=weights / "sam_vit_b_01ec64.pth"))
        self.factory = partial(planted_labeler, boxes_file=str(self.boxes_file))
        self.runs = 0

    def cfg(self, spec: str, workers: int = 1) -> Any:
        """The backend's config on a fresh label cache that holds only the exported encoders (if any)."""
        self.runs += 1
        cache = self.tmp / f"cache{self.runs}"
        if (self.tmp / "encoders").is_dir():
            shutil.copytree(self.tmp / "encoders", cache / "encoders")
        return backend_cfg(self.base, spec, self.weights, cache, workers)

    def time_labeler(self, spec: str) -> tuple[float, float]:
        """(seconds of the first call: model loading, and the encoder export for @onnx; frames/s after)."""
        cfg = self.cfg(spec)
        labeler = self.factory(cfg)
        start = time.perf_counter()
        list(labeler.label(self.images[:1]))
        first = time.perf_counter() - start
        if (cfg.cache_dir / "encoders").is_dir():  # exported once: the later runs start with it
            shutil.copytree(cfg.cache_dir / "encoders", self.tmp / "encoders", dirs_exist_ok=True)
        batch = cfg.detector.batch
        start = time.perf_counter()
        for i in range(0, len(self.images), batch):
            list(labeler.label(self.images[i:i + batch]))
        return first, len(self.images) / (time.perf_counter() - start)

    def time_stage(self, spec: str, workers: int = 1) -> float:
        """make_masks on every frame with an empty label cache: frames/s."""
        from charseg.layout import MasksDir
        from charseg.masks import make_masks

        cfg, out = self.cfg(spec, workers), self.tmp / f"out{self.runs}"
        start = time.perf_counter()
        make_masks(self.frames_dir, MasksDir(out / "masks"), out / "plots", out / "metrics.json", cfg,
                   labeler_factory=self.factory)
        return len(self.images) / (time.perf_counter() - start)


def ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:6.2f}x" if reference else "     -"


def compare_backends(bench: Bench, specs: list[str]) -> dict[str, tuple[float, float, float]]:
    """labeler and stage frames/s per backend, and their ratio to vit_b's; {spec: (first call s, labeler
    frames/s, stage frames/s)}."""
    results = {}
    for spec in specs:
        first, labeler = bench.time_labeler(spec)
        results[spec] = (first, labeler, bench.time_stage(spec))
        print(f"  {spec:22s} first call {first:7.1f} s", file=sys.stderr)
    reference = results.get("vit_b", (0.0, None, None))
    print(f"\n{'backend (+ YOLOv8n)':22s} {'first call':>10s} {'labeler':>12s} {'vs vit_b':>8s} {'stage':>12s} "
          f"{'vs vit_b':>8s}")
    for spec, (first, labeler, stage) in results.items():
        print(f"{spec:22s} {first:8.1f} s {labeler:8.3f} f/s {ratio(labeler, reference[1]):>8s} "
              f"{stage:8.3f} f/s {ratio(stage, reference[2]):>8s}")
    return results


def write_backend_figures(path: str, results: dict[str, tuple[float, float, float]], half: bool, frames: str) -> None:
    from benchmarks.device_check import figure, write_figures

    precision = "half" if half else "float32"
    named = {spec: spec if spec.startswith("yolo_seg") else f"{spec} + YOLOv8n" for spec in results}
    write_figures(path, [row for spec, (first, labeler, stage) in results.items() for row in (
        figure(f"{named[spec]} labeler", labeler, "frames/s", f"{precision}; {frames}; models loaded"),
        figure(f"{named[spec]} masks stage", stage, "frames/s",
               f"{precision}; cold label cache, load + refine + PNGs; first call {first:.1f} s"))])


def compare_workers(bench: Bench, spec: str) -> None:
    one, two = bench.time_stage(spec, workers=1), bench.time_stage(spec, workers=2)
    print(f"\nstage on {spec}: 1 worker {one:.3f} f/s, 2 workers {two:.3f} f/s ({two / one:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=4, help="frames per backend")
    parser.add_argument("--size", default="640x480", help="frame width x height")
    parser.add_argument("--backends", default=DEFAULT_BACKENDS, help="comma-separated SPECs, as charseg agreement")
    parser.add_argument("--workers-backend", default="mobile_sam.pt")
    parser.add_argument("--workers-frames", type=int, default=4, help="frames of the 1 vs 2 workers run; 0: skip")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda")
    parser.add_argument("--half", action=argparse.BooleanOptionalAction,
                        help="half precision for YOLO and SAM on a GPU (default: params.yaml labels.half)")
    parser.add_argument("--json", help="also write the figures to this file (benchmarks/device_check.py)")
    args = parser.parse_args()

    import torch

    from charseg import environment

    environment.configure()  # as run_cli does for the stages: ultralytics' settings stay in the project
    width, height = (int(v) for v in args.size.lower().split("x"))
    specs = [s for s in args.backends.split(",") if s]
    needed = specs + ([args.workers_backend] if args.workers_frames else [])
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        write_weights(tmp / "w", needed)
        print(f"random weights written in {time.perf_counter() - start:.1f} s; {torch.get_num_threads()} CPU "
              f"threads; device {args.device}", file=sys.stderr)
        if specs:
            frames = render_frames(args.frames, (width, height))
            print(f"{len(frames)} frames {width}x{height}, {sum(len(b) for _, b in frames)} persons")
            bench = Bench(tmp / "backends", tmp / "w", frames, args.device, args.half)
            results = compare_backends(bench, specs)
            if args.json:
                write_backend_figures(args.json, results, bench.base.half and args.device != "cpu",
                                      f"{len(frames)} frames {width}x{height}")
        if args.workers_frames:
            frames = render_frames(args.workers_frames, (width, height))
            compare_workers(Bench(tmp / "workers", tmp / "w", frames, args.device), args.workers_backend)


if __name__ == "__main__":
    main()
