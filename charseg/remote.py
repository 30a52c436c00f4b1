"""Check the DVC remote before a pull, so a missing one is named instead of DVC's "Everything is up to date".

    charseg remote check [--remote NAME]     # `make pull` runs it before `dvc pull`

A folder remote (the committed default `shared` is ~/.cache/charseg/dvc-remote) that does not exist
makes `dvc pull` print "Everything is up to date." and then fail to check out, without saying why.
Cloud remotes (s3://, gs://, ...) are left to DVC, which names connection and credential errors itself.
"""
from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from charseg.errors import CharsegError


def _dvc(*args: str) -> str:
    proc = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CharsegError(f"dvc {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout.strip()


def remote_url(name: str | None) -> tuple[str, str]:
    """(name, url) of the named remote, or of the default one."""
    name = name or _dvc("remote", "default")
    if not name:
        raise CharsegError("no DVC remote is set: add one with `dvc remote add -d NAME URL` (README, 'Share data "
                           "and models')")
    proc = subprocess.run(["dvc", "config", f"remote.{name}.url"], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise CharsegError(f"there is no DVC remote '{name}' (`dvc remote list` shows the remotes)")
    return name, proc.stdout.strip()


def check_folder_remote(name: str, url: str) -> Path | None:
    """The folder of a local remote, which must exist and hold DVC's objects; None for other remotes."""
    if "://" in url and not url.startswith("file://"):
        return None
    folder = Path(url.removeprefix("file://")).expanduser()
    if not folder.is_absolute():  # DVC stores a relative remote path relative to .dvc/config
        folder = Path(".dvc") / folder
    if not folder.is_dir():
        raise CharsegError(f"the DVC remote '{name}' is the folder {folder}, which does not exist on this machine: "
                           f"nothing was pushed there yet. Point it at your team's copy (`dvc remote modify "
                           f"{name} url /mnt/team/charseg-dvc`, or `dvc remote add -d ...` for S3 and others), "
                           f"or run the pipeline and `dvc push` first")
    if not (folder / "files").is_dir():
        raise CharsegError(f"the DVC remote '{name}' folder {folder} holds no DVC data (no files/ inside): "
                           f"check it is the folder your team pushes to")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["check"])
    parser.add_argument("--remote", help="remote name (default: the project's default remote)")
    args = parser.parse_args(argv)
    name, url = remote_url(args.remote)
    folder = check_folder_remote(name, url)
    print(f"remote: '{name}' is {folder or url}" + (" (found)" if folder else " (checked by dvc itself)"))

