"""The `charseg` command: the tools that are not stages, from any folder; stages stay `python -m stages.<name>`."""
from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from charseg.cli import COMMANDS, main
from tests.conftest import REPO_ROOT


def charseg(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "charseg", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_no_command_prints_the_commands_and_exits_2(capsys):
    with pytest.raises(SystemExit) as err:
        main([])
    assert err.value.code == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: charseg <command>")
    assert all(f"  {name}" in out for name in COMMANDS)


def test_an_unknown_command_names_itself_and_exits_2(tmp_path):
    proc = charseg("predcit", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("charseg: unknown command 'predcit'")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_help_in_process(monkeypatch, capsys, command):
    monkeypatch.setattr(sys, "argv", ["charseg"])
    with pytest.raises(SystemExit) as err:
        main([command, "--help"])
    assert err.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: charseg {command}")


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_help_outside_the_repository(tmp_path, command):
    proc = charseg(command, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: charseg {command}")
    assert not list(tmp_path.iterdir()), "--help wrote files"


def test_the_installed_console_script_is_the_same_command(tmp_path):
    script = shutil.which("charseg", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the charseg console script is not installed in this environment (pip install -e .)")
    proc = subprocess.run([script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "predict" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["frames", "eda", "masks", "split", "train", "evaluate"])
def test_stage_entry_points_answer_help(stage):
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--help"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:")


@pytest.mark.parametrize("stage", ["frames", "eda", "masks", "split", "train", "evaluate"])
def test_stage_mains_answer_help_in_process(capsys, stage):
    with pytest.raises(SystemExit) as err:
        importlib.import_module(f"stages.{stage}").main(["--help"])
    assert err.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")
