"""Train one model of params.yaml `models:` on the split: what stage train@<name> runs (stages/train.py).

The `task` param picks what is learnt (charseg.task). person: Dice loss on the masks stage's masks, the best
epoch by validation Dice over the whole validation set. characters: the identity stage's class maps, classes
from its classes.json, multi-class Dice + cross entropy weighted by the training side's class frequencies
(task.class_weights), the best epoch by validation mIoU over the named characters (background and `other`
left out) from one confusion matrix of the whole validation set; val/person_dice (every person class merged
against background) is logged beside it. Both: AdamW with warm-up + cosine schedule, train-side augmentation;
the best epoch is `<models>/<name>/best.pt`. dvclive logs the curves to `<live>/<name>/` (no dvc.yaml of its
own: the root dvc.yaml declares them).

A run is a `Trainer` in seams that `train_model` calls in order, and that tests and tools can drive one by
one: `Trainer.setup` (sizes check, pair cache, normalisation, precision, seeding, model, loaders,
optimisation) -> `resume_or_start` (fingerprint, resume state, history and best) -> for each of
`remaining_epochs()`: `fit_epoch` (train, validate, divergence check; returns the history entry) then `save`
(best checkpoint, resume state, dvclive) -> `finish`.

Resume: DVC deletes a stage's outputs before running it, so the resume state (last finished epoch,
optimizer, scheduler, scaler, RNG, history, and the best weights so far) lives outside them, in
`<cache>/train/<name>/`, tagged with a fingerprint of everything that shapes the run (params, split,
frame and mask contents, process count, task and classes). A rerun with the same fingerprint continues after the last
finished epoch, and its history is identical to an uninterrupted run's; any other fingerprint starts
afresh. The state is deleted once training finishes (DVC's run cache takes over from there).

Several GPUs: `torchrun --nproc_per_node=N -m stages.train <name>` (DDP; gloo on CPU, NCCL on GPU);
only rank 0 writes files. batch_size is per process.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from charseg import metrics, models
from charseg.config import ModelConfig, TrainConfig
from charseg.data import (Augment, PairDataset, cache_pairs, class_pixels, has_foreground, loader_worker_init,
                          normalize, read_split)
from charseg.device import Precision, select_device, wants_cuda
from charseg.errors import CharsegError, require, warn
from charseg.io import write_bytes_atomic
from charseg.layout import PROJECT, FramesDir, IdentityDir, MasksDir, ResumeFiles, checkpoint_in, train_state_in
from charseg.task import CHARACTERS, PERSON, Task, class_map, class_weights, person_task, read_classes
from charseg.task import loss as task_loss

STATE_FORMAT = 1
# One epoch of the history: epoch, train/loss, val/loss, lr and the task's validation scores (VAL_SCORES).
Entry = dict[str, float]
# The validation scores each task logs; the first one picks the best epoch. (key, what a person reads)
VAL_SCORES = {PERSON: (("val/dice", "val Dice"),),
              CHARACTERS: (("val/miou", "val mIoU"), ("val/person_dice", "val person Dice"))}


def best_key(task: Task) -> str:
    """The history key whose highest value picks the best epoch: val/dice (person), val/miou (characters)."""
    return VAL_SCORES[task.name][0][0]


@dataclass(frozen=True)
class TrainPaths:
    """What a training run reads (the split, frames and masks stage folders; the identity stage folder in the
    characters task) and the folders it writes to."""
    split: Path
    frames: FramesDir
    masks: MasksDir
    identity: IdentityDir = PROJECT.identity  # class maps and classes.json (characters task)
    models: Path = PROJECT.models  # <models>/<name>/best.pt
    live: Path = PROJECT.live      # dvclive logs in <live>/<name>/
    cache: Path = PROJECT.cache    # pre-resized pairs, and the resume state in <cache>/train/<name>/

    def checkpoint(self, name: str) -> Path:
        return checkpoint_in(self.models, name)

    def live_dir(self, name: str) -> Path:
        return self.live / name

    def resume(self, name: str) -> ResumeFiles:
        return train_state_in(self.cache, name)


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

    def close(self) -> None:
        if self.world_size > 1:
            torch_dist.destroy_process_group()


def start_processes(device: str) -> tuple[Processes, torch.device]:
    """This process's rank and device: one process on the `--device`, or under torchrun one per GPU (NCCL)
    or per CPU process (gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(), select_device(device)
    use_cuda = wants_cuda(device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    torch_dist.init_process_group("nccl" if use_cuda else "gloo")
    return (Processes(torch_dist.get_rank(), world_size),
            torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def dice_loss() -> torch.nn.Module:
    """The person task's loss (task.loss(person_task()))."""
    return task_loss(person_task())


def _lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _fingerprint(name: str, model_cfg: dict[str, Any], cfg: TrainConfig, world_size: int,
                 train_files: list[Path], val_files: list[Path], task: Task) -> str:
    run = {"format": STATE_FORMAT, "name": name, "model": model_cfg, "train": dataclasses.asdict(cfg),
           "task": task.name, "classes": list(task.classes),
           "world_size": world_size, "train_pairs": [p.stem for p in train_files],
           "val_pairs": [p.stem for p in val_files]}
    return hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()


def _torch_save(path: Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def _log_epoch(live: Any, entry: Entry, best: Entry, task: Task) -> None:
    live.step = entry["epoch"]
    scores = [key for key, _ in VAL_SCORES[task.name]]
    for key in ("train/loss", "val/loss", *scores, "lr"):
        live.log_metric(key, entry[key])
    # dvc exp show / metrics diff compare runs by their best epoch, not whatever came last.
    live.summary = {**{"best_" + key.replace("/", "_"): best[key] for key in scores}, "best_epoch": best["epoch"],
                    "val_loss": best["val/loss"], "train_loss": best["train/loss"]}
    live.next_step()


def _open_live(live_dir: Path, history: list[Entry], task: Task) -> Any:
    """A fresh dvclive directory holding the epochs of `history` (a resumed run's finished epochs)."""
    from dvclive import Live  # imports DVC: only the process that logs pays for it

    # dvcyaml=None: dvclive must not rewrite the root dvc.yaml (that declares these files itself);
    # save_dvc_exp=False: a plain `python -m stages.train` must not create DVC experiments.
    live = Live(str(live_dir), dvcyaml=None, save_dvc_exp=False)
    best, key = None, best_key(task)
    for entry in history:
        if best is None or entry[key] > best[key]:
            best = entry
        _log_epoch(live, entry, best, task)
    return live


@dataclass(frozen=True)
class Runtime:
    """Where and how batches run: processes, device precision, and the encoder's normalisation."""
    procs: Processes
    precision: Precision
    mean: list[float]
    std: list[float]
    class_ids: bool = False  # targets are class ids (characters task), not 0/1 masks

    @property
    def device(self) -> torch.device:
        return self.precision.device

    def batch(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 loader output -> (normalised model input, target) on the device: a float (B, 1, H, W) 0/1 mask,
        or int64 (B, H, W) class ids."""
        images = images.to(self.device, non_blocking=True)
        inputs = normalize(images, self.mean, self.std).contiguous(memory_format=self.precision.memory_format)
        masks = masks.to(self.device, non_blocking=True)
        return inputs, masks[:, 0].long() if self.class_ids else masks.float()

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


def _optimization(model: torch.nn.Module, model_cfg: ModelConfig, cfg: TrainConfig, steps_per_epoch: int,
                  precision: Precision) -> Optimization:
    optimizer = torch.optim.AdamW(models.param_groups(model, model_cfg.params, cfg.lr, cfg.weight_decay,
                                                      name=model_cfg.name))
    warmup_steps, total_steps = round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, warmup_steps, total_steps, cfg.min_lr_ratio))
    return Optimization(optimizer, scheduler,
                        torch.amp.GradScaler("cuda", enabled=precision.amp_dtype == torch.float16))


@dataclass(frozen=True)
class Loaders:
    """The augmented, shuffled training side and the plain validation side, both split across processes."""
    train_set: PairDataset
    sampler: DistributedSampler
    train: DataLoader
    val: DataLoader

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)


def _loaders(train_files: list[Path], val_files: list[Path], cfg: TrainConfig, procs: Processes,
             device: torch.device) -> Loaders:
    train_set = PairDataset(train_files, Augment(cfg.augment), seed=cfg.seed)
    # Shuffled by (seed, epoch) and split across processes; a single process is rank 0 of 1.
    sampler = DistributedSampler(train_set, num_replicas=procs.world_size, rank=procs.rank, seed=cfg.seed)
    loader_args = {"num_workers": cfg.workers, "pin_memory": device.type == "cuda",
                   "worker_init_fn": loader_worker_init}
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                              drop_last=len(sampler) >= cfg.batch_size, **loader_args)
    # Validation shards are disjoint and unpadded, so the summed counts cover each frame exactly once.
    val_loader = DataLoader(PairDataset(val_files), batch_size=cfg.batch_size,
                            sampler=range(procs.rank, len(val_files), procs.world_size), **loader_args)
    return Loaders(train_set, sampler, train_loader, val_loader)


def _cached_sides(paths: TrainPaths, img_size: int, procs: Processes,
                  task: Task = person_task()) -> tuple[list[Path], list[Path]]:
    """Cache files of the train and val sides, checked for the problems training cannot survive."""
    sides = dict(zip(("train", "val"), read_split(paths.split)))
    require(len(sides["train"]) >= 2 * procs.world_size,
            f"{paths.split} has {len(sides['train'])} training frame(s): at least 2 per process are needed")
    class_ids = task.name == CHARACTERS
    labels = paths.identity if class_ids else paths.masks
    files = {}
    for side, ids in sides.items():
        if procs.world_size > 1:  # each process decodes its share of a cold cache first
            cache_pairs(ids[procs.rank::procs.world_size], paths.frames, labels, img_size, paths.cache,
                        progress=procs.is_main, class_ids=class_ids)
            procs.barrier()
        files[side] = cache_pairs(ids, paths.frames, labels, img_size, paths.cache, progress=procs.is_main,
                                  class_ids=class_ids)
        require(has_foreground(files[side]),
                f"every {'class map' if class_ids else 'mask'} on the '{side}' side of {paths.split} is "
                f"{'background' if class_ids else 'empty'}: there is nothing to segment. "
                f"Check the {'identity' if class_ids else 'masks'} stage ({labels.manifest})")
    return files["train"], files["val"]


def _class_weights(train_files: list[Path], val_files: list[Path], task: Task, paths: TrainPaths,
                   procs: Processes) -> torch.Tensor:
    """Cross-entropy class weights from the training side's pixels (task.class_weights); warns about a
    character the training side never shows, and stops when the validation side shows none (no mIoU)."""
    n_classes = len(task.classes)
    train_pixels, val_pixels = class_pixels(train_files, n_classes), class_pixels(val_files, n_classes)
    require(val_pixels[task.character_ids].any(),
            f"no frame on the 'val' side of {paths.split} shows a named character ({', '.join(task.characters)}): "
            f"the validation mIoU has nothing to score. Change split.seed or split.val_fraction in params.yaml, "
            f"or check the identity stage ({paths.identity.report})")
    unseen = [task.classes[i] for i in task.character_ids if not train_pixels[i]]
    if unseen and procs.is_main:
        warn(f"character(s) {', '.join(unseen)} have no pixel on the 'train' side of {paths.split}"
             f"{' (seen only in validation)' if val_pixels[[task.classes.index(c) for c in unseen]].any() else ''}: "
             f"the model cannot learn them and their validation IoU will be 0; training continues with the others")
    return class_weights(train_pixels)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _Diverged(Exception):
    def __init__(self, batch: int, loss: float) -> None:
        super().__init__(f"loss {loss} at batch {batch}")
        self.batch, self.loss = batch, loss


def _train_epoch(model: torch.nn.Module, loader: DataLoader, loss_fn: Callable[..., torch.Tensor],
                 opt: Optimization, rt: Runtime, desc: str) -> float:
    """One pass over the training side; the mean loss. Raises _Diverged before a non-finite loss is applied."""
    model.train()
    loss_sum = torch.zeros(2, dtype=torch.float64, device=rt.device)
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not rt.procs.is_main)
    for batch, (images, masks) in enumerate(bar, start=1):
        inputs, target = rt.batch(images, masks)
        with rt.precision.autocast():
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
def _validate(model: torch.nn.Module, loader: DataLoader, loss_fn: Callable[..., torch.Tensor],
              rt: Runtime) -> tuple[float, float]:
    """(loss, Dice) over the whole validation set: pixel counts summed over every batch and process."""
    model.eval()
    loss_sum = torch.zeros(2, dtype=torch.float64, device=rt.device)
    counts = metrics.Counts.zero()
    for images, masks in loader:
        inputs, target = rt.batch(images, masks)
        with rt.precision.autocast():
            logits = model(inputs).float()
        loss_sum += rt.weighted(loss_fn(logits, target), len(inputs))
        counts += metrics.confusion(torch.sigmoid(logits) > models.THRESHOLD, target.bool())
    # Summed once at the end: validation shards may differ by a batch between processes.
    loss_sum = rt.procs.sum(loss_sum)
    totals = rt.procs.sum(torch.tensor([counts.tp, counts.fp, counts.fn, counts.tn], dtype=torch.int64,
                                       device=rt.device))
    return (loss_sum[0] / loss_sum[1]).item(), metrics.dice(metrics.Counts(*totals.cpu().numpy()))


def person_counts(matrix: np.ndarray) -> metrics.Counts:
    """The binary person counts of a class confusion matrix: every class but background (0) merged."""
    return metrics.Counts(np.int64(matrix[1:, 1:].sum()), np.int64(matrix[0, 1:].sum()),
                          np.int64(matrix[1:, 0].sum()), np.int64(matrix[0, 0]))


@torch.no_grad()
def _validate_classes(model: torch.nn.Module, loader: DataLoader, loss_fn: Callable[..., torch.Tensor],
                      rt: Runtime, task: Task) -> Entry:
    """val/loss, val/miou (over the named characters) and val/person_dice of the whole validation set, from
    one class confusion matrix summed over every batch and process."""
    model.eval()
    loss_sum = torch.zeros(2, dtype=torch.float64, device=rt.device)
    n_classes = len(task.classes)
    matrix = torch.zeros((n_classes, n_classes), dtype=torch.int64, device=rt.device)
    for images, masks in loader:
        inputs, target = rt.batch(images, masks)
        with rt.precision.autocast():
            logits = model(inputs).float()
        loss_sum += rt.weighted(loss_fn(logits, target), len(inputs))
        matrix += torch.from_numpy(metrics.class_confusion(class_map(task, logits), target, n_classes)).to(rt.device)
    loss_sum = rt.procs.sum(loss_sum)
    matrix = rt.procs.sum(matrix).cpu().numpy()
    return {"val/loss": (loss_sum[0] / loss_sum[1]).item(), "val/miou": metrics.mean_iou(matrix, task.character_ids),
            "val/person_dice": float(metrics.dice(person_counts(matrix)))}


@dataclass
class Trainer:
    """One training run of one model; see the module docstring for the order of its seams.

    `loss_fn` is the training and validation loss (task.loss); `history` holds the saved epochs and `best` the
    best of them by the task's validation score, best_key(task) (epoch 0 until one is saved)."""
    model_cfg: ModelConfig
    cfg: TrainConfig
    paths: TrainPaths
    rt: Runtime
    model: torch.nn.Module
    loaders: Loaders
    optimization: Optimization
    fingerprint: str
    task: Task = field(default_factory=person_task)
    loss_fn: Callable[..., torch.Tensor] = field(default_factory=dice_loss)
    history: list[Entry] = field(default_factory=list)
    best: Entry | None = None                 # None: {best_key: -1, epoch: 0}, set on construction
    trained: torch.nn.Module | None = None  # the model, wrapped in DDP under torchrun
    live: Any = None                          # dvclive, on the main process

    def __post_init__(self) -> None:
        if self.best is None:
            self.best = {self.key: -1.0, "epoch": 0}

    @property
    def key(self) -> str:
        """The history key that picks the best epoch."""
        return best_key(self.task)

    def _score(self, entry: Entry) -> str:
        """The entry's validation scores, for a person to read: 'val mIoU 0.6123, val person Dice 0.9012'."""
        return ", ".join(f"{label} {entry[key]:.4f}" for key, label in VAL_SCORES[self.task.name])

    @classmethod
    def setup(cls, model_cfg: ModelConfig, cfg: TrainConfig, paths: TrainPaths, *, device: torch.device,
              procs: Processes = Processes(), task: str = PERSON) -> Trainer:
        """Checks, cached pairs, the model (seeded by cfg.seed), loaders and optimisation; writes nothing
        but the pair cache. task: the `task` param (characters: classes from <identity>/classes.json)."""
        name = model_cfg.name
        models.check_img_size(model_cfg.params, cfg.img_size, name=name)
        require(task in VAL_SCORES, f"task {task!r} is not one of {sorted(VAL_SCORES)}: set task in params.yaml")
        the_task = read_classes(paths.identity.classes) if task == CHARACTERS else person_task()
        train_files, val_files = _cached_sides(paths, cfg.img_size, procs, the_task)
        weights = _class_weights(train_files, val_files, the_task, paths, procs) if task == CHARACTERS else None
        mean, std = models.normalization(model_cfg.params, name=name)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest conv algorithms once
        rt = Runtime(procs, Precision.for_device(device, cfg.amp), mean, std, class_ids=task == CHARACTERS)
        _seed(cfg.seed)
        model = models.build_model(model_cfg.params, name=name, outputs=the_task.outputs).to(
            device, memory_format=rt.precision.memory_format)
        loaders = _loaders(train_files, val_files, cfg, procs, device)
        optimization = _optimization(model, model_cfg, cfg, len(loaders.train), rt.precision)
        fingerprint = _fingerprint(name, model_cfg.params, cfg, procs.world_size, train_files, val_files, the_task)
        return cls(model_cfg, cfg, paths, rt, model, loaders, optimization, fingerprint, the_task,
                   task_loss(the_task, weights))

    @property
    def name(self) -> str:
        return self.model_cfg.name

    def resume_or_start(self) -> None:
        """Continue after the last finished epoch of a resume state with this run's fingerprint, else start
        afresh; then open dvclive (holding the resumed epochs) and wrap the model for DDP."""
        files, procs = self.paths.resume(self.name), self.rt.procs
        state = torch.load(files.last, map_location=self.rt.device, weights_only=True) \
            if files.last.is_file() else None
        if state is not None and state["fingerprint"] == self.fingerprint and files.best.is_file():
            self._load_state(state)
            if procs.is_main:
                write_bytes_atomic(self.paths.checkpoint(self.name), files.best.read_bytes())
                tqdm.write(f"{self.name}: resuming after epoch {self.history[-1]['epoch']} from {files.last}")
        elif state is not None and procs.is_main:
            tqdm.write(f"{self.name}: {files.last} belongs to other params or data: starting afresh")
        self.live = _open_live(self.paths.live_dir(self.name), self.history, self.task) if procs.is_main else None
        self.trained = DistributedDataParallel(self.model) if procs.world_size > 1 else self.model

    def _state(self) -> dict[str, Any]:
        # Only torch generators need saving: augmentation draws from (seed, epoch, index), not global state.
        cuda = self.rt.device.type == "cuda"
        return {"fingerprint": self.fingerprint, "model": self.model.state_dict(),
                "optimization": self.optimization.state_dict(), "history": self.history, "best": self.best,
                "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if cuda else []}}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimization.load_state_dict(state["optimization"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if self.rt.device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        self.history, self.best = state["history"], state["best"]

    def remaining_epochs(self) -> Iterator[int]:
        """The epochs still to run, up to cfg.epochs; stops early after cfg.patience epochs without a better
        validation score (0: never). Reads `best` as `save` updates it."""
        for epoch in range(self.history[-1]["epoch"] + 1 if self.history else 1, self.cfg.epochs + 1):
            if self.cfg.patience and epoch - self.best["epoch"] > self.cfg.patience:
                if self.rt.procs.is_main:
                    label = VAL_SCORES[self.task.name][0][1]
                    tqdm.write(f"{self.name}: early stop, no better {label} for {self.cfg.patience} epochs")
                return
            yield epoch

    def fit_epoch(self, epoch: int) -> Entry:
        """Train one epoch and validate; the history entry (not yet saved). A non-finite training loss stops
        training with a CharsegError before it reaches the weights."""
        self.loaders.set_epoch(epoch)
        try:
            trained = self.model if self.trained is None else self.trained
            train_loss = _train_epoch(trained, self.loaders.train, self.loss_fn,
                                      self.optimization, self.rt, desc=f"{self.name} epoch {epoch}/{self.cfg.epochs}")
        except _Diverged as err:
            best = self.best
            kept = (f"the best checkpoint so far (epoch {best['epoch']}, {self._score(best)}) is kept "
                    f"in {self.paths.checkpoint(self.name)}" if best["epoch"] else
                    "no epoch finished, so no checkpoint was written")
            raise CharsegError(f"{self.name}: the training loss became {err.loss} at epoch {epoch}, batch "
                               f"{err.batch}: training diverged. Lower lr (dvc exp run -S lr=...) or set "
                               f"train.amp: false; {kept}") from None
        self.rt.procs.sync_buffers(self.model)
        if self.task.name == CHARACTERS:
            scores = _validate_classes(self.model, self.loaders.val, self.loss_fn, self.rt, self.task)
        else:
            val_loss, val_dice = _validate(self.model, self.loaders.val, self.loss_fn, self.rt)
            scores = {"val/loss": val_loss, "val/dice": val_dice}
        return {"epoch": epoch, "train/loss": train_loss, **scores, "lr": max(self.optimization.scheduler.get_last_lr())}

    def save(self, entry: Entry) -> None:
        """Add the epoch to the history; on the main process write the checkpoint if it is the best so far,
        the resume state and the dvclive step. Every process waits for that."""
        self.history.append(entry)
        procs, files, out_file = self.rt.procs, self.paths.resume(self.name), self.paths.checkpoint(self.name)
        if entry[self.key] > self.best[self.key]:
            self.best = entry
            if procs.is_main:
                # val_dice: the binary person Dice in either task (characters: every person class merged).
                scores = {"val_miou": entry["val/miou"]} if self.task.name == CHARACTERS else {}
                models.save_checkpoint(files.best, self.model, model_name=self.name, cfg=self.model_cfg.params,
                                       img_size=self.cfg.img_size, mean=self.rt.mean, std=self.rt.std,
                                       epoch=entry["epoch"], val_dice=entry.get("val/dice", entry.get("val/person_dice")),
                                       task=self.task, val_loss=entry["val/loss"], **scores,
                                       train_params=dataclasses.asdict(self.cfg))
                write_bytes_atomic(out_file, files.best.read_bytes())
        if procs.is_main:
            _torch_save(files.last, self._state())
            _log_epoch(self.live, entry, self.best, self.task)
            best = self.best
            tqdm.write(f"{self.name} epoch {entry['epoch']}/{self.cfg.epochs}: train loss {entry['train/loss']:.4f}, "
                       f"val loss {entry['val/loss']:.4f}, {self._score(entry)} (best "
                       f"{best[self.key]:.4f} at epoch {best['epoch']}), lr {entry['lr']:.2e}")
        procs.barrier()

    def finish(self) -> Entry:
        """Close dvclive and drop the resume state (DVC's run cache takes over); the best epoch's entry."""
        if self.rt.procs.is_main:
            self.live.end()
            shutil.rmtree(self.paths.resume(self.name).root)
            tqdm.write(f"{self.name}: best {self._score(self.best)} at epoch {self.best['epoch']} "
                       f"-> {self.paths.checkpoint(self.name)}")
        return self.best


def train_model(model_cfg: ModelConfig, cfg: TrainConfig, paths: TrainPaths, *, device: str = "auto",
                task: str = PERSON) -> Entry:
    """Train and write <models>/<name>/best.pt; returns the best epoch's entry (epoch, losses, the task's
    validation scores, lr). task: the `task` param, person or characters."""
    procs, torch_device = start_processes(device)
    try:
        trainer = Trainer.setup(model_cfg, cfg, paths, device=torch_device, procs=procs, task=task)
        trainer.resume_or_start()
        for epoch in trainer.remaining_epochs():
            trainer.save(trainer.fit_epoch(epoch))
        return trainer.finish()
    finally:
        procs.close()
