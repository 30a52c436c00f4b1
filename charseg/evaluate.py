"""Compare trained models on the validation frames: the library of the DVC stage `evaluate` (stages/evaluate.py).

Each `<models>/<name>/best.pt` predicts every validation frame at its checkpoint's img_size; the
probabilities are resized back to the frame's own size before thresholding, so every model is scored
against the same full-size masks. Scores: Dice and IoU over the whole set (pixel counts summed) and
per image (mean), precision, recall, boundary F1 within `evaluate.boundary_tolerance_px`, Dice per
character, parameter count, and latency per frame on this device (resize + forward + resize back,
batch of one, median after `evaluate.latency_warmup` frames).

The validation masks are the pipeline's own labels (weak labels, unless imported); with
`labels.truth_dir` set (the sample: data/raw/truth), every model is also scored against those exact
masks, found like imported masks (charseg.labels.imported.mask_files, through `labels.mask_index`).

Writes metrics/evaluate/<name>.json (numbers only: dvc metrics show/diff), reports/comparison.md and
.csv (ranked by Dice), and plots/evaluate/: metrics.png (a bar chart per metric), dice_per_character.png,
and qualitative.png, a grid of the same validation frames across all models (green: true positive, red:
false positive, blue: false negative). Figures are saved one way, `_save` (an atomic png write).
"""
from __future__ import annotations

import io
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from tqdm import tqdm

from charseg import metrics
from charseg.config import EvaluateConfig, ModelConfig
from charseg.data import read_pair, read_split
from charseg.device import select_device
from charseg.errors import CharsegError, require
from charseg.inference import TorchSegmenter, predict_proba
from charseg.io import atomic_dir, read_manifest, write_bytes_atomic, write_csv, write_json, write_text_atomic
from charseg.labels.imported import mask_files, read_binary_mask
from charseg.layout import FramesDir, MasksDir, checkpoint_in

TRUTH_KEY = "labels.truth_dir"
GRID_THUMB_HEIGHT = 180
OVERLAY = {"true positive": (0, 200, 0), "false positive": (230, 0, 0), "false negative": (0, 90, 255)}  # RGB
# (metrics key, table header, format); the order of the comparison table and the bar charts.
COLUMNS = [("dice", "Dice", ".4f"), ("iou", "IoU", ".4f"), ("dice_per_image", "Dice/img", ".4f"),
           ("iou_per_image", "IoU/img", ".4f"), ("precision", "Precision", ".4f"), ("recall", "Recall", ".4f"),
           ("boundary_f1", "Boundary F1", ".4f"), ("parameters_m", "Params (M)", ".2f"),
           ("latency_ms", "Latency (ms)", ".1f")]
TRUTH_COLUMNS = COLUMNS[:7]


@dataclass(frozen=True)
class Frame:
    id: str
    character: str
    video: str
    frame_index: int


def read_val_frames(split: Path, manifest: Path) -> list[Frame]:
    """The validation frames of split.json, with what the frames manifest says of each."""
    _, val_ids = read_split(split)
    rows = {row["id"]: row for row in read_manifest(manifest, required=("id", "character", "video", "frame_index"))}
    missing = [i for i in val_ids if i not in rows]
    if missing:
        raise CharsegError(f"{len(missing)} validation id(s) of {split} are not in {manifest} (e.g. "
                           f"'{missing[0]}'): re-run the stages that write them (dvc repro)")
    return [Frame(i, rows[i]["character"], rows[i]["video"], int(rows[i]["frame_index"])) for i in val_ids]


def truth_files(truth_dir: Path, mask_index: str | None, frames: list[Frame]) -> dict[str, Path]:
    """The exact mask of every validation frame in truth_dir (through its index CSV `mask_index` when there is
    one, else <frame id>.png); a frame without one, or a mask file that is not there, is an error naming it."""
    rows = [{"id": f.id, "video": f.video, "frame_index": str(f.frame_index)} for f in frames]
    found = mask_files(truth_dir, mask_index, rows, key=TRUTH_KEY)
    unlisted = [f for f in frames if f.id not in found]
    if unlisted:
        index = truth_dir / mask_index if mask_index else None
        raise CharsegError(f"{TRUTH_KEY}: {index if index is not None and index.is_file() else truth_dir} has no "
                           f"mask for {len(unlisted)} validation frame(s) (e.g. {unlisted[0].video} frame "
                           f"{unlisted[0].frame_index}): point it at the truth of these videos, or set "
                           f"{TRUTH_KEY}: null")
    absent = [path for path in found.values() if not path.is_file()]
    if absent:
        raise CharsegError(f"{TRUTH_KEY}: {truth_dir} lacks the mask file of {len(absent)} validation frame(s) "
                           f"(e.g. {absent[0]}): restore them, or set {TRUTH_KEY}: null")
    return found


@dataclass
class Scores:
    """What one model scored against one set of target masks, accumulated frame by frame."""
    tolerance_px: float
    counts: metrics.Counts = field(default_factory=metrics.Counts.zero)
    per_character: dict[str, metrics.Counts] = field(default_factory=lambda: defaultdict(metrics.Counts.zero))
    dice_per_image: list[float] = field(default_factory=list)
    iou_per_image: list[float] = field(default_factory=list)
    boundary_f1: list[float] = field(default_factory=list)

    def add(self, pred: np.ndarray, target: np.ndarray, character: str) -> None:
        counts = metrics.confusion(pred, target)
        self.counts += counts
        self.per_character[character] += counts
        self.dice_per_image.append(metrics.dice(counts))
        self.iou_per_image.append(metrics.iou(counts))
        self.boundary_f1.append(metrics.boundary_f1(pred, target, self.tolerance_px))

    def summary(self) -> dict[str, Any]:
        return {"dice": metrics.dice(self.counts), "iou": metrics.iou(self.counts),
                "dice_per_image": float(np.mean(self.dice_per_image)),
                "iou_per_image": float(np.mean(self.iou_per_image)),
                "precision": metrics.precision(self.counts), "recall": metrics.recall(self.counts),
                "boundary_f1": float(np.mean(self.boundary_f1)),
                "dice_per_character": {c: metrics.dice(n) for c, n in sorted(self.per_character.items())}}


def grid_ids(frames: list[Frame], n: int) -> list[str]:
    """n frames spread over the characters (one each in turn) and, within one, evenly over its frames."""
    by_character: dict[str, list[str]] = defaultdict(list)
    for f in frames:
        by_character[f.character].append(f.id)
    share = dict.fromkeys(sorted(by_character), 0)
    while sum(share.values()) < min(n, len(frames)):
        for character in share:
            if share[character] < len(by_character[character]) and sum(share.values()) < n:
                share[character] += 1
    chosen = []
    for character, k in share.items():
        ids = by_character[character]
        chosen += [ids[round(j * (len(ids) - 1) / max(1, k - 1))] for j in range(k)]
    return chosen


def thumbnail(image: np.ndarray, interpolation: int = cv2.INTER_AREA) -> np.ndarray:
    height, width = image.shape[:2]
    size = (max(1, round(width * GRID_THUMB_HEIGHT / height)), GRID_THUMB_HEIGHT)
    return cv2.resize(image, size, interpolation=interpolation)


def overlay(image: np.ndarray, pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    out = image.astype(np.float32)
    for color, region in zip(OVERLAY.values(), (pred & target, pred & ~target, ~pred & target)):
        out[region] = 0.45 * out[region] + 0.55 * np.array(color, np.float32)
    return out.astype(np.uint8)


@dataclass(frozen=True)
class Truth:
    """The exact masks to score against besides the pipeline's labels: labels.truth_dir and labels.mask_index."""
    folder: Path
    mask_index: str | None = None


@dataclass
class Run:
    """What scoring the validation frames gathered: scores per model, latency, and the qualitative grid."""
    scores: dict[str, Scores]
    truth_scores: dict[str, Scores]
    latency_ms: dict[str, list[float]]
    grid: list[dict[str, Any]] = field(default_factory=list)


def evaluate(models: Mapping[str, ModelConfig], cfg: EvaluateConfig, *, split: Path, frames: FramesDir,
             masks: MasksDir, models_dir: Path, metrics_dir: Path, reports_dir: Path, plots_dir: Path,
             truth: Truth | None = None, device: str = "auto", progress: bool = True) -> dict[str, dict[str, Any]]:
    """Score every model on the validation frames, write all outputs; returns {model name: its metrics}."""
    require(models, "params.yaml 'models:' is empty: there is nothing to evaluate")
    torch_device = select_device(device)
    val = read_val_frames(split, frames.manifest)
    exact = truth_files(truth.folder, truth.mask_index, val) if truth else {}
    loaded = load_models(models, models_dir, torch_device)
    run = score_frames(loaded, val, frames, masks, exact, cfg, progress=progress)
    results = summarize(loaded, run, cfg, len(val))
    write_outputs(results, loaded, cfg, truth, torch_device, len(val), run.grid, metrics_dir=metrics_dir,
                  reports_dir=reports_dir, plots_dir=plots_dir)
    return results


def load_models(models: Mapping[str, ModelConfig], models_dir: Path,
                device: torch.device) -> dict[str, TorchSegmenter]:
    """Every checkpoint first: a missing or wrong one fails before hours of scoring."""
    return {name: TorchSegmenter.from_checkpoint(checkpoint_in(models_dir, name), model_name=name,
                                                 expect_arch=model.arch, device=device)
            for name, model in models.items()}


def score_frames(loaded: dict[str, TorchSegmenter], frames: list[Frame], frames_dir: FramesDir,
                 masks_dir: MasksDir, truth: dict[str, Path], cfg: EvaluateConfig, *, progress: bool = True) -> Run:
    """Every model on every frame: scores against the labels (and the exact truth), latency, grid thumbnails."""
    run = Run(scores={name: Scores(cfg.boundary_tolerance_px) for name in loaded},
              truth_scores={name: Scores(cfg.boundary_tolerance_px) for name in loaded} if truth else {},
              latency_ms={name: [] for name in loaded})
    shown = set(grid_ids(frames, cfg.grid_frames))
    for frame in tqdm(frames, desc="evaluate", unit="frame", disable=not progress):
        image, target = read_pair(frames_dir, masks_dir, frame.id)
        exact = read_binary_mask(truth[frame.id], None, key=TRUTH_KEY) > 0 if truth else None
        row = {"frame": frame, "image": thumbnail(image), "target": thumbnail(target.astype(np.uint8)) > 0,
               "preds": {}}
        for name, segmenter in loaded.items():
            start = time.perf_counter()
            probs = predict_proba(segmenter, image)
            pred = probs > segmenter.meta["threshold"]
            run.latency_ms[name].append((time.perf_counter() - start) * 1000)  # .cpu() waited for the GPU
            run.scores[name].add(pred, target, frame.character)
            if exact is not None:
                if exact.shape != pred.shape:  # frames.max_side shrank the frames; score at truth size
                    probs = cv2.resize(probs, exact.shape[::-1], interpolation=cv2.INTER_LINEAR)
                run.truth_scores[name].add(probs > segmenter.meta["threshold"], exact, frame.character)
            if frame.id in shown:
                row["preds"][name] = thumbnail(pred.astype(np.uint8)) > 0
        if frame.id in shown:
            run.grid.append(row)
    return run


def summarize(loaded: dict[str, TorchSegmenter], run: Run, cfg: EvaluateConfig,
              n_frames: int) -> dict[str, dict[str, Any]]:
    """{model name: its metrics}, what metrics/evaluate/<name>.json holds."""
    results = {}
    for name, segmenter in loaded.items():
        timings = run.latency_ms[name][cfg.latency_warmup:] or run.latency_ms[name]  # fewer frames than warm-up: all
        results[name] = {**run.scores[name].summary(),
                         "parameters_m": sum(p.numel() for p in segmenter.model.parameters()) / 1e6,
                         "latency_ms": float(np.median(timings)), "latency_ms_p90": float(np.percentile(timings, 90)),
                         "frames": n_frames, "best_epoch": segmenter.meta["epoch"]}
        if run.truth_scores:
            results[name]["truth"] = run.truth_scores[name].summary()
    return results


def write_outputs(results: dict[str, dict[str, Any]], loaded: dict[str, TorchSegmenter], cfg: EvaluateConfig,
                  truth: Truth | None, device: torch.device, n_frames: int, grid: list[dict[str, Any]], *,
                  metrics_dir: Path, reports_dir: Path, plots_dir: Path) -> None:
    """metrics/evaluate/<name>.json, reports/comparison.md and .csv, plots/evaluate/*.png; models ranked by Dice."""
    ranked = sorted(results, key=lambda n: (-results[n]["dice"], n))
    with atomic_dir(metrics_dir) as tmp:
        for name in ranked:
            write_json(tmp / f"{name}.json", results[name])
    write_comparison(reports_dir, ranked, results, {n: s.meta for n, s in loaded.items()}, cfg,
                     truth.folder if truth else None, device, n_frames)
    with atomic_dir(plots_dir) as tmp:
        plot_bars(tmp, ranked, results, any("truth" in r for r in results.values()))
        if grid:
            plot_grid(tmp / "qualitative.png", grid, ranked)


def _device_name(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"


def write_comparison(reports_dir: Path, ranked: list[str], results: dict[str, dict[str, Any]],
                     metas: dict[str, dict[str, Any]], cfg: EvaluateConfig, truth_dir: Path | None,
                     device: torch.device, n_frames: int) -> None:
    characters = sorted({c for r in results.values() for c in r["dice_per_character"]})
    has_truth = all("truth" in r for r in results.values())
    rows = []
    for rank, name in enumerate(ranked, 1):
        meta, r = metas[name], results[name]
        row = {"rank": rank, "model": name, "arch": meta["arch"], "encoder": meta["encoder"],
               "encoder_weights": meta["cfg"].get("encoder_weights") or "none", "img_size": meta["img_size"],
               "best_epoch": meta["epoch"], **{key: r[key] for key, _, _ in COLUMNS},
               **{f"dice[{c}]": r["dice_per_character"].get(c, "") for c in characters}}
        if has_truth:
            row.update({f"truth_{key}": r["truth"][key] for key, _, _ in TRUTH_COLUMNS})
        rows.append(row)
    reports_dir.mkdir(parents=True, exist_ok=True)
    write_csv(reports_dir / "comparison.csv", rows, list(rows[0]))

    def table(headers: list[str], body: list[list[str]]) -> str:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])

    info = ["Rank", "Model", "Arch", "Encoder", "Weights", "Size", "Epoch"]
    text = [
        "# Model comparison", "",
        f"{n_frames} validation frames, {len(characters)} character(s), ranked by Dice over the whole set. "
        f"Targets: the pipeline's masks (data/masks). Boundary F1 within {cfg.boundary_tolerance_px:g} px. "
        f"Latency: one frame (resize, forward, resize back) on {_device_name(device)}, median.", "",
        table(info + [h for _, h, _ in COLUMNS],
              [[str(row[k]) for k in ("rank", "model", "arch", "encoder", "encoder_weights", "img_size", "best_epoch")]
               + [format(row[key], fmt) for key, _, fmt in COLUMNS] for row in rows]), "",
        "## Dice per character", "",
        table(["Model"] + characters,
              [[row["model"]] + [format(row[f"dice[{c}]"], ".4f") if row[f"dice[{c}]"] != "" else "-"
                                 for c in characters] for row in rows]), ""]
    if has_truth:
        text += [f"## Against the exact ground truth ({truth_dir})", "",
                 table(["Model"] + [h for _, h, _ in TRUTH_COLUMNS],
                       [[row["model"]] + [format(row[f"truth_{key}"], fmt) for key, _, fmt in TRUTH_COLUMNS]
                        for row in rows]), ""]
    write_text_atomic(reports_dir / "comparison.md", "\n".join(text))


def _save(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    write_bytes_atomic(path, buffer.getvalue())


def plot_bars(out_dir: Path, ranked: list[str], results: dict[str, dict[str, Any]], has_truth: bool) -> None:
    """metrics.png: one bar chart per metric, models in ranking order; dice_per_character.png."""
    charts = [(key, header, lambda r, k=key: r[k]) for key, header, _ in COLUMNS]
    if has_truth:
        charts += [(f"truth_{key}", f"{header} (exact truth)", lambda r, k=key: r["truth"][k])
                   for key, header, _ in TRUTH_COLUMNS]
    n_cols = 4
    n_rows = -(-len(charts) // n_cols)
    # Fixed spacing: matplotlib's layout engines cost seconds per figure.
    fig = Figure(figsize=(n_cols * (1.2 + 0.7 * len(ranked)), 3 * n_rows))
    axes = fig.subplots(n_rows, n_cols, squeeze=False, gridspec_kw={"hspace": 0.7, "wspace": 0.3}).ravel()
    for ax, (key, header, value) in zip(axes, charts):
        bars = ax.bar(ranked, [value(results[n]) for n in ranked], color="tab:blue")
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_title(header, fontsize=10)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        if key not in ("parameters_m", "latency_ms"):
            ax.set_ylim(0, 1.1)
    for ax in axes[len(charts):]:
        ax.set_axis_off()
    _save(fig, out_dir / "metrics.png")

    characters = sorted({c for n in ranked for c in results[n]["dice_per_character"]})
    fig = Figure(figsize=(2 + 0.5 * len(characters) * len(ranked), 3.5))
    fig.subplots_adjust(bottom=0.25)
    ax = fig.subplots()
    width = 0.8 / len(ranked)
    for i, name in enumerate(ranked):
        values = [results[name]["dice_per_character"].get(c, np.nan) for c in characters]
        ax.bar(np.arange(len(characters)) + i * width, values, width, label=name)
    ax.set_xticks(np.arange(len(characters)) + 0.4 - width / 2, characters, rotation=30)
    ax.set_ylim(0, 1.08)
    ax.set_title("Dice per character")
    ax.legend(fontsize=8)
    _save(fig, out_dir / "dice_per_character.png")


def plot_grid(path: Path, grid: list[dict[str, Any]], ranked: list[str]) -> None:
    columns = ["frame", "label"] + ranked
    fig = Figure(figsize=(2.4 * len(columns), 1.6 * len(grid) + 0.6))
    axes = fig.subplots(len(grid), len(columns), squeeze=False,
                        gridspec_kw={"wspace": 0.05, "hspace": 0.1, "left": 0.05, "right": 0.99, "top": 0.95,
                                     "bottom": 0.6 / (1.6 * len(grid) + 0.6)})
    for r, row in enumerate(grid):
        panels = [row["image"], overlay(row["image"], row["target"], row["target"])] + \
                 [overlay(row["image"], row["preds"][name], row["target"]) for name in ranked]
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
        axes[r][0].set_ylabel(f"{row['frame'].character}\n{row['frame'].id[-8:]}", fontsize=7)
    handles = [Patch(color=np.array(color) / 255, label=name) for name, color in OVERLAY.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    _save(fig, path)
