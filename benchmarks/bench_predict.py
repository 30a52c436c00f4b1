"""Predict speed on a 720p video: the pipelined `charseg predict` against a plain sequential loop.

    .venv/bin/python benchmarks/bench_predict.py [--seconds 3] [--size 1280x720] [--img-size 256 512]
        [--models unetpp,pspnet,deeplabv3,dinov2] [--batch-size 8] [--device cpu] [--amp] [--onnx]
        [--threads N] [--repeats 2] [--json FIGURES]

The video is rendered once into a temporary folder: the sample's panning rooms and walking figures,
30 fps MPEG-4 (mp4v), plus sensor grain (--grain): flat synthetic frames would make decoding and
encoding unrealistically cheap. Per model of params.yaml (random weights, encoder_weights null: speed
does not depend on them) and per img_size, end to end frames/s (decode + preprocess + inference +
resize back + overlay + encode, .mp4 out) of:

  sequential  read a batch of frames -> infer -> draw and write them, then the next batch
  pipelined   charseg.predict.predict_video: reader thread, batched inference, writer thread
  model only  the segmenter alone on a preprocessed batch: the ceiling for either loop

with the same model, batch size and threshold; speed-up = pipelined / sequential. Decode-only and
encode-only rates of the video are printed first: the pipeline runs at about the slowest of decode,
model and encode, the sequential loop at the sum of their times. --onnx adds ONNX Runtime rows (the
model exported with charseg.onnx.export_onnx). Figures are printed (and with --json written for
benchmarks/device_check.py, whose GPU mode is --device cuda --amp); nothing is asserted.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from charseg import predict  # noqa: E402
from charseg import models  # noqa: E402
from charseg.inference import Segmenter, TorchSegmenter, infer_masks, preprocess  # noqa: E402
from charseg.config import load_config  # noqa: E402
from charseg.device import ort_providers, select_device  # noqa: E402
from charseg.video import VideoInfo, probe  # noqa: E402
from charseg.sample import NAMED_CHARACTERS, ClipSpec, render_clip  # noqa: E402
from benchmarks.device_check import Figure, figure, write_figures  # noqa: E402

FPS = 30.0
THRESHOLD = 0.5


def make_video(path: Path, seconds: float, size: tuple[int, int], grain: float) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, size)
    noise = [np.random.default_rng(i).normal(0, grain, (size[1], size[0], 3)).astype(np.int16) for i in range(5)]
    # A character of the sample (render_clip draws each by its own looks): any one will do.
    spec = ClipSpec(NAMED_CHARACTERS[0], path.name, FPS, size, seconds, black_first_frame=False)
    for i, (frame, _) in enumerate(render_clip(spec, seed=0, clip_no=0)):
        writer.write(np.clip(frame + noise[i % len(noise)], 0, 255).astype(np.uint8) if grain else frame)
    writer.release()
    return path


def decode_only(video: Path) -> tuple[int, float]:
    capture, frames, start = cv2.VideoCapture(str(video)), 0, time.perf_counter()
    while capture.read()[0]:
        frames += 1
    capture.release()
    return frames, frames / (time.perf_counter() - start)


def encode_only(info: VideoInfo, frames: int, out: Path) -> float:
    frame = np.full((info.height, info.width, 3), 90, np.uint8)
    mask = np.zeros((info.height, info.width), np.uint8)
    mask[info.height // 4:3 * info.height // 4, info.width // 3:2 * info.width // 3] = 255
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), info.fps, (info.width, info.height))
    start = time.perf_counter()
    for _ in range(frames):
        writer.write(predict.overlay(frame, mask))
    writer.release()
    return frames / (time.perf_counter() - start)


def sequential(segmenter: Segmenter, info: VideoInfo, out: Path, batch_size: int) -> int:
    """The plain loop: nothing overlaps, each batch is decoded, inferred and encoded in turn."""
    capture = cv2.VideoCapture(str(info.path))
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), info.fps, (info.width, info.height))
    frames = 0
    while True:
        chunk = []
        while len(chunk) < batch_size and (frame := capture.read()[1]) is not None:
            chunk.append(frame)
        if not chunk:
            break
        batch = preprocess([cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in chunk], segmenter.meta)
        for frame, mask in zip(chunk, infer_masks(segmenter, batch, [f.shape[:2] for f in chunk], THRESHOLD)):
            writer.write(predict.overlay(frame, mask))
        frames += len(chunk)
    capture.release()
    writer.release()
    return frames


def model_only(segmenter: Segmenter, frames: int, batch_size: int) -> float:
    batch = np.random.default_rng(0).normal(size=(batch_size, 3, segmenter.meta["img_size"],
                                                 segmenter.meta["img_size"])).astype(np.float32)
    segmenter(batch)  # warm-up: first-call allocations, oneDNN / cuDNN kernel selection
    calls = max(1, -(-frames // batch_size))
    start = time.perf_counter()
    for _ in range(calls):
        segmenter(batch)
    return calls * batch_size / (time.perf_counter() - start)


def measure(segmenter: Segmenter, info: VideoInfo, tmp: Path, batch_size: int, repeats: int) -> dict[str, float]:
    """Best of `repeats` for each figure: on a shared machine the best run is the least disturbed one."""
    best = {"model": 0.0, "sequential": 0.0, "pipelined": 0.0}
    for _ in range(repeats):
        best["model"] = max(best["model"], model_only(segmenter, info.reported_frames, batch_size))
        start = time.perf_counter()
        frames = sequential(segmenter, info, tmp / "sequential.mp4", batch_size)
        best["sequential"] = max(best["sequential"], frames / (time.perf_counter() - start))
        start = time.perf_counter()
        result = predict.predict_video(segmenter, info, tmp / "pipelined.mp4", threshold=THRESHOLD,
                                       batch_size=batch_size, progress=False)
        best["pipelined"] = max(best["pipelined"], result.frames / (time.perf_counter() - start))
        assert result.frames == frames, (result.frames, frames)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of the synthetic video")
    parser.add_argument("--size", default="1280x720", help="video frame size WIDTHxHEIGHT")
    parser.add_argument("--grain", type=float, default=6.0, help="sensor-noise std added to the frames (0: none)")
    parser.add_argument("--img-size", type=int, nargs="+", default=[256], help="model input sizes to try")
    parser.add_argument("--models", help="comma-separated names of params.yaml models (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:1")
    parser.add_argument("--amp", action="store_true", help="mixed precision on CUDA (torch rows)")
    parser.add_argument("--onnx", action="store_true", help="also run the ONNX Runtime export of each model")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per figure; the best is printed")
    parser.add_argument("--json", help="also write the figures to this file (benchmarks/device_check.py)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    cfgs = {name: model.params for name, model in load_config(args.params).models().items()}
    names = args.models.split(",") if args.models else list(cfgs)
    width, height = map(int, args.size.lower().split("x"))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        info = probe(make_video(tmp / "clip.mp4", args.seconds, (width, height), args.grain))
        frames, decode_fps = decode_only(info.path)
        encode_fps = encode_only(info, frames, tmp / 'encode.mp4')
        print(f"predict on a {width}x{height} {FPS:g} fps video of {frames} frames, batch {args.batch_size}, {where}; "
              f"decode only {decode_fps:.1f} frames/s, overlay + encode only {encode_fps:.1f} frames/s\n")
        video = f"{width}x{height}"
        figures: list[Figure] = [figure(f"decode only ({video}, OpenCV)", decode_fps, "frames/s"),
                                 figure(f"overlay + encode only ({video}, mp4v)", encode_fps, "frames/s")]
        print("| model | arch | img_size | runtime | model only (frames/s) | sequential (frames/s) "
              "| pipelined (frames/s) | speed-up |")
        print("|---|---|---|---|---|---|---|---|")
        for name in names:
            cfg = {**cfgs[name], "encoder_weights": None}
            for img_size in args.img_size:
                models.check_img_size(cfg, img_size, name=name)
                torch.manual_seed(0)
                model = models.build_model(cfg, pretrained=False, name=name)
                mean, std = models.normalization(cfg, name=name)
                meta = {"model_name": name, "arch": cfg["arch"], "img_size": img_size, "mean": mean, "std": std,
                        "threshold": THRESHOLD}
                runtimes: list[tuple[str, Segmenter]] = []
                if args.onnx:  # exported first, while the model is still on the CPU
                    from charseg.onnx import OnnxSegmenter, export_onnx

                    export_onnx(model, meta, tmp / f"{name}.onnx")
                    runtimes.append(("onnxruntime", OnnxSegmenter(tmp / f"{name}.onnx", ort_providers(args.device))))
                runtimes.insert(0, ("torch" + (" amp" if args.amp and device.type == "cuda" else ""),
                                    TorchSegmenter(model, meta, device, amp=args.amp)))
                for runtime, segmenter in runtimes:
                    fps = measure(segmenter, info, tmp, args.batch_size, args.repeats)
                    print(f"| {name} | {cfg['arch']} | {img_size} | {runtime} | {fps['model']:.1f} "
                          f"| {fps['sequential']:.1f} | {fps['pipelined']:.1f} "
                          f"| {fps['pipelined'] / fps['sequential']:.2f}x |", flush=True)
                    run = f"{name} {img_size} px {runtime}, {video}"
                    figures += [figure(f"predict pipelined ({run})", fps["pipelined"], "frames/s",
                                       f"{fps['pipelined'] / fps['sequential']:.2f}x the plain loop; "
                                       f"batch {args.batch_size}; real time is {FPS:g} frames/s"),
                                figure(f"predict plain loop ({run})", fps["sequential"], "frames/s"),
                                figure(f"model only ({run})", fps["model"], "frames/s")]
                del model, runtimes
        if args.json:
            write_figures(args.json, figures)


if __name__ == "__main__":
    main()
