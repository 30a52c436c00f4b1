"""The sample's per-character truth: stable looks per character, guests in other characters' scenes, and exact
per-character masks that read back through charseg.labels.imported and merge into the binary truth."""
import csv
from pathlib import Path

import numpy as np
import pytest

import charseg.sample as sample
from charseg.labels.imported import mask_files, read_binary_mask, read_character_map, read_character_values

SCALE = 0.05  # as in test_sample: a few frames per scene, the same scenes as the full sample
NAMED = ("Zoë", "alice", "bob")


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "raw"
    sample.generate(out, seed=0, duration_scale=SCALE)
    return out / "truth"


def _rows(truth: Path) -> list[dict[str, str]]:
    with open(truth / "index.csv", newline="", encoding="utf-8") as fh:
        return [{**row, "id": f"{row['video']}#{row['frame_index']}"} for row in csv.DictReader(fh)]


def _character_maps(truth: Path) -> dict[str, tuple[dict[str, str], np.ndarray]]:
    """frame id -> (index row, per-character map), read as the pipeline reads them."""
    rows = _rows(truth)
    values = read_character_values(truth, key="labels.truth_dir")
    files = mask_files(truth, "index.csv", rows, key="labels.truth_dir", column="character_mask")
    assert set(files) == {row["id"] for row in rows}
    return {row["id"]: (row, read_character_map(files[row["id"]], None, values)) for row in rows}


def test_characters_json_names_every_character_and_other(truth):
    assert read_character_values(truth) == {1: "Zoë", 2: "alice", 3: "bob", 4: "other"}
    assert sample.CHARACTER_VALUES == {"Zoë": 1, "alice": 2, "bob": 3, "other": 4}
    assert set(sample.NAMED_CHARACTERS) == {spec.character for spec in sample.CLIPS}


def test_character_masks_merge_into_the_binary_truth_exactly(truth):
    rows = _rows(truth)
    binary = mask_files(truth, "index.csv", rows, key="labels.truth_dir")
    for frame_id, (row, values) in _character_maps(truth).items():
        assert row["character_mask"] == row["mask"].removesuffix(".png") + sample.CHARACTER_MASK_SUFFIX
        person = read_binary_mask(binary[frame_id], values.shape, key="labels.truth_dir")
        np.testing.assert_array_equal(person, (values > 0).astype(np.uint8) * 255)


def test_each_character_is_in_its_own_folder_and_guests_share_frames(truth):
    name_of = read_character_values(truth)
    found: dict[str, set[str]] = {}  # folder -> names seen in its frames
    frames_with_two_named = 0
    for row, values in _character_maps(truth).values():
        names = {name_of[value] for value in np.unique(values).tolist() if value}
        found.setdefault(row["video"].split("/")[0], set()).update(names)
        frames_with_two_named += len(names & set(NAMED)) >= 2
    assert set(found) == set(NAMED)
    for folder, names in found.items():
        assert folder in names
    assert "other" in set().union(*found.values())  # passers-by are nobody's character
    assert frames_with_two_named >= 3
    # Every character guests in someone else's folder (guest_plan puts each in one scene of another clip).
    for name in NAMED:
        assert any(name in names for folder, names in found.items() if folder != name)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_guest_plan_puts_each_character_once_into_another_characters_scene(seed):
    plan = sample.guest_plan(seed)
    assert sorted(plan.values()) == sorted(NAMED)
    for (clip_no, scene_no), guest in plan.items():
        assert sample.CLIPS[clip_no].character != guest and 0 <= scene_no < sample.SCENES_PER_CLIP
    assert sample.guest_plan(seed) == plan


def test_guest_plan_depends_on_the_seed():
    assert len({tuple(sorted(sample.guest_plan(seed).items())) for seed in range(5)}) > 1


def _mean_colours(seed: int) -> dict[tuple[str, str], np.ndarray]:
    """(character, folder whose clips it was seen in) -> mean BGR colour of its pixels there."""
    pixels: dict[tuple[str, str], list[np.ndarray]] = {}
    for clip_no, spec in enumerate(sample.CLIPS):
        for frame, values in sample.render_clip_characters(spec, seed, clip_no, SCALE):
            for name in NAMED:
                pixels.setdefault((name, spec.character), []).append(frame[values == sample.CHARACTER_VALUES[name]])
    return {key: np.concatenate(found).astype(np.float64).mean(axis=0)
            for key, found in pixels.items() if sum(len(p) for p in found)}


@pytest.mark.parametrize("seed", [0, 1])
def test_a_guest_wears_its_own_costume(seed):
    means = _mean_colours(seed)
    own = {name: means[(name, name)] for name in NAMED}
    guests = [(name, folder) for name, folder in means if name != folder]
    assert len(guests) == len(NAMED)
    for name, folder in guests:
        colour = means[(name, folder)]
        # Same costume, other pose, size and occlusion: the mean colour moves a little, not to anyone else's.
        assert np.abs(colour - own[name]).max() < 15, (name, folder, colour, own[name])
        nearest = min(NAMED, key=lambda other: np.linalg.norm(colour - own[other]))
        assert nearest == name, (name, folder, colour, own)


def test_nearer_figure_wins_where_figures_overlap():
    looks = sample.character_looks(0, "alice")
    patches = sample._sized(looks, 100)

    def standing(value: int, feet_y: float) -> sample.Figure:
        return sample.Figure(100.0, patches, 80.0, 0.0, feet_y, 0.0, 1.0, 0.0, value)

    far, near = standing(sample.CHARACTER_VALUES["bob"], 110.0), standing(sample.CHARACTER_VALUES["alice"], 120.0)
    frame, values = np.zeros((130, 160, 3), np.uint8), np.zeros((130, 160), np.uint8)
    far.draw(0.5, frame, values)
    far_only = values.copy()
    near.draw(0.5, frame, values)
    near_only = np.zeros_like(values)
    near.draw(0.5, np.zeros_like(frame), near_only)
    overlap = (far_only > 0) & (near_only > 0)
    assert overlap.sum() > 1000
    assert (values[overlap] == sample.CHARACTER_VALUES["alice"]).all()
    assert (values[(far_only > 0) & (near_only == 0)] == sample.CHARACTER_VALUES["bob"]).any()
    np.testing.assert_array_equal(values > 0, (far_only > 0) | (near_only > 0))


def test_same_seed_gives_the_same_character_masks(truth, tmp_path):
    again = tmp_path / "raw"
    sample.generate(again, seed=0, duration_scale=SCALE)
    for row in _rows(truth):
        assert (again / "truth" / row["character_mask"]).read_bytes() == (truth / row["character_mask"]).read_bytes()
    assert (again / "truth" / "characters.json").read_bytes() == (truth / "characters.json").read_bytes()
