"""The masks stage's work: one binary person mask per frame, paired with its frame by id.

labels.method picks what makes the labels (charseg.labels.detect.build_labeler): yolo_sam, YOLO person
boxes prompting a SAM-family model (labels.sam.model: segment-anything's vit_b/l/h, or ultralytics'
MobileSAM, SAM 2 / 2.1; labels.sam.runtime torch or onnx), or yolo_seg, a YOLO segmentation model's person
masks with no SAM. Either way the union of a frame's person masks is cleaned by labels.refine. Labels go
through a content-addressed cache (labels.cache_dir, keyed by the frame's bytes and the weights and params
that change the labeler's answer), so adding a video, resuming an interrupted run or changing
labels.refine sends only unseen frames to the models.
labels.workers N > 1 (0: one per GPU) labels the frames the cache lacks over N worker processes, one GPU
each on a GPU box (charseg.label_shards), before the one-process pass below assembles everything from the
cache: the outputs are the same bytes for any N, and an interrupted run resumes from the cache.
labels.method import: the masks in labels.import_dir replace the weak labels; every mask that does not
fit (missing, unreadable, wrong size, not binary) is reported by name, and then nothing is written; a
person painted only in the alpha channel is read from it, and empty masks on frames that are not
uniform are kept but named in one warning (they would be trained as 'nobody here').

Writes <masks>/images/<id>.png (0/255, frame size; all zero for `empty` frames, none for `failed`
ones), <masks>/manifest.csv (the frames manifest + LABEL_COLUMNS: status, n_persons, coverage, boxes,
box_scores, sam_scores, truth_dice, note) and <masks>/report.json (what made the labels); QA overlays
and histograms in the plots folder, numbers in the metrics file.
Status `labelled`: a person mask. `empty`: nobody found, an all-background mask (labels.keep_empty
decides whether it is trained on). `failed`: the frame is unreadable, or persons were found but their
mask is empty after refinement; never a training example.
"""
from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np
from tqdm import tqdm

from charseg.config import LabelsConfig, RefineConfig
from charseg.errors import CharsegError, warn
from charseg.io import atomic_dir, imread, imwrite_atomic, read_manifest, slugify, write_csv, write_json
from charseg.label_shards import Labeler, LabelerFactory, label_in_workers, labels_through_cache, worker_count
from charseg.labels.cache import LabelCache
from charseg.labels.detect import FrameLabel, build_labeler
from charseg.labels.imported import (MaskMismatch, is_uniform, mask_files, read_binary_mask, read_character_map,
                                     read_character_values)
from charseg.labels.refine import refine_instances, refine_mask
from charseg.layout import INSTANCE_COLUMNS, LABEL_COLUMNS, FramesDir, MasksDir
from charseg.metrics import Counts, confusion, dice
from charseg.tiles import spread_indices, tile_grid

TILE_WIDTH, GRID_COLUMNS = 320, 4


# ---------------------------------------------------------------------------------------------
# Saving masks, and scoring them against exact ones
# ---------------------------------------------------------------------------------------------

class TruthScore:
    """Dice of the final masks against exact masks (labels.truth_dir), summed over all frames as evaluate
    does; frames whose exact mask cannot be used are listed in `problems`, not scored."""

    def __init__(self, truth_files: dict[str, Path]):
        self.truth_files = truth_files
        self.problems: list[str] = []
        self.counts, self.frames = Counts.zero(), 0

    def score(self, frame_id: str, mask: np.ndarray) -> float | str:
        """The frame's Dice (rounded), or "" when its exact mask is absent or unusable."""
        path = self.truth_files.get(frame_id)
        try:
            if path is None:
                raise MaskMismatch("not listed in the truth index")
            truth = read_binary_mask(path, None, key="labels.truth_dir") > 0
        except MaskMismatch as err:
            self.problems.append(f"{frame_id}: {err}")
            return ""
        if truth.shape != mask.shape:  # frames.max_side shrank the frames: score at the truth's size
            mask = cv2.resize(mask, truth.shape[::-1], interpolation=cv2.INTER_NEAREST)
        counts = confusion(mask > 0, truth)
        self.counts += counts
        self.frames += 1
        return round(dice(counts), 6)


class MaskSaver:
    """Writes each final mask as the masks folder's <id>.png and its instance map as instances/<id>.png,
    collects the instances' rows (INSTANCE_COLUMNS) and measures the mask (coverage; Dice against exact
    masks when `truth` is given)."""

    def __init__(self, out: MasksDir, truth: TruthScore | None):
        self.out, self.truth = out, truth
        self.instance_rows: list[dict[str, Any]] = []
        out.images.mkdir(parents=True, exist_ok=True)
        out.instances.mkdir(parents=True, exist_ok=True)

    def save(self, frame_id: str, mask: np.ndarray, instances: np.ndarray,
             details: Mapping[int, Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """`instances`: uint16 ids whose non-zero pixels are `mask`'s; `details`: per id, the INSTANCE_COLUMNS
        the map cannot tell (box_score, sam_score, character; the box is the detector's when given)."""
        imwrite_atomic(self.out.mask(frame_id), mask)
        imwrite_atomic(self.out.instance_map(frame_id), instances.astype(np.uint16))
        self.instance_rows += instance_rows(frame_id, instances, details or {})
        return {"coverage": round(np.count_nonzero(mask) / mask.size, 6),
                "truth_dice": self.truth.score(frame_id, mask) if self.truth is not None else ""}


def instance_rows(frame_id: str, instances: np.ndarray, details: Mapping[int, Mapping[str, Any]]) -> list[dict]:
    """One INSTANCE_COLUMNS row per id present in the map; the box is the blob's extent unless details give one."""
    rows = []
    for value in np.unique(instances[instances > 0]).tolist():
        ys, xs = np.nonzero(instances == value)
        row = {"id": frame_id, "instance": value, "x1": int(xs.min()), "y1": int(ys.min()), "x2": int(xs.max()) + 1,
               "y2": int(ys.max()) + 1, "box_score": "", "sam_score": "", "area": int(len(xs)), "character": ""}
        rows.append({**row, **details.get(value, {})})
    return rows


def _failed(note: str) -> dict[str, Any]:
    return {"status": "failed", "note": note}


def _numbers(values: np.ndarray, digits: int) -> str:
    return json.dumps(np.round(np.asarray(values, dtype=float), digits).tolist())


# ---------------------------------------------------------------------------------------------
# labels.method yolo_sam and yolo_seg
# ---------------------------------------------------------------------------------------------

def final_mask(label: FrameLabel, refine: RefineConfig) -> np.ndarray:
    """The 0/255 uint8 mask a label becomes: its raw mask refined, all zero when nobody was found."""
    return refine_mask(label.mask, refine) if len(label.boxes) else np.zeros(label.mask.shape, np.uint8)


def _box_details(label: FrameLabel) -> dict[int, dict[str, Any]]:
    """Per instance id (box index + 1): the detector's box and score, and SAM's score when SAM ran."""
    details = {}
    for index, box in enumerate(np.asarray(label.boxes).reshape(-1, 4)):
        x1, y1, x2, y2 = (round(float(v), 1) for v in box)
        details[index + 1] = {"x1": x1, "y1": y1, "x2": x2, "y2": y2,
                              "box_score": round(float(label.box_scores[index]), 4),
                              "sam_score": round(float(label.sam_scores[index]), 4) if len(label.sam_scores) else ""}
    return details


class FrameLabeller:
    """Turns a frame's FrameLabel (fresh or cached) into its manifest fields: refined, saved, measured."""

    def __init__(self, refine: RefineConfig, saver: MaskSaver):
        self.refine, self.saver = refine, saver

    def fields(self, frame_id: str, label: FrameLabel) -> dict[str, Any]:
        n = len(label.boxes)
        fields = {"n_persons": n, "boxes": _numbers(label.boxes, 1), "box_scores": _numbers(label.box_scores, 4),
                  "sam_scores": _numbers(label.sam_scores, 4), "note": ""}
        mask = final_mask(label, self.refine)
        instances = refine_instances(label.instances, mask)
        if n == 0:
            return {**fields, "status": "empty", **self.saver.save(frame_id, mask, instances)}
        if not mask.any():
            return {**fields, **_failed(f"{n} person(s) found but their mask is empty after refinement")}
        return {**fields, "status": "labelled", **self.saver.save(frame_id, mask, instances, _box_details(label))}


def label_frames(rows: list[dict[str, str]], frames: FramesDir, labeler: Labeler, cache: LabelCache,
                 batch: int, labeller: FrameLabeller) -> tuple[dict[str, dict], Counter]:
    """Labels per frame id, from the cache where possible; misses are labelled `batch` at a time."""
    results: dict[str, dict] = {}
    stats: Counter = Counter()
    paths = ((row["id"], frames.image(row["id"])) for row in rows)
    with tqdm(total=len(rows), desc="masks", unit="frame") as progress:
        for frame_id, found, fresh in labels_through_cache(paths, labeler, cache, batch):
            if found.label is None:
                results[frame_id] = _failed(found.failure)
            else:
                results[frame_id] = labeller.fields(frame_id, found.label)
                stats["labelled_now" if fresh else "from_cache"] += 1
            progress.update()
    return results, stats


# ---------------------------------------------------------------------------------------------
# labels.method import
# ---------------------------------------------------------------------------------------------

class ImportedMask:
    """Reads one user mask as (0/255 mask, uint16 instance map, per-instance details): a binary mask's
    connected blobs are its instances (their identity is the identity stage's guess); with
    labels.import_identity, a per-character mask's values are taken as they are, one instance per character."""

    def __init__(self, folder: Path, index_name: str | None, rows: list[dict[str, str]], with_identity: bool):
        self.values = read_character_values(folder) if with_identity else None
        self.files = mask_files(folder, index_name, rows, column="character_mask" if with_identity else "mask")

    def read(self, path: Path, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, dict[int, dict[str, Any]]]:
        if self.values is None:
            mask = read_binary_mask(path, size)
            _, blobs = cv2.connectedComponents((mask > 0).astype(np.uint8), connectivity=8)
            return mask, blobs.astype(np.uint16), {}
        values = read_character_map(path, size, self.values)
        details = {value: {"character": self.values[value]} for value in np.unique(values[values > 0]).tolist()}
        return (values > 0).astype(np.uint8) * 255, values, details


def import_masks(rows: list[dict[str, str]], frames: FramesDir, folder: Path, index_name: str | None,
                 saver: MaskSaver, with_identity: bool = False) -> dict[str, dict]:
    """The user's masks per frame id; every mask that does not fit is reported, then nothing is kept.
    An empty mask on a frame that shows something is kept (nobody may be there) but warned about,
    once for the run, with the first examples: it is trained as 'nobody here' (labels.keep_empty)."""
    reader = ImportedMask(folder, index_name, rows, with_identity)
    files = reader.files
    index = folder / index_name if index_name else None
    results: dict[str, dict] = {}
    problems: list[str] = []
    suspicious: list[str] = []
    for row in tqdm(rows, desc="import masks", unit="frame"):
        frame_id, frame_path = row["id"], frames.image(row["id"])
        if not frame_path.is_file():
            results[frame_id] = _failed(f"frame file {frame_path} is missing")
            continue
        try:
            if frame_id not in files:
                raise MaskMismatch(f"not listed in {index} (video {row['video']}, frame_index {row['frame_index']})")
            mask, instances, details = reader.read(files[frame_id], (int(row["height"]), int(row["width"])))
        except MaskMismatch as err:
            problems.append(f"{frame_id}: {err}")
            continue
        note = ""
        if not mask.any() and _shows_something(frame_path):
            suspicious.append(f"{frame_id} ({files[frame_id]})")
            note = "empty mask on a non-uniform frame"
        results[frame_id] = {"status": "labelled" if mask.any() else "empty", "n_persons": "", "boxes": "",
                             "box_scores": "", "sam_scores": "", "note": note,
                             **saver.save(frame_id, mask, instances, details)}
    if problems:
        raise _mismatches(problems, len(rows), folder, index_name)
    if suspicious:
        _warn_empty_imports(suspicious, folder)
    return results


def _shows_something(frame_path: Path) -> bool:
    frame = cv2.imread(str(frame_path), cv2.IMREAD_GRAYSCALE)
    return frame is not None and not is_uniform(frame)


def _warn_empty_imports(suspicious: list[str], folder: Path) -> None:
    shown = ", ".join(suspicious[:3]) + (f" and {len(suspicious) - 3} more" if len(suspicious) > 3 else "")
    warn(f"{len(suspicious)} imported mask(s) in {folder} are empty although their frame is not uniform: "
         f"{shown}. They are kept as 'nobody here' frames (trained on when labels.keep_empty is true); if a "
         f"person is there, fix those files (the manifest notes them)")


def _mismatches(problems: list[str], frames: int, folder: Path, index_name: str | None) -> CharsegError:
    """Every problem printed on its own line; the error names the first few and how to fix them."""
    for problem in problems:
        print(f"mask mismatch: {problem}", file=sys.stderr)
    shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more above)" if len(problems) > 5 else "")
    return CharsegError(f"{len(problems)} of {frames} frames have no usable mask in {folder}: {shown}. "
                        f"Masks must be 0/255 (or 0/1) PNGs of the extracted frame's size (frames.max_side "
                        f"shrinks frames), named <frame id>.png or listed in {index_name or 'an index CSV'}; "
                        f"fix them, or set labels.method: yolo_sam")


# ---------------------------------------------------------------------------------------------
# QA: overlays, histograms, metrics
# ---------------------------------------------------------------------------------------------

def overlay_tile(frame_path: Path, mask_path: Path, row: dict[str, Any]) -> np.ndarray:
    """The frame with the mask outline (green) and detector boxes (red), captioned, TILE_WIDTH wide."""
    try:
        image, mask = imread(frame_path), imread(mask_path, cv2.IMREAD_GRAYSCALE)
    except CharsegError:
        image = np.full((int(row["height"]), int(row["width"]), 3), 64, np.uint8)
        mask = np.zeros(image.shape[:2], np.uint8)
    scale = TILE_WIDTH / image.shape[1]
    tile = cv2.resize(image, (TILE_WIDTH, max(1, round(image.shape[0] * scale))), interpolation=cv2.INTER_AREA)
    small = cv2.resize(mask, (tile.shape[1], tile.shape[0]), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours((small > 127).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(tile, contours, -1, (0, 255, 0), 2)
    for x1, y1, x2, y2 in json.loads(row["boxes"] or "[]"):
        cv2.rectangle(tile, (round(x1 * scale), round(y1 * scale)), (round(x2 * scale), round(y2 * scale)),
                      (0, 0, 255), 1)
    caption = np.zeros((18, tile.shape[1], 3), np.uint8)
    text = f"{row['id'][-28:]} {row['status']} {float(row['coverage'] or 0):.0%}"
    cv2.putText(caption, text, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return np.vstack([caption, tile])


def _histogram(path: Path, values: list[float], bins: Any, title: str, xlabel: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=bins, color="#4c72b0", edgecolor="white")
    ax.set(title=title, xlabel=xlabel, ylabel="frames")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def spread_sample(rows: list[dict[str, Any]], samples: int) -> list[dict[str, Any]]:
    """Up to `samples` of the rows (one character's frames), evenly spread over its videos' time: the same
    rows for the same manifest, whatever order it lists them in."""
    ordered = sorted(rows, key=lambda r: (r["video"], float(r["timestamp"]), r["id"]))
    return [ordered[i] for i in spread_indices(len(ordered), samples)]


def _overlay_grids(tmp: Path, rows: list[dict[str, Any]], frames: FramesDir, masks: MasksDir, samples: int) -> None:
    """overlays_<character>.png: up to `samples` frames per character, spread over its videos' time."""
    by_character: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["status"] != "failed":
            by_character[row["character"]].append(row)
    for character, char_rows in sorted(by_character.items()):
        picks = spread_sample(char_rows, samples)
        if picks:
            tiles = [overlay_tile(frames.image(row["id"]), masks.mask(row["id"]), row) for row in picks]
            imwrite_atomic(tmp / f"overlays_{slugify(character)}.png", tile_grid(tiles, GRID_COLUMNS))


def write_qa_plots(plots_dir: Path, rows: list[dict[str, Any]], frames: FramesDir, masks: MasksDir,
                   samples: int, with_detections: bool) -> None:
    with atomic_dir(plots_dir) as tmp:
        _overlay_grids(tmp, rows, frames, masks, samples)
        coverage = [float(r["coverage"]) for r in rows if r["status"] == "labelled"]
        _histogram(tmp / "coverage_hist.png", coverage, np.linspace(0, 1, 51),
                   f"Mask coverage of labelled frames ({len(coverage)})", "share of the frame that is person")
        if with_detections:
            persons = [int(r["n_persons"]) for r in rows if r["n_persons"] != ""]
            _histogram(tmp / "persons_hist.png", persons, np.arange(max(persons, default=0) + 2) - 0.5,
                       f"Persons detected per frame ({len(persons)} frames)", "persons")


def summarize(rows: list[dict[str, Any]], truth: TruthScore | None) -> dict[str, float | int]:
    counts = Counter(r["status"] for r in rows)
    coverage = [float(r["coverage"]) for r in rows if r["status"] == "labelled"]
    metrics: dict[str, float | int] = {"frames": len(rows), "labelled": counts["labelled"], "empty": counts["empty"],
                                       "failed": counts["failed"],
                                       "mean_coverage": round(float(np.mean(coverage)), 6) if coverage else 0.0}
    persons = [int(r["n_persons"]) for r in rows if r["n_persons"] != ""]
    if persons:
        metrics["mean_persons"] = round(float(np.mean(persons)), 4)
    sam_scores = [s for r in rows if r["sam_scores"] for s in json.loads(r["sam_scores"])]
    if sam_scores:
        metrics["mean_sam_score"] = round(float(np.mean(sam_scores)), 6)
    if truth is not None and truth.frames:
        metrics["truth_dice"] = round(dice(truth.counts), 6)
        metrics["truth_frames"] = truth.frames
    return metrics


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def make_labels(rows: list[dict[str, str]], frames: FramesDir, cfg: LabelsConfig, labeler: Labeler | None,
                saver: MaskSaver, workers: LabelerFactory | None = None) -> tuple[dict[str, dict], dict[str, Any]]:
    """Each frame's manifest fields by cfg.method, and the report's `source` (what made the labels).
    With `workers` (the factory of the workers' labelers), the frames missing from the label cache are
    labelled first over worker_count(cfg) processes; the fields are then read from the cache."""
    if cfg.method == "import":
        results = import_masks(rows, frames, cfg.import_dir, cfg.mask_index, saver, cfg.import_identity)
        print(f"masks: imported {len(results)} masks from {cfg.import_dir}")
        return results, {"import_dir": str(cfg.import_dir), "mask_index": cfg.mask_index or None,
                         "import_identity": cfg.import_identity}
    assert labeler is not None, "make_masks builds the labeler"
    n_workers = worker_count(cfg) if workers is not None else 1
    by_workers = label_in_workers([frames.image(row["id"]) for row in rows], cfg, workers, labeler.fingerprint,
                                  n_workers) if n_workers > 1 else 0
    results, stats = label_frames(rows, frames, labeler, LabelCache(cfg.cache_dir, labeler.fingerprint),
                                  cfg.detector.batch, FrameLabeller(cfg.refine, saver))
    workers_note = f" ({by_workers} by {n_workers} worker processes)" if by_workers else ""
    print(f"masks: {stats['labelled_now'] + by_workers} frames labelled now{workers_note}, "
          f"{max(0, stats['from_cache'] - by_workers)} from the label cache ({cfg.cache_dir})")
    return results, {**labeler.settings, "refine": asdict(cfg.refine)}


def write_manifest_and_report(out: MasksDir, rows: list[dict[str, str]], results: dict[str, dict],
                              cfg: LabelsConfig, source: dict[str, Any], truth: TruthScore | None) -> list[dict]:
    """manifest.csv (the frames manifest's rows and order + LABEL_COLUMNS) and report.json; the manifest rows."""
    manifest = [{**row, **{c: "" for c in LABEL_COLUMNS}, **results[row["id"]]} for row in rows]
    columns = list(rows[0]) + [c for c in LABEL_COLUMNS if c not in rows[0]]
    write_csv(out.manifest, manifest, columns)
    write_json(out.report, {
        "method": cfg.method, "source": source, "truth_dir": str(cfg.truth_dir) if cfg.truth_dir else None,
        "statuses": dict(Counter(r["status"] for r in manifest)),
        "failed": [{"id": r["id"], "note": r["note"]} for r in manifest if r["status"] == "failed"],
        "truth_problems": truth.problems if truth is not None else []})
    return manifest


def make_masks(frames: FramesDir, out: MasksDir, plots_dir: Path, metrics_path: Path, cfg: LabelsConfig,
               labeler: Labeler | None = None,
               labeler_factory: LabelerFactory = build_labeler) -> dict[str, float | int]:
    """Masks, manifest, report, QA plots and metrics for every frame of `frames`; the metrics.

    The labeler is `labeler_factory(cfg, device=None)`, and with labels.workers > 1 every worker builds its
    own with `labeler_factory(cfg, device=...)`: a module-level callable, so that it pickles into spawned
    processes (tests plant one this way). A `labeler` instance given instead labels in this process only.
    Weights are resolved before anything is written: absent weights stop the run with nothing changed.
    """
    rows = read_manifest(frames.manifest)
    workers = None
    if cfg.method != "import" and labeler is None:
        labeler, workers = labeler_factory(cfg, device=None), labeler_factory
    truth = TruthScore(mask_files(cfg.truth_dir, cfg.mask_index, rows, key="labels.truth_dir")) \
        if cfg.truth_dir else None

    with atomic_dir(out.root) as tmp:
        staged = MasksDir(tmp)
        saver = MaskSaver(staged, truth)
        results, source = make_labels(rows, frames, cfg, labeler, saver, workers)
        manifest = write_manifest_and_report(staged, rows, results, cfg, source, truth)
        write_csv(staged.instance_table, sorted(saver.instance_rows, key=lambda r: (r["id"], r["instance"])),
                  INSTANCE_COLUMNS)

    if truth is not None and truth.problems:
        warn(f"{len(truth.problems)} frame(s) left out of the truth Dice "
             f"(e.g. {truth.problems[0]}); all are listed in {out.report}")
    write_qa_plots(plots_dir, manifest, frames, out, cfg.qa_samples, cfg.method != "import")
    metrics = summarize(manifest, truth)
    write_json(metrics_path, metrics)
    return metrics
