"""Frame extraction speed: our `frames` stage vs the seed's loop (and ffmpeg when installed), same video.

    .venv/bin/python benchmarks/bench_frames.py [--video PATH] [--seconds 60] [--size 1280x720]

Without --video it renders a clip once into a temporary folder: the sample's panning rooms and
walking figures, 29.97 fps MPEG-4, plus sensor grain (--grain, pixel noise std): flat synthetic
frames would make PNG writing (the seed's main extra cost) unrealistically cheap; real 720p frames
are 1-1.5 MB as PNG (the seed's run prints the size it got). Every method runs in its own child process, so the peak
resident memory (ru_maxrss, native memory included) is that method's alone; "import baseline" is the
RSS of a child that only imports the libraries. Methods:

  ours        charseg.frames.extract_frames as the stage runs it (workers 0 = every core: the video is
              cut into time chunks decoded in parallel when it is long enough): grab() every frame,
              retrieve() only the frames kept at 1 fps, JPEG
  ours-1w     the same with workers=1 (one process, no chunks)
  seed        the original loop: read() every frame, keep every int(fps)-th one, cv2.imwrite PNG
  read-all    read() every frame and write nothing: the cost of converting every frame
  decode-only grab() every frame: the floor for any exact sampler that decodes the stream
  ffmpeg      `ffmpeg -vf fps=1` to JPEG (skipped when no ffmpeg binary is on PATH)
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

METHODS = ("ours", "ours-1w", "seed", "read-all", "decode-only", "ffmpeg")


def make_video(path: Path, seconds: float, size: tuple[int, int], fps: float, grain: float) -> Path:
    import cv2
    import numpy as np

    from charseg.sample import ClipSpec, render_clip

    spec = ClipSpec("bench", path.name, fps, size, seconds, black_first_frame=False)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    rng = np.random.default_rng(0)
    # A few noise fields, cycled: changes every frame like sensor grain, without drawing 1800 fields.
    noise = [rng.normal(0, grain, (size[1], size[0], 3)).astype(np.int16) for _ in range(7)]
    for i, (frame, _) in enumerate(render_clip(spec, seed=0, clip_no=0)):
        writer.write(np.clip(frame + noise[i % len(noise)], 0, 255).astype(np.uint8) if grain else frame)
    writer.release()
    return path


def run_method(method: str, video: Path, out: Path) -> int:
    """The timed part of one method; returns the number of frames written."""
    import cv2

    if method.startswith("ours"):
        from charseg.config import FramesConfig
        from charseg.frames import extract_frames
        from charseg.layout import FramesDir

        videos = out / "videos"
        (videos / "bench").mkdir(parents=True)
        (videos / "bench" / video.name).symlink_to(video.resolve())
        cfg = FramesConfig(fps=1.0, max_side=None, jpeg_quality=95, workers=1 if method == "ours-1w" else 0)
        report = extract_frames(videos, FramesDir(out / "frames"), cfg)
        return report["frames_written"]
    if method == "ffmpeg":
        subprocess.run(["ffmpeg", "-v", "error", "-i", str(video), "-vf", "fps=1", "-q:v", "2",
                        str(out / "%06d.jpg")], check=True)
        return len(list(out.glob("*.jpg")))
    capture = cv2.VideoCapture(str(video))
    step, index, written, png_bytes = int(capture.get(cv2.CAP_PROP_FPS)), 0, 0, 0
    while True:
        if method == "decode-only":
            if not capture.grab():
                break
        else:
            ok, frame = capture.read()
            if not ok:
                break
            if method == "seed" and index % step == 0:
                cv2.imwrite(str(out / f"{index:06d}.png"), frame)
                written += 1
                png_bytes += (out / f"{index:06d}.png").stat().st_size
        index += 1
    capture.release()
    if written:
        print(f"PNG size: {png_bytes / written / 1e6:.2f} MB per frame", file=sys.stderr)
    return written


def child(method: str, video: Path) -> None:
    import cv2  # noqa: F401  (imported before timing: every method pays the same import cost)

    import charseg.frames  # noqa: F401

    with tempfile.TemporaryDirectory(prefix=f"bench_{method}_") as tmp:
        cpu_before = _cpu_seconds()
        start = time.perf_counter()
        if method != "baseline":
            frames = run_method(method, video, Path(tmp))
        wall = time.perf_counter() - start
        cpu = _cpu_seconds() - cpu_before
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # worker processes / ffmpeg
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "frames": 0 if method == "baseline" else frames,
                      "peak_rss_mb": max(own, children) / 1024}))


def _cpu_seconds() -> float:
    """User + system CPU of this process and its finished children: the work done, whatever the load."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(method: str, video: Path, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        proc = subprocess.run([sys.executable, __file__, "--child", method, "--video", str(video)],
                              capture_output=True, text=True, cwd=REPO_ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{method} failed:\n{proc.stderr}")
        if "PNG size" in proc.stderr and not runs:
            print("  " + proc.stderr.strip().splitlines()[-1])
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return min(runs, key=lambda r: r["wall_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", type=Path, help="a video to test on (default: render one)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--fps", type=float, default=30000 / 1001)
    parser.add_argument("--grain", type=float, default=5.0, help="std of the pixel noise added to each frame")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method; the fastest is reported")
    parser.add_argument("--child", choices=METHODS + ("baseline",), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.video)
        return

    with tempfile.TemporaryDirectory(prefix="bench_frames_") as tmp:
        video = args.video
        if video is None:
            width, height = map(int, args.size.split("x"))
            start = time.perf_counter()
            video = make_video(Path(tmp) / "bench.mp4", args.seconds, (width, height), args.fps, args.grain)
            print(f"rendered {video.name}: {width}x{height}, {args.seconds:g} s at {args.fps:.3f} fps, grain "
                  f"{args.grain:g}, {video.stat().st_size * 8 / args.seconds / 1e6:.1f} Mbit/s, "
                  f"in {time.perf_counter() - start:.1f} s")
        import cv2

        capture = cv2.VideoCapture(str(video))
        n_frames, fps = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), capture.get(cv2.CAP_PROP_FPS)
        capture.release()
        print(f"video: {video} ({n_frames} frames, {fps:.3f} fps, {n_frames / fps:.1f} s); "
              f"{Path('/proc/cpuinfo').read_text().count('processor') if Path('/proc/cpuinfo').exists() else '?'} CPUs")

        baseline = measure("baseline", video, 1)
        results = {}
        for method in METHODS:
            if method == "ffmpeg" and shutil.which("ffmpeg") is None:
                results[method] = None
                continue
            results[method] = measure(method, video, args.repeat)
            print(f"  {method}: {results[method]['wall_s']:.2f} s", flush=True)

    seed_wall = results["seed"]["wall_s"]
    print(f"\n{'method':<12} {'wall s':>8} {'vs seed':>8} {'CPU s':>7} {'frames':>7} {'peak RSS MB':>12}")
    for method, r in results.items():
        if r is None:
            print(f"{method:<12} skipped (no ffmpeg binary on PATH)")
            continue
        print(f"{method:<12} {r['wall_s']:>8.2f} {seed_wall / r['wall_s']:>7.2f}x {r['cpu_s']:>7.2f} "
              f"{r['frames']:>7} {r['peak_rss_mb']:>12.0f}")
    print(f"{'(imports)':<12} {'':>8} {'':>8} {'':>7} {'':>7} {baseline['peak_rss_mb']:>12.0f}")
    speedup = seed_wall / results["ours"]["wall_s"]
    print(f"\nours vs seed: {speedup:.2f}x faster (target >= 3x: {'met' if speedup >= 3 else 'NOT met'}); "
          f"the seed keeps {results['seed']['frames']} frames for {n_frames / fps:.1f} s because int({fps:.2f}) "
          f"= {int(fps)} drifts; ours keeps {results['ours']['frames']}")


if __name__ == "__main__":
    main()
