"""Training-step time and size of every model in params.yaml `models:`.

One step = forward + Dice-style loss + backward + AdamW update on a random batch, at params.yaml's
img_size and batch_size unless overridden. Weights are random (`encoder_weights` ignored): speed does
not depend on them, and nothing is downloaded.

    python -m benchmarks.bench_models                      # params.yaml sizes, CPU
    python -m benchmarks.bench_models --img-size 128 --batch-size 2 --iters 2 --device cuda
    python -m benchmarks.bench_models --device cuda --amp --json figures.json   # the device check's GPU mode

--amp: autocast and channels-last as training runs them on a GPU (charseg.device.Precision; off on the CPU).
--json: the figures also go to a file for benchmarks/device_check.py.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from charseg import models
from charseg.config import load_config
from charseg.device import Precision, select_device

from benchmarks.device_check import figure, write_figures


def step_times(model: torch.nn.Module, cfg: dict, batch_size: int, img_size: int, iters: int, warmup: int,
               precision: Precision) -> list[float]:
    device = precision.device
    model.to(memory_format=precision.memory_format)
    optimizer = torch.optim.AdamW(models.param_groups(model, cfg, lr=1e-4, weight_decay=1e-4))
    images = torch.randn(batch_size, 3, img_size, img_size, device=device).contiguous(
        memory_format=precision.memory_format)
    masks = (torch.rand(batch_size, 1, img_size, img_size, device=device) > 0.5).float()
    model.train()
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with precision.autocast():
            logits = model(images)
        probs = torch.sigmoid(logits.float())
        loss = 1 - 2 * (probs * masks).sum() / (probs.sum() + masks.sum() + 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--img-size", type=int, help="default: params.yaml img_size")
    parser.add_argument("--batch-size", type=int, help="default: params.yaml batch_size")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:<index>")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--amp", action="store_true", help="autocast + channels-last on CUDA, as training")
    parser.add_argument("--json", help="also write the figures to this file (benchmarks/device_check.py)")
    args = parser.parse_args()

    params = load_config(args.params)
    img_size = args.img_size or params.train.img_size
    batch_size = args.batch_size or params.train.batch_size
    device = select_device(args.device)
    precision = Precision.for_device(device, args.amp)
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"train step (forward + backward + AdamW), batch {batch_size} x {img_size}px, {where}, "
          f"median of {args.iters} after {args.warmup} warm-up, autocast {precision.amp_dtype or 'off'}")
    figures = []
    print(f"{'model':<12} {'arch':<11} {'encoder':<26} {'params (M)':>10} {'enc (M)':>8} {'step (ms)':>10} {'img/s':>7}")
    for name, model_cfg in params.models().items():
        cfg = {**model_cfg.params, "encoder_weights": None}
        models.check_img_size(cfg, img_size, name=name)
        torch.manual_seed(0)
        model = models.build_model(cfg, name=name).to(device)
        total = sum(p.numel() for p in model.parameters()) / 1e6
        encoder = sum(p.numel() for p in model.encoder.parameters()) / 1e6
        median = statistics.median(step_times(model, cfg, batch_size, img_size, args.iters, args.warmup, precision))
        print(f"{name:<12} {cfg['arch']:<11} {cfg.get('encoder', '-'):<26} {total:>10.2f} {encoder:>8.2f} "
              f"{median * 1000:>10.0f} {batch_size / median:>7.1f}")
        figures.append(figure(f"{name} train step ({img_size} px, batch {batch_size})", median * 1000, "ms",
                              f"{batch_size / median:.1f} img/s; {cfg['arch']} {cfg.get('encoder', '-')}, "
                              f"{total:.1f} M params; autocast {precision.amp_dtype or 'off'}"))
        del model
    if args.json:
        write_figures(args.json, figures)


if __name__ == "__main__":
    main()
