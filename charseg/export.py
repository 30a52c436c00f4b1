"""Export a trained model to ONNX, checked against PyTorch: `charseg export --model NAME`.

Reads models/NAME/best.pt (or --checkpoint), writes exports/NAME.onnx (dynamic batch, fixed
img_size x img_size input, the checkpoint metadata embedded) only after onnxruntime's output matches
torch's on a random batch; `charseg predict --onnx exports/NAME.onnx ...` then runs it.
Not a DVC stage: exports/ is a deliverable built on demand from a checkpoint, and models/ is a DVC
output that nothing else may write into.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from charseg import models
from charseg.errors import CharsegError, require, run_cli
from charseg.io import check_writable
from charseg.onnx import DEFAULT_OPSET, DEFAULT_TOLERANCE, ExportReport, export_onnx
from charseg.config import load_params, section


def export(model_cfgs: dict[str, Any], name: str, *, checkpoint: Path, output: Path, opset: int = DEFAULT_OPSET,
           tolerance: float = DEFAULT_TOLERANCE, overwrite: bool = False) -> ExportReport:
    """Export models.<name>'s checkpoint to `output`; refuses an existing output unless `overwrite`."""
    if name not in model_cfgs:
        raise CharsegError(f"unknown model '{name}': params.yaml 'models:' defines {', '.join(model_cfgs)}")
    cfg = model_cfgs[name]
    require(isinstance(cfg, dict), f"params.yaml: models.{name} must be a mapping (arch, encoder, ...)")
    require(not output.is_dir(), f"--output {output} is a folder: give a file path such as exports/{name}.onnx")
    require(overwrite or not output.exists(), f"{output} exists: pass --overwrite to replace it")
    check_writable(output)  # a read-only or full disk fails now, not after the minutes-long export
    model, meta = models.load_checkpoint(checkpoint, expect_arch=cfg.get("arch"), model_name=name)
    print(f"export: {name} ({meta['arch']}, {meta['encoder']}, img_size {meta['img_size']}) from {checkpoint}, "
          f"opset {opset}...", file=sys.stderr)
    return export_onnx(model, meta, output, opset=opset, tolerance=tolerance, source_checkpoint=checkpoint)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a name under params.yaml 'models:'")
    parser.add_argument("--checkpoint", help="default: models/<model>/best.pt (the train@<model> output)")
    parser.add_argument("--output", help="default: exports/<model>.onnx")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (default {DEFAULT_OPSET}; 18 for older runtimes)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest allowed |onnxruntime - torch| foreground probability on the check batch "
                             f"(default {DEFAULT_TOLERANCE:g}); the logit difference is reported too")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    require(args.tolerance >= 0, f"--tolerance must be >= 0, got {args.tolerance}")

    params = load_params(args.params)
    checkpoint = Path(args.checkpoint or f"models/{args.model}/best.pt")
    output = Path(args.output or f"exports/{args.model}.onnx")
    report = export(section(params, "models"), args.model, checkpoint=checkpoint, output=output, opset=args.opset,
                    tolerance=args.tolerance, overwrite=args.overwrite)
    print(f"export: wrote {report.path} ({report.size_bytes / 1e6:.1f} MB, opset {report.opset}); onnxruntime vs "
          f"torch on a batch of {report.check_batch}: max |logit diff| {report.max_abs_logits:.2e}, "
          f"max |prob diff| {report.max_abs_probs:.2e} (tolerance {report.tolerance:g})")

