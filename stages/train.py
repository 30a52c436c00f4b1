"""DVC stage train@<name>: train one model of params.yaml `models:` on the split.

Reads params.yaml (task, lr, weight_decay, epochs, batch_size, img_size, seed, train:, models.<name>),
data/split.json, data/frames/images/ and the targets of the task: data/masks/images/ (person) or
data/identity/images/ and classes.json (characters); writes models/<name>/best.pt and dvclive/<name>/.
Keeps pre-resized pairs and the resume state (.cache/train/<name>/) in .cache/, outside DVC's outputs.
Several GPUs: `torchrun --nproc_per_node=N -m stages.train <name>`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from charseg.config import load_config
from charseg.errors import run_cli
from charseg.layout import PROJECT, FramesDir, IdentityDir, MasksDir
from charseg.train import TrainPaths, train_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model name of params.yaml 'models:'")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--split", default=str(PROJECT.split))
    parser.add_argument("--frames", default=str(PROJECT.frames.root), help="the frames stage folder")
    parser.add_argument("--masks", default=str(PROJECT.masks.root), help="the masks stage folder")
    parser.add_argument("--identity", default=str(PROJECT.identity.root),
                        help="the identity stage folder (read in the characters task)")
    parser.add_argument("--out", default=str(PROJECT.models), help="writes <out>/<model>/best.pt")
    parser.add_argument("--live", default=str(PROJECT.live), help="dvclive logs go to <live>/<model>/")
    parser.add_argument("--cache", default=str(PROJECT.cache),
                        help="pre-resized frames and resume state; outside DVC outputs, safe to delete")
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:1")
    args = parser.parse_args(argv)

    params = load_config(args.params)
    paths = TrainPaths(split=Path(args.split), frames=FramesDir(Path(args.frames)), masks=MasksDir(Path(args.masks)),
                       identity=IdentityDir(Path(args.identity)), models=Path(args.out), live=Path(args.live),
                       cache=Path(args.cache))
    try:
        train_model(params.model_config(args.model), params.train, paths, device=args.device, task=params.task)
    except KeyboardInterrupt:  # unlike other stages, training keeps something: say what and how to use it
        state = paths.resume(args.model).last
        print(f"interrupted: the last finished epoch is kept in {state}; run the same command (or dvc exp run "
              f"with the same params) to resume from it" if state.is_file() else
              "interrupted before an epoch finished: nothing to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main)
