"""DVC stage `evaluate`: every model of params.yaml `models:` on the validation frames, side by side.

Reads data/split.json, data/frames (manifest.csv, images/), models/<name>/best.pt, the targets of params.yaml's
`task` (person: data/masks/images; characters: data/identity, classes.json and images/) and, when
labels.truth_dir is set, the exact masks there (through labels.mask_index). Writes metrics/evaluate/<name>.json,
reports/comparison.md and .csv, and plots/evaluate/ (metrics.png, qualitative.png, and per task
dice_per_character.png, or iou_per_character.png and confusion_<name>.png).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from charseg.config import PARAMS_FILE, load_config
from charseg.errors import run_cli
from charseg.evaluate import CHARACTERS_REPORT, PERSON_REPORT, evaluate, ranking
from charseg.layout import PROJECT, FramesDir, IdentityDir, MasksDir
from charseg.task import CHARACTERS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--split", type=Path, default=PROJECT.split)
    parser.add_argument("--frames", type=Path, default=PROJECT.frames.root,
                        help="the frames stage folder (images/ and manifest.csv)")
    parser.add_argument("--masks", type=Path, default=PROJECT.masks.root, help="the masks stage folder (images/)")
    parser.add_argument("--identity", type=Path, default=PROJECT.identity.root,
                        help="the identity stage folder (classes.json, images/): the characters task's targets")
    parser.add_argument("--models", type=Path, default=PROJECT.models, help="reads <models>/<name>/best.pt")
    parser.add_argument("--metrics", type=Path, default=PROJECT.metrics("evaluate"))
    parser.add_argument("--reports", type=Path, default=PROJECT.reports)
    parser.add_argument("--plots", type=Path, default=PROJECT.plots("evaluate"))
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:1")
    args = parser.parse_args(argv)

    params = load_config(args.params)
    results = evaluate(params.models(), params.evaluate, split=args.split, frames=FramesDir(args.frames),
                       masks=MasksDir(args.masks), models_dir=args.models, metrics_dir=args.metrics,
                       reports_dir=args.reports, plots_dir=args.plots, truth=params.truth, device=args.device,
                       task=params.task, identity=IdentityDir(args.identity))
    spec = CHARACTERS_REPORT if params.task == CHARACTERS else PERSON_REPORT
    best = ranking(results, spec.rank_key)[0]
    score = results[best].get(spec.rank_key)
    print(f"evaluate: {len(results)} models; best {spec.rank_text.split(' over ')[0]} "
          f"{'-' if score is None else format(score, '.4f')} ({best}); see {args.reports / 'comparison.md'}")


if __name__ == "__main__":
    run_cli(main)
