"""Training speed: the data path against the seed's, and the step time of every model.

    python benchmarks/bench_train.py [--frames 64] [--frame-size 1280x720] [--img-size N] [--batch-size N]
                                     [--workers 0] [--steps 3] [--models unetpp,pspnet,...] [--threads N]
                                     [--device auto] [--quick] [--json FIGURES]

1. Data path. Synthetic full-size JPEG frames + PNG masks. "seed": what the original notebook did,
   decode the full-size frame and mask and resize them on every access (then the same augmentation
   and normalisation). "charseg": charseg/data.py, pairs decoded once into the pre-resized cache,
   normalised on the device. Reports the cold cache build, loader-only images/s, and training
   images/s with the same model (--train-model) and the same training step for both loaders.
2. Step time of each model of params.yaml at img_size/batch_size (defaults: params.yaml), CPU unless
   a GPU is present, encoder_weights null (no download), after one warm-up step.
--quick (the device check's GPU mode, benchmarks/device_check.py): instead of 1 and 2, the training loop's own
   rate: charseg.train's Trainer.setup (pair cache, precision: AMP and channels-last on CUDA, loaders with
   --workers) and its epoch function on --train-model, --epochs timed epochs after one warm-up epoch; then the
   loader alone (its images/s with no model) and the GPU alone (the same epoch function on one batch already on
   the device): the slower of the two bounds training. --json writes these figures to a file.
Figures are printed; nothing is asserted. On 2 CPU cores at the defaults (512 px, batch 8) part 2 takes
minutes per model (DeepLabV3 runs its ASPP at stride 8); --img-size 128 --batch-size 4 gives a quick look.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from charseg import models  # noqa: E402
from charseg.config import load_config  # noqa: E402
from charseg.data import Augment, PairDataset, cache_pairs, normalize, read_pair, resize_pair  # noqa: E402
from charseg.device import select_device  # noqa: E402
from charseg.layout import FramesDir, MasksDir  # noqa: E402
from charseg.io import write_json  # noqa: E402
from charseg.train import Trainer, TrainPaths, _train_epoch, dice_loss  # noqa: E402
from benchmarks.device_check import Figure, figure, write_figures  # noqa: E402


class SeedDataset(Dataset):
    """The seed's loader: full-size decode + resize on every access, normalised on the CPU."""

    def __init__(self, ids: list[str], frames: FramesDir, masks: MasksDir, img_size: int, augment: Augment,
                 mean: list[float], std: list[float]) -> None:
        self.ids, self.frames, self.masks, self.img_size = ids, frames, masks, img_size
        self.augment, self.mean, self.std = augment, np.float32(mean) * 255, np.float32(std) * 255

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = resize_pair(*read_pair(self.frames, self.masks, self.ids[index]), self.img_size)
        image, mask = self.augment(image, mask, np.random.default_rng(index))
        image = (image.astype(np.float32) - self.mean) / self.std
        return torch.from_numpy(image.transpose(2, 0, 1).copy()), torch.from_numpy(mask[None].copy())


def make_frames(frames: FramesDir, masks: MasksDir, count: int, width: int, height: int) -> list[str]:
    rng = np.random.default_rng(0)
    frames.images.mkdir(parents=True)
    masks.images.mkdir(parents=True)
    ids = []
    for i in range(count):
        frame_id = f"bench--clip--{i:08d}"
        image = cv2.resize(rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8), (width, height),
                           interpolation=cv2.INTER_CUBIC)
        image = cv2.add(image, rng.integers(0, 40, image.shape, dtype=np.uint8))  # grain, as in real footage
        mask = np.zeros((height, width), np.uint8)
        cv2.ellipse(mask, (int(rng.integers(width // 4, 3 * width // 4)), height // 2),
                    (width // 10, height // 3), 0, 0, 360, 255, -1)
        cv2.imwrite(str(frames.image(frame_id)), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(str(masks.mask(frame_id)), mask)
        ids.append(frame_id)
    return ids


def loader_rate(loader: DataLoader, epochs: int) -> float:
    start, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for images, _ in loader:
            seen += len(images)
    return seen / (time.perf_counter() - start)


def train_rate(loader: DataLoader, model: torch.nn.Module, device: torch.device, mean: list[float],
               std: list[float], steps: int) -> float:
    """Training images/s over `steps` steps (after one warm-up step), data loading included."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = dice_loss()
    model.train()
    seen, start, step = 0, 0.0, 0
    while step <= steps:
        for images, masks in loader:
            if step == 1:
                start, seen = time.perf_counter(), 0
            if step > steps:
                break
            images = images.to(device)
            inputs = normalize(images, mean, std) if images.dtype == torch.uint8 else images
            loss = loss_fn(model(inputs).float(), masks.to(device).float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(images)
            step += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def step_time(cfg: dict, img_size: int, batch_size: int, device: torch.device, steps: int) -> float:
    model = models.build_model({**cfg, "encoder_weights": None}).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = dice_loss()
    inputs = torch.randn(batch_size, 3, img_size, img_size, device=device)
    target = (torch.rand(batch_size, 1, img_size, img_size, device=device) > 0.5).float()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = loss_fn(model(inputs), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def _timed(run: Callable[[], int], device: torch.device) -> float:
    """images/s of `run` (which returns the images it processed), GPU work finished included."""
    start = time.perf_counter()
    images = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images / (time.perf_counter() - start)


def trainer_rates(args: argparse.Namespace, params: Any, device: torch.device, width: int, height: int) -> list[Figure]:
    """--quick: training, loader-only and GPU-only images/s of charseg.train's own loop (see the docstring)."""
    model_cfg = params.model_config(args.train_model)
    model_cfg = dataclasses.replace(model_cfg, encoder_weights=None, params={**model_cfg.params, "encoder_weights": None})
    cfg = dataclasses.replace(params.train, img_size=args.img_size, batch_size=args.batch_size, workers=args.workers,
                              amp=True, epochs=args.epochs + 1)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        frames, masks = FramesDir(root / "frames"), MasksDir(root / "masks")
        ids = make_frames(frames, masks, args.frames + args.batch_size, width, height)  # + one validation batch
        write_json(root / "split.json", {"train": ids[:args.frames], "val": ids[args.frames:]})
        paths = TrainPaths(root / "split.json", frames, masks, models=root / "models", live=root / "live",
                           cache=root / "cache")
        start = time.perf_counter()
        trainer = Trainer.setup(model_cfg, cfg, paths, device=device)
        setup_s = time.perf_counter() - start
        loader, rt = trainer.loaders.train, trainer.rt
        per_epoch = len(loader) * args.batch_size

        def epoch(number: int, batches: Any = None) -> int:
            # charseg.train's own epoch (private: the benchmark times exactly what training runs)
            trainer.loaders.set_epoch(number)
            _train_epoch(trainer.model, loader if batches is None else batches, trainer.loss_fn,
                         trainer.optimization, rt, desc=f"epoch {number}")
            return per_epoch if batches is None else len(batches) * args.batch_size

        epoch(0)  # warm-up: cuDNN picks its kernels, the allocator fills up
        train = _timed(lambda: sum(epoch(n) for n in range(1, args.epochs + 1)), device)
        trainer.loaders.set_epoch(args.epochs + 1)
        loader_only = _timed(lambda: sum(len(images) for images, _ in loader), device)
        images, target = next(iter(loader))
        on_device = [(images.to(device), target.to(device))] * len(loader)
        gpu_only = _timed(lambda: epoch(args.epochs + 2, on_device), device)
    amp = rt.precision.amp_dtype
    how = (f"{args.train_model}, {args.img_size} px, batch {args.batch_size}, autocast {amp or 'off'}, "
           f"{rt.precision.memory_format}").replace("torch.", "")
    bound = "loader" if loader_only < gpu_only else "GPU"
    print(f"{args.train_model} on {device}: setup (cache of {args.frames} frames, model) {setup_s:.1f} s; training "
          f"{train:.1f} img/s, loader only {loader_only:.1f} img/s ({args.workers} workers), GPU only "
          f"{gpu_only:.1f} img/s: {bound}-bound")
    return [figure(f"{args.train_model} training images/s", train, "img/s",
                   f"{how}; charseg.train epoch, {args.epochs} epochs of {per_epoch} after a warm-up",
                   key="train_images_per_s"),
            figure("loader only", loader_only, "img/s", f"{args.workers} DataLoader workers, augmentation on the CPU"),
            figure("GPU only", gpu_only, "img/s", "the same epoch on one batch already on the device"),
            figure("bound", bound, note=f"the slower of loader only and GPU only; training at "
                                        f"{train / min(loader_only, gpu_only):.0%} of it")]


def main() -> None:
    params = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
    defaults = params.train
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=64, help="synthetic frames in the data-path test")
    parser.add_argument("--frame-size", default="1280x720", help="full frame size, WIDTHxHEIGHT")
    parser.add_argument("--img-size", type=int, default=defaults.img_size)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for both loaders")
    parser.add_argument("--epochs", type=int, default=2, help="loader-only passes over the frames")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per measurement")
    parser.add_argument("--train-model", default="pspnet", help="model of params.yaml for the data-path run")
    parser.add_argument("--models", default=",".join(params.model_names), help="models to time, comma-separated")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch default")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--quick", action="store_true",
                        help="only the training loop's rate with AMP, the loader and the GPU alone (GPU mode)")
    parser.add_argument("--json", help="with --quick: also write the figures to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    width, height = (int(v) for v in args.frame_size.lower().split("x"))
    if args.quick:
        figures = trainer_rates(args, params, device, width, height)
        if args.json:
            write_figures(args.json, figures)
        return
    print(f"device {device}, torch threads {torch.get_num_threads()}, img_size {args.img_size}, "
          f"batch_size {args.batch_size}, workers {args.workers}")

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        frames, masks = FramesDir(root / "frames"), MasksDir(root / "masks")
        ids = make_frames(frames, masks, args.frames, width, height)
        train_cfg = params.model_config(args.train_model).params
        mean, std = models.normalization({**train_cfg, "encoder_weights": None})
        augment = Augment(defaults.augment)
        seed_set = SeedDataset(ids, frames, masks, args.img_size, augment, mean, std)
        start = time.perf_counter()
        cached = cache_pairs(ids, frames, masks, args.img_size, root / "cache", progress=False)
        cold = time.perf_counter() - start
        ours_set = PairDataset(cached, augment, seed=0)
        print(f"\n1. data path, {args.frames} frames of {width}x{height} -> {args.img_size}px")
        print(f"   cold cache build (once per img_size, ever): {cold:.2f} s = {args.frames / cold:.1f} frames/s")

        def loader(dataset: Dataset) -> DataLoader:
            return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                              drop_last=True)

        seed_rate = loader_rate(loader(seed_set), args.epochs)
        ours_rate = loader_rate(loader(ours_set), args.epochs)
        print(f"   loader only: seed {seed_rate:8.1f} img/s | charseg {ours_rate:8.1f} img/s | "
              f"x{ours_rate / seed_rate:.1f}")
        torch.manual_seed(0)
        model = models.build_model({**train_cfg, "encoder_weights": None}).to(device)
        seed_train = train_rate(loader(seed_set), model, device, mean, std, args.steps)
        ours_train = train_rate(loader(ours_set), model, device, mean, std, args.steps)
        print(f"   training ({args.train_model}): seed {seed_train:6.2f} img/s | charseg {ours_train:6.2f} img/s | "
              f"x{ours_train / seed_train:.2f}")

    print(f"\n2. train step time per model ({device}, {args.img_size}px, batch {args.batch_size}, "
          f"median of {args.steps})")
    for name in args.models.split(","):
        seconds = step_time(params.model_config(name).params, args.img_size, args.batch_size, device, args.steps)
        print(f"   {name:10s} {seconds:7.3f} s/step  {args.batch_size / seconds:7.2f} img/s")


if __name__ == "__main__":
    main()
