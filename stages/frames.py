"""DVC stage `frames`: extract frames from the character videos, sampled by timestamp.

Reads  data/raw/videos/<character>/<video> and params.yaml `frames:` (fps, max_side, jpeg_quality, workers).
Writes data/frames/ (images/<id>.jpg, manifest.csv, report.json; all or nothing) and metrics/frames.json.
Files that cannot be used are skipped, warned about and listed in report.json (see charseg/frames.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from charseg.config import PARAMS_FILE, load_config
from charseg.errors import run_cli
from charseg.frames import extract_frames
from charseg.layout import PROJECT, FramesDir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=Path, default=PROJECT.videos, help="one folder of videos per character")
    parser.add_argument("--out", type=Path, default=PROJECT.frames.root, help="the frames folder to write")
    parser.add_argument("--metrics", type=Path, default=PROJECT.metrics("frames"))
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    out = FramesDir(args.out)
    report = extract_frames(args.videos, out, load_config(args.params).frames, args.metrics)
    print(f"frames: {report['frames_written']} frames from {report['videos_processed']} videos -> {out.root} "
          f"({len(report['skipped'])} skipped, {len(report['warnings'])} warnings: see {out.report})")


if __name__ == "__main__":
    run_cli(main)
