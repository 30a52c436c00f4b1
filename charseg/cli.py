"""`charseg <command>`: the tools that are not pipeline stages.

    charseg predict --checkpoint models/unetpp/best.pt --input ep01.mkv --output ep01_seg.mp4
    charseg export  --checkpoint models/unetpp/best.pt
    charseg sample  --out data/raw
    charseg compare
    charseg remote check
    charseg agreement --a vit_b --b mobile_sam.pt
    charseg app            # http://127.0.0.1:7860

Each command is a module of the package with its own `main(argv)`; `charseg <command> --help` lists its options.
"""
from __future__ import annotations

import importlib
import sys

from charseg.errors import run_cli

COMMANDS = {
    "predict": "segment images, folders or videos with a trained model (a checkpoint or an ONNX file)",
    "export": "export a checkpoint to ONNX, checked against PyTorch",
    "sample": "generate the synthetic demo footage, remove it, or run the demo (make repro)",
    "compare": "one row per DVC experiment: each model's val Dice, Dice and boundary F1",
    "remote": "check the DVC remote before a pull (make pull)",
    "agreement": "label a sample of frames with two labelling backends and score how well they agree",
    "app": "a local web page: every trained model's masks side by side on your images and clips",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {text}" for name, text in COMMANDS.items()]
    return "usage: charseg <command> [options]\n\ncommands:\n" + "\n".join(lines) + \
        "\n\n`charseg <command> --help` lists a command's options."


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"charseg: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(f"charseg.{command}")
    sys.argv[0] = f"charseg {command}"  # argparse's usage line names the command as typed
    run_cli(module.main, rest)
