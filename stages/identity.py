"""DVC stage `identity`: every person instance of every frame -> a character (by folder name) or other.

    python -m stages.identity --frames data/frames --masks data/masks --out data/identity \
        --plots plots/identity --metrics metrics/identity.json

Reads the frames stage's images, the masks stage's folder (manifest.csv, instances.csv, instances/<id>.png),
params.yaml's `identity:` and labels.truth_dir / labels.mask_index (exact per-character masks, for scoring);
writes <out>/images/<id>.png (uint8 class ids), classes.json, instances.csv, manifest.csv, report.json, the
contact sheets and assignments.png in --plots and the numbers in --metrics (charseg.identity).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from charseg.config import PARAMS_FILE, load_config
from charseg.errors import run_cli
from charseg.identity import make_identity
from charseg.layout import PROJECT, FramesDir, IdentityDir, MasksDir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=Path, default=PROJECT.frames.root, help="frames stage output")
    parser.add_argument("--masks", type=Path, default=PROJECT.masks.root, help="masks stage output")
    parser.add_argument("--out", type=Path, default=PROJECT.identity.root)
    parser.add_argument("--plots", type=Path, default=PROJECT.plots("identity"))
    parser.add_argument("--metrics", type=Path, default=PROJECT.metrics("identity"))
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    params = load_config(args.params)
    metrics = make_identity(FramesDir(args.frames), MasksDir(args.masks), IdentityDir(args.out), args.plots,
                            args.metrics, params.identity, params.truth)
    truth = f", instance accuracy vs truth {metrics['instance_accuracy']:.3f}" \
        if metrics.get("instance_accuracy") is not None else ""
    print(f"identity: {metrics['instances']} instances in {metrics['frames']} frames: {len(metrics['classes'])} "
          f"character(s) found ({', '.join(metrics['classes']) or 'none'}), {metrics['other_instances']} other; "
          f"not found: {', '.join(metrics['not_found']) or 'none'}{truth}; "
          f"{metrics['seconds_per_frame'] * 1000:.1f} ms/frame")


if __name__ == "__main__":
    run_cli(main)
