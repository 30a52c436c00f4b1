"""Train one model of params.yaml `models:` on the split: `python -m stages.train <name>` (stage train@<name>).

Dice loss, AdamW with warm-up + cosine schedule, train-side augmentation, validation Dice over the
whole validation set each epoch; the best epoch by that Dice is `models/<name>/best.pt`. dvclive logs
the curves to `dvclive/<name>/` (no dvc.yaml of its own: the root dvc.yaml declares them).

Resume: DVC deletes a stage's outputs before running it, so the resume state (last finished epoch,
optimizer, scheduler, scaler, RNG, history, and the best weights so far) lives outside them, in
`<cache>/train/<name>/`, tagged with a fingerprint of everything that shapes the run (params, split,
frame and mask contents, process count). A rerun with the same fingerprint continues after the last
finished epoch, and its history is identical to an uninterrupted run's; any other fingerprint starts
afresh. The state is deleted once training finishes (DVC's run cache takes over from there).

Several GPUs: `torchrun --nproc_per_node=N -m stages.train <name>` (DDP; gloo on CPU, NCCL on GPU);
only rank 0 writes files. batch_size is per process.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as torch_dist
from segmentation_models_pytorch.losses import DiceLoss
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from charseg import metrics, models
from charseg.data import (Augment, PairDataset, cache_pairs, has_foreground, loader_worker_init, normalize,
                        read_split)
from charseg.errors import CharsegError, require, run_cli
from charseg.io import write_bytes_atomic
from charseg.config import load_params, number, section

STATE_FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    """The shared training params (top-level keys and the `train:` section of params.yaml)."""
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    img_size: int
    seed: int
    warmup_epochs: float
    min_lr_ratio: float
    patience: int
    workers: int
    amp: bool
    augment: Augment


def read_config(params: dict[str, Any]) -> TrainConfig:
    train = section(params, "train")
    augment = train.get("augment")
    require(isinstance(augment, dict), "params.yaml has no 'train.augment:' section (hflip, scale, shift, color)")
    require(isinstance(train.get("amp"), bool), "params.yaml: 'train.amp' must be true or false")
    return TrainConfig(
        lr=number(params, "lr", lo=0, lo_open=True),  # the same ranges as params.SCHEMA
        weight_decay=number(params, "weight_decay", lo=0),
        epochs=number(params, "epochs", lo=1, integer=True),
        # BatchNorm after global pooling (PSPNet, DeepLabV3) cannot train on a batch of one.
        batch_size=number(params, "batch_size", lo=2, integer=True),
        img_size=number(params, "img_size", lo=32, integer=True),
        seed=number(params, "seed", lo=0, integer=True),
        warmup_epochs=number(train, "warmup_epochs", lo=0, where="train"),
        min_lr_ratio=number(train, "min_lr_ratio", lo=0, hi=1, where="train"),
        patience=number(train, "patience", lo=0, integer=True, where="train"),
        workers=number(train, "workers", lo=0, integer=True, where="train"),
        amp=train["amp"],
        augment=Augment(hflip=number(augment, "hflip", lo=0, hi=1, where="train.augment"),
                        scale=number(augment, "scale", lo=0, hi=0.9, where="train.augment"),
                        shift=number(augment, "shift", lo=0, hi=0.5, where="train.augment"),
                        color=number(augment, "color", lo=0, hi=1, where="train.augment")),
    )


def model_config(params: dict[str, Any], name: str) -> dict[str, Any]:
    """The models.<name> cfg; an unknown name lists the valid ones."""
    known = section(params, "models")
    if name not in known:
        raise CharsegError(f"unknown model '{name}': params.yaml 'models:' defines {', '.join(known)}; "
                           f"run python -m stages.train <one of them>")
    require(isinstance(known[name], dict), f"params.yaml: models.{name} must be a mapping (arch, encoder, ...)")
    return known[name]


@dataclass(frozen=True)
class Processes:
    """This process's place among the torchrun processes (one process: rank 0 of 1)."""
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch_dist.all_reduce(tensor)
        return tensor

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's BatchNorm statistics everywhere: DDP broadcasts them at the start of each forward, so
        after the last training step the other ranks lag one update behind the weights rank 0 saves."""
        if self.world_size > 1:
            for buffer in model.buffers():
                torch_dist.broadcast(buffer, src=0)


def _start_processes(device: str) -> tuple[Processes, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if world_size == 1:
        return Processes(), torch.device(("cuda" if use_cuda else "cpu") if device == "auto" else device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    torch_dist.init_process_group("nccl" if use_cuda else "gloo")
    return (Processes(torch_dist.get_rank(), world_size),
            torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def dice_loss() -> torch.nn.Module:
    return DiceLoss(mode="binary", from_logits=True)


def _lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _fingerprint(name: str, model_cfg: dict[str, Any], cfg: TrainConfig, world_size: int,
                 train_files: list[Path], val_files: list[Path]) -> str:
    run = {"format": STATE_FORMAT, "name": name, "model": model_cfg, "train": dataclasses.asdict(cfg),
           "world_size": world_size, "train_pairs": [p.stem for p in train_files],
           "val_pairs": [p.stem for p in val_files]}
    return hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()


def _torch_save(path: Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def _log_epoch(live: Any, entry: dict[str, float], best: dict[str, float]) -> None:
    live.step = entry["epoch"]
    for key in ("train/loss", "val/loss", "val/dice", "lr"):
        live.log_metric(key, entry[key])
    # dvc exp show / metrics diff compare runs by their best epoch, not whatever came last.
    live.summary = {"best_val_dice": best["val/dice"], "best_epoch": best["epoch"],
                    "val_loss": best["val/loss"], "train_loss": best["train/loss"]}
    live.next_step()


def _open_live(live_dir: Path, history: list[dict[str, float]]) -> Any:
    """A fresh dvclive directory holding the epochs of `history` (a resumed run's finished epochs)."""
    from dvclive import Live  # imports DVC: only the process that logs pays for it

    # dvcyaml=None: dvclive must not rewrite the root dvc.yaml (that declares these files itself);
    # save_dvc_exp=False: a plain `python -m stages.train` must not create DVC experiments.
    live = Live(str(live_dir), dvcyaml=None, save_dvc_exp=False)
    best = None
    for entry in history:
        if best is None or entry["val/dice"] > best["val/dice"]:
            best = entry
        _log_epoch(live, entry, best)
    return live


@dataclass(frozen=True)
class Runtime:
    """Where and how batches run: processes, device, mixed precision, and the encoder's normalisation."""
    procs: Processes
    device: torch.device
    amp_dtype: torch.dtype | None
    mean: list[float]
    std: list[float]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.device.type == "cuda" else torch.contiguous_format

    def batch(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 loader output -> (normalised model input, float target) on the device."""
        images = images.to(self.device, non_blocking=True)
        inputs = normalize(images, self.mean, self.std).contiguous(memory_format=self.memory_format)
        return inputs, masks.to(self.device, non_blocking=True).float()

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def weighted(self, value: torch.Tensor, weight: int) -> torch.Tensor:
        """[value * weight, weight]: summed over batches and processes, the two give a frame-weighted mean."""
        return torch.stack([value.detach().double() * weight,
                            torch.tensor(weight, dtype=torch.float64, device=self.device)])


@dataclass(frozen=True)
class Optimization:
    """AdamW, its learning-rate schedule (stepped per batch) and the fp16 loss scaler (off otherwise)."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {part: getattr(self, part).state_dict() for part in ("optimizer", "scheduler", "scaler")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for part, part_state in state.items():
            getattr(self, part).load_state_dict(part_state)


def _optimization(model: torch.nn.Module, model_cfg: dict[str, Any], cfg: TrainConfig, steps_per_epoch: int,
                  amp_dtype: torch.dtype | None) -> Optimization:
    optimizer = torch.optim.AdamW(models.param_groups(model, model_cfg, cfg.lr, cfg.weight_decay))
    warmup_steps, total_steps = round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, warmup_steps, total_steps, cfg.min_lr_ratio))
    return Optimization(optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16))


def _resume_state(model: torch.nn.Module, opt: Optimization, fingerprint: str, history: list[dict[str, float]],
                  best: dict[str, float], device: torch.device) -> dict[str, Any]:
    # Only torch generators need saving: augmentation draws from (seed, epoch, index), not global state.
    return {"fingerprint": fingerprint, "model": model.state_dict(), "optimization": opt.state_dict(),
            "history": history, "best": best,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}}


def _resume(state: dict[str, Any], model: torch.nn.Module, opt: Optimization,
            device: torch.device) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Load a _resume_state into model and optimization; returns (history, best)."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimization"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if device.type == "cuda" and state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    return state["history"], state["best"]


class _Diverged(Exception):
    def __init__(self, batch: int, loss: float) -> None:
        super().__init__(f"loss {loss} at batch {batch}")
        self.batch, self.loss = batch, loss


def _train_epoch(model: torch.nn.Module, loader: DataLoader, loss_fn: torch.nn.Module, opt: Optimization,
                 rt: Runtime, desc: str) -> float:
    """One pass over the training side; the mean loss. Raises _Diverged before a non-finite loss is applied."""
    model.train()
    loss_sum = torch.zeros(2, dtype=torch.float64, device=rt.device)
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not rt.procs.is_main)
    for batch, (images, masks) in enumerate(bar, start=1):
        inputs, target = rt.batch(images, masks)
        with rt.autocast():
            logits = model(inputs)
        loss = loss_fn(logits.float(), target)
        # Summed over processes (which all run the same number of batches), so a NaN anywhere stops them all.
        step_sum = rt.procs.sum(rt.weighted(loss, len(inputs)))
        if not torch.isfinite(step_sum[0]):
            raise _Diverged(batch, step_sum[0].item())
        opt.step(loss)
        loss_sum += step_sum
        bar.set_postfix(loss=f"{loss_sum[0].item() / loss_sum[1].item():.4f}")
    return loss_sum[0].item() / loss_sum[1].item()


@torch.no_grad()
def _validate(model: torch.nn.Module, loader: DataLoader, loss_fn: torch.nn.Module,
              rt: Runtime) -> tuple[float, float]:
    """(loss, Dice) over the whole validation set: pixel counts summed over every batch and process."""
    model.eval()
    loss_sum = torch.zeros(2, dtype=torch.float64, device=rt.device)
    counts = metrics.Counts.zero()
    for images, masks in loader:
        inputs, target = rt.batch(images, masks)
        with rt.autocast():
            logits = model(inputs).float()
        loss_sum += rt.weighted(loss_fn(logits, target), len(inputs))
        counts += metrics.confusion(torch.sigmoid(logits) > models.THRESHOLD, target.bool())
    # Summed once at the end: validation shards may differ by a batch between processes.
    loss_sum = rt.procs.sum(loss_sum)
    totals = rt.procs.sum(torch.tensor([counts.tp, counts.fp, counts.fn, counts.tn], dtype=torch.int64,
                                       device=rt.device))
    return (loss_sum[0] / loss_sum[1]).item(), metrics.dice(metrics.Counts(*totals.cpu().numpy()))


def train_model(name: str, model_cfg: dict[str, Any], cfg: TrainConfig, *, split: Path, frames_dir: Path,
                masks_dir: Path, out_dir: Path, live_dir: Path, cache_dir: Path, device: str = "auto",
                after_epoch: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
    """Train and write out_dir/best.pt; returns the best epoch's entry (epoch, losses, Dice, lr).

    after_epoch(entry) runs on every process once an epoch's state is saved (progress hooks, tests).
    """
    procs, torch_device = _start_processes(device)
    try:
        return _train(name, model_cfg, cfg, procs, torch_device, split=split, frames_dir=frames_dir,
                      masks_dir=masks_dir, out_dir=out_dir, live_dir=live_dir, cache_dir=cache_dir,
                      after_epoch=after_epoch)
    finally:
        if procs.world_size > 1:
            torch_dist.destroy_process_group()


def _cached_sides(split: Path, frames_dir: Path, masks_dir: Path, img_size: int, cache_dir: Path,
                  procs: Processes) -> tuple[list[Path], list[Path]]:
    """Cache files of the train and val sides, checked for the problems training cannot survive."""
    sides = dict(zip(("train", "val"), read_split(split)))
    require(len(sides["train"]) >= 2 * procs.world_size,
            f"{split} has {len(sides['train'])} training frame(s): at least 2 per process are needed")
    files = {}
    for side, ids in sides.items():
        if procs.world_size > 1:  # each process decodes its share of a cold cache first
            cache_pairs(ids[procs.rank::procs.world_size], frames_dir, masks_dir, img_size, cache_dir,
                        progress=procs.is_main)
            procs.barrier()
        files[side] = cache_pairs(ids, frames_dir, masks_dir, img_size, cache_dir, progress=procs.is_main)
        require(has_foreground(files[side]), f"every mask on the '{side}' side of {split} is empty: there is "
                                             f"nothing to segment. Check the masks stage (data/masks/manifest.csv)")
    return files["train"], files["val"]


def _train(name: str, model_cfg: dict[str, Any], cfg: TrainConfig, procs: Processes, device: torch.device, *,
           split: Path, frames_dir: Path, masks_dir: Path, out_dir: Path, live_dir: Path, cache_dir: Path,
           after_epoch: Callable[[dict[str, float]], None] | None) -> dict[str, float]:
    models.check_img_size(model_cfg, cfg.img_size, name=name)
    train_files, val_files = _cached_sides(split, frames_dir, masks_dir, cfg.img_size, cache_dir, procs)
    mean, std = models.normalization(model_cfg, name=name)
    amp_dtype = None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest conv algorithms once
        if cfg.amp:
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    rt = Runtime(procs, device, amp_dtype, mean, std)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = models.build_model(model_cfg, name=name).to(device, memory_format=rt.memory_format)
    train_set = PairDataset(train_files, cfg.augment, seed=cfg.seed)
    # Shuffled by (seed, epoch) and split across processes; a single process is rank 0 of 1.
    sampler = DistributedSampler(train_set, num_replicas=procs.world_size, rank=procs.rank, seed=cfg.seed)
    loader_args = {"num_workers": cfg.workers, "pin_memory": device.type == "cuda",
                   "worker_init_fn": loader_worker_init}
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                              drop_last=len(sampler) >= cfg.batch_size, **loader_args)
    # Validation shards are disjoint and unpadded, so the summed counts cover each frame exactly once.
    val_loader = DataLoader(PairDataset(val_files), batch_size=cfg.batch_size,
                            sampler=range(procs.rank, len(val_files), procs.world_size), **loader_args)
    opt = _optimization(model, model_cfg, cfg, len(train_loader), amp_dtype)

    state_dir = Path(cache_dir) / "train" / name
    state_file, best_file, out_file = state_dir / "last.pt", state_dir / "best.pt", Path(out_dir) / "best.pt"
    fingerprint = _fingerprint(name, model_cfg, cfg, procs.world_size, train_files, val_files)
    history: list[dict[str, float]] = []
    best: dict[str, float] = {"val/dice": -1.0, "epoch": 0}
    state = torch.load(state_file, map_location=device, weights_only=True) if state_file.is_file() else None
    if state is not None and state["fingerprint"] == fingerprint and best_file.is_file():
        history, best = _resume(state, model, opt, device)
        if procs.is_main:
            write_bytes_atomic(out_file, best_file.read_bytes())
            tqdm.write(f"{name}: resuming after epoch {history[-1]['epoch']} from {state_file}")
    elif state is not None and procs.is_main:
        tqdm.write(f"{name}: {state_file} belongs to other params or data: starting afresh")

    live = _open_live(live_dir, history) if procs.is_main else None

    trained = DistributedDataParallel(model) if procs.world_size > 1 else model
    loss_fn = dice_loss()
    for epoch in range(history[-1]["epoch"] + 1 if history else 1, cfg.epochs + 1):
        if cfg.patience and epoch - best["epoch"] > cfg.patience:
            if procs.is_main:
                tqdm.write(f"{name}: early stop, no better val Dice for {cfg.patience} epochs")
            break
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        try:
            train_loss = _train_epoch(trained, train_loader, loss_fn, opt, rt,
                                      desc=f"{name} epoch {epoch}/{cfg.epochs}")
        except _Diverged as err:
            kept = (f"the best checkpoint so far (epoch {best['epoch']}, val Dice {best['val/dice']:.4f}) is "
                    f"kept in {out_file}" if best["epoch"] else "no epoch finished, so no checkpoint was written")
            raise CharsegError(f"{name}: the training loss became {err.loss} at epoch {epoch}, batch {err.batch}: "
                               f"training diverged. Lower lr (dvc exp run -S lr=...) or set train.amp: false; "
                               f"{kept}") from None
        procs.sync_buffers(model)
        val_loss, val_dice = _validate(model, val_loader, loss_fn, rt)
        entry = {"epoch": epoch, "train/loss": train_loss, "val/loss": val_loss, "val/dice": val_dice,
                 "lr": max(opt.scheduler.get_last_lr())}
        history.append(entry)
        if val_dice > best["val/dice"]:
            best = entry
            if procs.is_main:
                models.save_checkpoint(best_file, model, model_name=name, cfg=model_cfg, img_size=cfg.img_size,
                                       mean=mean, std=std, epoch=epoch, val_dice=val_dice, val_loss=val_loss,
                                       train_params=dataclasses.asdict(cfg))
                write_bytes_atomic(out_file, best_file.read_bytes())
        if procs.is_main:
            _torch_save(state_file, _resume_state(model, opt, fingerprint, history, best, device))
            _log_epoch(live, entry, best)
            tqdm.write(f"{name} epoch {epoch}/{cfg.epochs}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                       f"val Dice {val_dice:.4f} (best {best['val/dice']:.4f} at epoch {best['epoch']}), "
                       f"lr {entry['lr']:.2e}")
        procs.barrier()
        if after_epoch is not None:
            after_epoch(entry)

    if procs.is_main:
        live.end()
        shutil.rmtree(state_dir)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model name of params.yaml 'models:'")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--split", default="data/split.json")
    parser.add_argument("--frames", default="data/frames/images")
    parser.add_argument("--masks", default="data/masks/images")
    parser.add_argument("--out", default="models", help="writes <out>/<model>/best.pt")
    parser.add_argument("--live", default="dvclive", help="dvclive logs go to <live>/<model>/")
    parser.add_argument("--cache", default=".cache",
                        help="pre-resized frames and resume state; outside DVC outputs, safe to delete")
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:1")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    model_cfg = model_config(params, args.model)
    cfg = read_config(params)
    try:
        train_model(args.model, model_cfg, cfg, split=Path(args.split), frames_dir=Path(args.frames),
                    masks_dir=Path(args.masks), out_dir=Path(args.out) / args.model,
                    live_dir=Path(args.live) / args.model, cache_dir=Path(args.cache), device=args.device)
    except KeyboardInterrupt:  # unlike other stages, training keeps something: say what and how to use it
        state = Path(args.cache) / "train" / args.model / "last.pt"
        print(f"interrupted: the last finished epoch is kept in {state}; run the same command (or dvc exp run "
              f"with the same params) to resume from it" if state.is_file() else
              "interrupted before an epoch finished: nothing to resume", file=sys.stderr)
        sys.exit(130)

