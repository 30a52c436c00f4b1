"""`charseg app`: a local web page to look at the trained models (Gradio).

    charseg app                         # http://127.0.0.1:7860, the models of this project
    charseg app --port 8080 --host 0.0.0.0 --max-video-mb 50

The page lists every trained model found (models/<name>/best.pt, exports/<name>.onnx) with its arch, input
size, task, validation score and date; segments an image (upload, paste, or a validation frame) with each
chosen model side by side, the probability map on demand, a threshold slider and, for characters-task models,
a legend of the characters' colours; turns a short video into the overlay video of one model; and shows the
comparison table and plots that evaluate wrote. Every mask and overlay is made by predict's own code
(inference.predict_proba, inference.class_ids, predict.Rendering, predict.predict_video), so what the page
shows is what `charseg predict` writes.

The functions above `build_page` are the page's logic and need no web server (tests call them directly);
bad input becomes a CharsegError, whose message the page shows.
"""
from __future__ import annotations

import argparse
import functools
import html
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import gradio as gr
import numpy as np

from charseg.errors import CharsegError, require
from charseg.inference import Segmenter, class_ids, predict_proba, segmenter_task
from charseg.io import imread, read_json
from charseg.layout import Layout
from charseg.predict import ModelSource, Rendering, load_segmenter, predict_video, probe_input
from charseg.task import PERSON, palette

DEFAULT_PORT = 7860
DEFAULT_MAX_VIDEO_MB = 200.0
MAX_EXAMPLES = 12  # validation frames offered as examples
NO_MODEL = ("no trained model yet: train one with `make repro` (the demo) or `dvc repro` (your videos), or "
            "fetch the team's with `dvc pull`; then press Reload")


@dataclass
class ModelEntry:
    """One trained model the page can run: a checkpoint or an ONNX export."""
    name: str                     # models/<name>/best.pt or exports/<name>.onnx
    onnx: bool
    path: Path
    segmenter: Segmenter | None = None  # None when the file could not be loaded (see error)
    error: str | None = None

    @property
    def label(self) -> str:
        """What the page calls it: "unetpp", or "unetpp (onnx)" for an export."""
        return f"{self.name} (onnx)" if self.onnx else self.name

    @property
    def meta(self) -> dict[str, Any]:
        return self.segmenter.meta if self.segmenter is not None else {}


def find_models(layout: Layout) -> list[ModelEntry]:
    """Every models/<name>/best.pt and exports/<name>.onnx under the layout's root, loaded; a file that does not
    load is kept with its error (the page lists it and does not offer it)."""
    entries = [ModelEntry(p.parent.name, False, p) for p in sorted(layout.models.glob("*/best.pt"))]
    entries += [ModelEntry(p.stem, True, p) for p in sorted(layout.exports.glob("*.onnx"))]
    for entry in entries:
        source = ModelSource(name=entry.name, arch=None, checkpoint=None if entry.onnx else entry.path,
                             onnx=entry.path if entry.onnx else None)
        try:
            entry.segmenter = load_segmenter(source, device="auto", amp=True)
        except CharsegError as err:
            entry.error = str(err)
    return entries


def _score(layout: Layout, name: str, task: str) -> str:
    """Best validation score of training (dvclive), else evaluate's, as 'val Dice 0.812' / 'val mIoU 0.640'."""
    key, text = ("miou", "mIoU") if task != PERSON else ("dice", "Dice")
    for source, file, metric in (("val", layout.live / name / "metrics.json", f"best_val_{key}"),
                                 ("eval", layout.metrics("evaluate") / f"{name}.json", key)):
        try:
            value = read_json(file).get(metric)
        except (CharsegError, AttributeError):
            continue
        if isinstance(value, (int, float)):
            return f"{source} {text} {value:.3f}"
    return ""


MODEL_COLUMNS = ["model", "file", "arch", "img_size", "task", "score", "date"]


def model_rows(layout: Layout, entries: list[ModelEntry]) -> list[list[str]]:
    """One row per model for the page's table (MODEL_COLUMNS)."""
    rows = []
    for entry in entries:
        meta = entry.meta
        date = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.path.stat().st_mtime))
        name = meta.get("model_name") or entry.name
        task = meta.get("task", PERSON) if entry.segmenter is not None else ""
        if task and task != PERSON:
            task = f"{task} ({len(meta.get('classes', [])) - 2} characters)"
        rows.append([entry.label, str(entry.path.relative_to(layout.root)), meta.get("arch", "not loadable"),
                     str(meta.get("img_size", "")), task,
                     _score(layout, name, meta.get("task", PERSON)) if entry.segmenter else entry.error or "",
                     date])
    return rows


def read_frame(path: str | Path | None) -> np.ndarray:
    """An uploaded image as RGB uint8, read as predict reads images; CharsegError when there is none or it is
    not an image OpenCV reads."""
    require(path, "no image: upload one, paste one, or pick a validation frame")
    try:
        return cv2.cvtColor(imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    except CharsegError:
        raise CharsegError(f"{Path(path).name} is not a readable image (empty, corrupt, or not an image "
                           f"format OpenCV reads): choose another file") from None


def _choose(entries: list[ModelEntry], labels: list[str] | None) -> list[ModelEntry]:
    usable = [e for e in entries if e.segmenter is not None]
    require(usable, NO_MODEL)
    chosen = [e for e in usable if e.label in (labels or [])]
    require(chosen, "choose at least one model")
    return chosen


def probability_image(probs: np.ndarray, task_name: str) -> np.ndarray:
    """RGB heat map of P(person), or in the characters task of P(any character or other) = 1 - P(background)."""
    foreground = probs if task_name == PERSON else 1.0 - probs[0]
    heat = cv2.applyColorMap(np.clip(foreground * 255 + 0.5, 0, 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
    return cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)


@dataclass
class ImageResult:
    overlays: list[tuple[np.ndarray, str]]       # (RGB overlay, model label), as predict's .overlay.jpg
    masks: list[tuple[np.ndarray, str]]          # (RGB mask, model label), the pixels of predict's .mask.png
    probabilities: list[tuple[np.ndarray, str]]  # (RGB heat map, model label); empty unless asked for
    legend: str                                  # HTML: one colour swatch per class of the characters models


def segment_image(entries: list[ModelEntry], labels: list[str] | None, image: np.ndarray, threshold: float,
                  with_probabilities: bool = False) -> ImageResult:
    """Each chosen model's overlay and mask of one RGB image, at the image's size, as predict makes them."""
    chosen = _choose(entries, labels)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    result = ImageResult([], [], [], "")
    for entry in chosen:
        task = segmenter_task(entry.segmenter)
        probs = predict_proba(entry.segmenter, image)
        ids = class_ids(task, probs, threshold)
        rendering = Rendering(task)
        result.overlays.append((cv2.cvtColor(rendering.overlay(bgr, ids), cv2.COLOR_BGR2RGB), entry.label))
        mask = rendering.masks(ids)[""]
        result.masks.append((mask if mask.ndim == 2 else cv2.cvtColor(mask, cv2.COLOR_BGR2RGB), entry.label))
        if with_probabilities:
            result.probabilities.append((probability_image(probs, task.name), entry.label))
    result.legend = legend_html(chosen)
    return result


def legend_html(entries: list[ModelEntry]) -> str:
    """A swatch per class (task.palette) for each distinct class list among the entries' characters-task models
    (person-task models have no legend)."""
    blocks, seen = [], set()
    for entry in entries:
        task = segmenter_task(entry.segmenter)
        if task.name == PERSON or task.classes in seen:
            continue
        seen.add(task.classes)
        swatches = " ".join(
            f'<span style="display:inline-block;margin-right:1em"><span style="display:inline-block;width:1em;'
            f'height:1em;vertical-align:middle;background:rgb{tuple(int(c) for c in colour)}"></span> '
            f"{html.escape(name)}</span>" for name, colour in zip(task.classes[1:], palette(task)[1:]))
        blocks.append(f"<p><b>{html.escape(entry.label)}</b>: {swatches}</p>")
    return "".join(blocks)


def segment_video(entries: list[ModelEntry], label: str | None, video: str | Path | None, threshold: float,
                  max_mb: float, out_dir: Path) -> Path:
    """The overlay video of one model (predict_video, VP8 WebM so browsers play it) in a new folder of
    out_dir; CharsegError for no video, one over max_mb, or one that does not decode."""
    require(video, "no video: upload a short clip")
    entry = _choose(entries, [label] if label else None)[0]
    video = Path(video)
    size_mb = video.stat().st_size / 2**20
    require(size_mb <= max_mb, f"{video.name} is {size_mb:.1f} MB, over this page's limit of {max_mb:g} MB "
                               f"(charseg app --max-video-mb): cut it, or run `charseg predict` on it")
    try:
        info = probe_input(video)
    except CharsegError as err:
        raise CharsegError(f"{video.name} is not a video that can be read: {err}") from None
    output = Path(tempfile.mkdtemp(dir=out_dir)) / f"{video.stem}.overlay.webm"
    predict_video(entry.segmenter, info, output, threshold=threshold)
    return output


def comparison(layout: Layout) -> tuple[str, list[str]]:
    """evaluate's comparison table (markdown) and its plots (PNG paths) in the workspace, or what to run."""
    table = layout.reports / "comparison.md"
    text = table.read_text(encoding="utf-8") if table.is_file() else (
        "No comparison yet: `dvc repro evaluate` (or `make repro`) writes reports/comparison.md and the plots.")
    return text, [str(p) for p in sorted(layout.plots("evaluate").glob("*.png"))]


def validation_frames(layout: Layout, limit: int = MAX_EXAMPLES) -> list[str]:
    """Up to `limit` validation frames of data/split.json (spread over it) that exist on disk."""
    try:
        val = read_json(layout.split).get("val") or []
    except (CharsegError, AttributeError):
        return []
    step = max(1, len(val) // limit)
    frames = [layout.frames.image(frame_id) for frame_id in val[::step]]
    return [str(p) for p in frames if p.is_file()][:limit]


def _shown(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn, with a CharsegError turned into gradio's Error: a message on the page instead of a traceback."""
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CharsegError as err:
            raise gr.Error(str(err), print_exception=False) from None
    return wrapped


class Page:
    """The page's state (the models found, where videos are written) and its event handlers."""

    def __init__(self, layout: Layout, max_video_mb: float) -> None:
        self.layout, self.max_video_mb = layout, max_video_mb
        self.entries = find_models(layout)
        self._videos = tempfile.TemporaryDirectory(prefix="charseg-app-")  # removed when the page goes

    @property
    def labels(self) -> list[str]:
        return [e.label for e in self.entries if e.segmenter is not None]

    def notice(self) -> str:
        return "" if self.labels else f"**{NO_MODEL}**"

    def reload(self) -> tuple[Any, ...]:
        """Rescan the models and the reports (after a `dvc repro` or `dvc pull` while the page is up)."""
        self.entries = find_models(self.layout)
        labels = self.labels
        text, plots = comparison(self.layout)
        return (model_rows(self.layout, self.entries), gr.update(choices=labels, value=labels),
                gr.update(choices=labels, value=labels[0] if labels else None), text, plots, self.notice())

    def on_image(self, upload: dict[str, Any] | None, labels: list[str], threshold: float,
                 show_probs: bool) -> tuple[Any, ...]:
        # Unpreprocessed (preprocess=False): the uploaded file as it came, read by OpenCV as predict reads it,
        # so a file that is no image gets charseg's message rather than gradio's.
        result = segment_image(self.entries, labels, read_frame((upload or {}).get("path")), threshold, show_probs)
        return (result.overlays, result.masks, gr.update(value=result.probabilities, visible=show_probs),
                result.legend)

    def on_video(self, path: str | None, label: str | None, threshold: float,
                 progress: Any = gr.Progress(track_tqdm=True)) -> str:  # predict's tqdm bar, shown on the page
        return str(segment_video(self.entries, label, path, threshold, self.max_video_mb, Path(self._videos.name)))


def _image_tab(page: Page) -> Any:
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(type="filepath", sources=["upload", "clipboard"], label="image", elem_id="image-input")
            chosen = gr.CheckboxGroup(page.labels, value=page.labels, label="models")
            threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="threshold (person task: P(person) above it)")
            show_probs = gr.Checkbox(False, label="show probability maps")
            run = gr.Button("Segment", variant="primary", elem_id="segment-image")
            examples = validation_frames(page.layout)
            if examples:
                gr.Examples(examples, inputs=image, label="validation frames")
        with gr.Column(scale=3):
            overlays = gr.Gallery(label="overlays", columns=4, height=300, object_fit="contain", format="png", elem_id="overlays")
            legend = gr.HTML()
            probs = gr.Gallery(label="probability maps", columns=4, height=300, object_fit="contain", format="png", visible=False)
            masks = gr.Gallery(label="masks (as charseg predict writes them)", columns=4, height=300, object_fit="contain", format="png")
    run.click(_shown(page.on_image), [image, chosen, threshold, show_probs], [overlays, masks, probs, legend],
              api_name="segment_image", preprocess=False)
    return chosen


def _video_tab(page: Page) -> Any:
    with gr.Row():
        with gr.Column():
            video = gr.Video(label=f"short clip (up to {page.max_video_mb:g} MB)", sources=["upload"])
            model = gr.Dropdown(page.labels, value=page.labels[0] if page.labels else None, label="model")
            threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="threshold (person task)")
            run = gr.Button("Segment video", variant="primary")
        result = gr.Video(label="overlay video")
    run.click(_shown(page.on_video), [video, model, threshold], result, api_name="segment_video")
    return model


def build_page(layout: Layout, max_video_mb: float = DEFAULT_MAX_VIDEO_MB) -> Any:
    """The gr.Blocks page of the project at layout.root."""
    page = Page(layout, max_video_mb)
    with gr.Blocks(title="charseg") as blocks:
        gr.Markdown(f"# charseg: models of `{layout.root.resolve().name}`")
        notice = gr.Markdown(page.notice())
        with gr.Row():
            table = gr.Dataframe(model_rows(layout, page.entries), headers=MODEL_COLUMNS, interactive=False,
                                 label="trained models", scale=5)
            reload_button = gr.Button("Reload", scale=1)
        with gr.Tab("Image"):
            chosen = _image_tab(page)
        with gr.Tab("Video"):
            video_model = _video_tab(page)
        with gr.Tab("Comparison"):
            text, plots = comparison(layout)
            comparison_text = gr.Markdown(text)
            comparison_plots = gr.Gallery(plots, label="plots/evaluate", columns=2)
        reload_button.click(page.reload, None, [table, chosen, video_model, comparison_text, comparison_plots, notice],
                            api_name="reload")
    return blocks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--project", type=Path, default=Path("."),
                        help="the charseg project folder (models/, exports/, reports/; default: here)")
    parser.add_argument("--max-video-mb", type=float, default=DEFAULT_MAX_VIDEO_MB,
                        help=f"largest video the page accepts, in MB (default {DEFAULT_MAX_VIDEO_MB:g}); also the "
                             f"largest upload of any kind")
    args = parser.parse_args(argv)
    require(1 <= args.port <= 65535, f"--port must be in 1..65535, got {args.port}")
    require(args.max_video_mb > 0, f"--max-video-mb must be positive, got {args.max_video_mb}")
    require(args.project.is_dir(), f"--project {args.project}: no such folder")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    page = build_page(Layout(args.project), args.max_video_mb)
    print(f"app: http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    page.queue().launch(server_name=args.host, server_port=args.port, show_error=True, inbrowser=False,
                        max_file_size=int(args.max_video_mb * 2**20), allowed_paths=[str(args.project.resolve())])
