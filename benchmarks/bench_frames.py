"""Frame extraction speed: the seed's loop vs our `frames` stage with each decoder, side by side, on several
kinds of video (same frame count and ids asserted between our two decoders).

    .venv/bin/python benchmarks/bench_frames.py [--video PATH] [--seconds 20] [--repeat 1] [--clips ...]

Without --video it renders each clip once into a temporary folder from the sample's panning rooms and
walking figures plus sensor grain (--grain, pixel noise std: flat synthetic frames would make decoding and
PNG writing unrealistically cheap):

  h264-1080p   1920x1080 25 fps H.264 through PyAV's libx264, bframes=3, keyint=250 (a typical TV encode)
  mpeg4-720p   1280x720 29.97 fps MPEG-4 (OpenCV's mp4v, no B-frames): the clip of the earlier benchmark
  h264-gop2s   1280x720 25 fps H.264, bframes=3, a keyframe every 2 s
  mjpg-720p    1280x720 25 fps MJPG (I-frames only: nothing refers to a frame, so none needs decoding
               unless picked)

Every method runs in its own child process, so the peak resident memory (ru_maxrss of the process and its
workers: the peak of one worker, native memory included) is that method's alone. Methods:

  seed        the original loop: read() every frame, keep every int(fps)-th one, cv2.imwrite PNG
  opencv      charseg.frames.extract_frames, frames.decoder opencv: grab() every frame, retrieve() the
              frames kept at 1 fps, JPEG (workers 0: chunks in parallel when the video is long enough)
  pyav        the same with frames.decoder pyav: only the picked frames and the reference frames are
              decoded (skip_frame NONREF; intra-only codecs: picks only), threaded decoder
  decode-all  PyAV decoding every frame, converting none: the floor of any reader that decodes everything
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

METHODS = ("seed", "opencv", "pyav", "decode-all")
CLIPS = {  # name: (size, fps, codec, encoder options)
    "h264-1080p": ((1920, 1080), 25.0, "libx264", {"x264-params": "bframes=3:keyint=250", "preset": "veryfast"}),
    "mpeg4-720p": ((1280, 720), 30000 / 1001, "mp4v", {}),
    "h264-gop2s": ((1280, 720), 25.0, "libx264", {"x264-params": "bframes=3:keyint=50:min-keyint=50",
                                                  "preset": "veryfast"}),
    "mjpg-720p": ((1280, 720), 25.0, "mjpeg", {}),
}


def _frames(size: tuple[int, int], fps: float, seconds: float, grain: float):
    import numpy as np

    from charseg.sample import ClipSpec, render_clip

    spec = ClipSpec("alice", "bench", fps, size, seconds, black_first_frame=False)
    rng = np.random.default_rng(0)
    # A few noise fields, cycled: changes every frame like sensor grain, without drawing a field per frame.
    noise = [rng.normal(0, grain, (size[1], size[0], 3)).astype(np.int16) for _ in range(7)]
    for i, (frame, _) in enumerate(render_clip(spec, seed=0, clip_no=0)):
        yield np.clip(frame + noise[i % len(noise)], 0, 255).astype(np.uint8) if grain else frame


def make_video(folder: Path, clip: str, seconds: float, grain: float) -> Path:
    """Render `clip` (a CLIPS name): OpenCV's writer for mp4v, PyAV's encoders for the others."""
    from fractions import Fraction

    import av
    import cv2

    size, fps, codec, options = CLIPS[clip]
    path = folder / f"{clip}.{'avi' if codec == 'mjpeg' else 'mp4'}"
    if codec == "mp4v":
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        for frame in _frames(size, fps, seconds, grain):
            writer.write(frame)
        writer.release()
        return path
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001), options=options)
        stream.width, stream.height = size
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "mjpeg":
            stream.codec_context.bit_rate = 8 * 150_000 * round(fps)  # ~150 kB per 720p frame: camera quality
        for frame in _frames(size, fps, seconds, grain):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")))
        container.mux(stream.encode())
    return path


def run_method(method: str, video: Path, out: Path) -> tuple[int, list[str]]:
    """The timed part of one method; returns the number of frames written and their ids (ours only)."""
    import cv2

    if method in ("opencv", "pyav"):
        from charseg.config import FramesConfig
        from charseg.frames import extract_frames
        from charseg.layout import FramesDir

        videos = out / "videos"
        (videos / "bench").mkdir(parents=True)
        (videos / "bench" / video.name).symlink_to(video.resolve())
        cfg = FramesConfig(fps=1.0, max_side=None, jpeg_quality=95, workers=0, decoder=method)
        report = extract_frames(videos, FramesDir(out / "frames"), cfg)
        ids = sorted(p.stem for p in (out / "frames" / "images").iterdir())
        return report["frames_written"], ids
    if method == "decode-all":
        import av

        with av.open(str(video)) as container:
            container.streams.video[0].thread_type = "AUTO"
            return sum(1 for _ in container.decode(video=0)), []
    capture = cv2.VideoCapture(str(video))
    step, index, written, png_bytes = int(capture.get(cv2.CAP_PROP_FPS)), 0, 0, 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        if index % step == 0:
            cv2.imwrite(str(out / f"{index:06d}.png"), frame)
            written += 1
            png_bytes += (out / f"{index:06d}.png").stat().st_size
        index += 1
    capture.release()
    return written, []


def child(method: str, video: Path) -> None:
    import av  # noqa: F401  (imported before timing: every method pays the same import cost)
    import cv2  # noqa: F401

    import charseg.frames  # noqa: F401

    with tempfile.TemporaryDirectory(prefix=f"bench_{method}_") as tmp:
        cpu_before = _cpu_seconds()
        start = time.perf_counter()
        frames, ids = run_method(method, video, Path(tmp)) if method != "baseline" else (0, [])
        wall = time.perf_counter() - start
        cpu = _cpu_seconds() - cpu_before
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # worker processes
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "frames": frames, "ids": ids,
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
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return min(runs, key=lambda r: r["wall_s"])


def bench_video(video: Path, repeat: int) -> dict[str, dict]:
    """Every method on one video; asserts that both decoders of ours wrote the same frames."""
    import cv2

    capture = cv2.VideoCapture(str(video))
    n_frames, fps = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    print(f"{video.name}: {n_frames} frames, {fps:.3f} fps, {n_frames / fps:.1f} s, "
          f"{video.stat().st_size * 8 / (n_frames / fps) / 1e6:.1f} Mbit/s", flush=True)
    results = {method: measure(method, video, repeat) for method in METHODS}
    assert results["opencv"]["ids"] == results["pyav"]["ids"], "the two decoders kept different frames"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", type=Path, help="a video to test on (default: render the --clips)")
    parser.add_argument("--clips", nargs="+", choices=list(CLIPS), default=list(CLIPS))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--grain", type=float, default=5.0, help="std of the pixel noise added to each frame")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method; the fastest is reported")
    parser.add_argument("--child", choices=METHODS + ("baseline",), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.video)
        return

    print(f"{os.cpu_count()} CPUs")
    table = {}
    with tempfile.TemporaryDirectory(prefix="bench_frames_") as tmp:
        if args.video:
            videos = {args.video.name: args.video}
        else:
            videos = {}
            for clip in args.clips:
                start = time.perf_counter()
                videos[clip] = make_video(Path(tmp), clip, args.seconds, args.grain)
                print(f"rendered {clip} in {time.perf_counter() - start:.1f} s", flush=True)
        baseline = measure("baseline", next(iter(videos.values())), 1)
        for name, video in videos.items():
            table[name] = bench_video(video, args.repeat)

    print(f"\n| video | method | wall s | vs seed | vs opencv | CPU s | frames | peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, results in table.items():
        for method, r in results.items():
            print(f"| {name} | {method} | {r['wall_s']:.2f} | {results['seed']['wall_s'] / r['wall_s']:.2f}x | "
                  f"{results['opencv']['wall_s'] / r['wall_s']:.2f}x | {r['cpu_s']:.2f} | {r['frames']} | "
                  f"{r['peak_rss_mb']:.0f} |")
    print(f"| (imports only) | | | | | | | {baseline['peak_rss_mb']:.0f} |")
    for name, results in table.items():
        vs_seed = results["seed"]["wall_s"] / results["pyav"]["wall_s"]
        vs_opencv = results["opencv"]["wall_s"] / results["pyav"]["wall_s"]
        met = "met" if vs_seed >= 3 and vs_opencv >= 1.5 else "NOT met"
        print(f"{name}: pyav {vs_seed:.2f}x the seed, {vs_opencv:.2f}x opencv (targets >= 3x, >= 1.5x: {met}); "
              f"same {results['pyav']['frames']} frames and ids from both decoders")


if __name__ == "__main__":
    main()
