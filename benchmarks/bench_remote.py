"""DVC push/pull speed for many small frames vs a few per-video shards, to a local remote and to S3.

    .venv/bin/python benchmarks/bench_remote.py [--frames 5000] [--per-video 100] [--jobs 32] [--work DIR]

Data: `--frames` JPEGs of 1280x720 at quality 90 (~115 KB each, like real 720p TV frames), one synthetic
room per "video" (`--per-video` frames each) with a slow pan, light grain and the frame number drawn in, so
every file is unique (DVC stores identical content once). The same frames also as one uncompressed tar per
video (`data/shards/<video>.tar`). Both are generated once into a temporary folder (deleted at the end
unless --work is given) and tracked by DVC as `data/frames` and `data/shards` of one repository.

For each layout and remote: `dvc push` to an empty remote, then `dvc pull` into a fresh `git clone` (empty
cache and workspace), once with the remote's `verify` off and once on (DVC then re-hashes every downloaded
object). Remotes: a local folder (the committed default kind) and S3 = moto's server on 127.0.0.1 (tests/
s3_server.py): a Python server on the same CPU cores as DVC, so S3 figures measure per-request overhead, not
a real bucket's bandwidth. DVC's default jobs are 4 x CPU cores; `--jobs` adds a run with that many for the
frames. The machine's other load counts: run it alone.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

BUCKET = "bench"


def make_frames(out: Path, n_frames: int, per_video: int, size: tuple[int, int], quality: int) -> None:
    import cv2
    import numpy as np
    from tqdm import tqdm

    from charseg.sample import _background

    width, height = size
    rng = np.random.default_rng(0)
    grain = rng.normal(0, 1.5, (height + 64, width + 64, 3)).astype(np.float32)
    out.mkdir(parents=True)
    room = None
    for index in tqdm(range(n_frames), desc="frames", unit="frame"):
        video, step = divmod(index, per_video)
        if step == 0:
            room = _background(rng, height, width + per_video * 2).astype(np.float32)
        dy, dx = (index * 7) % 64, (index * 13) % 64
        image = room[:, step * 2:step * 2 + width] + grain[dy:dy + height, dx:dx + width]
        image = np.clip(image, 0, 255).astype(np.uint8)
        cv2.putText(image, f"{index:06d}", (40, 80), cv2.FONT_HERSHEY_SIMPLEX, 2, (255, 255, 255), 3)
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        (out / f"video{video:03d}--{step:08d}.jpg").write_bytes(data.tobytes())


def make_shards(frames: Path, out: Path) -> None:
    """One uncompressed tar per video, members in frame order (a reader indexes them once per shard)."""
    out.mkdir(parents=True)
    by_video: dict[str, list[Path]] = {}
    for path in sorted(frames.iterdir()):
        by_video.setdefault(path.name.split("--")[0], []).append(path)
    for video, paths in by_video.items():
        with tarfile.open(out / f"{video}.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            for path in paths:
                info = tarfile.TarInfo(path.name)
                data = path.read_bytes()
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}) in {cwd}:\n{proc.stdout}\n{proc.stderr}")
    return seconds


def tree_stats(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=5000)
    parser.add_argument("--per-video", type=int, default=100, help="frames per video = per shard")
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--jobs", type=int, default=32, help="extra -j run for the frames; 0 = none")
    parser.add_argument("--work", type=Path, help="keep everything here (default: a temporary folder)")
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))

    from s3_server import S3Server

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_remote_"))
    work.mkdir(parents=True, exist_ok=True)
    bin_dir = str(Path(sys.executable).parent)
    try:
        with S3Server(work) as s3:
            s3.create_bucket(BUCKET)
            env = {**os.environ, **s3.env, "HOME": str(work / "home"), "DVC_NO_ANALYTICS": "1",
                   "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                   "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
                   "GIT_COMMITTER_EMAIL": "b@b"}
            dvc = [sys.executable, "-m", "dvc"]
            repo = work / "repo"
            repo.mkdir()
            timed(["git", "init", "-q"], repo, env)
            timed(dvc + ["init", "-q"], repo, env)
            start = time.perf_counter()
            make_frames(repo / "data" / "frames", args.frames, args.per_video, size, args.quality)
            make_shards(repo / "data" / "frames", repo / "data" / "shards")
            print(f"generated the data in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            layouts = {}
            for layout in ("frames", "shards"):
                n_files, n_bytes = tree_stats(repo / "data" / layout)
                layouts[layout] = {"files": n_files, "bytes": n_bytes,
                                   "add": timed(dvc + ["add", "-q", f"data/{layout}"], repo, env)}

            runs = []  # (layout, remote kind, jobs or None)
            for layout in layouts:
                for kind in ("local", "s3"):
                    runs.append((layout, kind, None))
                    if layout == "frames" and args.jobs:
                        runs.append((layout, kind, args.jobs))
            for layout, kind, jobs in runs:
                name = f"{kind}_{layout}_{jobs or 'default'}"
                url = str(work / "remotes" / name) if kind == "local" else f"s3://{BUCKET}/{name}"
                timed(dvc + ["remote", "add", name, url], repo, env)
                if kind == "s3":
                    timed(dvc + ["remote", "modify", name, "endpointurl", s3.endpoint], repo, env)
            timed(["git", "add", "-A"], repo, env)
            timed(["git", "commit", "-q", "-m", "bench"], repo, env)

            rows = []
            for layout, kind, jobs in runs:
                name = f"{kind}_{layout}_{jobs or 'default'}"
                jobs_args = ["-j", str(jobs)] if jobs else []
                target = f"data/{layout}.dvc"
                print(f"{name}: push", file=sys.stderr)
                row = {"layout": layout, "remote": kind, "jobs": jobs or "default",
                       "push": timed(dvc + ["push", "-r", name, *jobs_args, target], repo, env)}
                for verify in (False, True):
                    print(f"{name}: pull, verify {verify}", file=sys.stderr)
                    clone = work / f"clone_{name}_{verify}"
                    timed(["git", "clone", "-q", str(repo), str(clone)], work, env)
                    timed(dvc + ["remote", "modify", "--local", name, "verify", str(verify).lower()], clone, env)
                    row[f"pull verify={verify}"] = timed(dvc + ["pull", "-r", name, *jobs_args, target], clone, env)
                    if tree_stats(clone / "data" / layout) != (layouts[layout]["files"], layouts[layout]["bytes"]):
                        raise SystemExit(f"{name}: the pulled data/{layout} differs from the pushed one")
                    shutil.rmtree(clone)
                rows.append(row)
                if kind == "local":  # free the space (and moto's memory) before the next run
                    shutil.rmtree(work / "remotes" / name)
                else:
                    client = s3.client()
                    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=name):
                        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                        if keys:
                            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{os.cpu_count()} CPU cores; data: {args.frames} JPEGs {size[0]}x{size[1]} q{args.quality}\n")
    print("| layout | files | MB | mean file KB | dvc add s |")
    print("|---|---:|---:|---:|---:|")
    for layout, info in layouts.items():
        print(f"| {layout} | {info['files']} | {info['bytes'] / 1e6:.0f} | {info['bytes'] / info['files'] / 1e3:.0f} "
              f"| {info['add']:.1f} |")
    print("\n| layout | remote | jobs | operation | s | frames/s | files/s | MB/s |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        info = layouts[row["layout"]]
        for op in ("push", "pull verify=False", "pull verify=True"):
            seconds = row[op]
            print(f"| {row['layout']} | {row['remote']} | {row['jobs']} | {op} | {seconds:.1f} "
                  f"| {args.frames / seconds:.0f} | {info['files'] / seconds:.1f} "
                  f"| {info['bytes'] / 1e6 / seconds:.1f} |")


if __name__ == "__main__":
    main()
