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

Writes metrics/evaluate/<name>.json (numbers only: dvc metrics show/diff; `person_dice` is the Dice in
both tasks, so a person model and a characters model line up), reports/comparison.md and .csv (ranked by
Dice), and plots/evaluate/: metrics.png (a bar chart per metric), dice_per_character.png (per folder),
and qualitative.png, a grid of the same validation frames across all models (green: true positive, red:
false positive, blue: false negative). Figures are saved one way, `_save` (an atomic png write).

The characters task (`task: characters`): every model must be a characters checkpoint of the identity stage's
classes (data/identity/classes.json), scored against its class maps (data/identity/images): mIoU over the
named characters (the ranking), IoU, Dice and boundary F1 per character, IoU of `other`, and person Dice (all
person classes merged, against the merged target). A class in neither prediction nor target has no score: it
is left out of the means and the JSON, and shown as '-'. Exact truth is per-character truth here (a
characters.json and the index's character_mask column in labels.truth_dir; names the classes lack count as
`other`). Plots: metrics.png, iou_per_character.png, confusion_<name>.png (each true class's pixels spread
over the predicted classes) and qualitative.png (one colour per class, task.palette, with a legend).
"""
from __future__ import annotations

import io
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import cv2
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from tqdm import tqdm

from charseg import metrics
from charseg.config import EvaluateConfig, ModelConfig, TruthConfig
from charseg.data import read_pair, read_split
from charseg.device import select_device
from charseg.errors import CharsegError, require, warn
from charseg.inference import TorchSegmenter, class_ids, predict_proba, to_frame_size
from charseg.io import atomic_dir, read_manifest, write_bytes_atomic, write_csv, write_json, write_text_atomic
from charseg.labels.imported import (CHARACTERS_FILE, mask_files, read_binary_mask, read_character_map,
                                     read_character_values)
from charseg.layout import FramesDir, IdentityDir, MasksDir, checkpoint_in
from charseg.task import CHARACTERS, PERSON, Task, palette, person_task, read_classes

TRUTH_KEY = "labels.truth_dir"
GRID_THUMB_HEIGHT = 180
OVERLAY = {"true positive": (0, 200, 0), "false positive": (230, 0, 0), "false negative": (0, 90, 255)}  # RGB
# (metrics key, table header, format); the order of the comparison table and the bar charts.
COLUMNS = [("dice", "Dice", ".4f"), ("iou", "IoU", ".4f"), ("dice_per_image", "Dice/img", ".4f"),
           ("iou_per_image", "IoU/img", ".4f"), ("precision", "Precision", ".4f"), ("recall", "Recall", ".4f"),
           ("boundary_f1", "Boundary F1", ".4f"), ("parameters_m", "Params (M)", ".2f"),
           ("latency_ms", "Latency (ms)", ".1f")]
TRUTH_COLUMNS = COLUMNS[:7]
CHARACTER_COLUMNS = [("miou", "mIoU", ".4f"), ("person_dice", "Person Dice", ".4f"), ("other_iou", "Other IoU", ".4f"),
                     ("boundary_f1", "Boundary F1", ".4f"), ("pixel_accuracy", "Pixel acc.", ".4f"),
                     ("parameters_m", "Params (M)", ".2f"), ("latency_ms", "Latency (ms)", ".1f")]
CHARACTER_TRUTH_COLUMNS = CHARACTER_COLUMNS[:5]


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


def truth_files(truth_dir: Path, mask_index: str | None, frames: list[Frame], column: str = "mask") -> dict[str, Path]:
    """The exact mask of every validation frame in truth_dir (through its index CSV `mask_index` when there is
    one, else <frame id>.png; column "character_mask": the per-character masks the index lists); a frame without
    one, or a mask file that is not there, is an error naming it."""
    rows = [{"id": f.id, "video": f.video, "frame_index": str(f.frame_index)} for f in frames]
    found = mask_files(truth_dir, mask_index, rows, key=TRUTH_KEY, column=column)
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
                "boundary_f1": float(np.mean(self.boundary_f1)), "person_dice": metrics.dice(self.counts),
                "dice_per_character": {c: metrics.dice(n) for c, n in sorted(self.per_character.items())}}


def _scored(value: dict[str, Any]) -> dict[str, Any]:
    """`value` without its NaN entries (classes with no score), at every depth: the metrics JSON holds numbers."""
    return {k: _scored(v) if isinstance(v, dict) else v for k, v in value.items()
            if isinstance(v, dict) or not np.isnan(v)}


@dataclass
class ClassScores:
    """What one characters-task model scored against one set of class maps, accumulated frame by frame."""
    task: Task
    tolerance_px: float
    matrix: np.ndarray = field(init=False)  # metrics.class_confusion summed over the frames
    person: metrics.Counts = field(default_factory=metrics.Counts.zero)  # all person classes merged
    # Per character id: boundary F1 of each frame where the character is predicted or true (else it says nothing).
    boundary_f1: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))

    def __post_init__(self) -> None:
        self.matrix = np.zeros((len(self.task.classes),) * 2, np.int64)

    def add(self, pred: np.ndarray, target: np.ndarray, character: str = "") -> None:
        """One frame's class ids (`character`, its folder, plays no part: the classes say who is where)."""
        self.matrix += metrics.class_confusion(pred, target, len(self.task.classes))
        self.person += metrics.confusion(pred > 0, target > 0)
        for k in self.task.character_ids:
            predicted, true = pred == k, target == k
            if predicted.any() or true.any():
                self.boundary_f1[k].append(metrics.boundary_f1(predicted, true, self.tolerance_px))

    def summary(self) -> dict[str, Any]:
        """The scores, NaN where a class has none (_scored drops them before they are written)."""
        iou, dice = metrics.per_class_iou(self.matrix), metrics.per_class_dice(self.matrix)
        boundary = {k: float(np.mean(self.boundary_f1[k])) if self.boundary_f1[k] else np.nan
                    for k in self.task.character_ids}
        named = [v for v in boundary.values() if not np.isnan(v)]
        names = dict(zip(self.task.character_ids, self.task.characters))
        return {"miou": metrics.mean_iou(self.matrix, self.task.character_ids),
                "person_dice": metrics.dice(self.person), "person_iou": metrics.iou(self.person),
                "other_iou": float(iou[-1]), "boundary_f1": float(np.mean(named)) if named else np.nan,
                "pixel_accuracy": float(np.trace(self.matrix) / max(1, self.matrix.sum())),
                "iou_per_character": {names[k]: float(iou[k]) for k in names},
                "dice_per_character": {names[k]: float(dice[k]) for k in names},
                "boundary_f1_per_character": {names[k]: boundary[k] for k in names}}


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


def tint(image: np.ndarray, ids: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """The RGB image with every pixel of a class > 0 blended with that class's RGB colour (task.palette)."""
    out = image.astype(np.float32)
    people = ids > 0
    out[people] = 0.45 * out[people] + 0.55 * colours[ids[people]].astype(np.float32)
    return out.astype(np.uint8)


@dataclass(frozen=True)
class CharacterTruth:
    """Exact per-character masks: each validation frame's file, its values' names (characters.json) and the
    class id of each value (by name; a name the classes lack is `other`)."""
    files: dict[str, Path]
    values: dict[int, str]
    class_of_value: np.ndarray

    def read(self, frame_id: str) -> np.ndarray:
        """The frame's exact class ids (uint8)."""
        return self.class_of_value[read_character_map(self.files[frame_id], None, self.values)]


def character_truth(truth: TruthConfig, frames: list[Frame], task: Task) -> CharacterTruth | None:
    """The per-character truth of labels.truth_dir (None, with a warning, when it has no characters.json)."""
    if not (truth.folder / CHARACTERS_FILE).is_file():
        warn(f"{TRUTH_KEY}: {truth.folder} has no {CHARACTERS_FILE}, so no per-character truth: the models are "
             f"scored against the identity stage's class maps only")
        return None
    values = read_character_values(truth.folder, key=TRUTH_KEY)
    class_of_value = np.full(max(values) + 1, len(task.classes) - 1, np.uint8)  # other, unless named below
    class_of_value[0] = 0
    for value, name in values.items():
        if name in task.classes:
            class_of_value[value] = task.classes.index(name)
    files = truth_files(truth.folder, truth.mask_index, frames, column="character_mask")
    return CharacterTruth(files, values, class_of_value)


@dataclass(frozen=True)
class Targets:
    """One task's side of scoring: a frame and its target, the exact truth, and probabilities -> prediction."""
    task: Task
    read: Callable[[str], tuple[np.ndarray, np.ndarray]]   # frame id -> (RGB frame, target)
    read_truth: Callable[[str], np.ndarray] | None         # frame id -> exact target; None: no exact truth

    def predict(self, probs: np.ndarray, threshold: float) -> np.ndarray:
        """A frame's prediction as its targets are: person a bool mask, characters uint8 class ids."""
        ids = class_ids(self.task, probs, threshold)
        return ids.view(bool) if self.task.name == PERSON else ids

    def thumbnail(self, target: np.ndarray) -> np.ndarray:
        if self.task.name == PERSON:
            return thumbnail(target.astype(np.uint8)) > 0
        return thumbnail(target, cv2.INTER_NEAREST)  # class ids must not blend

    def scores(self, cfg: EvaluateConfig) -> Scores | ClassScores:
        if self.task.name == PERSON:
            return Scores(cfg.boundary_tolerance_px)
        return ClassScores(self.task, cfg.boundary_tolerance_px)


def person_targets(frames: FramesDir, masks: MasksDir, truth: dict[str, Path]) -> Targets:
    return Targets(person_task(), lambda frame_id: read_pair(frames, masks, frame_id),
                   (lambda frame_id: read_binary_mask(truth[frame_id], None, key=TRUTH_KEY) > 0) if truth else None)


def character_targets(task: Task, frames: FramesDir, identity: IdentityDir, truth: CharacterTruth | None) -> Targets:
    def read(frame_id: str) -> tuple[np.ndarray, np.ndarray]:
        image, target = read_pair(frames, identity, frame_id, class_ids=True)
        require(int(target.max()) < len(task.classes),
                f"{identity.class_map(frame_id)} holds class id {int(target.max())} but {identity.classes} lists "
                f"{len(task.classes)} classes: re-run the identity stage (dvc repro identity)")
        return image, target
    return Targets(task, read, truth.read if truth else None)


@dataclass
class Run:
    """What scoring the validation frames gathered: scores per model, latency, and the qualitative grid."""
    scores: dict[str, Scores | ClassScores]
    truth_scores: dict[str, Scores | ClassScores]
    latency_ms: dict[str, list[float]]
    grid: list[dict[str, Any]] = field(default_factory=list)


def evaluate(models: Mapping[str, ModelConfig], cfg: EvaluateConfig, *, split: Path, frames: FramesDir,
             masks: MasksDir, models_dir: Path, metrics_dir: Path, reports_dir: Path, plots_dir: Path,
             truth: TruthConfig | None = None, device: str = "auto", progress: bool = True, task: str = PERSON,
             identity: IdentityDir | None = None) -> dict[str, dict[str, Any]]:
    """Score every model on the validation frames, write all outputs; returns {model name: its metrics}.
    task: params.yaml's `task`; the characters task reads its classes and targets from `identity`."""
    require(models, "params.yaml 'models:' is empty: there is nothing to evaluate")
    torch_device = select_device(device)
    val = read_val_frames(split, frames.manifest)
    if task == CHARACTERS:
        require(identity is not None, "the characters task is scored against the identity stage's output: "
                                      "pass its folder (--identity data/identity)")
        classes = read_classes(identity.classes)
        exact = character_truth(truth, val, classes) if truth else None
        loaded = load_models(models, models_dir, torch_device, classes, identity.classes)
        targets = character_targets(classes, frames, identity, exact)
    else:
        loaded = load_models(models, models_dir, torch_device, person_task())
        targets = person_targets(frames, masks, truth_files(truth.folder, truth.mask_index, val) if truth else {})
    run = score_frames(loaded, val, targets, cfg, progress=progress)
    results = summarize(loaded, run, cfg, len(val))
    write_outputs(results, loaded, cfg, truth, torch_device, len(val), run, targets.task, metrics_dir=metrics_dir,
                  reports_dir=reports_dir, plots_dir=plots_dir)
    return results


def load_models(models: Mapping[str, ModelConfig], models_dir: Path, device: torch.device, task: Task,
                classes_file: Path | None = None) -> dict[str, TorchSegmenter]:
    """Every checkpoint first: a missing or wrong one (another arch, task or class list) fails before hours
    of scoring. classes_file: where the characters task's classes came from, for the error."""
    loaded = {}
    for name, model in models.items():
        checkpoint = checkpoint_in(models_dir, name)
        segmenter = TorchSegmenter.from_checkpoint(checkpoint, model_name=name, expect_arch=model.arch, device=device)
        retrain = f"retrain it with `dvc repro train@{name}`"
        if segmenter.task.name != task.name:
            raise CharsegError(f"model {name} ({checkpoint}) was trained for the '{segmenter.task.name}' task but "
                               f"params.yaml says task: {task.name}: {retrain} (or set task: {segmenter.task.name})")
        if segmenter.task.classes != task.classes:
            raise CharsegError(f"model {name} ({checkpoint}) was trained on the classes {list(segmenter.task.classes)} "
                               f"but {classes_file} lists {list(task.classes)}: {retrain}")
        loaded[name] = segmenter
    return loaded


def score_frames(loaded: dict[str, TorchSegmenter], frames: list[Frame], targets: Targets, cfg: EvaluateConfig, *,
                 progress: bool = True) -> Run:
    """Every model on every frame: scores against the labels (and the exact truth), latency, grid thumbnails."""
    exact_truth = targets.read_truth is not None
    run = Run(scores={name: targets.scores(cfg) for name in loaded},
              truth_scores={name: targets.scores(cfg) for name in loaded} if exact_truth else {},
              latency_ms={name: [] for name in loaded})
    shown = set(grid_ids(frames, cfg.grid_frames))
    for frame in tqdm(frames, desc="evaluate", unit="frame", disable=not progress):
        image, target = targets.read(frame.id)
        exact = targets.read_truth(frame.id) if exact_truth else None
        row = {"frame": frame, "image": thumbnail(image), "target": targets.thumbnail(target), "preds": {}}
        for name, segmenter in loaded.items():
            threshold = segmenter.meta["threshold"]
            start = time.perf_counter()
            probs = predict_proba(segmenter, image)
            pred = targets.predict(probs, threshold)
            run.latency_ms[name].append((time.perf_counter() - start) * 1000)  # .cpu() waited for the GPU
            run.scores[name].add(pred, target, frame.character)
            if exact is not None:
                if exact.shape != pred.shape:  # frames.max_side shrank the frames; score at truth size
                    probs = to_frame_size(probs, exact.shape)
                run.truth_scores[name].add(targets.predict(probs, threshold), exact, frame.character)
            if frame.id in shown:
                row["preds"][name] = targets.thumbnail(pred)
        if frame.id in shown:
            run.grid.append(row)
    return run


def summarize(loaded: dict[str, TorchSegmenter], run: Run, cfg: EvaluateConfig,
              n_frames: int) -> dict[str, dict[str, Any]]:
    """{model name: its metrics}, what metrics/evaluate/<name>.json holds (scores that are NaN left out)."""
    results = {}
    for name, segmenter in loaded.items():
        timings = run.latency_ms[name][cfg.latency_warmup:] or run.latency_ms[name]  # fewer frames than warm-up: all
        results[name] = {**run.scores[name].summary(),
                         "parameters_m": sum(p.numel() for p in segmenter.model.parameters()) / 1e6,
                         "latency_ms": float(np.median(timings)), "latency_ms_p90": float(np.percentile(timings, 90)),
                         "frames": n_frames, "best_epoch": segmenter.meta["epoch"]}
        if run.truth_scores:
            results[name]["truth"] = run.truth_scores[name].summary()
        results[name] = _scored(results[name])
    return results


@dataclass(frozen=True)
class ReportSpec:
    """What one task's comparison table and bar charts show."""
    rank_key: str                                 # the metrics key models are ranked by, highest first
    rank_text: str
    targets: str
    columns: list[tuple[str, str, str]]           # (metrics key, header, format), as COLUMNS
    truth_columns: list[tuple[str, str, str]]
    per_character: list[tuple[str, str, str]]     # (csv prefix, metrics key, title): a table per character
    truth_per_character: list[tuple[str, str, str]]


PERSON_REPORT = ReportSpec("dice", "Dice over the whole set", "the pipeline's masks (data/masks)", COLUMNS,
                           TRUTH_COLUMNS, [("dice", "dice_per_character", "Dice per character")], [])
CHARACTERS_REPORT = ReportSpec(
    "miou", "mIoU over the named characters", "the identity stage's class maps (data/identity)", CHARACTER_COLUMNS,
    CHARACTER_TRUTH_COLUMNS, [("iou", "iou_per_character", "IoU per character"),
                              ("dice", "dice_per_character", "Dice per character"),
                              ("bf1", "boundary_f1_per_character", "Boundary F1 per character")],
    [("iou", "iou_per_character", "IoU per character")])


def ranking(results: dict[str, dict[str, Any]], key: str) -> list[str]:
    """Model names, best `key` first (a model without that score, e.g. no character anywhere, last)."""
    return sorted(results, key=lambda n: (-results[n].get(key, -1.0), n))


def write_outputs(results: dict[str, dict[str, Any]], loaded: dict[str, TorchSegmenter], cfg: EvaluateConfig,
                  truth: TruthConfig | None, device: torch.device, n_frames: int, run: Run, task: Task, *,
                  metrics_dir: Path, reports_dir: Path, plots_dir: Path) -> None:
    """metrics/evaluate/<name>.json, reports/comparison.md and .csv, plots/evaluate/*.png; models ranked by
    Dice (person) or mIoU (characters)."""
    spec = CHARACTERS_REPORT if task.name == CHARACTERS else PERSON_REPORT
    ranked = ranking(results, spec.rank_key)
    with atomic_dir(metrics_dir) as tmp:
        for name in ranked:
            write_json(tmp / f"{name}.json", results[name])
    characters = list(task.characters) or sorted({c for r in results.values() for c in r["dice_per_character"]})
    has_truth = all("truth" in r for r in results.values())
    write_comparison(reports_dir, ranked, results, {n: s.meta for n, s in loaded.items()}, cfg,
                     truth.folder if truth and has_truth else None, device, n_frames, spec, characters)
    with atomic_dir(plots_dir) as tmp:
        plot_bars(tmp / "metrics.png", ranked, results, spec, has_truth)
        key, title = spec.per_character[0][1:]
        plot_per_character(tmp / f"{key}.png", ranked, results, characters, key, title)
        if task.name == CHARACTERS:
            for name in ranked:
                plot_confusion(tmp / f"confusion_{name}.png", run.scores[name].matrix, task, name)
        if run.grid:
            plot_grid(tmp / "qualitative.png", run.grid, ranked, task)


def _device_name(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"


def _cell(value: Any, fmt: str) -> str:
    """A table cell: '-' for a score that does not exist (a class in neither prediction nor target)."""
    return "-" if value in ("", None) or np.isnan(value) else format(value, fmt)


def write_comparison(reports_dir: Path, ranked: list[str], results: dict[str, dict[str, Any]],
                     metas: dict[str, dict[str, Any]], cfg: EvaluateConfig, truth_dir: Path | None,
                     device: torch.device, n_frames: int, spec: ReportSpec = PERSON_REPORT,
                     characters: list[str] | None = None) -> None:
    """reports/comparison.csv and .md. characters: the per-character columns (default: every one scored)."""
    characters = characters or sorted({c for r in results.values() for c in r["dice_per_character"]})
    per_character = [(f"{prefix}[{c}]", key, c) for prefix, key, _ in spec.per_character for c in characters]
    truth_per_character = [(f"truth_{prefix}[{c}]", key, c) for prefix, key, _ in spec.truth_per_character
                           for c in characters]
    rows = []
    for rank, name in enumerate(ranked, 1):
        meta, r = metas[name], results[name]
        row = {"rank": rank, "model": name, "arch": meta["arch"], "encoder": meta["encoder"],
               "encoder_weights": meta["cfg"].get("encoder_weights") or "none", "img_size": meta["img_size"],
               "best_epoch": meta["epoch"], **{key: r.get(key, "") for key, _, _ in spec.columns},
               **{column: r.get(key, {}).get(c, "") for column, key, c in per_character}}
        if truth_dir is not None:
            row.update({f"truth_{key}": r["truth"].get(key, "") for key, _, _ in spec.truth_columns})
            row.update({column: r["truth"].get(key, {}).get(c, "") for column, key, c in truth_per_character})
        rows.append(row)
    reports_dir.mkdir(parents=True, exist_ok=True)
    write_csv(reports_dir / "comparison.csv", rows, list(rows[0]))

    def table(headers: list[str], body: list[list[str]]) -> str:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])

    def character_table(prefix: str) -> str:
        return table(["Model"] + characters,
                     [[row["model"]] + [_cell(row[f"{prefix}[{c}]"], ".4f") for c in characters] for row in rows])

    info = ["Rank", "Model", "Arch", "Encoder", "Weights", "Size", "Epoch"]
    text = [
        "# Model comparison", "",
        f"{n_frames} validation frames, {len(characters)} character(s), ranked by {spec.rank_text}. "
        f"Targets: {spec.targets}. Boundary F1 within {cfg.boundary_tolerance_px:g} px. "
        f"Latency: one frame (resize, forward, resize back) on {_device_name(device)}, median.", "",
        table(info + [h for _, h, _ in spec.columns],
              [[str(row[k]) for k in ("rank", "model", "arch", "encoder", "encoder_weights", "img_size", "best_epoch")]
               + [_cell(row[key], fmt) for key, _, fmt in spec.columns] for row in rows]), ""]
    for prefix, _, title in spec.per_character:
        text += [f"## {title}", "", character_table(prefix), ""]
    if truth_dir is not None:
        text += [f"## Against the exact ground truth ({truth_dir})", "",
                 table(["Model"] + [h for _, h, _ in spec.truth_columns],
                       [[row["model"]] + [_cell(row[f"truth_{key}"], fmt) for key, _, fmt in spec.truth_columns]
                        for row in rows]), ""]
        for prefix, _, title in spec.truth_per_character:
            text += [f"### {title} (exact truth)", "", character_table(f"truth_{prefix}"), ""]
    write_text_atomic(reports_dir / "comparison.md", "\n".join(text))


def _save(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    write_bytes_atomic(path, buffer.getvalue())


def plot_bars(path: Path, ranked: list[str], results: dict[str, dict[str, Any]], spec: ReportSpec,
              has_truth: bool) -> None:
    """One bar chart per metric of the comparison table (and of the exact truth), models in ranking order."""
    charts = [(key, header, lambda r, k=key: r.get(k, np.nan)) for key, header, _ in spec.columns]
    if has_truth:
        charts += [(f"truth_{key}", f"{header} (exact truth)", lambda r, k=key: r["truth"].get(k, np.nan))
                   for key, header, _ in spec.truth_columns]
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
    _save(fig, path)


def plot_per_character(path: Path, ranked: list[str], results: dict[str, dict[str, Any]], characters: list[str],
                       key: str, title: str) -> None:
    """Grouped bars: one group per character, one bar per model (no bar where a score does not exist)."""
    fig = Figure(figsize=(2 + 0.5 * max(1, len(characters)) * len(ranked), 3.5))
    fig.subplots_adjust(bottom=0.25)
    ax = fig.subplots()
    width = 0.8 / len(ranked)
    for i, name in enumerate(ranked):
        values = [results[name].get(key, {}).get(c, np.nan) for c in characters]
        ax.bar(np.arange(len(characters)) + i * width, values, width, label=name)
    ax.set_xticks(np.arange(len(characters)) + 0.4 - width / 2, characters, rotation=30)
    ax.set_ylim(0, 1.08)
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_confusion(path: Path, matrix: np.ndarray, task: Task, name: str) -> None:
    """The class confusion of one model, each row (a true class) divided by its pixels: where alice's pixels went."""
    pixels = matrix.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(pixels > 0, matrix / np.maximum(pixels, 1), np.nan)
    n = len(task.classes)
    fig = Figure(figsize=(2.5 + 0.7 * n, 2 + 0.6 * n))
    fig.subplots_adjust(left=0.25, bottom=0.25, right=0.95, top=0.9)
    ax = fig.subplots()
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for row in range(n):
        for col in range(n):
            if not np.isnan(shares[row, col]):
                ax.text(col, row, f"{shares[row, col]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if shares[row, col] > 0.5 else "black")
    ax.set_xticks(range(n), task.classes, rotation=30, fontsize=8)
    ax.set_yticks(range(n), task.classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{name}: share of each true class's pixels", fontsize=10)
    _save(fig, path)


def plot_grid(path: Path, grid: list[dict[str, Any]], ranked: list[str], task: Task | None = None) -> None:
    """The same validation frames across all models: person task green/red/blue for true positive, false
    positive, false negative; characters task each class in its colour (task.palette), with a legend."""
    task = task or person_task()
    colours = palette(task)
    columns = ["frame", "label"] + ranked
    fig = Figure(figsize=(2.4 * len(columns), 1.6 * len(grid) + 0.6))
    axes = fig.subplots(len(grid), len(columns), squeeze=False,
                        gridspec_kw={"wspace": 0.05, "hspace": 0.1, "left": 0.05, "right": 0.99, "top": 0.95,
                                     "bottom": 0.6 / (1.6 * len(grid) + 0.6)})
    for r, row in enumerate(grid):
        if task.name == PERSON:
            panels = [row["image"], overlay(row["image"], row["target"], row["target"])] + \
                     [overlay(row["image"], row["preds"][name], row["target"]) for name in ranked]
        else:
            panels = [row["image"], tint(row["image"], row["target"], colours)] + \
                     [tint(row["image"], row["preds"][name], colours) for name in ranked]
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
        axes[r][0].set_ylabel(f"{row['frame'].character}\n{row['frame'].id[-8:]}", fontsize=7)
    legend = OVERLAY.items() if task.name == PERSON else zip(task.classes[1:], colours[1:])
    handles = [Patch(color=np.array(color) / 255, label=name) for name, color in legend]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    _save(fig, path)
