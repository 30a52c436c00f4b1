"""The real `dvc` CLI on a copy of the repo: frames -> eda -> masks -> split, caching, param-driven reruns.

The sample runs under the demo profile (params.sample.yaml), exactly as `make repro` applies it.
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict

import pytest

from pipeline_utils import copy_repo, dvc, stages_run
from charseg.sample import demo_overrides, generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    generate(root / "data" / "raw", seed=0, duration_scale=0.5)
    return root


def _manifest_rows(repo):
    with open(repo / "data/frames/manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_repro_split_builds_outputs_and_is_cached(repo):
    first = dvc(repo, "exp", "run", *demo_overrides(repo / "params.sample.yaml"), "split")
    assert stages_run(first.stdout) == {"frames", "masks", "split"}

    rows = _manifest_rows(repo)
    assert rows and all((repo / "data/frames/images" / f"{r['id']}.jpg").is_file() for r in rows)
    split = json.loads((repo / "data/split.json").read_text())
    assert split["train"] and split["val"]
    videos_of_character = defaultdict(set)
    for r in rows:
        videos_of_character[r["character"]].add(r["video"])
    video_of = {r["id"]: r["video"] for r in rows}
    on_both_sides = {video_of[i] for i in split["train"]} & {video_of[i] for i in split["val"]}
    # Only a character's single video may be cut into train/val time blocks.
    assert all(len(videos_of_character[r["character"]]) == 1 for r in rows if r["video"] in on_both_sides)

    again = dvc(repo, "repro", "split")
    assert stages_run(again.stdout) == set()
    assert "up to date" in dvc(repo, "status", "split").stdout


def test_eda_then_status_clean_and_dag(repo):
    dvc(repo, "repro", "eda", "split")
    assert "up to date" in dvc(repo, "status", "eda", "split").stdout
    dag = dvc(repo, "dag").stdout
    for stage in ("frames", "eda", "masks", "split"):
        assert stage in dag
    metrics = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    assert metrics, "dvc metrics show found no metrics"


def test_fps_change_reruns_frames_masks_and_split_only(repo):
    before = len(_manifest_rows(repo))
    result = dvc(repo, "exp", "run", "-S", "frames.fps=2", "split")
    assert stages_run(result.stdout) == {"frames", "masks", "split"}
    after = len(_manifest_rows(repo))
    assert 1.7 * before <= after <= 2.3 * before


def test_keep_empty_toggle_reruns_only_the_split(repo):
    dvc(repo, "repro", "split")
    result = dvc(repo, "exp", "run", "-S", "labels.keep_empty=false", "split")
    assert stages_run(result.stdout) == {"split"}
