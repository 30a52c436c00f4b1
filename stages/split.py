"""DVC stage `split`: split the frames into train and validation, whole videos (or time blocks) per side.

Reads  data/masks/manifest.csv (or any frames manifest; a `status` column filters rows), params.yaml
       `split:` (val_fraction, seed, gap_seconds) and `labels.keep_empty`.
Writes data/split.json ({"train": [ids], "val": [ids]}) and metrics/split.json (both or neither).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from charseg.config import PARAMS_FILE, load_config
from charseg.errors import run_cli
from charseg.layout import PROJECT
from charseg.split import write_split


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=PROJECT.frames.manifest,
                        help="frames or masks manifest (a 'status' column, when present, filters rows)")
    parser.add_argument("--out", type=Path, default=PROJECT.split)
    parser.add_argument("--metrics", type=Path, default=PROJECT.metrics("split"))
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    params = load_config(args.params)
    metrics = write_split(args.manifest, args.out, args.metrics, params.split, params.value("labels.keep_empty"))
    print(f"split: {metrics['train_frames']} train / {metrics['val_frames']} val frames "
          f"(val share {metrics['val_fraction_achieved']:.3f}), {metrics['dropped_by_gap']} dropped by the gap, "
          f"{metrics['dropped_by_status']} by status")


if __name__ == "__main__":
    run_cli(main)
