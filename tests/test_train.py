"""Training: the data path, learning on exact synthetic masks, best-by-Dice checkpoints, resume after an
interruption, NaN handling, params overrides, bad input, and a 2-process torchrun run."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from charseg.config import AugmentConfig, ModelConfig, TrainConfig, load_config, load_params
from charseg.data import Augment, PairDataset, cache_pairs, normalize, read_pair, read_split, resize_pair
from charseg.errors import CharsegError
from charseg.layout import FramesDir, MasksDir
from charseg.metrics import confusion, dice
from charseg.models import load_checkpoint
from charseg.train import Trainer, dice_loss, train_model
from stages.train import main
from tests.conftest import REPO_ROOT
from train_helpers import train_config as config
from train_helpers import train_paths as paths

# PSPNet-resnet18 without pretrained weights: the smallest model of the registry (0.8 M parameters).
TINY_MODEL = {"arch": "pspnet", "encoder": "resnet18", "encoder_weights": None, "encoder_lr_mult": 1.0}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)  # dvclive looks for a DVC repo in the working directory: not ours
    yield
    torch.set_num_threads(threads)


def make_frames(root: Path, n_train: int, n_val: int, seed: int = 0, empty_masks: bool = False) -> Path:
    """Textured figures (exact masks) on textured backgrounds, 128x96 JPEG frames in a frames stage folder
    (root/frames), their masks in a masks stage folder (root/masks), and a split.json."""
    rng = np.random.default_rng(seed)
    width, height = 128, 96
    frames, masks = FramesDir(root / "frames"), MasksDir(root / "masks")
    frames.images.mkdir(parents=True)
    masks.images.mkdir(parents=True)
    ids = []
    for i in range(n_train + n_val):
        frame_id = f"alice--clip_{i % 3:02d}--{i:08d}"
        background = cv2.resize(rng.integers(0, 150, (height // 8, width // 8, 3), dtype=np.uint8), (width, height))
        background[..., 2] //= 3
        mask = np.zeros((height, width), np.uint8)
        if not empty_masks:
            x, y = int(rng.integers(width // 4, 3 * width // 4)), int(rng.integers(height // 3, 2 * height // 3))
            cv2.ellipse(mask, (x, y), (int(rng.integers(8, 20)), int(rng.integers(15, 30))), 0, 0, 360, 255, -1)
            cv2.circle(mask, (x, y - 30), int(rng.integers(5, 10)), 255, -1)
        figure = np.zeros_like(background)
        figure[..., 2] = rng.integers(150, 256, (height, width))
        figure[..., 1] = rng.integers(0, 120, (height, width))
        cv2.imwrite(str(frames.image(frame_id)), np.where(mask[..., None] > 0, figure, background))
        cv2.imwrite(str(masks.mask(frame_id)), mask)
        ids.append(frame_id)
    (root / "split.json").write_text(json.dumps({"train": ids[:n_train], "val": ids[n_train:]}))
    return root


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    return make_frames(tmp_path_factory.mktemp("frames"), n_train=32, n_val=8)


def tiny_model(name: str = "tiny") -> ModelConfig:
    return ModelConfig(name=name, arch="pspnet", encoder="resnet18", encoder_weights=None, encoder_lr_mult=1.0,
                       params=TINY_MODEL)


def train(data: Path, run: Path, cfg: TrainConfig, name: str = "tiny") -> dict:
    return train_model(tiny_model(name), cfg, paths(data, run), device="cpu")


def trainer(data: Path, run: Path, cfg: TrainConfig, name: str = "tiny") -> Trainer:
    """A single-process CPU run, resumed or started, for tests that drive the epochs one seam at a time."""
    started = Trainer.setup(tiny_model(name), cfg, paths(data, run), device=torch.device("cpu"))
    started.resume_or_start()
    return started


def curve(run: Path, metric: str, name: str = "tiny") -> list[list[str]]:
    lines = (run / "dvclive" / name / "plots" / "metrics" / f"{metric}.tsv").read_text().splitlines()
    return [line.split("\t") for line in lines[1:]]


# --- data path -------------------------------------------------------------------------------------

def test_pairs_are_matched_by_id_and_cached_by_content(tmp_path, frames):
    train_ids, val_ids = read_split(frames / "split.json")
    ids = list(reversed(train_ids[:6]))
    frames_dir, masks_dir = FramesDir(frames / "frames"), MasksDir(frames / "masks")
    files = cache_pairs(ids, frames_dir, masks_dir, 64, tmp_path / "cache")
    for frame_id, file in zip(ids, files):
        _, expected = resize_pair(*read_pair(frames_dir, masks_dir, frame_id), 64)
        assert np.array_equal(np.load(file)[..., 3], expected)
    cached = {p: p.stat().st_mtime_ns for p in files}
    assert cache_pairs(ids, frames_dir, masks_dir, 64, tmp_path / "cache") == files
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in cached.items())  # reused, not rewritten

    edited = MasksDir(tmp_path / "masks")
    shutil.copytree(frames / "masks", edited.root)
    cv2.imwrite(str(edited.mask(ids[0])), np.zeros((96, 128), np.uint8))
    again = cache_pairs(ids, frames_dir, edited, 64, tmp_path / "cache")
    assert again[0] != files[0] and again[1:] == files[1:]
    assert not np.load(again[0])[..., 3].any()


def test_augmentation_moves_frame_and_mask_together_and_is_reproducible(tmp_path, frames):
    train_ids, _ = read_split(frames / "split.json")
    files = cache_pairs(train_ids[:4], FramesDir(frames / "frames"), MasksDir(frames / "masks"), 64,
                        tmp_path / "cache")
    # A frame that *is* its mask: after a joint flip/zoom/shift the two must still coincide.
    for file in files:
        pair = np.load(file)
        pair[..., :3] = pair[..., 3:] * 255
        np.save(file, pair)
    augmented = PairDataset(files, Augment(AugmentConfig(hflip=0.5, scale=0.2, shift=0.1, color=0.0)), seed=3)
    changed = 0
    for index in range(len(files)):
        image, mask = augmented[index]
        agreement = ((image[0] > 127) == mask[0].bool()).float().mean().item()
        assert agreement > 0.97
        changed += not torch.equal(mask, torch.from_numpy(np.load(files[index])[None, ..., 3]))
        assert torch.equal(augmented[index][0], image)  # same (seed, epoch, index): same draw
    assert changed >= 3
    before = augmented[0][1]
    augmented.set_epoch(1)
    assert not torch.equal(augmented[0][1], before)

    plain = PairDataset(files)  # the validation side is never augmented
    assert torch.equal(plain[0][1][0], torch.from_numpy(np.load(files[0])[..., 3]))


def test_normalize_uses_the_encoder_statistics():
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(images, [0.5, 0.5, 0.5], [0.25, 0.5, 1.0])
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
    # Inference normalises numpy batches with the same function: float32 numpy out, the same numbers.
    as_numpy = normalize(images.numpy(), [0.5, 0.5, 0.5], [0.25, 0.5, 1.0])
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32
    np.testing.assert_array_equal(as_numpy, out.numpy())


# --- training ---------------------------------------------------------------------------------------

@pytest.mark.slow  # ~15 s on 2 CPU cores
def test_learns_synthetic_figures_within_40_steps(tmp_path, frames):
    # 32 training frames, batch 8: 4 optimizer steps per epoch, 10 epochs.
    best = train(frames, tmp_path, config(epochs=10))
    assert best["val/dice"] >= 0.8

    model, meta = load_checkpoint(tmp_path / "models" / "tiny" / "best.pt", expect_arch="pspnet")
    assert meta["epoch"] == best["epoch"] and meta["val_dice"] == pytest.approx(best["val/dice"])
    assert meta["img_size"] == 64 and meta["mean"] == pytest.approx([0.485, 0.456, 0.406])
    summary = json.loads((tmp_path / "dvclive" / "tiny" / "metrics.json").read_text())
    assert summary["best_val_dice"] == pytest.approx(best["val/dice"])
    assert summary["best_epoch"] == best["epoch"]
    assert [int(step) for step, _ in curve(tmp_path, "val/dice")] == list(range(1, 11))
    assert not (tmp_path / ".cache" / "train" / "tiny").exists()  # resume state dropped once finished


def test_checkpoint_is_the_best_epoch_not_the_last(tmp_path, frames):
    scripted = iter([0.3, 0.7, 0.5])
    weights_after = {}
    run = trainer(frames, tmp_path, config(epochs=3, batch_size=16))
    for epoch in run.remaining_epochs():
        run.save({**run.fit_epoch(epoch), "val/dice": next(scripted)})  # the real loss, a scripted Dice
        state = torch.load(tmp_path / ".cache" / "train" / "tiny" / "last.pt", weights_only=True)
        weights_after[epoch] = state["model"]
    run.finish()
    model, meta = load_checkpoint(tmp_path / "models" / "tiny" / "best.pt")
    assert meta["epoch"] == 2 and meta["val_dice"] == 0.7
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights_after[2][key]), key
    assert not all(torch.equal(v, weights_after[3][k]) for k, v in model.state_dict().items())
    summary = json.loads((tmp_path / "dvclive" / "tiny" / "metrics.json").read_text())
    assert (summary["best_val_dice"], summary["best_epoch"]) == (0.7, 2)
    assert [float(v) for _, v in curve(tmp_path, "val/dice")] == [0.3, 0.7, 0.5]


def test_early_stopping_after_patience_epochs(tmp_path, frames):
    scripted = iter([0.5, 0.6, 0.55, 0.58, 0.9])
    run = trainer(frames, tmp_path, config(epochs=5, batch_size=16, patience=2))
    for epoch in run.remaining_epochs():
        run.save({**run.fit_epoch(epoch), "val/loss": 0.5, "val/dice": next(scripted)})
    best = run.finish()
    assert (best["epoch"], best["val/dice"]) == (2, 0.6)
    assert len(curve(tmp_path, "val/dice")) == 4


def test_resume_after_interruption_continues_with_identical_history(tmp_path, frames):
    cfg = config(epochs=3, batch_size=16)
    train(frames, tmp_path / "whole", cfg)

    run = tmp_path / "interrupted"
    first = trainer(frames, run, cfg)
    with pytest.raises(KeyboardInterrupt):
        for epoch in first.remaining_epochs():
            first.save(first.fit_epoch(epoch))
            if epoch == 1:
                raise KeyboardInterrupt
    assert (run / ".cache" / "train" / "tiny" / "last.pt").is_file()
    assert len(curve(run, "val/dice")) == 1

    shutil.rmtree(run / "models")  # what DVC does to a stage's outputs before running it again
    shutil.rmtree(run / "dvclive")
    epochs_run = []
    resumed = trainer(frames, run, cfg)
    for epoch in resumed.remaining_epochs():
        resumed.save(resumed.fit_epoch(epoch))
        epochs_run.append(epoch)
    resumed.finish()
    assert epochs_run == [2, 3]
    for metric in ("train/loss", "val/loss", "val/dice", "lr"):
        assert curve(run, metric) == curve(tmp_path / "whole", metric), metric
    resumed, _ = load_checkpoint(run / "models" / "tiny" / "best.pt")
    whole, _ = load_checkpoint(tmp_path / "whole" / "models" / "tiny" / "best.pt")
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in resumed.state_dict().items())


def test_resume_state_of_other_params_is_not_reused(tmp_path, frames):
    first = trainer(frames, tmp_path, config(epochs=2, batch_size=16))
    with pytest.raises(KeyboardInterrupt):
        for epoch in first.remaining_epochs():
            first.save(first.fit_epoch(epoch))
            raise KeyboardInterrupt
    epochs_run = []
    other = trainer(frames, tmp_path, config(epochs=2, batch_size=16, lr=1e-3))
    for epoch in other.remaining_epochs():
        other.save(other.fit_epoch(epoch))
        epochs_run.append(epoch)
    other.finish()
    assert epochs_run == [1, 2]


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, frames):
    real_loss = dice_loss()
    training_steps = []

    def loss_turning_nan(logits, target):
        loss = real_loss(logits, target)
        if logits.requires_grad:
            training_steps.append(1)
            if len(training_steps) >= 3:  # epoch 2 (two steps per epoch), first batch
                return loss * float("nan")
        return loss

    run = trainer(frames, tmp_path, config(epochs=3, batch_size=16))
    run.loss_fn = loss_turning_nan
    with pytest.raises(CharsegError, match=r"loss became nan at epoch 2, batch 1.*Lower lr.*epoch 1"):
        for epoch in run.remaining_epochs():
            run.save(run.fit_epoch(epoch))
    model, meta = load_checkpoint(tmp_path / "models" / "tiny" / "best.pt")
    assert meta["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    state = torch.load(tmp_path / ".cache" / "train" / "tiny" / "last.pt", weights_only=True)
    assert [entry["epoch"] for entry in state["history"]] == [1]


# --- params and command line ------------------------------------------------------------------------

def write_params(path: Path, **overrides: str) -> Path:
    """The repo's params.yaml plus a `tiny` model and train.workers 0, with top-level keys then rewritten
    the way `dvc exp run -S key=value` writes them (e.g. `lr: 1e-05`)."""
    params = load_params(REPO_ROOT / "params.yaml")
    params["models"]["tiny"] = {**TINY_MODEL, "encoder_lr_mult": 0.1}
    params["train"]["workers"] = 0
    text = yaml.safe_dump(params, sort_keys=False)
    for key, value in overrides.items():
        text, replaced = re.subn(rf"^{key}:.*$", f"{key}: {value}", text, flags=re.M)
        assert replaced == 1, key
    path.write_text(text, encoding="utf-8")
    return path


def cli_args(data: Path, params: Path, name: str = "tiny") -> list[str]:
    return [name, "--params", str(params), "--split", str(data / "split.json"), "--frames", str(data / "frames"),
            "--masks", str(data / "masks"), "--device", "cpu"]


def test_lr_override_as_dvc_writes_it_reaches_the_optimizer(tmp_path, frames):
    params = write_params(tmp_path / "params.yaml", lr="1e-05", epochs="1", img_size="64", batch_size="16")
    loaded = load_config(params)
    assert loaded.train.lr == 1e-05
    # What the stage builds from the same file (main below trains with it).
    run = Trainer.setup(loaded.model_config("tiny"), loaded.train, paths(frames, tmp_path / "setup"),
                        device=torch.device("cpu"))
    initial = sorted({group["initial_lr"] for group in run.optimization.optimizer.param_groups})
    assert initial == pytest.approx([1e-06, 1e-05])  # encoder at lr * encoder_lr_mult, the rest at lr
    main(cli_args(frames, params))
    assert load_checkpoint(tmp_path / "models" / "tiny" / "best.pt")[1]["train_params"]["lr"] == 1e-05
    assert (tmp_path / "models" / "tiny" / "best.pt").is_file()
    assert (tmp_path / "dvclive" / "tiny" / "metrics.json").is_file()


@pytest.mark.parametrize("override, message", [
    ("batch_size: 1", r"'batch_size' = 1 is outside \[2"),
    ("lr: fast", r"'lr' must be a number"),
])
def test_bad_training_params_name_the_key(tmp_path, override, message):
    params = write_params(tmp_path / "params.yaml", **dict([override.split(": ")]))
    with pytest.raises(CharsegError, match=message):
        load_config(params).train


def test_unknown_model_name_lists_the_valid_ones(tmp_path, frames):
    with pytest.raises(CharsegError, match="unknown model 'nosuch'.*unetpp.*pspnet.*deeplabv3.*dinov2"):
        main(cli_args(frames, REPO_ROOT / "params.yaml", name="nosuch"))


@pytest.mark.parametrize("make_split, message", [
    (lambda ids: {"train": [], "val": ids[:1]}, "no frames on the 'train' side"),
    (lambda ids: {"train": ids[:2], "val": []}, "no frames on the 'val' side"),
    (lambda ids: {"train": ids[:2], "val": ids[1:2]}, "on both sides"),
    (lambda ids: {"train": ids[:2], "val": ["alice--gone--00000000"]}, "lack a frame .* or a mask"),
])
def test_bad_split_is_refused_before_training(tmp_path, frames, make_split, message):
    data = tmp_path / "data"
    shutil.copytree(frames, data)
    train_ids, _ = read_split(frames / "split.json")
    (data / "split.json").write_text(json.dumps(make_split(train_ids)))
    with pytest.raises(CharsegError, match=message):
        train(data, tmp_path, config())


def test_all_empty_masks_are_refused(tmp_path):
    data = make_frames(tmp_path / "data", n_train=4, n_val=2, empty_masks=True)
    with pytest.raises(CharsegError, match="every mask on the 'train' side .* is empty"):
        train(data, tmp_path, config())


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_one_epoch(tmp_path, frames):
    params = write_params(tmp_path / "params.yaml", epochs="1", img_size="32", batch_size="3")
    # 7 validation frames: the processes get 4 and 3 of them, so 2 and 1 batches (the collectives must not
    # assume equal batch counts), and the Dice must still count every frame once.
    split = json.loads((frames / "split.json").read_text())
    (tmp_path / "split.json").write_text(json.dumps({"train": split["train"], "val": split["val"][:7]}))
    args = cli_args(frames, params)
    args[args.index("--split") + 1] = str(tmp_path / "split.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "stages.train", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, meta = load_checkpoint(tmp_path / "models" / "tiny" / "best.pt")
    assert meta["epoch"] == 1 and meta["train_params"]["batch_size"] == 3
    summary = json.loads((tmp_path / "dvclive" / "tiny" / "metrics.json").read_text())
    assert summary["best_epoch"] == 1
    assert proc.stdout.count("tiny epoch 1/1: train loss") == 1  # only rank 0 reports

    # The Dice both processes agreed on is the whole-set Dice of the saved model on all 7 frames.
    files = cache_pairs(split["val"][:7], FramesDir(frames / "frames"), MasksDir(frames / "masks"), 32,
                        tmp_path / ".cache")
    images, masks = (torch.stack(t) for t in zip(*PairDataset(files)))
    with torch.no_grad():
        logits = model(normalize(images, meta["mean"], meta["std"]))
    counts = confusion(torch.sigmoid(logits) > meta["threshold"], masks.bool())
    assert summary["best_val_dice"] == pytest.approx(dice(counts), abs=1e-6)
