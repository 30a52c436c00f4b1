"""Segment new footage with a trained model: `charseg predict --model NAME --input PATH --output PATH`.

The model: --model NAME runs models/NAME/best.pt (the train@NAME output), --checkpoint PATH any checkpoint,
--onnx [PATH] an ONNX export instead (default exports/NAME.onnx, from `charseg export`). Checkpoints and
ONNX files record their arch and preprocessing, so no params.yaml is needed; when one is there (--params,
default ./params.yaml) and --model names one of its models, the file must hold that model's arch.

- An image or a folder of images: --output is a folder with `<stem>.mask.png` (0/255, the image's size) and
  `<stem>.overlay.jpg` (mask tinted and outlined) per image; full file names (`a.jpg.mask.png`) when stems collide.
- A video (anything OpenCV decodes): --output is the overlay video (.mp4/.mov/.m4v: mp4v, .avi/.mkv: MJPG,
  .webm: VP8, which browsers play) at the source's fps, size and frame count; --save-masks adds
  `<output stem>.masks/<frame:06d>.png`. --every N runs the model on every Nth frame, the frames between
  reuse its mask; --smooth ALPHA averages probabilities over consecutive inferred frames (exponential moving
  average) before thresholding.

A characters-task model (charseg.task) writes each mask as a colour PNG, every pixel its class's colour
(task.palette: background black, other grey), and its overlay tints each class in that colour and writes the
character's name at its largest region. --per-character adds one 0/255 PNG per class but background (each
character and `other`) next to each mask: `<stem>_<class>.mask.png` for images, `<frame:06d>_<class>.png` in
the masks folder of a video (class names slugified; it implies --save-masks).

Decoding, inference and encoding overlap: a reader thread decodes and preprocesses, the main thread runs
the model on batches, a writer thread draws overlays and encodes, with bounded queues between them, so the
slowest of the three sets the pace (benchmarks/bench_predict.py). Outputs are built in temporary siblings
and renamed when complete: a failed or interrupted run never leaves a file that looks finished.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import queue
import re
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from charseg.device import ort_providers, select_device
from charseg.errors import CharsegError, require, warn
from charseg.inference import (Segmenter, Smoother, TorchSegmenter, configured_arch, infer_class_maps, preprocess,
                               segmenter_task)
from charseg.io import atomic_dir, atomic_path, check_video, check_writable, imread, imwrite_atomic, naming, slugify
from charseg.layout import PROJECT
from charseg.task import PERSON, Task, palette
from charseg.video import VideoInfo, is_video_file, looks_truncated, probe

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# All in OpenCV's wheels. WebM (VP8) is the one a browser plays (charseg app), at ~5-10x mp4v's encoding time.
CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG", ".webm": "VP80"}
MASK_SUFFIX, OVERLAY_SUFFIX, MASKS_DIR_SUFFIX = ".mask.png", ".overlay.jpg", ".masks"
TINT = (255, 0, 255)  # BGR magenta: rare in skin, hair and clothes, so the mask stays visible on people
TINT_ALPHA = 0.45
JPEG_QUALITY = 92
_END = object()   # end of stream, in the queues between threads
_POLL_S = 0.1     # how often a blocked thread checks whether another one failed


@functools.lru_cache(maxsize=4)
def _solid_tint(shape: tuple[int, ...]) -> np.ndarray:
    # Cached: filling a 720p 3-channel image with one colour costs numpy ~12 ms, more than encoding the frame.
    tint = np.full(shape, TINT, np.uint8)
    tint.flags.writeable = False
    return tint


def overlay(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The BGR frame with the mask's pixels tinted and its outline drawn."""
    tinted = cv2.addWeighted(frame, 1 - TINT_ALPHA, _solid_tint(frame.shape), TINT_ALPHA, 0)
    out = cv2.copyTo(tinted, mask, frame.copy())
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    # LINE_8, not LINE_AA: anti-aliasing a 720p outline costs ~2 ms a frame in the writer thread, often the slowest
    return cv2.drawContours(out, contours, -1, TINT, max(1, round(max(frame.shape[:2]) / 640)), cv2.LINE_8)


def _label_text(name: str) -> str:
    # OpenCV's Hershey fonts draw ASCII only: 'Zoë' is written 'Zoe' (slugify when nothing ASCII is left).
    return unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii").strip() or slugify(name)


def _draw_name(image: np.ndarray, text: str, centre: tuple[float, float]) -> None:
    """`text` centred on `centre` (x, y), white on a black outline (readable on any tint), kept inside the image."""
    scale = max(0.35, max(image.shape[:2]) / 1400)
    thickness = max(1, round(scale * 1.5))
    (width, height), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    x = int(np.clip(centre[0] - width / 2, 0, max(0, image.shape[1] - width)))
    y = int(np.clip(centre[1] + height / 2, height, image.shape[0] - 1))
    cv2.putText(image, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(image, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)


def class_overlay(frame: np.ndarray, ids: np.ndarray, colours: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """The BGR frame with each class's pixels (ids > 0) tinted in its BGR colour and outlined, and the class's
    name written at the centroid of its largest connected region."""
    tinted = cv2.addWeighted(frame, 1 - TINT_ALPHA, colours[ids], TINT_ALPHA, 0)
    out = cv2.copyTo(tinted, ids, frame.copy())
    thickness = max(1, round(max(frame.shape[:2]) / 640))
    for k in np.unique(ids)[1:] if ids.any() else []:
        mask = (ids == k).view(np.uint8)
        colour = tuple(int(c) for c in colours[k])
        contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, thickness, cv2.LINE_8)
        _, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
        largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        _draw_name(out, _label_text(names[k]), tuple(centroids[largest]))
    return out


@dataclass(frozen=True)
class Rendering:
    """How a frame's class ids (inference.class_ids) become its mask files and its overlay, by task."""
    task: Task
    per_character: bool = False  # characters task: also one 0/255 mask per class but background

    @functools.cached_property
    def colours(self) -> np.ndarray:
        """(classes, 3) uint8 BGR: task.palette, in OpenCV's channel order."""
        return np.ascontiguousarray(palette(self.task)[:, ::-1])

    @functools.cached_property
    def suffixes(self) -> dict[int, str]:
        """Class id -> the suffix of its own mask file, `_<slugified name>`, for every class but background."""
        return {k: f"_{slugify(name)}" for k, name in enumerate(self.task.classes) if k > 0}

    def masks(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """File-name suffix -> image: "" the frame's mask (person 0/255; characters each pixel in its class's
        colour), and with per_character "_<class>" a 0/255 mask per class."""
        if self.task.name == PERSON:
            return {"": ids * np.uint8(255)}
        files = {"": self.colours[ids]}
        if self.per_character:
            files.update({suffix: (ids == k).view(np.uint8) * np.uint8(255) for k, suffix in self.suffixes.items()})
        return files

    def overlay(self, frame: np.ndarray, ids: np.ndarray) -> np.ndarray:
        if self.task.name == PERSON:
            return overlay(frame, ids)  # any non-zero pixel is the mask
        return class_overlay(frame, ids, self.colours, self.task.classes)


def output_stems(images: list[Path]) -> dict[Path, str]:
    """Output name of each image: its stem, or its full file name for all when two stems would collide."""
    stems = [p.stem.lower() for p in images]  # lower: macOS and Windows filesystems ignore case
    return {p: p.stem if len(set(stems)) == len(stems) else p.name for p in images}


def predict_images(segmenter: Segmenter, images: list[Path], out_dir: Path, *, threshold: float,
                   batch_size: int = 8, per_character: bool = False, progress: bool = True) -> None:
    """Mask(s) and overlay of every image, into out_dir (built aside, swapped in when all are written)."""
    stems = output_stems(images)
    rendering = Rendering(segmenter_task(segmenter), per_character)
    with atomic_dir(out_dir) as tmp, tqdm(total=len(images), desc="predict", unit="image",
                                          disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            paths = images[start:start + batch_size]
            frames = [_read_image(p) for p in paths]
            batch = preprocess([cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in frames], segmenter.meta)
            class_maps = infer_class_maps(segmenter, batch, [f.shape[:2] for f in frames], threshold)
            for path, frame, ids in zip(paths, frames, class_maps):
                for suffix, mask in rendering.masks(ids).items():
                    imwrite_atomic(tmp / f"{stems[path]}{suffix}{MASK_SUFFIX}", mask)
                imwrite_atomic(tmp / f"{stems[path]}{OVERLAY_SUFFIX}", rendering.overlay(frame, ids),
                               [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            bar.update(len(paths))


def _read_image(path: Path) -> np.ndarray:
    try:
        return imread(path, cv2.IMREAD_COLOR)
    except CharsegError:
        raise CharsegError(f"{path} is not a readable image (empty or corrupt): replace it, or move it out "
                           f"of the input") from None


class _Pipeline:
    """Stop flag and first error shared by the reader, main and writer threads: when one fails, the
    others stop waiting on their queues within _POLL_S and the error is raised in the main thread."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def fail(self, err: BaseException) -> None:
        if self.error is None and not isinstance(err, _Stopped):  # the first real error is the one raised
            self.error = err
        self.stop.set()

    def put(self, q: queue.Queue, item: Any) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(queue.Full):
                return q.put(item, timeout=_POLL_S)
        self.raise_error()

    def get(self, q: queue.Queue) -> Any:
        while not self.stop.is_set():
            with contextlib.suppress(queue.Empty):
                return q.get(timeout=_POLL_S)
        self.raise_error()

    def raise_error(self) -> None:
        raise self.error or _Stopped()


class _Stopped(Exception):
    """A helper thread's way out when the main thread stopped the pipeline."""


@dataclass
class _Frame:
    index: int
    image: np.ndarray          # BGR, as decoded
    batch: np.ndarray | None   # (1, 3, S, S) model input; None for frames that reuse the last mask (--every)


def _read(pipe: _Pipeline, info: VideoInfo, every: int, meta: dict[str, Any], decoded: queue.Queue) -> None:
    try:
        capture = cv2.VideoCapture(str(info.path), cv2.CAP_FFMPEG)
        index = 0
        try:
            while capture.grab():
                ok, image = capture.retrieve()
                require(ok, f"{info.path}: frame {index} could not be decoded: the file is damaged; re-encode it "
                            f"(e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`)")
                batch = preprocess([cv2.cvtColor(image, cv2.COLOR_BGR2RGB)], meta) if index % every == 0 else None
                pipe.put(decoded, _Frame(index, image, batch))
                index += 1
        finally:
            capture.release()
        require(index, f"{info.path}: the video has no frame that can be decoded (no video stream, or damaged "
                       f"from the start): re-encode it or choose another file")
        if looks_truncated(info, index):
            warn(f"{info.path}: decoding stopped at frame {index} of {info.reported_frames} (damaged or truncated "
                 f"file): the output covers the frames before")
        pipe.put(decoded, _END)
    except BaseException as err:  # noqa: BLE001  (handed to the main thread, which raises it)
        pipe.fail(err)


def _write(pipe: _Pipeline, encoded: queue.Queue, path: Path, fourcc: str, fps: float, masks_dir: Path | None,
           rendering: Rendering, bar: tqdm) -> None:
    writer, size = None, None
    try:
        while (item := pipe.get(encoded)) is not _END:
            index, image, ids = item
            # Sized by the decoded frames, not the container: with rotation metadata the two can differ
            # (whether OpenCV auto-rotates depends on its version).
            if writer is None:
                size = (image.shape[1], image.shape[0])
                writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
                require(writer.isOpened(), f"OpenCV cannot write {fourcc} video to {path}: try a .avi or .mp4 output")
            frame = rendering.overlay(image, ids)
            if (frame.shape[1], frame.shape[0]) != size:  # VideoWriter silently drops frames of another size
                frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
            writer.write(frame)
            if masks_dir is not None:
                for suffix, mask in rendering.masks(ids).items():
                    imwrite_atomic(masks_dir / f"{index:06d}{suffix}.png", mask)
            bar.update()
    except BaseException as err:  # noqa: BLE001
        pipe.fail(err)
    finally:
        if writer is not None:
            writer.release()


@dataclass(frozen=True)
class VideoResult:
    frames: int    # frames written (= frames decoded)
    inferred: int  # frames the model ran on


def predict_video(segmenter: Segmenter, info: VideoInfo, output: Path, *, threshold: float, batch_size: int = 8,
                  every: int = 1, smooth: float | None = None, masks_dir: Path | None = None,
                  per_character: bool = False, progress: bool = True) -> VideoResult:
    """Overlay video of `info.path` at its fps and size, frame for frame (and per-frame masks in masks_dir).

    One function on purpose: the batching loop and run_pending share the pending frames, the last mask and the
    counts, and the threads' start, stop and join must sit in one try/finally with the atomic outputs."""
    fourcc = CODECS[output.suffix.lower()]
    rendering = Rendering(segmenter_task(segmenter), per_character)
    smoother, pipe = Smoother(smooth), _Pipeline()
    decoded: queue.Queue = queue.Queue(maxsize=2 * batch_size)
    encoded: queue.Queue = queue.Queue(maxsize=2 * batch_size)
    # Frames wait in `pending` until the batch holding the mask they need has run; with --every the
    # frames between inferred ones wait too, so the batch also runs when this many frames are waiting.
    max_pending = max(4 * batch_size, 32)
    frames = inferred = 0
    # The writer thread's VideoWriter reports no error (a full disk leaves an mp4 without its index):
    # the finished temp file must read back to every frame before it is renamed into place.
    with atomic_path(output, verify=lambda tmp: check_video(tmp, frames, target=output)) as tmp_video, \
            (atomic_dir(masks_dir) if masks_dir else contextlib.nullcontext()) as tmp_masks:
        bar = tqdm(total=info.reported_frames or None, desc="predict", unit="frame", disable=not progress)
        threads = [threading.Thread(target=_read, args=(pipe, info, every, segmenter.meta, decoded), daemon=True),
                   threading.Thread(target=_write, args=(pipe, encoded, tmp_video, fourcc, info.fps, tmp_masks,
                                                         rendering, bar), daemon=True)]
        try:
            for thread in threads:
                thread.start()
            pending: list[_Frame] = []
            last_ids: np.ndarray | None = None  # the class ids of the last inferred frame

            def run_pending() -> None:
                nonlocal last_ids, frames, inferred
                seen = [f for f in pending if f.batch is not None]
                class_maps = iter(infer_class_maps(segmenter, np.concatenate([f.batch for f in seen]),
                                                   [f.image.shape[:2] for f in seen], threshold, smoother)
                                  if seen else [])
                for frame in pending:
                    last_ids = next(class_maps) if frame.batch is not None else last_ids
                    pipe.put(encoded, (frame.index, frame.image, last_ids))
                frames, inferred = frames + len(pending), inferred + len(seen)
                pending.clear()

            while (frame := pipe.get(decoded)) is not _END:
                pending.append(frame)
                waiting_for_model = sum(f.batch is not None for f in pending)  # 0: every mask is known already
                if waiting_for_model in (0, batch_size) or len(pending) >= max_pending:
                    run_pending()
            run_pending()
            pipe.put(encoded, _END)
            threads[1].join()
            if pipe.error:
                raise pipe.error
        finally:
            pipe.stop.set()  # no-op after success; otherwise the helper threads leave their loops
            for thread in threads:
                if thread.is_alive():
                    thread.join()
            bar.close()
    return VideoResult(frames, inferred)


@dataclass(frozen=True)
class ModelSource:
    """Which model to run, from --model / --checkpoint / --onnx."""
    name: str | None          # --model NAME
    arch: str | None          # params.yaml's models.NAME.arch, checked against the file; None: not checked
    checkpoint: Path | None   # --checkpoint as given; None: models/NAME/best.pt (unless onnx)
    onnx: Path | None         # the ONNX file to run instead of a checkpoint


def choose_model(name: str | None, checkpoint: Path | None, onnx: str | None,
                 params_file: Path | None = None) -> ModelSource:
    """The model the options name; params_file as configured_arch (None: ./params.yaml when there is one)."""
    require(checkpoint is None or onnx is None, "--checkpoint and --onnx both name a model: give only one")
    require(name or checkpoint or onnx is not None,
            "give --model NAME, --checkpoint PATH or --onnx PATH: which model to run")
    onnx_path = None
    if onnx is not None:
        require(onnx or name, "--onnx without a PATH runs exports/NAME.onnx: give --model NAME, or the file's path")
        onnx_path = Path(onnx) if onnx else PROJECT.onnx(name)
    return ModelSource(name, configured_arch(name, params_file), checkpoint, onnx_path)


def load_segmenter(source: ModelSource, *, device: str, amp: bool) -> Segmenter:
    """The model to run: models/<name>/best.pt, --checkpoint, or with --onnx an ONNX export."""
    if source.onnx is None:
        if source.checkpoint is not None:
            require(source.checkpoint.is_file(), f"--checkpoint {source.checkpoint}: no such file")
        return TorchSegmenter.from_checkpoint(source.checkpoint or PROJECT.checkpoint(source.name),
                                              model_name=source.name, expect_arch=source.arch,
                                              device=select_device(device), amp=amp)
    try:  # imported here: onnxruntime is only needed for --onnx
        from charseg.onnx import OnnxSegmenter, export_command
    except ImportError as err:
        raise CharsegError(f"--onnx is not available ({err}): install requirements.txt") from err
    segmenter = OnnxSegmenter(source.onnx, providers=ort_providers(device), model_name=source.name)
    if source.arch is not None:
        require(segmenter.meta.get("arch") == source.arch,
                f"{source.onnx} holds a '{segmenter.meta.get('arch')}' model but params.yaml says arch "
                f"'{source.arch}': re-export it with {export_command(source.onnx, source.name, overwrite=True)}")
    return segmenter


def find_inputs(path: Path) -> tuple[str, list[Path]]:
    """("images", image files) or ("video", [file]); a folder's non-image files are skipped with a warning."""
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))  # .DS_Store and the like
        images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        require(images, f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}): point --input at a folder of "
                        f"images, one image, or a video")
        skipped = [p.name for p in entries if p not in images]
        if skipped:
            more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
            warn(f"{path}: skipped {len(skipped)} non-image entr{'y' if len(skipped) == 1 else 'ies'}: "
                 f"{', '.join(skipped[:10])}{more}")
        return "images", images
    require(path.exists(), f"--input {path}: no such file or folder")
    require(path.is_file(), f"--input {path} is not a file or folder (a pipe, socket or device): save the "
                            f"footage to a file first")
    return ("images" if path.suffix.lower() in IMAGE_EXTENSIONS else "video"), [path]


def probe_input(path: Path) -> VideoInfo:
    try:
        return probe(path)
    except CharsegError:
        if is_video_file(path):
            raise
        raise CharsegError(f"--input {path} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a video "
                           f"OpenCV can read: convert it, or choose another file") from None


def _ours(name: str) -> bool:
    return name.endswith((MASK_SUFFIX, OVERLAY_SUFFIX)) or re.fullmatch(r"\d+(_[\w-]+)?\.png", name) is not None


def check_output(path: Path, *, is_dir: bool, overwrite: bool, source: Path) -> None:
    """Refuse to replace an existing output without --overwrite, the input itself, or a folder that holds
    anything predict did not write (so `--output ~ --overwrite` cannot delete a home folder); and fail
    before any work when the output cannot be written (read-only or full disk, no permission, name too long)."""
    with naming(path):
        _check_output(path, is_dir=is_dir, overwrite=overwrite, source=source)
    check_writable(path, is_dir=is_dir)


def _check_output(path: Path, *, is_dir: bool, overwrite: bool, source: Path) -> None:
    resolved = path.resolve()
    require(resolved != source.resolve() and resolved not in source.resolve().parents,
            f"--output {path} would replace the input {source}: choose another --output")
    if path.exists() or path.is_symlink():
        kind = "folder" if is_dir else "file"
        require(path.is_dir() == is_dir, f"--output {path} exists and is not a {kind}: predict writes a {kind} "
                                         f"there; choose another --output")
        require(overwrite, f"{path} already exists: pass --overwrite to replace it, or choose another --output")
        foreign = [p.name for p in path.iterdir() if not _ours(p.name)] if is_dir else []
        if foreign:
            raise CharsegError(f"refusing to replace {path}: it holds files predict did not write (e.g. "
                               f"{foreign[0]!r}): choose another --output")


@dataclass(frozen=True)
class Job:
    """What to segment and where the results go, checked before the model is loaded."""
    kind: str                   # "images" or "video"
    inputs: list[Path]
    output: Path
    info: VideoInfo | None      # the video's (kind "video")
    masks_dir: Path | None      # video with --save-masks: <output stem>.masks/


def plan_job(source: Path, output: Path, *, overwrite: bool, save_masks: bool, video_only: dict[str, bool]) -> Job:
    """Inputs and outputs checked before any work; video_only: option -> given, warned about for images."""
    kind, inputs = find_inputs(source)
    if kind == "video":
        masks_dir = output.with_name(output.stem + MASKS_DIR_SUFFIX) if save_masks else None
        require(output.suffix.lower() in CODECS, f"--output {output}: a video needs one of the suffixes "
                                                 f"{', '.join(f'{s} ({c})' for s, c in CODECS.items())}")
        info = probe_input(inputs[0])
        check_output(output, is_dir=False, overwrite=overwrite, source=source)
        if masks_dir:
            check_output(masks_dir, is_dir=True, overwrite=overwrite, source=source)
        return Job(kind, inputs, output, info, masks_dir)
    require(output.suffix.lower() not in IMAGE_EXTENSIONS + tuple(CODECS),
            f"--output {output}: for images it is a folder (masks and overlays go inside)")
    check_output(output, is_dir=True, overwrite=overwrite, source=source)
    for option, given in video_only.items():
        if given:
            warn(f"--{option} applies to video only: ignored for images")
    return Job(kind, inputs, output, None, None)


def check_task_options(segmenter: Segmenter, label: str, *, per_character: bool, threshold: float | None) -> None:
    """--per-character needs a characters-task model; --threshold means nothing to one (argmax over classes)."""
    task = segmenter_task(segmenter)
    if task.name == PERSON:
        require(not per_character, f"--per-character: {label} was trained for the person task (one mask of "
                                   f"everyone), so it has no characters to write apart: run a model of the "
                                   f"characters task (train it with `dvc exp run -S task=characters`), or drop "
                                   f"--per-character")
    elif threshold is not None:
        warn(f"--threshold: {label} is a characters-task model, each pixel takes its most probable class: ignored")


def run_job(job: Job, segmenter: Segmenter, *, threshold: float | None, batch_size: int, every: int,
            smooth: float | None, label: str, per_character: bool = False) -> str:
    """Segment the job's inputs; returns the one-line summary."""
    threshold = segmenter.meta["threshold"] if threshold is None else threshold
    runtime = f"{label}, " + (f"torch on {segmenter.device}" if isinstance(segmenter, TorchSegmenter)
                              else f"onnxruntime on {segmenter.providers[0]}")
    start = time.perf_counter()
    if job.kind == "images":
        predict_images(segmenter, job.inputs, job.output, threshold=threshold, batch_size=batch_size,
                       per_character=per_character)
        rate = len(job.inputs) / (time.perf_counter() - start)
        each = f" + <name>_<class>{MASK_SUFFIX}" if per_character else ""
        return (f"predict: {len(job.inputs)} image(s) -> {job.output}/ (<name>{MASK_SUFFIX}{each} + "
                f"<name>{OVERLAY_SUFFIX}), {rate:.1f} images/s ({runtime})")
    result = predict_video(segmenter, job.info, job.output, threshold=threshold, batch_size=batch_size,
                           every=every, smooth=smooth, masks_dir=job.masks_dir, per_character=per_character)
    rate = result.frames / (time.perf_counter() - start)
    masks = f" + masks in {job.masks_dir}/" if job.masks_dir else ""
    return (f"predict: {result.frames} frames of {job.inputs[0]} -> {job.output}{masks}; model ran on "
            f"{result.inferred}; {rate:.1f} frames/s ({runtime})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="NAME",
                        help="run models/NAME/best.pt (train@NAME's output), or with --onnx exports/NAME.onnx")
    parser.add_argument("--input", required=True, type=Path, help="an image, a folder of images, or a video")
    parser.add_argument("--output", required=True, type=Path,
                        help=f"images: a folder for masks and overlays; video: the overlay video ({', '.join(CODECS)})")
    parser.add_argument("--checkpoint", type=Path, help="run this checkpoint (default: models/NAME/best.pt)")
    parser.add_argument("--onnx", nargs="?", const="", metavar="PATH",
                        help="run an ONNX export instead (default exports/NAME.onnx, from charseg export)")
    parser.add_argument("--threshold", type=float,
                        help="foreground where probability > this (default: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:1")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="mixed precision on a CUDA GPU, as in training (ignored on CPU and with --onnx)")
    parser.add_argument("--batch-size", type=int, default=8, help="frames per model call")
    parser.add_argument("--every", type=int, default=1, metavar="N",
                        help="video: run the model on every Nth frame; frames in between reuse the last mask")
    parser.add_argument("--smooth", type=float, metavar="ALPHA",
                        help="video: average probabilities over consecutive inferred frames (weight ALPHA in (0, 1] "
                             "for the newest) to cut mask flicker; lower is smoother but lags motion. Default off")
    parser.add_argument("--save-masks", action="store_true", help="video: also write <output stem>.masks/<frame>.png")
    parser.add_argument("--per-character", action="store_true",
                        help="characters-task models: also one 0/255 mask per class (each character, other) per "
                             "frame: <name>_<class>.mask.png, or <frame>_<class>.png in a video's masks folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--params", type=Path,
                        help="checks the model file against models.NAME.arch (default: ./params.yaml if there is one)")
    args = parser.parse_args(argv)
    require(args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}")
    require(args.every >= 1, f"--every must be at least 1, got {args.every}")
    require(args.threshold is None or 0 <= args.threshold <= 1,
            f"--threshold must be in [0, 1], got {args.threshold}")
    require(args.smooth is None or 0 < args.smooth <= 1, f"--smooth must be in (0, 1], got {args.smooth}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    source = choose_model(args.model, args.checkpoint, args.onnx, args.params)
    job = plan_job(args.input, args.output, overwrite=args.overwrite, save_masks=args.save_masks or args.per_character,
                   video_only={"every": args.every != 1, "smooth": args.smooth is not None,
                               "save-masks": args.save_masks})
    segmenter = load_segmenter(source, device=args.device, amp=args.amp)
    label = source.name or segmenter.meta.get("model_name", "model")
    check_task_options(segmenter, label, per_character=args.per_character, threshold=args.threshold)
    print(run_job(job, segmenter, threshold=args.threshold, batch_size=args.batch_size, every=args.every,
                  smooth=args.smooth, label=label, per_character=args.per_character))
