"""Where everything lives: every path and naming rule of data/, models/, dvclive/, metrics/, plots/, reports/,
exports/ and .cache/, in one place. Stages, tools and tests ask `Layout` (or a `FramesDir` / `MasksDir`)
instead of joining path strings, so a name changes here or nowhere.

One meaning per CLI flag: `--frames` is always a frames stage output folder (images/ + manifest.csv),
`--masks` a masks stage output folder, `--split` the split file, `--models` the folder of models/<name>/.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

FRAME_SUFFIX = ".jpg"  # extracted frames: small, and what the detector and the models read
MASK_SUFFIX = ".png"   # masks: lossless 0/255
CHECKPOINT_NAME = "best.pt"
# The frames manifest (data/frames/manifest.csv), one row per extracted frame, sorted by id.
FRAME_COLUMNS = ("id", "character", "video", "frame_index", "timestamp", "width", "height")
# What the masks manifest (data/masks/manifest.csv) adds to each frame row.
LABEL_COLUMNS = ("status", "n_persons", "coverage", "boxes", "box_scores", "sam_scores", "truth_dice", "note")
# The masks stage's instances.csv: one row per person instance kept after refinement, in instance-id order per
# frame. `instance` is the pixel value in instances/<id>.png; `character` is empty unless imported labels named it.
INSTANCE_COLUMNS = ("id", "instance", "x1", "y1", "x2", "y2", "box_score", "sam_score", "area", "character")
# The identity stage's instances.csv adds the assignment of each instance.
IDENTITY_COLUMNS = INSTANCE_COLUMNS + ("folder", "assigned", "similarity", "runner_up", "source")
BACKGROUND, OTHER = "background", "other"  # the first and the last class of the characters task


@dataclass(frozen=True)
class StageDir:
    """A stage output folder of one file per frame: images/<id><SUFFIX>, manifest.csv (one row per frame,
    sorted by id) and report.json (how the files were made)."""
    root: Path
    SUFFIX: ClassVar[str]

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    def file(self, frame_id: str) -> Path:
        return self.images / f"{frame_id}{self.SUFFIX}"


class FramesDir(StageDir):
    """The frames stage's output (data/frames): images/<id>.jpg."""
    SUFFIX = FRAME_SUFFIX

    def image(self, frame_id: str) -> Path:
        return self.file(frame_id)


class MasksDir(StageDir):
    """The masks stage's output (data/masks): images/<id>.png, 0/255 at the frame's size (the union of the
    instances), instances/<id>.png (uint16 instance ids, 0 = nobody) and instances.csv (INSTANCE_COLUMNS)."""
    SUFFIX = MASK_SUFFIX

    def mask(self, frame_id: str) -> Path:
        return self.file(frame_id)

    @property
    def instances(self) -> Path:
        return self.root / "instances"

    def instance_map(self, frame_id: str) -> Path:
        return self.instances / f"{frame_id}{MASK_SUFFIX}"

    @property
    def instance_table(self) -> Path:
        return self.root / "instances.csv"


class IdentityDir(StageDir):
    """The identity stage's output (data/identity): images/<id>.png, uint8 class ids at the frame's size
    (0 background, 1..K the characters, K+1 other: the order of classes.json), manifest.csv, report.json,
    instances.csv (IDENTITY_COLUMNS) and classes.json ({"classes": [...]})."""
    SUFFIX = MASK_SUFFIX

    def class_map(self, frame_id: str) -> Path:
        return self.file(frame_id)

    @property
    def classes(self) -> Path:
        return self.root / "classes.json"

    @property
    def instance_table(self) -> Path:
        return self.root / "instances.csv"


@dataclass(frozen=True)
class ResumeFiles:
    """<cache>/train/<name>/: `last` is the state after the last finished epoch, `best` the best checkpoint so
    far (the copy in <models>/<name>/ is a DVC output, deleted before a rerun)."""
    root: Path

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "best.pt"


@dataclass(frozen=True)
class Layout:
    """The project's folders, relative to `root` (the repository root, where dvc.yaml is)."""
    root: Path = field(default_factory=Path)

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def videos(self) -> Path:
        """One folder per character: videos/<character>/<video>."""
        return self.raw / "videos"

    @property
    def weights(self) -> Path:
        """Detector and SAM-family weight files (`dvc add weights/<file>` to share them)."""
        return self.root / "weights"

    @property
    def frames(self) -> FramesDir:
        return FramesDir(self.root / "data" / "frames")

    @property
    def masks(self) -> MasksDir:
        return MasksDir(self.root / "data" / "masks")

    @property
    def identity(self) -> IdentityDir:
        return IdentityDir(self.root / "data" / "identity")

    @property
    def split(self) -> Path:
        return self.root / "data" / "split.json"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def checkpoint(self, name: str) -> Path:
        """models/<name>/best.pt, what train@<name> writes."""
        return checkpoint_in(self.models, name)

    @property
    def live(self) -> Path:
        return self.root / "dvclive"

    def metrics(self, stage: str) -> Path:
        """metrics/<stage>.json (evaluate writes a folder, metrics/evaluate/<model>.json)."""
        return self.root / "metrics" / (stage if stage == "evaluate" else f"{stage}.json")

    def plots(self, stage: str) -> Path:
        return self.root / "plots" / stage

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def exports(self) -> Path:
        """ONNX exports of the trained models (`charseg export`)."""
        return self.root / "exports"

    def onnx(self, name: str) -> Path:
        return self.exports / f"{name}.onnx"

    @property
    def cache(self) -> Path:
        """Outside DVC's outputs, safe to delete: pre-resized training pairs and resume state."""
        return self.root / ".cache"

    def train_state(self, name: str) -> ResumeFiles:
        return train_state_in(self.cache, name)


def checkpoint_in(models: Path, name: str) -> Path:
    """<models>/<name>/best.pt: Layout.checkpoint for a models folder given on the command line (--out)."""
    return Path(models) / name / CHECKPOINT_NAME


def train_state_in(cache: Path, name: str) -> ResumeFiles:
    """<cache>/train/<name>/: Layout.train_state for a cache folder given on the command line (--cache)."""
    return ResumeFiles(Path(cache) / "train" / name)


PROJECT = Layout()


def train_output_name(path: str | Path, model_name: str | None) -> str | None:
    """model_name when `path` is <...>/models/<model_name>/best.pt, what train@<model_name> writes; None for
    any other file (a checkpoint of the user's own, where retraining would not fix it)."""
    path = Path(path)
    if model_name and path.name == CHECKPOINT_NAME and path.parent.name == model_name and \
            path.parent.parent.name == "models":
        return model_name
    return None
