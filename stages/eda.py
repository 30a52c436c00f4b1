"""DVC stage `eda`: look at the extracted frames before labelling them (balance, sizes, samples, bad frames).

Reads  data/frames/ (manifest.csv and the images it lists) and params.yaml `eda:` (samples_per_character,
       dark_mean, uniform_std, workers).
Writes plots/eda/ (frames_per_character.csv, frame_sizes.csv, flagged_frames.csv and images/*.png; all or
       nothing) and metrics/eda.json (flat numbers for `dvc metrics show`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from charseg.config import PARAMS_FILE, load_config
from charseg.eda import run_eda
from charseg.errors import run_cli
from charseg.layout import PROJECT, FramesDir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=Path, default=PROJECT.frames.root,
                        help="frames stage output (manifest.csv + images/)")
    parser.add_argument("--plots", type=Path, default=PROJECT.plots("eda"), help="output folder for tables and images")
    parser.add_argument("--metrics", type=Path, default=PROJECT.metrics("eda"))
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    metrics = run_eda(FramesDir(args.frames), args.plots, args.metrics, load_config(args.params).eda)
    print(f"eda: {metrics['frames']} frames of {metrics['characters']} characters, {metrics['near_black']} "
          f"near-black and {metrics['near_uniform']} near-uniform -> {args.plots}")


if __name__ == "__main__":
    run_cli(main)
