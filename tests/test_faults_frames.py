"""Faults and bad input from outside for the frames stage and the shared worker pool: Ctrl-C (once,
twice), a parent killed outright, an output write failing in a worker (full disk), names too long for
the filesystem, hidden folders, broken/looping symlinks, a named pipe, a non-UTF-8 name, and frames.fps
above a video's own rate."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import charseg.frames as frames
from helpers import write_video
from charseg.config import FramesConfig
from charseg.errors import CharsegError
from charseg.io import remove_stale_temps
from charseg.layout import FramesDir
from charseg.workers import WorkerPool

REPO_ROOT = Path(__file__).resolve().parents[1]
EXIT_WITHIN_S = 3.0


# -- the stage as a subprocess, interrupted ------------------------------------------------------------

@pytest.fixture(scope="module")
def big_videos(tmp_path_factory) -> Path:
    """Six 12 s videos (one clip, hard-linked: cheap to make), ~7 s of work for 2 workers at 25 fps."""
    root = tmp_path_factory.mktemp("big") / "videos"
    clip = write_video(root / "c0" / "v0.avi", 300, 25, size=(320, 240))
    for i in range(1, 6):
        (root / f"c{i % 3}").mkdir(exist_ok=True)
        os.link(clip, root / f"c{i % 3}" / f"v{i}.avi")
    return root


def _params(tmp_path: Path, fps: float = 25, workers: int = 2) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(f"frames:\n  fps: {fps}\n  max_side: null\n  jpeg_quality: 95\n  workers: {workers}\n")
    return path


def _start(videos: Path, tmp_path: Path, **kwargs) -> subprocess.Popen:
    """`python -m stages.frames` in its own process group, as a terminal runs it (Ctrl-C goes to the group)."""
    cmd = [sys.executable, "-m", "stages.frames", "--videos", str(videos), "--out", str(tmp_path / "out"),
           "--metrics", str(tmp_path / "frames.json"), "--params", str(_params(tmp_path))]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


@pytest.fixture
def reaper():
    """Kills whatever a test started if it fails before its process group ends (a hang must not linger)."""
    started: list[subprocess.Popen] = []
    yield started.append
    for proc in started:
        for child in _descendants(proc):
            child.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _temps(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out."))


def _wait_until_decoding(proc: subprocess.Popen, tmp_path: Path, workers: int = 2) -> list[psutil.Process]:
    """Block until the workers write frames; returns the stage's child processes at that point."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        jpegs = [p for temp in _temps(tmp_path) for p in (tmp_path / temp / "images").glob("*.jpg")]
        children = _descendants(proc)
        if len(jpegs) >= 4 and len(children) >= workers:
            return children
        time.sleep(0.05)
    raise AssertionError("the stage never started writing frames")


def _alive(processes: list[psutil.Process], within: float = 1.5) -> list[int]:
    """The processes still running (zombies count as gone) after up to `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        alive = []
        for process in processes:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process.pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def test_first_ctrl_c_stops_the_workers_and_removes_the_temp_output(big_videos, tmp_path, reaper):
    proc = _start(big_videos, tmp_path)
    reaper(proc)
    children = _wait_until_decoding(proc, tmp_path)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    sent = time.monotonic()
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - sent
    assert proc.returncode == 130, err
    assert took < EXIT_WITHIN_S, f"exited {took:.1f} s after Ctrl-C (the queued videos were decoded first?)"
    assert "interrupted: no partial output was kept" in err and "Traceback" not in err, err
    assert _temps(tmp_path) == [] and not (tmp_path / "out").exists()
    assert _alive(children) == []


@pytest.mark.parametrize("gap", [0.02, 1.0])
def test_second_ctrl_c_exits_at_once(big_videos, tmp_path, reaper, gap):
    """0.02 s: the second one lands while the first is being handled; 1 s: after the first one should have
    ended the stage (before: the message was printed, then the process hung with its workers writing)."""
    proc = _start(big_videos, tmp_path)
    reaper(proc)
    children = _wait_until_decoding(proc, tmp_path)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    time.sleep(gap)
    with contextlib.suppress(ProcessLookupError):  # the group may be gone already
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    assert time.monotonic() - sent < EXIT_WITHIN_S
    assert _alive(children) == []
    time.sleep(0.3)
    assert not (tmp_path / "out").exists()
    # A second Ctrl-C may cut the temp folder's removal short; the next run sweeps it (its pid is gone).
    remove_stale_temps(tmp_path)
    assert _temps(tmp_path) == []


def test_no_worker_outlives_a_killed_parent(big_videos, tmp_path, reaper):
    proc = _start(big_videos, tmp_path)
    reaper(proc)
    children = _wait_until_decoding(proc, tmp_path)
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup runs in the parent at all
    proc.communicate(timeout=10)
    assert _alive(children, within=2.0) == []


def test_write_error_in_a_worker_is_one_error_line_and_no_temp_output(tmp_path, reaper):
    """A full disk, simulated by a file size limit (RLIMIT_FSIZE: the write fails with EFBIG, as with
    ENOSPC); every frame write fails in the worker processes."""
    import resource

    for i in range(3):
        write_video(tmp_path / "v" / f"c{i}" / "clip.avi", 50, 25, seed=i)
    proc = _start(tmp_path / "v", tmp_path,
                  preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)))
    reaper(proc)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "File too large" in lines[0] and ".jpg" in lines[0], err
    assert _temps(tmp_path) == [] and not (tmp_path / "out").exists()


# -- the pool itself ---------------------------------------------------------------------------------

def _slow_square(x: int) -> int:
    time.sleep(0.02)
    return x * x


def test_thread_pool_ctrl_c_cancels_the_queued_items():
    ran = []

    def work(x):
        ran.append(x)
        return _slow_square(x)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with WorkerPool(2, processes=False) as pool:
            for i, result in enumerate(pool.map(work, range(1000), window=50)):
                assert result == i * i
                if i == 5:
                    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    assert len(ran) < 100  # not the 1000 items, nor the whole window and more
    assert signal.getsignal(signal.SIGINT) is before


def test_a_worker_process_that_dies_is_a_clear_error():
    with pytest.raises(CharsegError, match=r"worker process ended abruptly \(exit code 3"):
        with WorkerPool(1, processes=True) as pool:
            for future in pool.as_completed([pool.submit(os._exit, 3)]):
                future.result()


# -- bad input: skipped and reported, the others go on -----------------------------------------------

def _extract(videos: Path, out: Path, **overrides):
    options = {"fps": 1.0, "max_side": None, "jpeg_quality": 90, "workers": 1, **overrides}
    return frames.extract_frames(videos, FramesDir(out), FramesConfig(**options))


def _skipped(report) -> dict[str, str]:
    return {item["path"]: item["reason"] for item in report["skipped"]}


def test_names_too_long_for_frame_files_are_skipped_not_fatal(tmp_path, capsys):
    videos = tmp_path / "v"
    write_video(videos / ("a" * 250) / "clip.mp4", 30, 25)  # before: OSError File name too long, stage over
    write_video(videos / ("b" * 200) / "clip.mp4", 30, 25)  # fits: <200 b>--clip--00000000.jpg is 220 bytes
    write_video(videos / "carol" / ("c" * 246 + ".mp4"), 30, 25)
    write_video(videos / "carol" / "short.mp4", 30, 25)
    report = _extract(videos, tmp_path / "out")
    skipped = _skipped(report)
    assert set(skipped) == {"a" * 250 + "/clip.mp4", "a" * 250, "carol/" + "c" * 246 + ".mp4"}
    assert "longer than the 255 bytes" in skipped["a" * 250 + "/clip.mp4"]
    assert "shorten the character folder's or the video's name" in skipped["carol/" + "c" * 246 + ".mp4"]
    assert sorted(v["video"] for v in report["videos"]) == ["b" * 200 + "/clip.mp4", "carol/short.mp4"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["skipped"] == report["skipped"]
    assert "warning: skipped" in capsys.readouterr().err


def test_hidden_character_folder_is_reported(tmp_path, capsys):
    videos = tmp_path / "v"
    write_video(videos / ".alice" / "clip.mp4", 30, 25)
    write_video(videos / "bob" / "clip.mp4", 30, 25)
    write_video(videos / "bob" / ".thumbs" / "x.mp4", 5, 25)
    (videos / "bob" / ".DS_Store").write_bytes(b"\0")  # hidden files stay ignored silently
    (videos / ".charseg-sample.json").write_text("{}")
    report = _extract(videos, tmp_path / "out")
    skipped = _skipped(report)
    assert set(skipped) == {".alice", "bob/.thumbs"}
    assert "hidden folder, skipped" in skipped[".alice"]
    assert f"warning: skipped {videos / '.alice'}: hidden folder, skipped" in capsys.readouterr().err
    assert [v["video"] for v in report["videos"]] == ["bob/clip.mp4"]


def test_broken_and_looping_symlinks_are_reported(tmp_path):
    videos = tmp_path / "v"
    write_video(videos / "alice" / "good.mp4", 30, 25)
    (videos / "alice" / "gone.mp4").symlink_to(tmp_path / "nowhere" / "clip.mp4")
    (videos / "loop").symlink_to("loop")  # a "character folder" that is a link to itself
    (videos / "bob").symlink_to(videos / "alice")  # a working link to a folder is used like a folder
    report = _extract(videos, tmp_path / "out")
    skipped = _skipped(report)
    assert set(skipped) == {"alice/gone.mp4", "loop", "bob/gone.mp4"}
    assert "a symbolic link to " + str(tmp_path / "nowhere" / "clip.mp4") in skipped["alice/gone.mp4"]
    assert "cannot be followed (No such file or directory): fix or remove the link" in skipped["alice/gone.mp4"]
    assert "a symbolic link loop (-> loop)" in skipped["loop"]  # before: "a file ... has no character"
    assert sorted(v["video"] for v in report["videos"]) == ["alice/good.mp4", "bob/good.mp4"]


def test_named_pipe_with_a_video_name_is_skipped_without_blocking(tmp_path):
    videos = tmp_path / "v"
    write_video(videos / "alice" / "good.mp4", 30, 25)
    os.mkfifo(videos / "alice" / "stream.mp4")  # opening it for reading would wait for a writer forever
    report = _extract(videos, tmp_path / "out")
    assert "a named pipe (FIFO), not a video file" in _skipped(report)["alice/stream.mp4"]
    assert [v["video"] for v in report["videos"]] == ["alice/good.mp4"]


def test_non_utf8_file_name_is_skipped_and_the_report_stays_valid(tmp_path):
    videos = tmp_path / "v"
    good = write_video(videos / "alice" / "good.mp4", 30, 25)
    bad = os.path.join(os.fsencode(videos / "alice"), b"caf\xe9.mp4")  # Latin-1 "café": not UTF-8
    with open(bad, "wb") as fh:
        fh.write(good.read_bytes())
    report = _extract(videos, tmp_path / "out")  # before: UnicodeEncodeError writing the manifest
    reason = _skipped(report)["alice/caf\\xe9.mp4"]
    assert "not valid UTF-8" in reason and "rename it" in reason
    assert json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))["skipped"] == report["skipped"]
    assert [v["video"] for v in report["videos"]] == ["alice/good.mp4"]


def test_fps_above_the_video_rate_is_warned_about(tmp_path):
    write_video(tmp_path / "v" / "alice" / "clip.mp4", 50, 25)
    report = _extract(tmp_path / "v", tmp_path / "out", fps=60)
    assert report["frames_written"] == 50  # every frame once, not 60 per second
    assert any("frames.fps 60 is above the video's own 25.000 fps" in w and "every frame was kept" in w
               for w in report["warnings"])
    assert not _extract(tmp_path / "v", tmp_path / "out2", fps=25)["warnings"]
