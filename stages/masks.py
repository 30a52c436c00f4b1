"""DVC stage `masks`: one binary person mask per frame (charseg.masks), weak labels or the user's own.

    python -m stages.masks --frames data/frames --out data/masks --plots plots/masks --metrics metrics/masks.json

Reads the frames stage's folder (images/<id>.jpg, manifest.csv), params.yaml's `labels:` and the weights
(or labels.import_dir); writes <out>/images/<id>.png, <out>/manifest.csv, <out>/report.json, QA plots in
--plots and the numbers in --metrics. labels.workers > 1 (0: one per GPU) labels over that many processes,
with the same outputs as one.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from charseg.config import PARAMS_FILE, load_config
from charseg.errors import run_cli, warn
from charseg.layout import PROJECT, FramesDir, MasksDir
from charseg.masks import make_masks


def warn_if_untracked(folder: Path | None, key: str) -> None:
    """dvc.yaml's masks stage depends on data/raw (besides frames and weights): a folder elsewhere changes unseen."""
    if folder is None:
        return
    tracked, resolved = PROJECT.raw.resolve(), folder.resolve()
    if resolved != tracked and tracked not in resolved.parents:
        warn(f"labels.{key} {folder} is outside {PROJECT.raw}, which is what dvc.yaml tracks: DVC will "
             f"not notice changes there (re-run with dvc repro -f masks, or move the folder under {PROJECT.raw})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=Path, default=PROJECT.frames.root, help="frames stage output")
    parser.add_argument("--out", type=Path, default=PROJECT.masks.root)
    parser.add_argument("--plots", type=Path, default=PROJECT.plots("masks"))
    parser.add_argument("--metrics", type=Path, default=PROJECT.metrics("masks"))
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    cfg = load_config(args.params).labels
    warn_if_untracked(cfg.import_dir if cfg.method == "import" else None, "import_dir")
    warn_if_untracked(cfg.truth_dir, "truth_dir")
    metrics = make_masks(FramesDir(args.frames), MasksDir(args.out), args.plots, args.metrics, cfg)
    truth = f", Dice vs truth {metrics['truth_dice']:.3f}" if "truth_dice" in metrics else ""
    print(f"masks: {metrics['frames']} frames: {metrics['labelled']} labelled, {metrics['empty']} empty, "
          f"{metrics['failed']} failed; mean coverage {metrics['mean_coverage']:.3f}{truth}")


if __name__ == "__main__":
    run_cli(main)
