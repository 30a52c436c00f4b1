"""Run the real DVC pipeline in a throw-away copy of this repository."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# One epoch, 32 px (every architecture's stride divides it: see models.check_img_size), batches of 4:
# `dvc exp run` overrides that make all four models train in seconds.
TINY_TRAINING = ["-S", "epochs=1", "-S", "img_size=32", "-S", "batch_size=4", "-S", "train.workers=0"]


def copy_repo(dest: Path) -> Path:
    """Copy what git would ship (tracked + untracked-not-ignored files) and make it a fresh repo."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO_ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git(dest, "init", "-q", "-b", "main")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "copy of charseg for a test")
    return dest


def clone_repo(tmp: Path, name: str = "clone") -> Path:
    """A real `git clone` of this repository as it stands (uncommitted work included, via a snapshot origin)."""
    origin = tmp / "origin"
    if not (origin / ".git").is_dir():
        origin.mkdir(parents=True, exist_ok=True)
        copy_repo(origin)
    git(tmp, "clone", "-q", str(origin), name)
    return tmp / name


GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@t"}


def _venv_env() -> dict[str, str]:
    """This environment with the test run's venv first on PATH (stage commands then find the same packages)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1",
            **GIT_IDENTITY}


def user_env(home: Path) -> dict[str, str]:
    """The environment of a user's shell: the project's venv on PATH, offline, HOME in a tmp folder."""
    return {**_venv_env(), "HOME": str(home), "YOLO_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def make(cwd: Path, target: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`make TARGET` as a user types it, on this test run's venv (never reinstalled: -o marks it up to date)."""
    venv = Path(sys.executable).parents[1]
    return subprocess.run(["make", f"VENV={venv}", "-o", f"{venv}/.installed", target], cwd=cwd,
                          capture_output=True, text=True, env=env)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_IDENTITY}).stdout


def dvc(cwd: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    """`dvc ...` with this interpreter's environment (stage commands then find the same packages)."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True,
                          env=env or _venv_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def stages_run(output: str) -> set[str]:
    """Names of the stages that DVC actually executed, from its 'Running stage' lines."""
    return set(re.findall(r"Running stage '([^']+)'", output))
