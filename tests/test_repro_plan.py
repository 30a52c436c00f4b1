"""What `make repro` decides (sample demo or own footage), the sample's removal, and the remote check."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import charseg.sample as sample
from pipeline_utils import git
from charseg.errors import CharsegError
from charseg.remote import check_folder_remote

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILE = REPO_ROOT / "params.sample.yaml"


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A git checkout holding the committed params.yaml and the demo profile."""
    for name in ("params.yaml", "params.sample.yaml"):
        (tmp_path / name).write_text((REPO_ROOT / name).read_text(encoding="utf-8"), encoding="utf-8")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "params")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def apply_demo(params: Path) -> None:
    """What `dvc exp run -S ...` with the demo profile leaves in params.yaml."""
    from dvc.utils.serialize import modify_yaml

    overrides = sample.demo_overrides(PROFILE)[1::2]
    with modify_yaml(params) as data:
        for pair in overrides:
            dotted, raw = pair.split("=", 1)
            *parents, leaf = dotted.split(".")
            node = data
            for part in parents:
                node = node[part]
            node[leaf] = sample.parse_yaml(raw)


def test_sample_videos_run_the_demo_experiment(checkout, capsys):
    sample.generate(checkout / "data/raw", duration_scale=0.05)
    command = sample.repro_command(checkout / "data/raw/videos", checkout / "params.yaml", PROFILE)
    assert command[:3] == ["dvc", "exp", "run"] and "labels.method=import" in command
    assert sample.HASH_INFO_NOTE in capsys.readouterr().out


def test_own_videos_with_committed_params_run_plain_repro(checkout):
    (checkout / "data/raw/videos/ann").mkdir(parents=True)
    (checkout / "data/raw/videos/ann/ep1.mp4").write_bytes(b"x")
    before = (checkout / "params.yaml").read_text()
    assert sample.repro_command(checkout / "data/raw/videos", checkout / "params.yaml", PROFILE) == ["dvc", "repro"]
    assert (checkout / "params.yaml").read_text() == before


def test_a_leftover_demo_profile_is_undone_for_own_videos(checkout, capsys):
    committed = (checkout / "params.yaml").read_text()
    apply_demo(checkout / "params.yaml")
    assert (checkout / "params.yaml").read_text() != committed
    (checkout / "data/raw/videos/ann").mkdir(parents=True)
    (checkout / "data/raw/videos/ann/ep1.mp4").write_bytes(b"x")
    assert sample.repro_command(checkout / "data/raw/videos", checkout / "params.yaml", PROFILE) == ["dvc", "repro"]
    assert "restored the committed params.yaml" in capsys.readouterr().out
    assert (checkout / "params.yaml").read_text() == committed


def test_a_leftover_demo_profile_beside_other_edits_is_refused_not_lost(checkout):
    apply_demo(checkout / "params.yaml")
    from dvc.utils.serialize import modify_yaml

    with modify_yaml(checkout / "params.yaml") as data:
        data["split"]["seed"] = 7
    edited = (checkout / "params.yaml").read_text()
    with pytest.raises(CharsegError, match=r"demo profile .* other edits too \(split.seed\).*git checkout params.yaml"):
        sample.repro_command(checkout / "data/raw/videos", checkout / "params.yaml", PROFILE)
    assert (checkout / "params.yaml").read_text() == edited


def test_a_demo_profile_committed_as_the_defaults_is_refused(checkout):
    apply_demo(checkout / "params.yaml")
    git(checkout, "commit", "-q", "-am", "demo committed")
    with pytest.raises(CharsegError, match="the committed params.yaml holds it too"):
        sample.repro_command(checkout / "data/raw/videos", checkout / "params.yaml", PROFILE)


def test_sample_mixed_with_own_videos_is_refused_and_remove_keeps_own_files(checkout):
    sample.generate(checkout / "data/raw", duration_scale=0.05)
    own = checkout / "data/raw/videos/dana/ep1.mp4"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"mine")
    with pytest.raises(CharsegError, match=r"mixes the generated sample with other files .*dana/ep1.mp4"):
        sample.repro_command(checkout / "data/raw/videos", checkout / "params.yaml", PROFILE)
    removed = sample.remove_sample(checkout / "data/raw")
    assert len(removed) == len(sample.CLIPS) + 1  # the clips and the marker
    assert own.read_bytes() == b"mine"
    assert sorted(p.name for p in (checkout / "data/raw/videos").iterdir()) == ["dana"]
    assert not (checkout / "data/raw/truth").exists()


def test_remove_without_a_sample_removes_nothing(checkout):
    own = checkout / "data/raw/videos/alice/clip_01.mp4"  # a sample file name, but no marker: the user's
    own.parent.mkdir(parents=True)
    own.write_bytes(b"mine")
    assert sample.remove_sample(checkout / "data/raw") == [] and own.is_file()


def test_a_missing_folder_remote_is_named_before_pulling(tmp_path):
    with pytest.raises(CharsegError, match=r"the DVC remote 'shared' is the folder .*nowhere, which does not "
                                           r"exist on this machine.*dvc remote modify shared url"):
        check_folder_remote("shared", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CharsegError, match="holds no DVC data"):
        check_folder_remote("shared", str(tmp_path / "empty"))
    (tmp_path / "empty" / "files").mkdir()
    assert check_folder_remote("shared", str(tmp_path / "empty")) == tmp_path / "empty"
    assert check_folder_remote("team", "s3://bucket/charseg") is None


def test_remote_check_cli_on_the_committed_default_remote(tmp_path):
    """The committed `shared` remote under a HOME where nothing was pushed: one error line, exit 2."""
    env = {**os.environ, "HOME": str(tmp_path), "PATH": str(Path(sys.executable).parent) + os.pathsep
           + os.environ.get("PATH", "")}
    proc = subprocess.run([sys.executable, "-m", "charseg", "remote", "check"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: the DVC remote 'shared' is the folder {tmp_path}/.cache/charseg/dvc-remote")
