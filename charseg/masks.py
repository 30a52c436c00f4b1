"""The masks stage: one binary person mask per frame, paired with its frame by id.

    python -m stages.masks --frames data/frames --out data/masks --plots plots/masks --metrics metrics/masks.json

labels.method yolo_sam: YOLOv8 person boxes prompt SAM (stages/lib/labelers.py) and the union of a
frame's masks is cleaned by labels.refine. Labels go through a content-addressed cache
(labels.cache_dir, keyed by the frame's bytes and the weights and params that change SAM's answer), so
adding a video, resuming an interrupted run or changing labels.refine sends only unseen frames to SAM.
labels.method import: the masks in labels.import_dir replace the weak labels; every mask that does not
fit (missing, unreadable, wrong size, not binary) is reported by name, and then nothing is written; a
person painted only in the alpha channel is read from it, and empty masks on frames that are not
uniform are kept but named in one warning (they would be trained as 'nobody here').

Writes data/masks/images/<id>.png (0/255, frame size; all zero for `empty` frames, none for `failed`
ones), data/masks/manifest.csv (the frames manifest + status, n_persons, coverage, boxes, box_scores,
sam_scores, truth_dice, note) and data/masks/report.json (what made the labels); QA overlays and
histograms in plots/masks, numbers in metrics/masks.json.
Status `labelled`: a person mask. `empty`: nobody found, an all-background mask (labels.keep_empty
decides whether it is trained on). `failed`: the frame is unreadable, or persons were found but their
mask is empty after refinement; never a training example.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from charseg.errors import CharsegError, require, run_cli, warn
from charseg.io import (atomic_dir, imread, imwrite_atomic, read_manifest, slugify,
                          write_csv, write_json)
from charseg.labels import (FrameLabel, LabelCache, MaskMismatch, RefineConfig, YoloSamLabeler,
                                 check_model_type, is_uniform, mask_files, read_binary_mask, refine_mask)
from charseg.metrics import Counts, confusion, dice
from charseg.config import load_params, number, section

LABEL_COLUMNS = ("status", "n_persons", "coverage", "boxes", "box_scores", "sam_scores", "truth_dice", "note")
METHODS = ("yolo_sam", "import")
TRACKED_INPUTS = Path("data/raw")  # the folder dvc.yaml's masks stage depends on, besides frames and weights
TILE_WIDTH, GRID_COLUMNS = 320, 4


@dataclass(frozen=True)
class LabelsConfig:
    method: str
    detector_weights: Path
    conf: float
    min_box_area: float
    imgsz: int
    batch: int
    sam_model_type: str
    sam_checkpoint: Path
    device: str
    half: bool
    refine: RefineConfig
    import_dir: Path
    mask_index: str
    truth_dir: Path | None
    cache_dir: Path
    qa_samples: int


def _part(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    value = cfg.get(key)
    require(isinstance(value, dict), f"params.yaml: 'labels.{key}:' must be a section (see params.yaml's comments)")
    return value


def _text(cfg: dict[str, Any], key: str, where: str) -> str:
    value = cfg.get(key)
    require(isinstance(value, str) and value.strip(), f"params.yaml: '{where}.{key}' must be a non-empty text, "
                                                      f"got {value!r}")
    return value


def labels_config(params: dict[str, Any]) -> LabelsConfig:
    """The labels: section, checked whole before any work (an unknown model_type stops here too)."""
    cfg = section(params, "labels")
    method = cfg.get("method")
    require(method in METHODS, f"params.yaml: 'labels.method' is {method!r}: use one of {', '.join(METHODS)}")
    detector, sam, refine = _part(cfg, "detector"), _part(cfg, "sam"), _part(cfg, "refine")
    check_model_type(_text(sam, "model_type", "labels.sam"))
    half = cfg.get("half")
    require(isinstance(half, bool), f"params.yaml: 'labels.half' must be true or false, got {half!r}")
    truth_dir = cfg.get("truth_dir")
    require(truth_dir is None or (isinstance(truth_dir, str) and truth_dir.strip()),
            f"params.yaml: 'labels.truth_dir' must be null or a folder, got {truth_dir!r}")
    mask_index = cfg.get("mask_index")
    require(mask_index is None or isinstance(mask_index, str),
            f"params.yaml: 'labels.mask_index' must be null or a CSV file name, got {mask_index!r}")
    return LabelsConfig(
        method=method,
        detector_weights=Path(_text(detector, "weights", "labels.detector")),
        conf=number(detector, "conf", lo=0, hi=1, where="labels.detector"),
        min_box_area=number(detector, "min_box_area", lo=0, hi=1, where="labels.detector"),
        imgsz=number(detector, "imgsz", lo=32, integer=True, where="labels.detector"),
        batch=number(detector, "batch", lo=1, integer=True, where="labels.detector"),
        sam_model_type=sam["model_type"],
        sam_checkpoint=Path(_text(sam, "checkpoint", "labels.sam")),
        device=_text(cfg, "device", "labels"),
        half=half,
        refine=RefineConfig(
            close_kernel=number(refine, "close_kernel", lo=0, integer=True, where="labels.refine"),
            open_kernel=number(refine, "open_kernel", lo=0, integer=True, where="labels.refine"),
            min_area=number(refine, "min_area", lo=0, hi=1, where="labels.refine"),
            max_hole_area=number(refine, "max_hole_area", lo=0, hi=1, where="labels.refine")),
        import_dir=Path(_text(cfg, "import_dir", "labels")),
        mask_index=mask_index or "",
        truth_dir=Path(truth_dir) if truth_dir else None,
        cache_dir=Path(_text(cfg, "cache_dir", "labels")),
        qa_samples=number(cfg, "qa_samples", lo=0, integer=True, where="labels"),
    )


class MaskSaver:
    """Writes each final mask as <id>.png and measures it (coverage; Dice against exact masks if given)."""

    def __init__(self, images_dir: Path, truth_files: dict[str, Path] | None):
        self.images_dir, self.truth_files = images_dir, truth_files
        self.truth_problems: list[str] = []
        self.truth_counts, self.truth_frames = Counts.zero(), 0  # summed: Dice over all frames, as evaluate does
        images_dir.mkdir(parents=True, exist_ok=True)

    def save(self, frame_id: str, mask: np.ndarray) -> dict[str, Any]:
        imwrite_atomic(self.images_dir / f"{frame_id}.png", mask)
        fields: dict[str, Any] = {"coverage": round(np.count_nonzero(mask) / mask.size, 6), "truth_dice": ""}
        if self.truth_files is not None:
            path = self.truth_files.get(frame_id)
            try:
                if path is None:
                    raise MaskMismatch("not listed in the truth index")
                truth = read_binary_mask(path, None, key="labels.truth_dir") > 0
                if truth.shape != mask.shape:  # frames.max_side shrank the frames: score at the truth's size
                    mask = cv2.resize(mask, truth.shape[::-1], interpolation=cv2.INTER_NEAREST)
                counts = confusion(mask > 0, truth)
                self.truth_counts += counts
                self.truth_frames += 1
                fields["truth_dice"] = round(dice(counts), 6)
            except MaskMismatch as err:
                self.truth_problems.append(f"{frame_id}: {err}")
        return fields


def _failed(note: str) -> dict[str, Any]:
    return {"status": "failed", "note": note}


def _numbers(values: np.ndarray, digits: int) -> str:
    return json.dumps(np.round(np.asarray(values, dtype=float), digits).tolist())


def label_frames(rows: list[dict[str, str]], images_dir: Path, labeler: YoloSamLabeler, cache: LabelCache,
                 refine: RefineConfig, batch: int, saver: MaskSaver) -> tuple[dict[str, dict], Counter]:
    """YOLO+SAM labels per frame id, from the cache where possible; misses are labelled `batch` at a time."""
    results: dict[str, dict] = {}
    stats: Counter = Counter()
    pending: list[tuple[str, str, np.ndarray]] = []
    progress = tqdm(total=len(rows), desc="masks", unit="frame")

    def done(frame_id: str, fields: dict[str, Any]) -> None:
        results[frame_id] = fields
        progress.update()

    def finish(frame_id: str, label: FrameLabel) -> dict[str, Any]:
        n = len(label.boxes)
        fields = {"n_persons": n, "boxes": _numbers(label.boxes, 1), "box_scores": _numbers(label.box_scores, 4),
                  "sam_scores": _numbers(label.sam_scores, 4), "note": ""}
        if n == 0:
            return {**fields, "status": "empty", **saver.save(frame_id, np.zeros(label.mask.shape, np.uint8))}
        mask = refine_mask(label.mask, refine)
        if not mask.any():
            return {**fields, **_failed(f"{n} person(s) found but their mask is empty after refinement")}
        return {**fields, "status": "labelled", **saver.save(frame_id, mask)}

    def flush() -> None:
        for (frame_id, key, _), label in zip(pending, labeler.label([image for _, _, image in pending])):
            cache.put(key, label)  # at once: an interrupted run keeps every frame finished so far
            done(frame_id, finish(frame_id, label))
            stats["labelled_now"] += 1
        pending.clear()

    with progress:
        for row in rows:
            frame_id = row["id"]
            path = images_dir / f"{frame_id}.jpg"
            try:
                data = path.read_bytes()
            except OSError as err:
                done(frame_id, _failed(f"cannot read {path}: {err.strerror or err}"))
                continue
            key = cache.key(data)
            cached = cache.get(key)
            if cached is not None:
                stats["from_cache"] += 1
                done(frame_id, finish(frame_id, cached))
                continue
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
            if image is None:
                done(frame_id, _failed(f"{path} is not a readable image"))
                continue
            pending.append((frame_id, key, image))
            if len(pending) >= batch:
                flush()
        flush()
    return results, stats


def import_masks(rows: list[dict[str, str]], images_dir: Path, folder: Path, index_name: str,
                 saver: MaskSaver) -> dict[str, dict]:
    """The user's masks per frame id; every mask that does not fit is reported, then nothing is kept.
    An empty mask on a frame that shows something is kept (nobody may be there) but warned about,
    once for the run, with the first examples: it is trained as 'nobody here' (labels.keep_empty)."""
    files = mask_files(folder, index_name, rows)
    index = folder / index_name if index_name else None
    results: dict[str, dict] = {}
    problems: list[str] = []
    suspicious: list[str] = []
    for row in tqdm(rows, desc="import masks", unit="frame"):
        frame_id = row["id"]
        if not (images_dir / f"{frame_id}.jpg").is_file():
            results[frame_id] = _failed(f"frame file {images_dir / (frame_id + '.jpg')} is missing")
            continue
        try:
            if frame_id not in files:
                raise MaskMismatch(f"not listed in {index} (video {row['video']}, frame_index {row['frame_index']})")
            mask = read_binary_mask(files[frame_id], (int(row["height"]), int(row["width"])))
        except MaskMismatch as err:
            problems.append(f"{frame_id}: {err}")
            continue
        note = ""
        if not mask.any():
            frame = cv2.imread(str(images_dir / f"{frame_id}.jpg"), cv2.IMREAD_GRAYSCALE)
            if frame is not None and not is_uniform(frame):
                suspicious.append(f"{frame_id} ({files[frame_id]})")
                note = "empty mask on a non-uniform frame"
        results[frame_id] = {"status": "labelled" if mask.any() else "empty", "n_persons": "", "boxes": "",
                             "box_scores": "", "sam_scores": "", "note": note, **saver.save(frame_id, mask)}
    if suspicious and not problems:
        shown = ", ".join(suspicious[:3]) + (f" and {len(suspicious) - 3} more" if len(suspicious) > 3 else "")
        warn(f"{len(suspicious)} imported mask(s) in {folder} are empty although their frame is not uniform: "
             f"{shown}. They are kept as 'nobody here' frames (trained on when labels.keep_empty is true); if a "
             f"person is there, fix those files (the manifest notes them)")
    if problems:
        for problem in problems:
            print(f"mask mismatch: {problem}", file=sys.stderr)
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more above)" if len(problems) > 5 else "")
        raise CharsegError(f"{len(problems)} of {len(rows)} frames have no usable mask in {folder}: {shown}. "
                           f"Masks must be 0/255 (or 0/1) PNGs of the extracted frame's size (frames.max_side "
                           f"shrinks frames), named <frame id>.png or listed in {index_name or 'an index CSV'}; "
                           f"fix them, or set labels.method: yolo_sam")
    return results


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


def tile_grid(tiles: list[np.ndarray]) -> np.ndarray:
    height = max(t.shape[0] for t in tiles)
    cells = [np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0))) for t in tiles]
    cells += [np.zeros_like(cells[0])] * (-len(cells) % GRID_COLUMNS)
    return np.vstack([np.hstack(cells[i:i + GRID_COLUMNS]) for i in range(0, len(cells), GRID_COLUMNS)])


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


def write_qa_plots(plots_dir: Path, rows: list[dict[str, Any]], frames_images: Path, masks_images: Path,
                   samples: int, with_detections: bool) -> None:
    with atomic_dir(plots_dir) as tmp:
        by_character: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            if row["status"] != "failed":
                by_character[row["character"]].append(row)
        for character, char_rows in sorted(by_character.items()):
            char_rows.sort(key=lambda r: (r["video"], float(r["timestamp"]), r["id"]))
            picks = sorted(set(np.linspace(0, len(char_rows) - 1, min(samples, len(char_rows))).round().astype(int)))
            if picks:
                tiles = [overlay_tile(frames_images / f"{char_rows[i]['id']}.jpg",
                                      masks_images / f"{char_rows[i]['id']}.png", char_rows[i]) for i in picks]
                imwrite_atomic(tmp / f"overlays_{slugify(character)}.png", tile_grid(tiles))
        coverage = [float(r["coverage"]) for r in rows if r["status"] == "labelled"]
        _histogram(tmp / "coverage_hist.png", coverage, np.linspace(0, 1, 51),
                   f"Mask coverage of labelled frames ({len(coverage)})", "share of the frame that is person")
        if with_detections:
            persons = [int(r["n_persons"]) for r in rows if r["n_persons"] != ""]
            _histogram(tmp / "persons_hist.png", persons, np.arange(max(persons, default=0) + 2) - 0.5,
                       f"Persons detected per frame ({len(persons)} frames)", "persons")


def summarize(rows: list[dict[str, Any]], saver: MaskSaver) -> dict[str, float | int]:
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
    if saver.truth_frames:
        metrics["truth_dice"] = round(dice(saver.truth_counts), 6)
        metrics["truth_frames"] = saver.truth_frames
    return metrics


# ---------------------------------------------------------------------------------------------

def make_masks(frames_dir: Path, out_dir: Path, plots_dir: Path, metrics_path: Path, cfg: LabelsConfig,
               labeler: YoloSamLabeler | None = None) -> dict[str, float | int]:
    """Masks, manifest, report, QA plots and metrics for every frame of frames_dir.

    `labeler` replaces the one built from cfg's weights files (tests plant detections this way).
    Weights are resolved before anything is written: absent weights stop the run with nothing changed.
    """
    rows = read_manifest(frames_dir / "manifest.csv")
    frames_images = frames_dir / "images"
    if cfg.method == "yolo_sam" and labeler is None:
        labeler = YoloSamLabeler.from_files(
            detector_weights=cfg.detector_weights, conf=cfg.conf, min_box_area=cfg.min_box_area, imgsz=cfg.imgsz,
            sam_model_type=cfg.sam_model_type, sam_checkpoint=cfg.sam_checkpoint, device=cfg.device, half=cfg.half)
    truth_files = mask_files(cfg.truth_dir, cfg.mask_index, rows, key="labels.truth_dir") if cfg.truth_dir else None

    with atomic_dir(out_dir) as tmp:
        saver = MaskSaver(tmp / "images", truth_files)
        if cfg.method == "import":
            results = import_masks(rows, frames_images, cfg.import_dir, cfg.mask_index, saver)
            source: dict[str, Any] = {"import_dir": str(cfg.import_dir), "mask_index": cfg.mask_index or None}
            print(f"masks: imported {len(results)} masks from {cfg.import_dir}")
        else:
            results, stats = label_frames(rows, frames_images, labeler, LabelCache(cfg.cache_dir, labeler.fingerprint),
                                          cfg.refine, cfg.batch, saver)
            source = {**labeler.settings, "refine": asdict(cfg.refine)}
            print(f"masks: {stats['labelled_now']} frames labelled by YOLO+SAM now, {stats['from_cache']} from the "
                  f"label cache ({cfg.cache_dir})")
        manifest = [{**row, **{c: "" for c in LABEL_COLUMNS}, **results[row["id"]]} for row in rows]
        columns = list(rows[0]) + [c for c in LABEL_COLUMNS if c not in rows[0]]
        write_csv(tmp / "manifest.csv", manifest, columns)
        write_json(tmp / "report.json", {
            "method": cfg.method, "source": source, "truth_dir": str(cfg.truth_dir) if cfg.truth_dir else None,
            "statuses": dict(Counter(r["status"] for r in manifest)),
            "failed": [{"id": r["id"], "note": r["note"]} for r in manifest if r["status"] == "failed"],
            "truth_problems": saver.truth_problems})

    if saver.truth_problems:
        warn(f"{len(saver.truth_problems)} frame(s) left out of the truth Dice "
             f"(e.g. {saver.truth_problems[0]}); all are listed in {out_dir / 'report.json'}")
    write_qa_plots(plots_dir, manifest, frames_images, out_dir / "images", cfg.qa_samples, cfg.method == "yolo_sam")
    metrics = summarize(manifest, saver)
    write_json(metrics_path, metrics)
    return metrics


def warn_if_untracked(folder: Path | None, key: str) -> None:
    if folder is None:
        return
    tracked, resolved = TRACKED_INPUTS.resolve(), folder.resolve()
    if resolved != tracked and tracked not in resolved.parents:
        warn(f"labels.{key} {folder} is outside {TRACKED_INPUTS}, which is what dvc.yaml tracks: DVC will "
             f"not notice changes there (re-run with dvc repro -f masks, or move the folder under {TRACKED_INPUTS})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=Path, default=Path("data/frames"), help="frames stage output")
    parser.add_argument("--out", type=Path, default=Path("data/masks"))
    parser.add_argument("--plots", type=Path, default=Path("plots/masks"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/masks.json"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    cfg = labels_config(load_params(args.params))
    warn_if_untracked(cfg.import_dir if cfg.method == "import" else None, "import_dir")
    warn_if_untracked(cfg.truth_dir, "truth_dir")
    metrics = make_masks(args.frames, args.out, args.plots, args.metrics, cfg)
    truth = f", Dice vs truth {metrics['truth_dice']:.3f}" if "truth_dice" in metrics else ""
    print(f"masks: {metrics['frames']} frames: {metrics['labelled']} labelled, {metrics['empty']} empty, "
          f"{metrics['failed']} failed; mean coverage {metrics['mean_coverage']:.3f}{truth}")

