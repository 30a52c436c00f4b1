"""The identity stage's work: every person instance of every frame -> one of the characters (the names of the
character folders) or `other` (anyone who is not one of them), from appearance alone: weak identity.

A frame from videos/alice/ very likely shows alice, but may show others too. So:
1. Each instance gets an appearance embedding, `embed`: HSV colour histograms of its pixels in the upper and
   in the lower half of its mask's rows (a costume: shirt and trousers), L2-normalised, so that cosine
   similarity is a dot product. Instances under MIN_PIXELS pixels are `other` (source too_small): too few
   pixels to tell. `embed(frame, instance_mask) -> vector` is the one extension point: a re-id model, or a
   detector / SAM backbone feature pooled inside the mask, would replace it (out of scope today; its weights
   would then be handled like the labels' weights).
2. Each character's prototype, `find_prototype`: among its folder's instances (those of its one-person frames
   when it has at least MIN_ONE_PERSON_FRAMES, else all), the one with the most neighbours (similarity >=
   identity.min_similarity); the mean of those neighbours, the folder's dominant cluster, so that extras
   and co-stars in the folder do not pull it.
3. Each frame's instances, `assign`: greedily by descending similarity, an instance goes to a character when
   the similarity is at least identity.min_similarity and beats the instance's best similarity to any other
   character by identity.margin, each character at most once per frame; the rest are `other`. A frame of
   alice's folder where alice is not found is recorded (report.json), not forced.
Instances the masks stage already named (imported per-character labels: its instances.csv `character`
column) are taken as they are (source imported). Characters never assigned (a folder without persons...)
are left out of the classes and reported; two prototypes at least identity.duplicate_similarity alike are
warned about (one character under two names?).

Writes <identity>/images/<id>.png (uint8 class ids at the frame's size, for every labelled or empty frame of
the masks manifest), classes.json ({"classes": [background, characters..., other], "not_found": [...]}),
instances.csv (IDENTITY_COLUMNS), manifest.csv and report.json; QA in the plots folder (contact sheets of
assigned crops per class, assignments.png) and the metrics file, with the assignment's accuracy against exact
per-character masks when labels.truth_dir has them (characters.json and a character_mask index column).
"""
from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
from tqdm import tqdm

from charseg.config import IdentityConfig, TruthConfig
from charseg.errors import CharsegError, warn
from charseg.io import atomic_dir, imread, imwrite_atomic, read_csv, read_manifest, slugify, write_csv, write_json
from charseg.labels.imported import (CHARACTERS_FILE, MaskMismatch, mask_files, read_character_map,
                                     read_character_values)
from charseg.layout import (BACKGROUND, FRAME_COLUMNS, IDENTITY_COLUMNS, INSTANCE_COLUMNS, OTHER, FramesDir,
                            IdentityDir, MasksDir)
from charseg.tiles import spread_indices, tile_grid

MIN_PIXELS = 50             # an instance smaller than this is `other`: too few pixels to tell who it is
MIN_ONE_PERSON_FRAMES = 3   # a prototype from one-person frames only when its folder has at least this many
HUE_BINS, SATURATION_BINS, VALUE_BINS = 16, 4, 8
TOLERANCE = 1e-9            # a similarity exactly at a threshold passes despite float rounding
RESERVED = (BACKGROUND, OTHER)  # class names no character folder can take
LABELLED = ("labelled", "empty")  # the masks statuses that get a class map
TRUTH_COLUMN = "character_mask"
TILE_WIDTH, TILE_HEIGHT, CAPTION_HEIGHT, SHEET_COLUMNS = 112, 160, 28, 8
_REDO = "re-run dvc repro masks"

Embedder = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------------------------
# Embedding, prototypes, assignment
# ---------------------------------------------------------------------------------------------

def _colour_histograms(hsv: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The H x S histogram and the V histogram of the OpenCV HSV image's pixels under the uint8 mask, each
    L1-normalised (all zero for no pixels)."""
    parts = (cv2.calcHist([hsv], [0, 1], mask, [HUE_BINS, SATURATION_BINS], [0, 180, 0, 256]).ravel(),
             cv2.calcHist([hsv], [2], mask, [VALUE_BINS], [0, 256]).ravel())
    return np.concatenate([part / max(float(part.sum()), 1.0) for part in parts])


def embed(frame: np.ndarray, instance_mask: np.ndarray) -> np.ndarray:
    """The appearance of one instance: colour histograms of its upper and its lower half (by its mask's rows),
    concatenated and L2-normalised. `frame` BGR uint8, `instance_mask` boolean of the frame's size (not empty)."""
    rows, columns = np.flatnonzero(instance_mask.any(1)), np.flatnonzero(instance_mask.any(0))
    if not len(rows):
        raise ValueError("cannot embed an empty instance mask")
    box = (slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1))
    hsv, mask = cv2.cvtColor(frame[box], cv2.COLOR_BGR2HSV), instance_mask[box].astype(np.uint8)
    middle = (len(mask) + 1) // 2
    upper, lower = mask.copy(), mask
    upper[middle:] = 0
    lower[:middle] = 0
    vector = np.concatenate([_colour_histograms(hsv, upper), _colour_histograms(hsv, lower)])
    return vector / np.linalg.norm(vector)


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64).ravel()
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector


def find_prototype(embeddings: np.ndarray, min_similarity: float, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The dominant cluster of unit rows `embeddings` (N, D): the row with the most neighbours (similarity >=
    min_similarity, itself included; the first of ties) and the unit mean of those neighbours.
    Returns (prototype, indices of the neighbours). Similarities are taken `block` rows at a time."""
    counts = np.concatenate([(embeddings[i:i + block] @ embeddings.T >= min_similarity - TOLERANCE).sum(1)
                             for i in range(0, len(embeddings), block)])
    densest = int(np.argmax(counts))
    neighbours = embeddings @ embeddings[densest] >= min_similarity - TOLERANCE
    neighbours[densest] = True  # itself, whatever rounding says
    members = np.flatnonzero(neighbours)
    return _unit(embeddings[members].mean(0)), members


def runner_up(similarity: np.ndarray) -> np.ndarray:
    """(n, K) -> (n, K): for each instance and character, the instance's best similarity to any *other*
    character (-inf when there is no other)."""
    n, k = similarity.shape
    if k < 2:
        return np.full((n, k), -np.inf)
    best = similarity.argmax(1)
    top_two = -np.sort(-similarity, axis=1)[:, :2]
    result = np.repeat(top_two[:, :1], k, axis=1)
    result[np.arange(n), best] = top_two[:, 1]
    return result


def assign(similarity: np.ndarray, min_similarity: float, margin: float) -> np.ndarray:
    """The character index of each instance of one frame (-1: other) from its (n instances, K characters)
    cosine similarities: pairs in descending similarity, a pair taken when the similarity is at least
    min_similarity, beats the instance's runner-up by at least margin, and neither the instance nor the
    character is taken yet (a character appears at most once per frame)."""
    chosen = np.full(similarity.shape[0], -1)
    if similarity.size == 0:
        return chosen
    eligible = (similarity >= min_similarity - TOLERANCE) & \
               (similarity - runner_up(similarity) >= margin - TOLERANCE)
    pairs = np.argwhere(eligible)  # instance-major: ties go to the earlier instance, then character
    taken: set[int] = set()
    for i, c in pairs[np.argsort(-similarity[eligible], kind="stable")]:
        if chosen[i] < 0 and c not in taken:
            chosen[i] = c
            taken.add(int(c))
    return chosen


# ---------------------------------------------------------------------------------------------
# Reading the masks stage's instances
# ---------------------------------------------------------------------------------------------

@dataclass
class Instance:
    """One person instance of a frame and, once assigned, its class."""
    frame_id: str
    folder: str                  # the frame's character folder
    row: dict[str, str]          # its instances.csv row (INSTANCE_COLUMNS)
    embedding: np.ndarray | None = None
    assigned: str = OTHER
    similarity: float | None = None   # to the assigned character, or the best one when `other`
    runner_up: float | None = None    # the best similarity to any character but that one
    source: str = "weak"              # weak | imported | too_small
    truth: str | None = None          # the exact masks' name for it, when scored

    @property
    def key(self) -> int:
        return int(self.row["instance"])

    @property
    def imported(self) -> str:
        return self.row.get("character") or ""


def read_instances(masks: MasksDir) -> tuple[list[dict[str, Any]], dict[str, list[Instance]]]:
    """The masks manifest's rows and the instances of each labelled frame (by frame id, in instance order)."""
    if not masks.instance_table.is_file():
        raise CharsegError(f"{masks.root} has no per-instance masks ({masks.instance_table.name} and "
                           f"{masks.instances.name}/): it was made before the masks stage kept each person "
                           f"instance; {_REDO}")
    rows = read_manifest(masks.manifest, FRAME_COLUMNS + ("status",))
    table = read_csv(masks.instance_table)
    missing = [c for c in INSTANCE_COLUMNS if table and c not in table[0]]
    if missing:
        raise CharsegError(f"{masks.instance_table} lacks column(s) {', '.join(missing)}: {_REDO}")
    by_id = {row["id"]: row for row in rows}
    by_frame: dict[str, list[Instance]] = defaultdict(list)
    for line, record in enumerate(table, start=2):
        frame = by_id.get(record["id"])
        if frame is None:
            raise CharsegError(f"{masks.instance_table} line {line}: frame {record['id']!r} is not in "
                               f"{masks.manifest}: {_REDO}")
        if not record["instance"].isdigit() or not 0 < int(record["instance"]) < 65536:
            raise CharsegError(f"{masks.instance_table} line {line}: instance {record['instance']!r} is not an "
                               f"id 1-65535: {_REDO}")
        if frame["status"] == "labelled":
            by_frame[record["id"]].append(Instance(record["id"], frame["character"], record))
    for instances in by_frame.values():
        instances.sort(key=lambda inst: inst.key)
    return rows, dict(by_frame)


def read_instance_map(masks: MasksDir, row: dict[str, Any]) -> np.ndarray:
    """instances/<id>.png of a manifest row, checked: single-channel, the frame's size."""
    path = masks.instance_map(row["id"])
    if not path.is_file():
        raise CharsegError(f"{path} is missing although {masks.manifest} lists frame {row['id']} as labelled: {_REDO}")
    ids = imread(path, cv2.IMREAD_UNCHANGED)
    size = (int(row["height"]), int(row["width"]))
    if ids.ndim != 2 or ids.shape != size:
        raise CharsegError(f"{path} is not a single-channel instance map of the frame's size {size[1]}x{size[0]}: "
                           f"{_REDO}")
    return ids


def embed_instances(rows: list[dict[str, Any]], by_frame: dict[str, list[Instance]], frames: FramesDir,
                    masks: MasksDir, embedder: Embedder) -> None:
    """Sets each instance's embedding, or its source (imported, too_small) when it gets none."""
    for row in tqdm([r for r in rows if r["id"] in by_frame], desc="identity: embed", unit="frame"):
        instances = by_frame[row["id"]]
        ids = read_instance_map(masks, row)
        areas = np.bincount(ids.ravel(), minlength=65536)
        unknown = sorted(set((np.flatnonzero(areas[1:]) + 1).tolist()) - {inst.key for inst in instances})
        if unknown:
            raise CharsegError(f"{masks.instance_map(row['id'])} holds instance id(s) {unknown[:5]} that "
                               f"{masks.instance_table} does not list for that frame: {_REDO}")
        frame = None
        for inst in instances:
            if inst.imported:
                inst.source, inst.assigned = "imported", inst.imported if inst.imported not in RESERVED else OTHER
            elif areas[inst.key] < MIN_PIXELS:
                inst.source = "too_small"
            else:
                if frame is None:
                    frame = imread(frames.image(row["id"]))
                    if frame.shape[:2] != ids.shape:
                        raise CharsegError(f"{frames.image(row['id'])} is not the size of its instance map "
                                           f"{masks.instance_map(row['id'])}: the frames changed, {_REDO}")
                inst.embedding = _unit(embedder(frame, ids == inst.key))


@dataclass(frozen=True)
class Prototype:
    vector: np.ndarray
    candidates: int      # instances it was chosen among
    members: int         # of them, in the dominant cluster
    one_person: bool     # candidates from the folder's one-person frames (else all its instances)


def character_prototypes(folders: list[str], by_frame: dict[str, list[Instance]],
                         min_similarity: float) -> dict[str, Prototype]:
    """The prototype of each folder's character that has embedded instances in its own folder."""
    prototypes = {}
    for folder in folders:
        per_frame = [[inst for inst in by_frame[frame_id] if inst.embedding is not None]
                     for frame_id in sorted(by_frame) if by_frame[frame_id][0].folder == folder]
        single = [embedded[0] for embedded in per_frame if len(embedded) == 1]
        one_person = len(single) >= MIN_ONE_PERSON_FRAMES
        candidates = single if one_person else [inst for embedded in per_frame for inst in embedded]
        if candidates:
            vector, members = find_prototype(np.stack([inst.embedding for inst in candidates]), min_similarity)
            prototypes[folder] = Prototype(vector, len(candidates), len(members), one_person)
    return prototypes


def duplicate_pairs(prototypes: dict[str, Prototype], threshold: float) -> list[dict[str, Any]]:
    """Pairs of characters whose prototypes are at least `threshold` alike: maybe one character under two names."""
    names = sorted(prototypes)
    pairs = []
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            similarity = float(prototypes[first].vector @ prototypes[second].vector)
            if similarity >= threshold - TOLERANCE:
                pairs.append({"characters": [first, second], "similarity": round(similarity, 4)})
    return pairs


def assign_instances(by_frame: dict[str, list[Instance]], prototypes: dict[str, Prototype],
                     cfg: IdentityConfig) -> None:
    """Each embedded instance's class, frame by frame (`assign`)."""
    names = sorted(prototypes)
    if not names:
        return
    matrix = np.stack([prototypes[name].vector for name in names])
    for instances in by_frame.values():
        embedded = [inst for inst in instances if inst.embedding is not None]
        if not embedded:
            continue
        similarity = np.stack([inst.embedding for inst in embedded]) @ matrix.T
        chosen, second = assign(similarity, cfg.min_similarity, cfg.margin), runner_up(similarity)
        for j, inst in enumerate(embedded):
            shown = chosen[j] if chosen[j] >= 0 else int(similarity[j].argmax())
            inst.assigned = names[chosen[j]] if chosen[j] >= 0 else OTHER
            inst.similarity = float(similarity[j, shown])
            inst.runner_up = float(second[j, shown]) if len(names) > 1 else None


# ---------------------------------------------------------------------------------------------
# Class maps, scored against exact per-character masks when there are some
# ---------------------------------------------------------------------------------------------

def truth_source(truth: TruthConfig | None,
                 rows: list[dict[str, Any]]) -> tuple[dict[str, Path], dict[int, str]] | None:
    """(frame id -> exact per-character mask, pixel value -> name) when labels.truth_dir has per-character
    masks (characters.json and a character_mask column in its index), else None."""
    if truth is None or not truth.mask_index:
        return None
    index = truth.folder / truth.mask_index
    if not (truth.folder / CHARACTERS_FILE).is_file() or not index.is_file():
        return None
    header = read_csv(index)
    if not header or TRUTH_COLUMN not in header[0]:
        return None
    return (mask_files(truth.folder, truth.mask_index, rows, key="labels.truth_dir", column=TRUTH_COLUMN),
            read_character_values(truth.folder, key="labels.truth_dir"))


def score_frame(instances: list[Instance], ids: np.ndarray, truth_map: np.ndarray, values: dict[int, str],
                characters: set[str]) -> None:
    """Sets each instance's truth: the name most of its pixels have in the exact map (0, a name that is
    no known character, or no pixel at all: other)."""
    if truth_map.shape != ids.shape:  # frames.max_side shrank the frames
        truth_map = cv2.resize(truth_map, ids.shape[::-1], interpolation=cv2.INTER_NEAREST)
    inside = ids > 0
    pairs, counts = np.unique(ids[inside].astype(np.int64) << 16 | truth_map[inside], return_counts=True)
    majority: dict[int, tuple[int, int]] = {}
    for pair, count in zip(pairs.tolist(), counts.tolist()):
        key, value = pair >> 16, pair & 0xFFFF
        if count > majority.get(key, (-1, 0))[0]:
            majority[key] = (count, value)
    for inst in instances:
        name = values.get(majority.get(inst.key, (0, 0))[1], OTHER)
        inst.truth = name if name in characters else OTHER


def write_class_maps(out: IdentityDir, rows: list[dict[str, Any]], by_frame: dict[str, list[Instance]],
                     masks: MasksDir, classes: list[str], truth: tuple[dict[str, Path], dict[int, str]] | None,
                     characters: set[str]) -> tuple[int, list[str]]:
    """images/<id>.png for every labelled or empty frame; with `truth`, each instance's truth name.
    Returns (frames scored against the truth, the problems of those that could not be)."""
    out.images.mkdir(parents=True, exist_ok=True)
    index = {name: i for i, name in enumerate(classes)}
    scored, problems = 0, []
    for row in tqdm([r for r in rows if r["status"] in LABELLED], desc="identity: class maps", unit="frame"):
        instances = by_frame.get(row["id"], [])
        ids = read_instance_map(masks, row) if instances else \
            np.zeros((int(row["height"]), int(row["width"])), np.uint16)
        lookup = np.zeros(65536, np.uint8)
        for inst in instances:
            lookup[inst.key] = index[inst.assigned]
        imwrite_atomic(out.class_map(row["id"]), lookup[ids])
        if truth is None or not instances:
            continue
        files, values = truth
        try:
            if row["id"] not in files:
                raise MaskMismatch("not listed in the truth index")
            score_frame(instances, ids, read_character_map(files[row["id"]], None, values), values, characters)
            scored += 1
        except MaskMismatch as err:
            problems.append(f"{row['id']}: {err}")
    return scored, problems


# ---------------------------------------------------------------------------------------------
# QA: contact sheets, assignments per folder, metrics
# ---------------------------------------------------------------------------------------------

def _crop_tile(frame: np.ndarray | None, ids: np.ndarray, inst: Instance) -> np.ndarray:
    """The instance's box, its surroundings dimmed, fitted into TILE_WIDTH x TILE_HEIGHT and captioned."""
    tile = np.zeros((TILE_HEIGHT + CAPTION_HEIGHT, TILE_WIDTH, 3), np.uint8)
    mask = ids == inst.key
    if frame is not None and mask.any():
        ys, xs = np.nonzero(mask)
        box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        crop = np.where(mask[box][..., None], frame[box], frame[box] // 3)
        scale = min(TILE_WIDTH / crop.shape[1], TILE_HEIGHT / crop.shape[0])
        small = cv2.resize(crop, (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))),
                           interpolation=cv2.INTER_AREA)
        top, left = (TILE_HEIGHT - small.shape[0]) // 2, (TILE_WIDTH - small.shape[1]) // 2
        tile[top:top + small.shape[0], left:left + small.shape[1]] = small
    score = f"{inst.similarity:.2f}" if inst.similarity is not None else inst.source
    for line, text in enumerate((inst.frame_id[-20:], f"#{inst.key} {score}")):
        cv2.putText(tile, text, (2, TILE_HEIGHT + 11 + 13 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.3,
                    (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def _contact_sheet(instances: list[Instance], count: int, frames: FramesDir, masks: MasksDir,
                   rows: dict[str, dict[str, Any]]) -> np.ndarray:
    """Up to `count` crops, evenly spread from the most to the least similar."""
    ordered = sorted(instances, key=lambda i: (-(i.similarity if i.similarity is not None else 2.0),
                                               i.frame_id, i.key))
    tiles = []
    for i in spread_indices(len(ordered), count):
        inst = ordered[i]
        ids = read_instance_map(masks, rows[inst.frame_id])
        try:
            frame = imread(frames.image(inst.frame_id))
        except CharsegError:
            frame = None  # an unreadable frame: the tile still names the instance
        tiles.append(_crop_tile(frame, ids, inst))
    return tile_grid(tiles, min(len(tiles), SHEET_COLUMNS))


def _assignment_bars(path: Path, instances: list[Instance]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folders = sorted({inst.folder for inst in instances})
    kinds = {"own character": lambda i: i.assigned == i.folder != OTHER,
             "other characters": lambda i: i.assigned not in (i.folder, OTHER), "other": lambda i: i.assigned == OTHER}
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(folders) + 2), 3.8))
    bottom = np.zeros(len(folders))
    for (label, test), colour in zip(kinds.items(), ("#4c72b0", "#dd8452", "#999999")):
        counts = np.array([sum(1 for i in instances if i.folder == f and test(i)) for f in folders], float)
        ax.bar(folders, counts, bottom=bottom, label=label, color=colour)
        bottom += counts
    ax.set(title="Instances per character folder, by assignment", ylabel="instances")
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_qa_plots(plots_dir: Path, instances: list[Instance], classes: list[str], frames: FramesDir,
                   masks: MasksDir, rows: dict[str, dict[str, Any]], crops: int) -> None:
    with atomic_dir(plots_dir) as tmp:
        for name in classes[1:]:
            assigned = [inst for inst in instances if inst.assigned == name]
            if assigned and crops > 0:
                imwrite_atomic(tmp / f"contact_{slugify(name)}.png",
                               _contact_sheet(assigned, crops, frames, masks, rows))
        if instances:
            _assignment_bars(tmp / "assignments.png", instances)


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None


def identity_metrics(rows: list[dict[str, Any]], instances: list[Instance], characters: list[str],
                     truth_frames: int | None) -> dict[str, Any]:
    """Per character: its folder's frames, those where it was found, its instances and how many came from
    other folders; with truth, the assignment's accuracy and per-character precision and recall."""
    frames = [r for r in rows if r["status"] in LABELLED]
    found = {(inst.frame_id, inst.assigned) for inst in instances}
    per_character = {}
    for name in characters:
        own = [r for r in frames if r["character"] == name]
        hits = sum((r["id"], name) in found for r in own)
        mine = [inst for inst in instances if inst.assigned == name]
        per_character[name] = {"frames_in_folder": len(own), "found_in_own_frames": hits,
                               "found_share": _share(hits, len(own)), "instances": len(mine),
                               "assigned_from_other_folders": sum(inst.folder != name for inst in mine)}
    metrics: dict[str, Any] = {"frames": len(frames), "instances": len(instances),
                               "other_instances": sum(inst.assigned == OTHER for inst in instances),
                               "too_small": sum(inst.source == "too_small" for inst in instances),
                               "characters": per_character}
    scored = [inst for inst in instances if inst.truth is not None]
    if truth_frames:
        truly_other = [inst for inst in scored if inst.truth == OTHER]
        metrics.update(truth_frames=truth_frames, truth_instances=len(scored),
                       instance_accuracy=_share(sum(i.assigned == i.truth for i in scored), len(scored)),
                       other_correct=_share(sum(i.assigned == OTHER for i in truly_other), len(truly_other)))
        for name, entry in per_character.items():
            right = sum(i.assigned == name and i.truth == name for i in scored)
            entry["precision"] = _share(right, sum(i.assigned == name for i in scored))
            entry["recall"] = _share(right, sum(i.truth == name for i in scored))
    return metrics


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def _character_folders(rows: list[dict[str, Any]]) -> list[str]:
    folders = sorted({row["character"] for row in rows})
    for name in set(folders) & set(RESERVED):
        warn(f"the character folder {name!r} has the name of a class that is no character: its frames are "
             f"used, but nobody is assigned to {name!r}; rename the folder if it holds one character")
    return [name for name in folders if name not in RESERVED]


def _warn_about(not_found: list[str], duplicates: list[dict[str, Any]]) -> None:
    for pair in duplicates:
        first, second = pair["characters"]
        warn(f"the prototypes of {first!r} and {second!r} are {pair['similarity']:.3f} alike (>= "
             f"identity.duplicate_similarity): the same character under two names? Their instances mostly "
             f"fall to `other` (identity.margin); merge the folders if they are one character")
    if not_found:
        warn(f"character(s) never found: {', '.join(not_found)} (no instance assigned to them): left out of the "
             f"classes, training continues with the others; see plots/identity and the report")


def make_identity(frames: FramesDir, masks: MasksDir, out: IdentityDir, plots_dir: Path, metrics_path: Path,
                  cfg: IdentityConfig, truth: TruthConfig | None = None,
                  embedder: Embedder = embed) -> dict[str, Any]:
    """Class maps, classes.json, instances.csv, manifest.csv and report.json in `out`, QA plots and metrics;
    the metrics. `embedder` (frame BGR, instance mask) -> appearance vector, `embed` by default."""
    start = time.perf_counter()
    rows, by_frame = read_instances(masks)
    folders = _character_folders(rows)
    truth_masks = truth_source(truth, rows)
    embed_instances(rows, by_frame, frames, masks, embedder)
    prototypes = character_prototypes(folders, by_frame, cfg.min_similarity)
    duplicates = duplicate_pairs(prototypes, cfg.duplicate_similarity)
    assign_instances(by_frame, prototypes, cfg)
    instances = [inst for frame_id in sorted(by_frame) for inst in by_frame[frame_id]]
    named = sorted({inst.assigned for inst in instances} - set(RESERVED))
    if len(named) > 254:
        raise CharsegError(f"{len(named)} characters: class maps are uint8, at most 254 characters fit")
    classes = [BACKGROUND, *named, OTHER]
    not_found = [name for name in folders if name not in named]
    _warn_about(not_found, duplicates)
    characters = sorted(set(folders) | set(named))

    with atomic_dir(out.root) as tmp:
        staged = IdentityDir(tmp)
        truth_frames, problems = write_class_maps(staged, rows, by_frame, masks, classes, truth_masks,
                                                  set(characters))
        write_json(staged.classes, {"classes": classes, "not_found": not_found})
        write_csv(staged.instance_table, [_instance_row(inst) for inst in instances], IDENTITY_COLUMNS)
        manifest = _manifest_rows(rows, by_frame)
        write_csv(staged.manifest, manifest, list(FRAME_COLUMNS) + ["status", "found_own", "n_instances", "assigned"])
        write_json(staged.report, {
            "params": asdict(cfg), "embedding": getattr(embedder, "__name__", str(embedder)),
            "min_pixels": MIN_PIXELS, "classes": classes, "not_found": not_found, "duplicates": duplicates,
            "prototypes": {name: {"candidates": p.candidates, "members": p.members,
                                  "from": "one-person frames" if p.one_person else "all instances"}
                           for name, p in sorted(prototypes.items())},
            "sources": dict(Counter(inst.source for inst in instances)),
            "own_character_missing": {folder: [r["id"] for r in manifest if r["character"] == folder
                                               and r["found_own"] == 0] for folder in folders},
            "truth_dir": str(truth.folder) if truth_masks is not None else None, "truth_problems": problems})
    if problems:
        warn(f"{len(problems)} frame(s) left out of the identity scoring against the exact masks "
             f"(e.g. {problems[0]}); all are listed in {out.report}")
    seconds = time.perf_counter() - start  # the step's own cost, beside SAM's: QA is timed apart
    write_qa_plots(plots_dir, instances, classes, frames, masks, {r["id"]: r for r in rows}, cfg.qa_crops)
    metrics = identity_metrics(rows, instances, characters, truth_frames if truth_masks is not None else None)
    metrics.update(classes=classes[1:-1], not_found=not_found,
                   duplicates=[" | ".join(pair["characters"]) for pair in duplicates],
                   seconds=round(seconds, 3), seconds_per_frame=round(seconds / max(metrics["frames"], 1), 6),
                   qa_seconds=round(time.perf_counter() - start - seconds, 3))
    write_json(metrics_path, metrics)
    return metrics


def _round(value: float | None) -> float | str:
    return round(value, 6) if value is not None else ""


def _instance_row(inst: Instance) -> dict[str, Any]:
    return {**{c: inst.row.get(c, "") for c in INSTANCE_COLUMNS}, "folder": inst.folder, "assigned": inst.assigned,
            "similarity": _round(inst.similarity), "runner_up": _round(inst.runner_up), "source": inst.source}


def _manifest_rows(rows: list[dict[str, Any]], by_frame: dict[str, list[Instance]]) -> list[dict[str, Any]]:
    manifest = []
    for row in rows:
        if row["status"] not in LABELLED:
            continue
        names = [inst.assigned for inst in by_frame.get(row["id"], [])]
        manifest.append({**{c: row[c] for c in FRAME_COLUMNS}, "status": row["status"],
                         "found_own": int(row["character"] in names), "n_instances": len(names),
                         "assigned": json.dumps(names, ensure_ascii=False)})
    return manifest
