"""The masks stage keeps every person as an instance (issue 14): instance maps, instances.csv, overlaps,
refinement, imported binary and per-character masks."""
from __future__ import annotations

import csv
import json
from dataclasses import replace

import cv2
import numpy as np
import pytest

from charseg.errors import CharsegError
from charseg.io import imread, imwrite_atomic, write_csv
from charseg.labels.detect import instance_map
from charseg.labels.refine import refine_instances
from charseg.layout import INSTANCE_COLUMNS, MasksDir
from test_masks import FRAMES, config, make_frames, planted_labeler, run


def read_instances(out):
    with open(MasksDir(out / "masks").instance_table, newline="") as fh:
        return list(csv.DictReader(fh))


def test_overlapping_persons_the_lower_box_is_in_front_and_ids_follow_the_boxes():
    masks = np.zeros((2, 10, 10), bool)
    masks[0, 0:8, 0:6] = True   # box 0: feet at y 8
    masks[1, 2:10, 4:9] = True  # box 1: feet at y 10, nearer the camera
    ids = instance_map(masks, np.array([[0, 0, 6, 8], [4, 2, 9, 10]], np.float32), (10, 10))
    assert ids[5, 5] == 2 and ids[1, 1] == 1 and ids[9, 8] == 2
    assert np.array_equal(ids > 0, masks.any(axis=0))


def test_refined_instances_cover_exactly_the_refined_mask():
    ids = np.zeros((12, 12), np.uint16)
    ids[1:5, 1:4], ids[6:11, 6:10] = 1, 3
    refined = (ids > 0).astype(np.uint8) * 255
    refined[2, 4] = refined[8, 5] = 255  # pixels closing added beside each person
    refined[1, 1] = 0                    # and one opening removed
    got = refine_instances(ids, refined)
    assert np.array_equal(got > 0, refined > 0)
    assert got[2, 4] == 1 and got[8, 5] == 3 and got[1, 1] == 0


def test_stage_writes_instance_maps_and_one_row_per_kept_person(tmp_path):
    make_frames(tmp_path / "frames")
    labeler, _, _ = planted_labeler()
    _, rows, out = run(tmp_path, config(tmp_path), labeler)
    masks = MasksDir(out / "masks")
    table = read_instances(out)
    assert tuple(table[0]) == INSTANCE_COLUMNS
    assert [r["id"] for r in table] == sorted(r["id"] for r in table)
    for frame_id in FRAMES:
        ids = imread(masks.instance_map(frame_id), cv2.IMREAD_UNCHANGED)
        assert ids.dtype == np.uint16
        assert np.array_equal(ids > 0, imread(masks.mask(frame_id), cv2.IMREAD_GRAYSCALE) > 0), frame_id
        for row in (r for r in table if r["id"] == frame_id):
            assert int(row["area"]) == np.count_nonzero(ids == int(row["instance"]))
    two = [r for r in table if r["id"] == "alice--clip_01--00001000"]
    # Three boxes were prompted; the corner one was refined away (labels.refine.min_area), so two rows remain,
    # each with its detector box and scores.
    assert len(two) == 2
    boxes = sorted([float(r[k]) for k in ("x1", "y1", "x2", "y2")] for r in two)
    assert boxes == [[8, 8, 24, 40], [40, 16, 56, 40]]
    assert {r["box_score"] for r in two} == {"0.9"} and {r["sam_score"] for r in two} == {"0.75"}
    assert [r for r in table if r["id"] == "bob--scene_2--00000000"] == []  # empty frame: no instance
    assert all(r["character"] == "" for r in table)


def _import_layout(tmp_path, per_character: bool):
    """Imported masks for the FRAMES: binary 0/255 masks, or per-character value masks + characters.json."""
    folder, index = tmp_path / "import", []
    for frame_id, (_, video, frame_index, size, persons) in FRAMES.items():
        values = np.zeros(size, np.uint8)
        for number, (x1, y1, x2, y2) in enumerate(persons):
            values[y1:y2, x1:x2] = 1 + number % 2  # alternately alice (1) and bob (2)
        name = f"{frame_id}.png"
        imwrite_atomic(folder / name, values if per_character else (values > 0).astype(np.uint8) * 255)
        index.append({"id": frame_id, "mask": name, "character_mask": name})
    write_csv(folder / "index.csv", index, ["id", "mask", "character_mask"])
    if per_character:
        (folder / "characters.json").write_text(json.dumps({"alice": 1, "bob": 2, "other": 3}))
    return folder


def test_imported_binary_masks_give_one_instance_per_blob(tmp_path):
    make_frames(tmp_path / "frames")
    _import_layout(tmp_path, per_character=False)
    _, rows, out = run(tmp_path, config(tmp_path, method="import"))
    table = read_instances(out)
    two = [r for r in table if r["id"] == "alice--clip_01--00001000"]
    assert sorted((int(r["x1"]), int(r["y1"]), int(r["x2"]), int(r["y2"])) for r in two) == \
        [(8, 8, 24, 40), (40, 16, 56, 40), (56, 0, 64, 8)]
    assert all(r["character"] == "" and r["box_score"] == "" for r in table)


def test_imported_per_character_masks_are_taken_as_they_are(tmp_path):
    make_frames(tmp_path / "frames")
    folder = _import_layout(tmp_path, per_character=True)
    cfg = config(tmp_path, method="import", import_identity=True)
    _, rows, out = run(tmp_path, cfg)
    two = {r["character"]: int(r["area"]) for r in read_instances(out) if r["id"] == "alice--clip_01--00001000"}
    assert two == {"alice": 16 * 32 + 8 * 8, "bob": 16 * 24}  # boxes 1 and 3 are alice's, box 2 is bob's
    mask = imread(MasksDir(out / "masks").mask("alice--clip_01--00001000"), cv2.IMREAD_GRAYSCALE)
    assert set(np.unique(mask).tolist()) == {0, 255}  # the binary mask is derived from the character values

    values = np.zeros((48, 64), np.uint8)
    values[0:4, 0:4] = 7
    imwrite_atomic(folder / "alice--clip_01--00000000.png", values)
    with pytest.raises(CharsegError, match=r"holds value\(s\) 7 that characters.json does not name"):
        run(tmp_path, cfg)
    (folder / "characters.json").unlink()
    with pytest.raises(CharsegError, match="characters.json not found"):
        run(tmp_path, cfg)
    with pytest.raises(CharsegError, match="has no 'character_mask' column"):
        write_csv(folder / "index.csv", [{"id": i, "mask": f"{i}.png"} for i in FRAMES], ["id", "mask"])
        (folder / "characters.json").write_text(json.dumps({"alice": 1, "bob": 2, "other": 3}))
        run(tmp_path, replace(cfg))
