"""The identity stage: planted embeddings, colour-coded characters end to end, bad folders, imports, truth, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from charseg import identity
from charseg.config import IdentityConfig, TruthConfig
from charseg.errors import CharsegError
from charseg.io import imread, imwrite_atomic, read_csv, write_csv
from charseg.layout import FRAME_COLUMNS, IDENTITY_COLUMNS, INSTANCE_COLUMNS, FramesDir, IdentityDir, MasksDir

REPO_ROOT = Path(__file__).resolve().parents[1]
CFG = IdentityConfig(min_similarity=0.75, margin=0.03, duplicate_similarity=0.97, qa_crops=4)
SIZE = (64, 96)  # frame height, width

# Costumes (BGR shirt, trousers): saturated and far apart in hue, so JPEG keeps them apart.
ALICE = ((0, 0, 220), (200, 0, 0))      # red shirt, blue trousers
BOB = ((0, 200, 0), (0, 220, 220))      # green shirt, yellow trousers
EXTRA = ((200, 0, 200), (0, 0, 0))      # purple shirt, black trousers
LEFT, RIGHT, MIDDLE = (0, 16, 16, 48), (48, 16, 64, 48), (32, 0, 48, 32)  # boxes x1, y1, x2, y2 (16-aligned)


def write_project(root: Path, frames: dict[str, tuple[str, str, list[tuple]]]) -> tuple[FramesDir, MasksDir]:
    """A frames folder and a masks folder (with instances) as the masks stage writes them.

    `frames`: id -> (character folder, status, persons); a person is (box, paint, imported name) where paint
    is a (shirt, trousers) pair of BGR colours or one grey level for the whole box."""
    frames_dir, masks_dir = FramesDir(root / "frames"), MasksDir(root / "masks")
    manifest, table = [], []
    for index, (frame_id, (folder, status, persons)) in enumerate(sorted(frames.items())):
        image = np.full((*SIZE, 3), 30, np.uint8)
        ids = np.zeros(SIZE, np.uint16)
        for key, (box, paint, imported) in enumerate(persons, start=1):
            x1, y1, x2, y2 = box
            if isinstance(paint, int):
                image[y1:y2, x1:x2] = paint
            else:
                middle = (y1 + y2) // 2
                image[y1:middle, x1:x2], image[middle:y2, x1:x2] = paint
            ids[y1:y2, x1:x2] = key
            table.append({"id": frame_id, "instance": key, "x1": x1, "y1": y1, "x2": x2, "y2": y2,
                          "box_score": 0.9, "sam_score": 0.9, "area": (x2 - x1) * (y2 - y1), "character": imported})
        imwrite_atomic(frames_dir.image(frame_id), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if status != "failed":
            imwrite_atomic(masks_dir.mask(frame_id), (ids > 0).astype(np.uint8) * 255)
        if status == "labelled":
            imwrite_atomic(masks_dir.instance_map(frame_id), ids)
        manifest.append({"id": frame_id, "character": folder, "video": f"{folder}/clip.mp4", "frame_index": index,
                         "timestamp": float(index), "width": SIZE[1], "height": SIZE[0], "status": status})
    write_csv(frames_dir.manifest, [{c: row[c] for c in FRAME_COLUMNS} for row in manifest], FRAME_COLUMNS)
    write_csv(masks_dir.manifest, manifest, list(FRAME_COLUMNS) + ["status"])
    write_csv(masks_dir.instance_table, table, INSTANCE_COLUMNS)
    return frames_dir, masks_dir


def run(root: Path, frames: FramesDir, masks: MasksDir, cfg: IdentityConfig = CFG, **kwargs) -> dict:
    return identity.make_identity(frames, masks, IdentityDir(root / "identity"), root / "plots",
                                  root / "metrics.json", cfg, **kwargs)


def assignments(root: Path) -> dict[tuple[str, int], dict[str, str]]:
    return {(r["id"], int(r["instance"])): r for r in read_csv(IdentityDir(root / "identity").instance_table)}


# ---------------------------------------------------------------------------------------------
# The pure parts: assignment, prototypes, runner-up
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("similarity, expected", [
    ([[0.9, 0.2], [0.85, 0.1]], [0, -1]),      # both want alice: the more similar gets her, one per frame
    ([[0.85, 0.1], [0.9, 0.2]], [-1, 0]),      # ... whatever the instance order
    ([[0.9, 0.2], [0.3, 0.8]], [0, 1]),        # each its own
    ([[0.80, 0.77]], [0]),                     # margin exactly 0.03: taken
    ([[0.80, 0.78]], [-1]),                    # margin 0.02: other
    ([[0.75, 0.1]], [0]),                      # exactly min_similarity: taken
    ([[0.7499, 0.1]], [-1]),                   # just below: other
    ([[0.8]], [0]),                            # one character: no runner-up, no margin to beat
    ([[0.9, 0.9]], [-1]),                      # a tie is no margin
])
def test_assign_greedy_with_thresholds(similarity, expected):
    assert identity.assign(np.array(similarity), min_similarity=0.75, margin=0.03).tolist() == expected


def test_assign_nothing_and_runner_up():
    assert identity.assign(np.zeros((0, 2)), 0.75, 0.03).tolist() == []
    second = identity.runner_up(np.array([[0.9, 0.2, 0.5], [0.1, 0.3, 0.3]]))
    assert second.tolist() == [[0.5, 0.9, 0.9], [0.3, 0.3, 0.3]]
    assert identity.runner_up(np.array([[0.4]])).tolist() == [[-np.inf]]


def test_find_prototype_takes_the_dominant_cluster():
    """Three instances near e1 and two near e2: the prototype is the unit mean of the e1 three."""
    e1, e2 = np.eye(3)[0], np.eye(3)[1]
    near = [identity._unit(e1 + 0.1 * e2), identity._unit(e1 - 0.1 * e2), e1]
    others = [identity._unit(e2 + 0.05 * e1), e2]
    embeddings = np.stack([others[0], *near, others[1]])
    prototype, members = identity.find_prototype(embeddings, 0.9)
    assert members.tolist() == [1, 2, 3]
    np.testing.assert_allclose(prototype, e1, atol=1e-12)
    # one block at a time gives the same answer
    assert identity.find_prototype(embeddings, 0.9, block=2)[1].tolist() == [1, 2, 3]


def test_embed_halves_and_norm():
    """Upper and lower halves are told apart: a red-over-blue person is not a blue-over-red one."""
    frame = np.zeros((40, 20, 3), np.uint8)
    frame[:20], frame[20:] = ALICE
    mask = np.ones((40, 20), bool)
    upside_down = frame[::-1].copy()
    vector, flipped = identity.embed(frame, mask), identity.embed(upside_down, mask)
    assert vector.shape == (2 * (identity.HUE_BINS * identity.SATURATION_BINS + identity.VALUE_BINS),)
    assert np.linalg.norm(vector) == pytest.approx(1.0)
    assert float(vector @ identity.embed(frame, mask)) == pytest.approx(1.0)
    assert float(vector @ flipped) < 0.75
    with pytest.raises(ValueError):
        identity.embed(frame, np.zeros((40, 20), bool))


# ---------------------------------------------------------------------------------------------
# Planted embeddings through the whole stage: each instance's grey level names its vector
# ---------------------------------------------------------------------------------------------

def unit(*values: float) -> np.ndarray:
    vector = np.zeros(4)
    vector[:len(values)] = values
    vector[2] = np.sqrt(max(0.0, 1 - float(vector @ vector)))  # the free axis makes it unit length
    return vector


PLANTED = {  # grey level -> embedding; axes: alice, bob, free, extra
    40: np.array([1.0, 0, 0, 0]), 60: np.array([0, 1.0, 0, 0]), 80: np.array([0, 0, 0, 1.0]),
    100: unit(0.9), 120: unit(0.6, 0.58), 140: unit(0.6, 0.57), 160: unit(0.49), 180: unit(0.5),
}


def planted_embedder(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    level = float(frame[mask].mean())
    return PLANTED[min(PLANTED, key=lambda grey: abs(grey - level))]


def test_planted_embeddings_exact_assignment(tmp_path, capsys):
    alone = {f"alice--clip--{i}": ("alice", "labelled", [(MIDDLE, 40, "")]) for i in range(3)}
    alone |= {f"bob--clip--{i}": ("bob", "labelled", [(MIDDLE, 60, "")]) for i in range(3)}
    probes = {  # each probe shares its frame with an extra, so that no probe makes a prototype
        "alice--probe--twice": ("alice", "labelled", [(LEFT, 40, ""), (RIGHT, 100, "")]),
        "alice--probe--ambiguous": ("alice", "labelled", [(LEFT, 120, ""), (RIGHT, 80, "")]),
        "alice--probe--margin_edge": ("alice", "labelled", [(LEFT, 140, ""), (RIGHT, 80, "")]),
        "alice--probe--below_min": ("alice", "labelled", [(LEFT, 160, ""), (RIGHT, 80, "")]),
        "bob--probe--min_edge": ("bob", "labelled", [(LEFT, 180, ""), (RIGHT, 80, ""), ((88, 56, 94, 63), 60, "")]),
    }
    frames, masks = write_project(tmp_path, alone | probes)
    cfg = IdentityConfig(min_similarity=0.5, margin=0.03, duplicate_similarity=0.97, qa_crops=2)
    metrics = run(tmp_path, frames, masks, cfg, embedder=planted_embedder)

    got = assignments(tmp_path)
    expected = {  # (frame, instance): (assigned, similarity, runner_up, source)
        ("alice--probe--twice", 1): ("alice", 1.0, 0.0, "weak"),
        ("alice--probe--twice", 2): ("other", 0.9, 0.0, "weak"),       # alice is taken in this frame
        ("alice--probe--ambiguous", 1): ("other", 0.6, 0.58, "weak"),  # margin 0.02 < 0.03
        ("alice--probe--ambiguous", 2): ("other", 0.0, 0.0, "weak"),   # the extra: like nobody
        ("alice--probe--margin_edge", 1): ("alice", 0.6, 0.57, "weak"),
        ("alice--probe--below_min", 1): ("other", 0.49, 0.0, "weak"),
        ("bob--probe--min_edge", 1): ("alice", 0.5, 0.0, "weak"),
        ("bob--probe--min_edge", 3): ("other", "", "", "too_small"),   # 6 x 7 = 42 pixels
        ("bob--clip--0", 1): ("bob", 1.0, 0.0, "weak"),
    }
    for key, (assigned, similarity, second, source) in expected.items():
        row = got[key]
        assert (row["assigned"], row["source"]) == (assigned, source), key
        assert row["similarity"] == "" if similarity == "" else float(row["similarity"]) == pytest.approx(similarity)
        assert row["runner_up"] == "" if second == "" else float(row["runner_up"]) == pytest.approx(second)
    assert got[("bob--probe--min_edge", 1)]["folder"] == "bob"

    out = IdentityDir(tmp_path / "identity")
    assert json.loads(out.classes.read_text()) == {"classes": ["background", "alice", "bob", "other"], "not_found": []}
    class_map = imread(out.class_map("alice--probe--twice"), cv2.IMREAD_UNCHANGED)
    assert class_map.dtype == np.uint8 and class_map.shape == SIZE
    assert np.unique(class_map[16:48, 0:16]).tolist() == [1] and np.unique(class_map[16:48, 48:64]).tolist() == [3]
    assert np.count_nonzero(class_map) == 2 * 16 * 32

    report = json.loads(out.report.read_text())
    assert report["prototypes"]["alice"] == {"candidates": 3, "members": 3, "from": "one-person frames"}
    assert sorted(report["own_character_missing"]["alice"]) == ["alice--probe--ambiguous", "alice--probe--below_min"]
    assert report["own_character_missing"]["bob"] == ["bob--probe--min_edge"]
    assert metrics["characters"]["alice"] == {"frames_in_folder": 7, "found_in_own_frames": 5, "found_share":
                                              round(5 / 7, 6), "instances": 6, "assigned_from_other_folders": 1}
    assert metrics["characters"]["bob"]["found_in_own_frames"] == 3
    assert (metrics["instances"], metrics["other_instances"], metrics["too_small"]) == (17, 8, 1)
    assert "warning:" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Colour-coded characters end to end (the real embedding)
# ---------------------------------------------------------------------------------------------

def colour_frames() -> dict[str, tuple[str, str, list[tuple]]]:
    return {
        "alice--a--0": ("alice", "labelled", [(MIDDLE, ALICE, "")]),
        "alice--a--1": ("alice", "labelled", [(LEFT, ALICE, "")]),
        "alice--a--2": ("alice", "labelled", [(RIGHT, ALICE, "")]),
        "alice--a--3": ("alice", "labelled", [(LEFT, ALICE, ""), (RIGHT, EXTRA, "")]),
        "bob--b--0": ("bob", "labelled", [(MIDDLE, BOB, "")]),
        "bob--b--1": ("bob", "labelled", [(LEFT, BOB, "")]),
        "bob--b--2": ("bob", "labelled", [(LEFT, BOB, ""), (RIGHT, ALICE, "")]),
        "bob--b--3": ("bob", "empty", []),
        "bob--b--4": ("bob", "failed", []),
    }


def test_colour_characters_end_to_end(tmp_path):
    frames, masks = write_project(tmp_path, colour_frames())
    metrics = run(tmp_path, frames, masks)
    out = IdentityDir(tmp_path / "identity")
    assert json.loads(out.classes.read_text()) == {"classes": ["background", "alice", "bob", "other"], "not_found": []}
    assert sorted(p.name for p in out.images.iterdir()) == sorted(f"{i}.png" for i in colour_frames()
                                                                  if i != "bob--b--4")
    two = imread(out.class_map("alice--a--3"), cv2.IMREAD_UNCHANGED)
    assert np.unique(two[16:48, 0:16]).tolist() == [1] and np.unique(two[16:48, 48:64]).tolist() == [3]
    guest = imread(out.class_map("bob--b--2"), cv2.IMREAD_UNCHANGED)
    assert np.unique(guest[16:48, 0:16]).tolist() == [2] and np.unique(guest[16:48, 48:64]).tolist() == [1]
    assert not imread(out.class_map("bob--b--3"), cv2.IMREAD_UNCHANGED).any()

    rows = {r["id"]: r for r in read_csv(out.manifest)}
    assert set(rows) == set(colour_frames()) - {"bob--b--4"}
    assert (rows["bob--b--2"]["found_own"], rows["bob--b--2"]["n_instances"]) == ("1", "2")
    assert json.loads(rows["bob--b--2"]["assigned"]) == ["bob", "alice"]
    assert rows["bob--b--3"]["found_own"] == "0"
    assert list(read_csv(out.instance_table)[0]) == list(IDENTITY_COLUMNS)
    report = json.loads(out.report.read_text())
    assert report["prototypes"]["bob"] == {"candidates": 4, "members": 3, "from": "all instances"}

    assert metrics["characters"]["alice"] == {"frames_in_folder": 4, "found_in_own_frames": 4, "found_share": 1.0,
                                              "instances": 5, "assigned_from_other_folders": 1}
    assert metrics["characters"]["bob"]["found_share"] == pytest.approx(3 / 4, abs=1e-6)  # the empty frame
    assert (metrics["other_instances"], metrics["frames"], metrics["classes"]) == (1, 8, ["alice", "bob"])
    assert metrics["seconds_per_frame"] > 0 and metrics["qa_seconds"] > 0 and "instance_accuracy" not in metrics
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["assignments.png", "contact_alice.png", "contact_bob.png", "contact_other.png"]
    sheet = imread(tmp_path / "plots" / "contact_alice.png")
    assert sheet.shape == (identity.TILE_HEIGHT + identity.CAPTION_HEIGHT, 4 * identity.TILE_WIDTH, 3)


def test_character_never_found_is_reported_and_others_continue(tmp_path, capsys):
    frames = colour_frames() | {"zoe--z--0": ("Zoë", "empty", []), "zoe--z--1": ("Zoë", "failed", [])}
    project_frames, masks = write_project(tmp_path, frames)
    metrics = run(tmp_path, project_frames, masks)
    classes = json.loads(IdentityDir(tmp_path / "identity").classes.read_text())
    assert classes == {"classes": ["background", "alice", "bob", "other"], "not_found": ["Zoë"]}
    assert metrics["not_found"] == ["Zoë"]
    assert metrics["characters"]["Zoë"] == {"frames_in_folder": 1, "found_in_own_frames": 0, "found_share": 0.0,
                                            "instances": 0, "assigned_from_other_folders": 0}
    assert "never found: Zoë" in capsys.readouterr().err


def test_two_folders_of_one_character_are_warned(tmp_path, capsys):
    frames = colour_frames()
    frames |= {f"alicia--c--{i}": ("alicia", "labelled", [(box, ALICE, "")]) for i, box in enumerate((LEFT, RIGHT))}
    project_frames, masks = write_project(tmp_path, frames)
    metrics = run(tmp_path, project_frames, masks)
    err = capsys.readouterr().err
    assert "'alice' and 'alicia'" in err and "the same character under two names?" in err
    assert metrics["duplicates"] == ["alice | alicia"]
    report = json.loads(IdentityDir(tmp_path / "identity").report.read_text())
    assert report["duplicates"][0]["characters"] == ["alice", "alicia"]
    assert report["duplicates"][0]["similarity"] >= 0.97
    assert metrics["classes"] == ["bob"]  # alice's instances are as like alicia: no margin, all other


def test_imported_names_are_taken_as_they_are(tmp_path):
    frames = {
        "alice--i--0": ("alice", "labelled", [(LEFT, ALICE, "alice"), (RIGHT, EXTRA, "dora")]),
        "alice--i--1": ("alice", "labelled", [(LEFT, BOB, "alice"), (RIGHT, 10, "other")]),
    }
    project_frames, masks = write_project(tmp_path, frames)

    def never(frame, mask):
        raise AssertionError("imported instances are not embedded")

    metrics = run(tmp_path, project_frames, masks, embedder=never)
    out = IdentityDir(tmp_path / "identity")
    assert json.loads(out.classes.read_text())["classes"] == ["background", "alice", "dora", "other"]
    got = assignments(tmp_path)
    assert [(got[k]["assigned"], got[k]["source"]) for k in sorted(got)] == [
        ("alice", "imported"), ("dora", "imported"), ("alice", "imported"), ("other", "imported")]
    class_map = imread(out.class_map("alice--i--1"), cv2.IMREAD_UNCHANGED)
    assert np.unique(class_map[16:48, 0:16]).tolist() == [1] and np.unique(class_map[16:48, 48:64]).tolist() == [3]
    assert metrics["characters"]["dora"]["assigned_from_other_folders"] == 1


# ---------------------------------------------------------------------------------------------
# Scoring against exact per-character masks
# ---------------------------------------------------------------------------------------------

def write_truth(root: Path, frames: dict[str, tuple[str, str, list[tuple]]], wrong: dict) -> Path:
    """characters.json + index.csv + one uint16 value map per labelled frame: each box holds its person's true
    value, except `wrong` ((frame, instance) -> value) ones."""
    values = {"alice": 1, "bob": 2, "other": 3}
    costume = {ALICE: 1, BOB: 2, EXTRA: 3}
    folder = root / "truth"
    (folder / "maps").mkdir(parents=True)
    (folder / "characters.json").write_text(json.dumps(values))
    index = []
    for number, (frame_id, (character, status, persons)) in enumerate(sorted(frames.items())):
        if status != "labelled":
            continue
        truth = np.zeros(SIZE, np.uint16)
        for key, (box, paint, _) in enumerate(persons, start=1):
            x1, y1, x2, y2 = box
            truth[y1:y2, x1:x2] = wrong.get((frame_id, key), costume[paint])
        truth[16:20, 0:16] = 2 if frame_id == "alice--a--1" else truth[16:20, 0:16]  # a minority of bob pixels
        cv2.imwrite(str(folder / "maps" / f"{frame_id}.png"), truth)
        index.append({"video": f"{character}/clip.mp4", "frame_index": number, "mask": "",
                      "character_mask": f"maps/{frame_id}.png"})
    write_csv(folder / "index.csv", index, ["video", "frame_index", "mask", "character_mask"])
    return folder


def test_truth_scoring_numbers(tmp_path):
    frames = colour_frames()
    truth = write_truth(tmp_path, frames, wrong={("alice--a--3", 2): 2, ("bob--b--2", 2): 0})
    project_frames, masks = write_project(tmp_path, frames)
    metrics = run(tmp_path, project_frames, masks, truth=TruthConfig(truth, "index.csv"))
    # 9 instances; wrong: the extra of alice--a--3 is truly bob (assigned other), the alice of bob--b--2 is
    # truly background (other; assigned alice). alice: 5 assigned, 4 truly; bob: 3 assigned, 4 truly.
    assert (metrics["truth_frames"], metrics["truth_instances"]) == (7, 9)
    assert metrics["instance_accuracy"] == pytest.approx(7 / 9, abs=1e-6)
    assert metrics["other_correct"] == 0.0
    assert (metrics["characters"]["alice"]["precision"], metrics["characters"]["alice"]["recall"]) == (0.8, 1.0)
    assert (metrics["characters"]["bob"]["precision"], metrics["characters"]["bob"]["recall"]) == (1.0, 0.75)
    assert json.loads(IdentityDir(tmp_path / "identity").report.read_text())["truth_problems"] == []


def test_truth_without_per_character_masks_is_not_scored(tmp_path):
    truth = tmp_path / "binary_truth"
    truth.mkdir()
    write_csv(truth / "index.csv", [], ["video", "frame_index", "mask"])
    project_frames, masks = write_project(tmp_path, colour_frames())
    metrics = run(tmp_path, project_frames, masks, truth=TruthConfig(truth, "index.csv"))
    assert "instance_accuracy" not in metrics


# ---------------------------------------------------------------------------------------------
# Bad input and the stage's command line
# ---------------------------------------------------------------------------------------------

def test_instance_map_with_unlisted_ids(tmp_path):
    frames, masks = write_project(tmp_path, colour_frames())
    ids = imread(masks.instance_map("alice--a--0"), cv2.IMREAD_UNCHANGED)
    ids[0:4, 0:4] = 7
    imwrite_atomic(masks.instance_map("alice--a--0"), ids)
    with pytest.raises(CharsegError, match=r"instance id\(s\) \[7\].*re-run dvc repro masks"):
        run(tmp_path, frames, masks)
    assert not (tmp_path / "identity").exists()


def stage(tmp_path: Path, frames: FramesDir, masks: MasksDir) -> subprocess.CompletedProcess:
    params = tmp_path / "params.yaml"
    params.write_text("identity:\n  min_similarity: 0.75\n  margin: 0.03\n  duplicate_similarity: 0.97\n"
                      "  qa_crops: 4\nlabels:\n  truth_dir: null\n  mask_index: index.csv\n")
    command = [sys.executable, "-m", "stages.identity", "--frames", str(frames.root), "--masks", str(masks.root),
               "--out", str(tmp_path / "identity"), "--plots", str(tmp_path / "plots"),
               "--metrics", str(tmp_path / "metrics.json"), "--params", str(params)]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def test_stage_cli_writes_everything(tmp_path):
    frames, masks = write_project(tmp_path, colour_frames())
    result = stage(tmp_path, frames, masks)
    assert result.returncode == 0, result.stderr
    assert "identity: 9 instances in 8 frames: 2 character(s) found (alice, bob), 1 other; not found: none" \
        in result.stdout
    out = IdentityDir(tmp_path / "identity")
    for path in (out.classes, out.instance_table, out.manifest, out.report, out.class_map("bob--b--2"),
                 tmp_path / "metrics.json", tmp_path / "plots" / "assignments.png"):
        assert path.is_file(), path


def test_stage_cli_masks_without_instances(tmp_path):
    frames, masks = write_project(tmp_path, colour_frames())
    masks.instance_table.unlink()
    result = stage(tmp_path, frames, masks)
    assert result.returncode == 2
    assert "has no per-instance masks" in result.stderr and "re-run dvc repro masks" in result.stderr
    assert "Traceback" not in result.stderr
