"""Faults from outside, through the one atomic-output path (charseg/io.py) and run_cli: a full disk under
the video writer, read-only output folders, truncated JSON and CSV, a predict killed with SIGKILL, every
OSError as one `error:` line, and bad inputs that used to end in a traceback or a misleading message."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from helpers import tiny_checkpoint, write_video
from charseg import export, predict
from charseg import io
from charseg.data import read_split
from charseg.errors import CharsegError, os_error_message, run_cli
from charseg.video import probe
from stages import evaluate, split
from tests.conftest import REPO_ROOT

CFG = {"arch": "pspnet", "encoder": "resnet18", "encoder_weights": None, "psp_out_channels": 16}
VIDEO_SIZE, VIDEO_FPS = (64, 48), 12.5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    checkpoint = tiny_checkpoint(root, 32, CFG)
    params = root / "params.yaml"
    params.write_text("models:\n  pspnet: {arch: pspnet, encoder: resnet18, encoder_weights: null}\n")
    return {"root": root, "checkpoint": checkpoint, "params": params,
            "video": write_video(root / "clip.avi", 40, VIDEO_FPS, VIDEO_SIZE),
            "long": write_video(root / "long.avi", 400, VIDEO_FPS, VIDEO_SIZE)}


def predict_argv(project: dict[str, Path], *args: str | Path) -> list[str]:
    return [str(a) for a in ["--params", project["params"], "--model", "pspnet", "--device", "cpu",
                             "--checkpoint", project["checkpoint"], *args]]


def error_line(capsys, tool_main, argv: list[str]) -> str:
    """The one stderr line of a CLI that fails with exit code 2 and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tool_main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, err
    assert not any("Traceback" in line for line in err)
    assert [line for line in err if line.startswith("error: ")] == err[-1:], err
    return err[-1]


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- a read-only folder, for root too (chmod does not stop root): the OS calls that write fail with EROFS ----

READ_ONLY_STUB = r'''
import builtins, errno, io, os

def make_read_only(folder):
    """Every OS call that would create, change or delete something under `folder` fails with EROFS, as on
    a filesystem mounted read-only; returns a function that undoes it."""
    root = os.path.realpath(folder)
    saved = {}

    def inside(path):
        try:
            real = os.path.realpath(os.fsdecode(path))
        except TypeError:  # a file descriptor
            return False
        return real == root or real.startswith(root + os.sep)

    def guard(module, name, paths, writes=lambda *a, **k: True):
        original = getattr(module, name)
        saved[(module, name)] = original

        def stub(*args, **kwargs):
            if writes(*args, **kwargs) and any(inside(p) for p in args[:paths]):
                bad = next(p for p in args[:paths] if inside(p))
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(bad))
            return original(*args, **kwargs)
        setattr(module, name, stub)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    guard(os, "open", 1, lambda path, flags, *a, **k: flags & write_flags)
    text_mode = lambda path, mode="r", *a, **k: any(c in mode for c in "wax+")
    guard(io, "open", 1, text_mode)
    guard(builtins, "open", 1, text_mode)
    for name in ("mkdir", "rmdir", "unlink", "remove", "chmod", "utime", "symlink", "link"):
        guard(os, name, 1)
    for name in ("rename", "replace"):
        guard(os, name, 2)

    def undo():
        for (module, name), original in saved.items():
            setattr(module, name, original)
    return undo
'''
_stub: dict = {}
exec(READ_ONLY_STUB, _stub)  # noqa: S102  (the same code runs in the subprocess test below)


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` read-only: chmod 0o500 for a normal user; for root (whom chmod does not stop) the stub above."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        try:
            yield
        finally:
            folder.chmod(0o700)
        return
    undo = _stub["make_read_only"](folder)
    try:
        yield
    finally:
        undo()


def test_the_read_only_stub_refuses_writes_and_allows_reads(tmp_path):
    (tmp_path / "kept.txt").write_text("x")
    with read_only(tmp_path):
        assert (tmp_path / "kept.txt").read_text() == "x"
        for attempt in (lambda: (tmp_path / "new.txt").write_text("y"), lambda: (tmp_path / "d").mkdir(),
                        lambda: (tmp_path / "kept.txt").unlink(), lambda: io.write_json(tmp_path / "a.json", {})):
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno in (errno.EROFS, errno.EACCES)
    assert entries(tmp_path) == ["kept.txt"]


# ---- item 1: a full disk under the video writer ----

@contextlib.contextmanager
def file_size_limit(limit: int):
    """Files of this process cannot grow past `limit` bytes (writes fail with EFBIG, as on a full disk: the
    `ulimit -f` analogue of a tiny filesystem); SIGXFSZ ignored so the write fails instead of killing us."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_video_that_outgrows_the_disk_is_an_error_and_leaves_nothing(project, tmp_path, capsys):
    out = tmp_path / "overlay.mp4"
    with file_size_limit(8000):  # the 40-frame overlay is ~4x that: OpenCV drops the rest and the moov atom
        line = error_line(capsys, predict.main, predict_argv(project, "--input", project["video"], "--output", out))
    assert re.fullmatch(rf"error: {re.escape(str(out))}: the video writer failed silently: the finished file holds "
                        rf"0 of its 40 frames \(disk full\? .* free there\): nothing was written; free some space or "
                        rf"write elsewhere", line), line
    assert entries(tmp_path) == []  # no unplayable video, no temp file
    run_cli(predict.main, predict_argv(project, "--input", project["video"], "--output", out))  # room again: fine
    assert entries(tmp_path) == ["overlay.mp4"] and probe(out).reported_frames == 40


class DroppingWriter:
    """cv2.VideoWriter that stops writing after `keep` frames without a word, as OpenCV does on ENOSPC."""
    keep, real = 7, cv2.VideoWriter

    def __init__(self, *args):
        self.writer, self.written = self.real(*args), 0

    def isOpened(self):  # noqa: N802  (OpenCV's name)
        return self.writer.isOpened()

    def write(self, frame):
        self.written += 1
        if self.written <= self.keep:
            self.writer.write(frame)

    def release(self):
        self.writer.release()


@pytest.mark.parametrize("suffix", [".avi", ".mp4"])
def test_a_writer_that_drops_frames_silently_is_caught_before_the_rename(project, tmp_path, monkeypatch, suffix):
    out = tmp_path / f"out{suffix}"
    out.write_bytes(b"previous result")
    segmenter = predict.TorchSegmenter.from_checkpoint(project["checkpoint"], expect_arch="pspnet")
    monkeypatch.setattr(cv2, "VideoWriter", DroppingWriter)
    with pytest.raises(CharsegError, match=rf"{re.escape(str(out))}: the video writer failed silently: the finished "
                                           rf"file holds 7 of its 40 frames \(disk full\?"):
        predict.predict_video(segmenter, probe(project["video"]), out, threshold=0.5, progress=False)
    assert entries(tmp_path) == [out.name] and out.read_bytes() == b"previous result"


def test_check_video_accepts_a_complete_video_and_names_the_target(project, tmp_path):
    io.check_video(project["video"], 40, target=tmp_path / "x.avi")
    with pytest.raises(CharsegError, match=r"x.avi: .* holds 40 of its 41 frames"):
        io.check_video(project["video"], 41, target=tmp_path / "x.avi")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(CharsegError, match=r"x.avi: .* holds 0 of its 5 frames"):
        io.check_video(tmp_path / "empty.mp4", 5, target=tmp_path / "x.avi")


def test_a_file_write_on_a_full_disk_names_the_output_and_leaves_no_temp(tmp_path, capsys):
    def main(argv):
        io.write_bytes_atomic(tmp_path / "big.bin", b"x" * 100_000)

    with file_size_limit(10_000):
        line = error_line(capsys, main, [])
    assert line == (f"error: {tmp_path / 'big.bin'}: File too large (file size limit reached (ulimit -f, or the "
                    f"filesystem's maximum): write elsewhere)")
    assert entries(tmp_path) == []


# ---- item 5: read-only folders, truncated JSON, every OSError as one line ----

def split_inputs(tmp_path: Path) -> tuple[Path, Path]:
    params = tmp_path / "params.yaml"
    params.write_text("labels: {keep_empty: false}\nsplit: {val_fraction: 0.3, seed: 0, gap_seconds: 0}\n")
    manifest = tmp_path / "manifest.csv"
    io.write_csv(manifest, [{"id": f"v{v}_{i}", "character": "a", "video": f"v{v}", "timestamp": i}
                            for v in range(3) for i in range(4)], ["id", "character", "video", "timestamp"])
    return params, manifest


def test_split_into_a_read_only_folder_is_one_error_line(tmp_path):
    params, manifest = split_inputs(tmp_path)
    (tmp_path / "data").mkdir()
    out, metrics = tmp_path / "data" / "split.json", tmp_path / "metrics" / "split.json"
    runner = (READ_ONLY_STUB + "\nimport runpy, sys\nif os.geteuid() == 0: make_read_only(sys.argv[1])\n"
              "sys.argv = ['split'] + sys.argv[2:]\nrunpy.run_module('stages.split', run_name='__main__')\n")
    if os.geteuid() != 0:
        (tmp_path / "data").chmod(0o500)
    try:
        done = subprocess.run([sys.executable, "-c", runner, str(tmp_path / "data"), "--manifest", str(manifest),
                               "--params", str(params), "--out", str(out), "--metrics", str(metrics)],
                              cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True,
                              text=True, timeout=60)
    finally:
        (tmp_path / "data").chmod(0o700)
    hint = "read-only filesystem: choose a writable location" if os.geteuid() == 0 else \
        "no permission: check the folder's permissions or choose another location"
    cause = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    assert (done.returncode, done.stderr) == (2, f"error: {out}: {cause} ({hint})\n")
    assert entries(tmp_path / "data") == [] and not metrics.exists()  # neither output: not metrics without split


def test_predict_into_a_read_only_folder_fails_before_any_work(project, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    monkeypatch.setattr(predict, "load_segmenter", lambda *a, **k: pytest.fail("the model was loaded"))
    with read_only(folder):
        for args, named in ((["--output", folder / "o.mp4", "--save-masks"], folder / "o.mp4"),
                            (["--output", folder / "sub" / "o.avi"], folder / "sub")):  # the folder it must create
            line = error_line(capsys, predict.main, predict_argv(project, "--input", project["video"], *args))
            assert re.fullmatch(rf"error: {re.escape(str(named))}: (Read-only file system \(read-only filesystem: "
                                rf"choose a writable location\)|Permission denied \(no permission: .*\))", line), line
    assert entries(folder) == []


def test_export_into_a_read_only_folder_fails_before_the_export(project, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "exports"
    folder.mkdir()
    monkeypatch.setattr(export.models, "load_checkpoint", lambda *a, **k: pytest.fail("the export ran"))
    with read_only(folder):
        line = error_line(capsys, export.main, ["--model", "pspnet", "--checkpoint", str(project["checkpoint"]),
                                                "--params", str(project["params"]), "--output",
                                                str(folder / "pspnet.onnx")])
    assert line.startswith(f"error: {folder / 'pspnet.onnx'}: ") and re.search("Read-only|Permission denied", line)
    assert entries(folder) == []


def test_a_truncated_split_json_is_one_error_line(tmp_path, capsys):
    split_json = tmp_path / "split.json"
    split_json.write_text('{"train": ["a_000001", "a_000002"], "val": ["b_0')  # cut by a crash or a full disk
    expected = (f"{split_json} is not valid JSON (truncated or corrupt: Unterminated string starting at: line 1 "
                f"column 45): re-run the stage that wrote it (dvc repro)")
    with pytest.raises(CharsegError) as info:
        read_split(split_json)
    assert str(info.value) == expected
    line = error_line(capsys, evaluate.main, ["--params", str(REPO_ROOT / "params.yaml"), "--split", str(split_json),
                                              "--frames", str(tmp_path / "f"), "--models", str(tmp_path / "m"),
                                              "--metrics", str(tmp_path / "metrics"),
                                              "--reports", str(tmp_path / "r"), "--plots", str(tmp_path / "p")])
    assert line == f"error: {expected}"
    split_json.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CharsegError, match="is not UTF-8 text"):
        io.read_json(split_json)


@pytest.mark.parametrize("code, message", [
    (errno.ENOSPC, "No space left on device (disk full? free some space or write elsewhere)"),
    (errno.EROFS, "Read-only file system (read-only filesystem: choose a writable location)"),
    (errno.EACCES, "Permission denied (no permission: check the folder's permissions or choose another location)"),
    (errno.ENAMETOOLONG, "File name too long (the name is too long for the filesystem: choose a shorter one)"),
])
def test_every_oserror_a_user_can_cause_is_one_line(capsys, code, message):
    def main(argv):
        raise OSError(code, os.strerror(code), "out/x.png")

    assert error_line(capsys, main, []) == f"error: out/x.png: {message}"
    assert os_error_message(OSError(code, os.strerror(code))) == message  # no file name: no "None:"


# ---- item 7: SIGKILL leaves temp files; the next run removes them, a running writer's are kept ----

def test_a_killed_predict_leaves_temps_that_the_next_run_removes(project, tmp_path):
    out = tmp_path / "long.mp4"
    command = [sys.executable, "-m", "charseg", "predict",
               *predict_argv(project, "--input", project["long"], "--output", out, "--save-masks")]
    process = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            temps = entries(tmp_path)  # the video's temp file and the masks' temp folder, both open
            if any(n.endswith(".tmp.mp4") for n in temps) and any((tmp_path / n).is_dir() for n in temps):
                break
            time.sleep(0.01)
        assert process.poll() is None, process.stderr.read().decode()
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    stale = entries(tmp_path)
    pid = process.pid
    assert len(stale) == 2 and all(re.fullmatch(rf"\.long\.(mp4|masks)\.{pid}-[0-9a-f]{{6}}-\w{{8}}\.tmp(\.mp4)?", n)
                                   for n in stale), stale  # the real suffix stays last
    assert [n for n in stale if n.endswith(".tmp.mp4")] and [n for n in stale if n.endswith(".tmp")]
    run_cli(predict.main, predict_argv(project, "--input", project["video"], "--output", out, "--save-masks"))
    assert entries(tmp_path) == ["long.masks", "long.mp4"]


def test_temps_of_a_running_writer_are_kept(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = io._HOST
        dead = [tmp_path / f".out.mp4.{dead_pid}-{host}-abcd_123.tmp.mp4", tmp_path / f".other.csv.{dead_pid}-{host}-"
                f"zzzzzzzz.tmp", tmp_path / f".masks.{dead_pid}-{host}-qwertyui.tmp"]
        live = [tmp_path / f".out.mp4.{alive.pid}-{host}-abcd_123.tmp.mp4",
                tmp_path / f".out.mp4.{dead_pid}-ffffff-abcd_123.tmp.mp4",  # another machine's (shared disk)
                tmp_path / ".out.mp4.notours.tmp.mp4", tmp_path / "out.mp4.12-abcdef-abcd_123.tmp.mp4"]
        for path in dead[:2] + live:
            path.write_bytes(b"x")
        dead[2].mkdir()
        (dead[2] / "000001.png").write_bytes(b"x")
        with io.atomic_path(tmp_path / "out.mp4") as tmp:
            assert re.fullmatch(rf"\.out\.mp4\.{os.getpid()}-{host}-\w{{8}}\.tmp\.mp4", tmp.name)
            tmp.write_bytes(b"video")
        assert entries(tmp_path) == sorted(["out.mp4"] + [p.name for p in live])
    finally:
        alive.kill()
        alive.wait()


def test_temp_names_fit_the_filesystem_and_too_long_names_are_refused(tmp_path):
    name = "n" * 250 + ".json"  # fits (255), though its temp sibling would not at full length
    io.write_json(tmp_path / name, {"a": 1})
    assert io.read_json(tmp_path / name) == {"a": 1} and entries(tmp_path) == [name]
    with pytest.raises(OSError) as info:
        io.write_json(tmp_path / ("n" * 300 + ".json"), {})
    assert info.value.errno == errno.ENAMETOOLONG and info.value.filename == str(tmp_path / ("n" * 300 + ".json"))


# ---- new bad inputs: each one clear line, nothing partial left ----

def test_predict_video_output_that_is_a_folder(project, tmp_path, capsys):
    folder = tmp_path / "o.mp4"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    for extra in ([], ["--overwrite"]):
        line = error_line(capsys, predict.main, predict_argv(project, "--input", project["video"], "--output", folder,
                                                             *extra))
        assert line == (f"error: --output {folder} exists and is not a file: predict writes a file there; "
                        f"choose another --output")
    assert entries(tmp_path) == ["o.mp4"] and entries(folder) == ["keep.txt"]


def test_predict_input_that_is_a_pipe(project, tmp_path, capsys):
    fifo = tmp_path / "camera.mp4"
    os.mkfifo(fifo)  # opening it would block forever
    line = error_line(capsys, predict.main, predict_argv(project, "--input", fifo, "--output", tmp_path / "o.mp4"))
    assert line == (f"error: --input {fifo} is not a file or folder (a pipe, socket or device): save the footage "
                    f"to a file first")
    assert entries(tmp_path) == ["camera.mp4"]


def test_predict_output_name_too_long(project, tmp_path, capsys):
    out = tmp_path / ("o" * 300 + ".mp4")
    line = error_line(capsys, predict.main, predict_argv(project, "--input", project["video"], "--output", out))
    assert line == f"error: {out}: File name too long (the name is too long for the filesystem: choose a shorter one)"
    assert entries(tmp_path) == []


def test_export_output_below_a_file(project, tmp_path, monkeypatch, capsys):
    (tmp_path / "exports").write_text("a file, not a folder")
    output = tmp_path / "exports" / "onnx" / "pspnet.onnx"
    monkeypatch.setattr(export.models, "load_checkpoint", lambda *a, **k: pytest.fail("the export ran"))
    line = error_line(capsys, export.main, ["--model", "pspnet", "--checkpoint", str(project["checkpoint"]),
                                            "--params", str(project["params"]), "--output", str(output)])
    assert line == f"error: {output}: {tmp_path / 'exports'} is a file, not a folder: choose another path"
    assert entries(tmp_path) == ["exports"] and (tmp_path / "exports").read_text() == "a file, not a folder"


def test_split_manifest_that_is_not_text(tmp_path, capsys):
    params, manifest = split_inputs(tmp_path)
    manifest.write_bytes(b"id,character\n\x89PNG\r\n\x1a\n\xff\xd8 binary")  # e.g. an image renamed .csv
    line = error_line(capsys, split.main, ["--manifest", str(manifest), "--params", str(params), "--out",
                                           str(tmp_path / "split.json"), "--metrics", str(tmp_path / "m.json")])
    assert line == (f"error: {manifest} is not UTF-8 text (corrupt, or not a CSV file): re-run the stage that wrote "
                    f"it (dvc repro)")
    assert entries(tmp_path) == ["manifest.csv", "params.yaml"]


def test_split_metrics_path_that_is_a_folder(tmp_path, capsys):
    params, manifest = split_inputs(tmp_path)
    (tmp_path / "m.json").mkdir()
    line = error_line(capsys, split.main, ["--manifest", str(manifest), "--params", str(params), "--out",
                                           str(tmp_path / "split.json"), "--metrics", str(tmp_path / "m.json")])
    assert line == (f"error: {tmp_path / 'm.json'}: Is a directory (a folder is in the way: remove it or choose "
                    f"another path)")
    assert entries(tmp_path) == ["m.json", "manifest.csv", "params.yaml"]  # and no split.json without its metrics


def test_run_cli_keeps_keyboard_interrupt_and_charseg_errors(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        run_cli(interrupted, [])
    assert info.value.code == 130
    assert capsys.readouterr().err == "interrupted: no partial output was kept\n"

