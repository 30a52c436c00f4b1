"""Export a trained model to ONNX, checked against PyTorch: `charseg export --model NAME` (or `--checkpoint PATH`).

Reads models/NAME/best.pt (or --checkpoint PATH), writes exports/NAME.onnx (or --output; NAME is the checkpoint's
own model name when only --checkpoint is given) with a dynamic batch, a fixed img_size x img_size input and the
checkpoint metadata embedded (its task and classes too: a characters-task model has one output channel per
class), only after onnxruntime's probabilities match torch's on a random batch;
`charseg predict --onnx exports/NAME.onnx ...` then runs it. The checkpoint records its arch, so no params.yaml
is needed; when one is there (--params, default ./params.yaml) and --model names one of its models, the
checkpoint must hold that model's arch.
Not a DVC stage: exports/ is a deliverable built on demand from a checkpoint, and models/ is a DVC
output that nothing else may write into.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from charseg import models
from charseg.errors import require
from charseg.inference import configured_arch
from charseg.io import check_writable
from charseg.layout import PROJECT
from charseg.onnx import DEFAULT_TOLERANCE, ExportReport, export_onnx
from charseg.ort import DEFAULT_OPSET
from charseg.task import PERSON, task_of_checkpoint


def check_output(output: Path, *, overwrite: bool) -> None:
    """A file path that may be written (and replaced only with `overwrite`); fails before the minutes-long export."""
    require(not output.is_dir(), f"--output {output} is a folder: give a file path such as {PROJECT.onnx('NAME')}")
    require(overwrite or not output.exists(), f"{output} exists: pass --overwrite to replace it")
    check_writable(output)  # a read-only or full disk fails now, not after the export


def export(checkpoint: Path, output: Path | None = None, *, model_name: str | None = None,
           expect_arch: str | None = None, opset: int = DEFAULT_OPSET, tolerance: float = DEFAULT_TOLERANCE,
           overwrite: bool = False) -> ExportReport:
    """Export the checkpoint to `output` (None: exports/<the checkpoint's model name>.onnx); refuses an existing
    output unless `overwrite`, and a checkpoint of another arch than `expect_arch` (None: any).
    model_name: the model the checkpoint is meant to be, for the hints of models.load_checkpoint."""
    if output is not None:
        check_output(output, overwrite=overwrite)
    model, meta = models.load_checkpoint(checkpoint, expect_arch=expect_arch, model_name=model_name)
    if output is None:
        output = PROJECT.onnx(meta["model_name"])
        check_output(output, overwrite=overwrite)
    task = task_of_checkpoint(meta)
    classes = "" if task.name == PERSON else f": {', '.join(task.classes)}"
    print(f"export: {meta['model_name']} ({meta['arch']}, {meta['encoder']}, img_size {meta['img_size']}, "
          f"{task.name} task{classes}) from {checkpoint}, opset {opset}...", file=sys.stderr)
    return export_onnx(model, meta, output, opset=opset, tolerance=tolerance, source_checkpoint=checkpoint)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", metavar="NAME",
                        help="a model name: reads models/NAME/best.pt (the train@NAME output) unless --checkpoint")
    parser.add_argument("--checkpoint", type=Path, help="a best.pt to export (default: models/NAME/best.pt)")
    parser.add_argument("--output", type=Path,
                        help="default: exports/NAME.onnx (NAME: --model, else the checkpoint's model name)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (default {DEFAULT_OPSET}; 18 for older runtimes)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest allowed |onnxruntime - torch| probability (foreground, or per class) on "
                             "the check batch "
                             f"(default {DEFAULT_TOLERANCE:g}); the logit difference is reported too")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--params", type=Path,
                        help="checks the checkpoint against models.NAME.arch (default: ./params.yaml if there is one)")
    args = parser.parse_args(argv)
    require(args.model or args.checkpoint, "give --model NAME (models/NAME/best.pt) or --checkpoint PATH")
    require(args.tolerance >= 0, f"--tolerance must be >= 0, got {args.tolerance}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    arch = configured_arch(args.model, args.params)
    checkpoint = args.checkpoint or PROJECT.checkpoint(args.model)
    output = args.output or (PROJECT.onnx(args.model) if args.model else None)
    report = export(checkpoint, output, model_name=args.model, expect_arch=arch, opset=args.opset,
                    tolerance=args.tolerance, overwrite=args.overwrite)
    print(f"export: wrote {report.path} ({report.size_bytes / 1e6:.1f} MB, opset {report.opset}); onnxruntime vs "
          f"torch on a batch of {report.check_batch}: max |logit diff| {report.max_abs_logits:.2e}, "
          f"max |prob diff| {report.max_abs_probs:.2e} (tolerance {report.tolerance:g})")
