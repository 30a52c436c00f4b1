"""`charseg agreement`: how well two labelling backends agree, on a fixed sample of frames per character.

    charseg agreement --a vit_b --b mobile_sam.pt
    charseg agreement --a mobile_sam.pt@onnx --b mobile_sam.pt@onnx@640 --per-character 20
    charseg agreement --a mobile_sam.pt --b yolo_seg --seg-weights weights/yolo11n-seg.pt

A SPEC is a SAM-family backend as labels.sam.model takes it (vit_b, vit_l, vit_h, mobile_sam.pt,
sam2.1_t.pt, ...), optionally followed by @torch or @onnx for labels.sam.runtime and/or by @SIZE for
labels.sam.image_size (@640: the encoder at 640^2, faster and coarser; ultralytics models only), in either
order; or `yolo_seg` (a YOLO segmentation model's own person masks, from --seg-weights). What a SPEC leaves
out, and everything else (detector, refinement, device, label cache), is params.yaml's labels section, and
both backends label through the label cache: the masks stage later reuses what was labelled here, and what
the stage labelled is not labelled again.

The frames: up to --per-character frames of each character, spread over its videos' time (the rule of
the masks stage's QA grids: the same frames on every run). Both labels are refined as the masks stage
refines them; then Dice (pixels summed over the frames, as evaluate sums them) and boundary F1 (mean over
frames, within evaluate.boundary_tolerance_px) between the two, per character and overall, are written
to --out (Markdown) and a JSON beside it, each atomically, and the table is printed.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from charseg.config import PARAMS_FILE, SCHEMA, LabelsConfig, load_config
from charseg.errors import CharsegError, warn
from charseg.io import read_manifest, write_json, write_text_atomic
from charseg.label_shards import Labeler, LabelerFactory, labels_through_cache
from charseg.labels.cache import LabelCache
from charseg.labels.detect import build_labeler
from charseg.labels.weights import SAM_RELEASES
from charseg.layout import PROJECT, FramesDir
from charseg.masks import final_mask, spread_sample
from charseg.metrics import Counts, boundary_f1, confusion, dice

YOLO_SEG = "yolo_seg"
RUNTIMES: tuple[str, ...] = SCHEMA["labels"]["sam"]["runtime"].choices
IMAGE_SIZE = SCHEMA["labels"]["sam"]["image_size"]  # what a @SIZE may be: params.yaml's own rule
DEFAULT_SEG_WEIGHTS = PROJECT.weights / "yolov8s-seg.pt"  # the segmentation twin of the default detector


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """A SPEC's backend name and the labels.sam fields its @-suffixes set ({'runtime': 'onnx', 'image_size': 640})."""
    name, *suffixes = spec.split("@")
    fields: dict[str, Any] = {}
    for suffix in suffixes:
        field = "image_size" if suffix.isdigit() else "runtime"
        if field in fields:
            raise CharsegError(f"backend {spec!r} names its {field.replace('_', ' ')} twice: at most one @runtime "
                               f"and one @SIZE (e.g. mobile_sam.pt@onnx@640)")
        if field == "runtime" and suffix not in RUNTIMES:
            raise CharsegError(f"backend {spec!r}: runtime {suffix!r} is unknown: use {' or '.join(RUNTIMES)} "
                               f"after the @ (e.g. mobile_sam.pt@onnx), a size (e.g. @640), or leave it out for "
                               f"params.yaml's labels.sam")
        fields[field] = int(suffix) if field == "image_size" else suffix
    if "image_size" in fields:  # the same rule as params.yaml's, named after the spec
        IMAGE_SIZE.check(fields["image_size"], "labels.sam.image_size", f"backend {spec!r}")
    return name, fields


def backend_config(cfg: LabelsConfig, spec: str, seg_weights: Path) -> LabelsConfig:
    """The labels config that labels with `spec`: params.yaml's, with the method and backend replaced."""
    name, fields = parse_spec(spec)
    if name == YOLO_SEG:
        if fields:
            raise CharsegError(f"backend {spec!r}: yolo_seg runs no SAM, so it takes no @runtime or @SIZE: write "
                               f"yolo_seg")
        return replace(cfg, method=YOLO_SEG, detector=replace(cfg.detector, weights=seg_weights))
    sam = replace(cfg.sam, model=name, **fields)
    if name in SAM_RELEASES and name != cfg.sam.model:  # another vit_*: its official checkpoint, beside params'
        sam = replace(sam, checkpoint=cfg.sam.checkpoint.parent / SAM_RELEASES[name].filename)
    return replace(cfg, method="yolo_sam", sam=sam)


def sample_rows(rows: list[dict[str, Any]], per_character: int) -> list[dict[str, Any]]:
    """Up to `per_character` frames of each character, by character, spread over its videos' time."""
    by_character: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_character[row["character"]].append(row)
    return [row for character in sorted(by_character) for row in spread_sample(by_character[character],
                                                                               per_character)]


def final_masks(rows: list[dict[str, Any]], frames: FramesDir, cfg: LabelsConfig, labeler: Labeler,
                spec: str) -> tuple[dict[str, np.ndarray], dict[str, Any], list[str]]:
    """The refined mask of each readable frame by id (through `labeler`, built from `cfg`, and the label
    cache), the labeler's settings, and the frames that could not be read."""
    cache = LabelCache(cfg.cache_dir, labeler.fingerprint)
    masks: dict[str, np.ndarray] = {}
    unreadable: list[str] = []
    paths = ((row["id"], frames.image(row["id"])) for row in rows)
    for frame_id, found, _ in tqdm(labels_through_cache(paths, labeler, cache, cfg.detector.batch),
                                   total=len(rows), desc=f"labels {spec}", unit="frame"):
        if found.label is None:
            unreadable.append(f"{frame_id}: {found.failure}")
        else:
            masks[frame_id] = final_mask(found.label, cfg.refine) > 0
    return masks, dict(labeler.settings), unreadable


@dataclass
class Agreement:
    """Two backends' masks compared over a set of frames."""
    tolerance_px: float
    counts: Counts = field(default_factory=Counts.zero)
    boundary: list[float] = field(default_factory=list)
    found: list[int] = field(default_factory=lambda: [0, 0])  # frames where a, b found somebody

    def add(self, mask_a: np.ndarray, mask_b: np.ndarray) -> None:
        self.counts += confusion(mask_a, mask_b)
        self.boundary.append(boundary_f1(mask_a, mask_b, self.tolerance_px))
        self.found = [self.found[0] + bool(mask_a.any()), self.found[1] + bool(mask_b.any())]

    def summary(self) -> dict[str, Any]:
        return {"frames": len(self.boundary), "dice": round(dice(self.counts), 6),
                "boundary_f1": round(float(np.mean(self.boundary)), 6) if self.boundary else 0.0,
                "persons_a": self.found[0], "persons_b": self.found[1]}


def score(rows: list[dict[str, Any]], masks_a: dict[str, np.ndarray], masks_b: dict[str, np.ndarray],
          tolerance_px: float) -> dict[str, Any]:
    """Agreement per character and overall, over the frames both backends labelled."""
    per_character: dict[str, Agreement] = defaultdict(lambda: Agreement(tolerance_px))
    overall = Agreement(tolerance_px)
    for row in rows:
        if row["id"] in masks_a and row["id"] in masks_b:
            for agreement in (per_character[row["character"]], overall):
                agreement.add(masks_a[row["id"]], masks_b[row["id"]])
    return {"per_character": {c: a.summary() for c, a in sorted(per_character.items())},
            "overall": overall.summary()}


def render(report: dict[str, Any]) -> str:
    """The report as Markdown: a heading, how it was measured, one row per character and the overall row."""
    a, b = report["a"]["spec"], report["b"]["spec"]
    lines = [f"# Label agreement: {a} vs {b}", "",
             f"a = `{a}`, b = `{b}`: {report['overall']['frames']} frames, up to {report['per_character_limit']} "
             f"per character spread over its videos' time, labelled with params.yaml's labels config otherwise and "
             f"refined as the masks stage refines. Dice: pixels summed over the frames; boundary F1: mean over the "
             f"frames, within {report['tolerance_px']:g} px; persons a, b: frames where that backend's mask is not "
             f"empty.", "",
             "| character | frames | Dice | boundary F1 | persons a | persons b |",
             "|---|---:|---:|---:|---:|---:|"]
    rows = [*report["per_character"].items(), ("**overall**", report["overall"])]
    lines += [f"| {name} | {s['frames']} | {s['dice']:.4f} | {s['boundary_f1']:.4f} | {s['persons_a']} | "
              f"{s['persons_b']} |" for name, s in rows]
    if report["unreadable"]:
        lines += ["", f"Left out, unreadable: {', '.join(report['unreadable'])}"]
    return "\n".join(lines) + "\n"


def measure_agreement(frames: FramesDir, cfg: LabelsConfig, spec_a: str, spec_b: str, per_character: int,
                      tolerance_px: float, seg_weights: Path = DEFAULT_SEG_WEIGHTS,
                      factory: LabelerFactory = build_labeler) -> dict[str, Any]:
    """The agreement report of two backends on the sampled frames (see the module docstring)."""
    rows = sample_rows(read_manifest(frames.manifest), per_character)
    if not rows:
        raise CharsegError(f"{frames.manifest} lists no frames: run the frames stage first (dvc repro frames)")
    configs = [backend_config(cfg, spec, seg_weights) for spec in (spec_a, spec_b)]
    # Both labelers before any labelling (their models load on first use): a spec the labeler refuses (vit_b@640,
    # absent weights) stops the run before the other backend spent minutes on the frames.
    labelers = [factory(backend, device=None) for backend in configs]
    (masks_a, settings_a, unreadable), (masks_b, settings_b, _) = \
        (final_masks(rows, frames, *args) for args in zip(configs, labelers, (spec_a, spec_b)))
    return {"a": {"spec": spec_a, "settings": settings_a}, "b": {"spec": spec_b, "settings": settings_b},
            "per_character_limit": per_character, "tolerance_px": tolerance_px,
            **score(rows, masks_a, masks_b, tolerance_px), "frames": [row["id"] for row in rows],
            "unreadable": unreadable}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].split(": ", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:5]))
    parser.add_argument("--a", required=True, metavar="SPEC", help="first backend: vit_b, mobile_sam.pt, "
                        "sam2.1_t.pt, mobile_sam.pt@onnx, mobile_sam.pt@640 (labels.sam.image_size 640), "
                        "mobile_sam.pt@onnx@640, yolo_seg, ...")
    parser.add_argument("--b", required=True, metavar="SPEC", help="second backend, as --a")
    parser.add_argument("--frames", type=Path, default=PROJECT.frames.root, help="frames stage output")
    parser.add_argument("--per-character", type=int, default=10, metavar="N", help="frames per character")
    parser.add_argument("--seg-weights", type=Path, default=DEFAULT_SEG_WEIGHTS,
                        help="YOLO segmentation weights for the yolo_seg backend")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--out", type=Path, default=PROJECT.reports / "label_agreement.md",
                        help="Markdown report; the JSON goes beside it")
    args = parser.parse_args(argv)
    if args.per_character < 1:
        parser.error("--per-character must be at least 1")
    params = load_config(args.params)
    report = measure_agreement(FramesDir(args.frames), params.labels, args.a, args.b, args.per_character,
                               params.evaluate.boundary_tolerance_px, args.seg_weights, factory=build_labeler)
    if report["unreadable"]:
        warn(f"{len(report['unreadable'])} sampled frame(s) could not be read and were left out "
             f"(e.g. {report['unreadable'][0]})")
    text = render(report)
    write_text_atomic(args.out, text)
    write_json(args.out.with_suffix(".json"), report)
    print(text, end="")
    print(f"agreement: written to {args.out} and {args.out.with_suffix('.json')}")
