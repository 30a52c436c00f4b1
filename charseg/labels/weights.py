"""Where the labelling weights come from, and loading them.

YOLO weights come from their local path, or from ultralytics' own download when online; the SAM
checkpoint from its path, or from Meta's official URL, checked against the published SHA-256, when
online. Absent and offline, the `resolve_*` functions stop before any work, saying where the file goes
and what the alternatives are (weights/README.md: the files are shareable through the DVC remote).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from charseg.errors import CharsegError

# Ultralytics' experiment integrations stay off: its DVC callback starts a dvclive session and
# crashes outside its own training loop, and the others (and its analytics) would phone home.
ULTRALYTICS_SETTINGS = {"sync": False, "dvc": False, "clearml": False, "comet": False, "mlflow": False,
                        "raytune": False, "tensorboard": False, "wandb": False}

PERSON_CLASS = 0  # 'person' in COCO, the classes of the official YOLOv8 detection weights


@dataclass(frozen=True)
class SamRelease:
    filename: str
    url: str
    sha256: str


# Meta's official checkpoints (github.com/facebookresearch/segment-anything, "Model Checkpoints").
SAM_RELEASES = {
    "vit_b": SamRelease("sam_vit_b_01ec64.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
                        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
    "vit_l": SamRelease("sam_vit_l_0b3195.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
                        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_h": SamRelease("sam_vit_h_4b8939.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
                        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
}


# ---------------------------------------------------------------------------------------------
# Weights: where they come from
# ---------------------------------------------------------------------------------------------

def is_offline() -> bool:
    """The project's offline switches (set by `make test` and CI): no download is even attempted."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("YOLO_OFFLINE", "HF_HUB_OFFLINE"))


def missing_weights_error(path: Path, what: str, source: str, reason: str) -> CharsegError:
    return CharsegError(
        f"{what} weights file {path} not found ({reason}). Either put the file at {path} (get {source} "
        f"on a machine with internet and copy it over), or, if your team shares weights through DVC, "
        f"`dvc pull {path}.dvc`, or label without weights: set labels.method: import and "
        f"labels.import_dir to a folder of your own masks. See weights/README.md")


def resolve_ultralytics_asset(path: str | Path, what: str, key: str) -> Path:
    """The local ultralytics weights file (YOLO, or a SAM-family file); absent, ultralytics downloads the
    official one of that name there when online. `key` is the param naming it, for the error."""
    path = Path(path)
    if path.is_file():
        return path
    source = f"'{path.name}' from https://github.com/ultralytics/assets/releases"
    if is_offline():
        raise missing_weights_error(path, what, source, "offline, so not downloaded")
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES, attempt_download_asset

    if path.name not in GITHUB_ASSETS_NAMES:
        raise missing_weights_error(path, what, f"your '{path.name}'", f"not an official ultralytics file, so it "
                                    f"cannot be downloaded; check {key}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        attempt_download_asset(str(path))
    except Exception as err:  # ultralytics raises several types for one condition: no download
        raise missing_weights_error(path, what, source, f"download failed: {err}") from err
    if not path.is_file():
        raise missing_weights_error(path, what, source, "download failed")
    return path


def resolve_yolo_weights(path: str | Path) -> Path:
    """The local YOLO weights file; absent, ultralytics downloads an official one there when online."""
    return resolve_ultralytics_asset(path, "YOLO", "labels.detector.weights")


def ultralytics_sam_names() -> list[str]:
    """The SAM-family file names ultralytics builds (mobile_sam.pt, sam_b.pt, sam2_t.pt, sam2.1_t.pt, ...)."""
    from ultralytics.models.sam.build import sam_model_map

    return list(sam_model_map)


def sam_backend(model: str) -> str:
    """The backend labels.sam.model names: a vit_* type (segment-anything) or the ultralytics SAM-family
    file name its weights file ends with (ultralytics picks the architecture by that ending too)."""
    if model in SAM_RELEASES:
        return model
    # Longest ending first, should one official name ever end with another: the most specific one wins.
    for name in sorted(ultralytics_sam_names(), key=len, reverse=True):
        if Path(model).name.endswith(name):
            return name
    raise CharsegError(f"params.yaml: labels.sam.model {model!r} is unknown: use one of "
                       f"{', '.join([*SAM_RELEASES, *ultralytics_sam_names()])} (a vit_* type with "
                       f"labels.sam.checkpoint, or an ultralytics weights file in weights/ or by path whose name "
                       f"ends like one of these)")


def is_sam2(backend: str) -> bool:
    return backend.startswith("sam2")


def check_model_type(model_type: str) -> SamRelease:
    """The official release of a segment-anything vit_* type."""
    if model_type not in SAM_RELEASES:
        backend = sam_backend(model_type)  # raises the error listing every valid name
        raise CharsegError(f"{model_type!r} is ultralytics' {backend}, not a segment-anything type: load it with "
                           f"load_ultralytics_sam")
    return SAM_RELEASES[model_type]


def resolve_sam_weights(model: str, checkpoint: str | Path) -> Path:
    """The local weights file of labels.sam.model: the vit_* checkpoint (labels.sam.checkpoint), or the
    ultralytics file `model` names (a bare name is looked for in weights/)."""
    backend = sam_backend(model)
    if backend in SAM_RELEASES:
        return resolve_sam_checkpoint(backend, checkpoint)
    path = Path(model)
    if len(path.parts) == 1:
        from charseg.layout import PROJECT

        path = PROJECT.weights / path
    return resolve_ultralytics_asset(path, "SAM-family", "labels.sam.model")


def resolve_sam_checkpoint(model_type: str, checkpoint: str | Path) -> Path:
    """The local SAM checkpoint; the official one is downloaded and SHA-256 checked when online and absent."""
    release = check_model_type(model_type)
    path = Path(checkpoint)
    official_type = {r.filename: t for t, r in SAM_RELEASES.items()}.get(path.name)
    if official_type not in (None, model_type):
        raise CharsegError(f"params.yaml: labels.sam.checkpoint {path} is the official {official_type} checkpoint "
                           f"but labels.sam.model is {model_type}: make them match")
    if path.is_file():
        return path
    source = f"{release.filename} from {release.url}"
    if path.name != release.filename:
        raise missing_weights_error(path, "SAM", source, f"and only the official {release.filename} is downloaded "
                                    f"automatically")
    if is_offline():
        raise missing_weights_error(path, "SAM", source, "offline, so not downloaded")
    try:
        download_verified(release.url, path, release.sha256)
    except (urllib.error.URLError, OSError) as err:
        raise missing_weights_error(path, "SAM", source, f"download failed: {err}") from err
    return path


def download_verified(url: str, path: Path, sha256: str) -> None:
    """Stream url into a temporary sibling and move it into place only if its SHA-256 matches."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {path.name}") as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        if digest.hexdigest() != sha256:
            raise CharsegError(f"download of {url} is corrupt (SHA-256 {digest.hexdigest()}, expected {sha256}): "
                               f"nothing was saved; try again, or download it yourself to {path}")
        os.replace(tmp_name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


# ---------------------------------------------------------------------------------------------
# Weights: loading
# ---------------------------------------------------------------------------------------------

def configure_ultralytics() -> None:
    from ultralytics.utils import SETTINGS

    changed = {key: value for key, value in ULTRALYTICS_SETTINGS.items() if SETTINGS.get(key) != value}
    if changed:
        SETTINGS.update(changed)


def load_yolo(path: str | Path, *, segmentation: bool = False) -> Any:
    """An ultralytics YOLO model from a local weights file (or a model .yaml: random weights), checked to
    have a person class. Detection and segmentation models both detect; `segmentation` requires the latter."""
    # The file is local, so ultralytics has nothing to fetch: without this, importing it probes the
    # network (a DNS lookup) to decide whether it is online.
    os.environ.setdefault("YOLO_OFFLINE", "1")
    configure_ultralytics()
    from ultralytics import YOLO

    path = Path(path)
    try:
        model = YOLO(str(path))
    except Exception as err:  # ultralytics wraps damaged files in TypeError, RuntimeError, ...
        detail = str(err).strip()[:200]
        raise CharsegError(f"cannot load YOLO weights {path} ({type(err).__name__}: {detail}): the file is damaged "
                           f"or not a YOLO model; delete it and download it again (or dvc pull)") from err
    if segmentation and model.task != "segment":
        raise CharsegError(f"YOLO weights {path} are a '{model.task}' model: labels.method yolo_seg needs a "
                           f"segmentation model in labels.detector.weights, such as yolov8n-seg.pt or yolo11n-seg.pt")
    if model.task not in ("detect", "segment"):
        raise CharsegError(f"YOLO weights {path} are a '{model.task}' model: labels.detector.weights needs a "
                           f"detection (or segmentation) model such as yolov8s.pt, yolo11s.pt or yolo11n-seg.pt")
    person_class(model.names, path)
    return model


def person_class(names: dict[int, str] | list[str], path: str | Path) -> int:
    """The index of the class named 'person'; models built from a .yaml name their classes '0', '1', ...
    (random weights, tests): there class 0, COCO's person."""
    names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else dict(names)
    for index, name in names.items():
        if str(name).strip().lower() == "person":
            return int(index)
    if all(str(name).isdigit() for name in names.values()):
        return PERSON_CLASS
    shown = ", ".join(repr(str(n)) for n in list(names.values())[:8]) + (", ..." if len(names) > 8 else "")
    raise CharsegError(f"YOLO weights {path} have no 'person' class (their classes: {shown}): "
                       f"labels.detector.weights needs weights that detect persons, such as COCO's yolov8s.pt "
                       f"or yolo11s.pt")


def _read_state(path: str | Path, what: str) -> dict[str, Any]:
    """A checkpoint's state dict (also inside {"model": ...}); a damaged file is the user's to replace."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a pickle, ...: one condition for the user
        raise CharsegError(f"cannot read {what} weights {path} ({type(err).__name__}): the file is damaged; "
                           f"delete it and download it again (or dvc pull)") from err
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CharsegError(f"{what} weights {path} hold no state dict: the file is damaged or not {what} "
                           f"weights; delete it and download it again (or dvc pull)")
    return state


def _load_state(model: torch.nn.Module, state: dict[str, Any], path: str | Path, backend: str, fix: str) -> None:
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise CharsegError(f"SAM weights {path} do not fit labels.sam.model {backend!r} (their tensors are another "
                           f"architecture's): {fix}") from err


def load_sam(model_type: str, checkpoint: str | Path | None, device: torch.device | str = "cpu") -> torch.nn.Module:
    """segment_anything's model for model_type with the checkpoint's weights (None: random weights)."""
    check_model_type(model_type)
    from segment_anything import sam_model_registry

    state = _read_state(checkpoint, "SAM") if checkpoint is not None else None  # a damaged file fails first
    sam = sam_model_registry[model_type](checkpoint=None)
    if state is not None:
        _load_state(sam, state, checkpoint, model_type, f"use the {SAM_RELEASES[model_type].filename} checkpoint, "
                    f"or set labels.sam.model to the one the file was made for")
    return sam.to(device).eval()


def load_ultralytics_sam(path: str | Path, backend: str | None = None) -> torch.nn.Module:
    """ultralytics' SAM-family model (SAMModel / SAM2Model) for the file's name, with its weights, on the CPU.
    `backend` overrides the name's ending (tests build random weights under any name)."""
    from ultralytics.models.sam.build import sam_model_map

    backend = backend or sam_backend(str(path))
    state = _read_state(path, "SAM-family")
    model = sam_model_map[backend](None)  # the architecture only: ultralytics' own loader would download
    _load_state(model, state, path, backend, f"the file is named like {backend} but holds another model's "
                f"weights; name it after what it holds, or get the real {backend} from "
                f"https://github.com/ultralytics/assets/releases")
    return model.eval()
