import csv
import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from charseg.errors import CharsegError
from charseg.split import choose_val_videos, make_split, read_rows, usable_statuses
from stages.split import main

LABELLED = {"labelled"}


def frames(character: str, video: str, n: int, step: float = 1.0, start: float = 0.0,
           status: str | None = None) -> list[dict]:
    rows = []
    for i in range(n):
        t = round(start + i * step, 3)
        row = {"id": f"{character}--{Path(video).stem}--{round(t * 1000):08d}", "character": character,
               "video": f"{character}/{video}", "timestamp": t}
        if status is not None:
            row["status"] = status
        rows.append(row)
    return rows


def random_manifest(rng: random.Random) -> list[dict]:
    """1-5 characters with 1-6 videos of 1-40 frames each; at least one character has 2 videos."""
    rows = []
    for c in range(rng.randint(1, 5)):
        n_videos = rng.randint(2, 6) if c == 0 else rng.choice([1, 1, 2, 3, 6])
        for v in range(n_videos):
            rows += frames(f"char{c}", f"ep{v}.mp4", rng.randint(1, 40), step=rng.choice([0.5, 1.0, 2.0]),
                           start=rng.choice([0.0, 3.0]))
    return rows


def check_split(rows: list[dict], split: dict, metrics: dict, gap_seconds: float) -> None:
    train, val = set(split["train"]), set(split["val"])
    assert not train & val
    assert split["train"] == sorted(split["train"]) and split["val"] == sorted(split["val"])
    by_id = {r["id"]: r for r in rows}
    videos_of = defaultdict(set)
    for r in rows:
        videos_of[r["character"]].add(r["video"])
    for character, videos in videos_of.items():
        char_ids = {r["id"] for r in rows if r["character"] == character}
        if len(videos) >= 2:
            assert char_ids & train and char_ids & val, character
            for video in videos:
                ids = {r["id"] for r in rows if r["video"] == video}
                assert ids <= train or ids <= val, f"{video} is on both sides"
        elif char_ids & val:
            last_train = max(by_id[i]["timestamp"] for i in char_ids & train)
            first_val = min(by_id[i]["timestamp"] for i in char_ids & val)
            assert first_val - last_train >= gap_seconds - 1e-9
            # The dropped frames lie between the blocks: the blocks are contiguous in time.
            dropped = char_ids - train - val
            assert all(last_train < by_id[i]["timestamp"] < first_val for i in dropped)
    assert metrics["train_frames"] + metrics["val_frames"] + metrics["dropped_by_gap"] == len(rows)
    assert metrics["val_fraction_achieved"] == pytest.approx(len(val) / (len(train) + len(val)), abs=1e-6)


@pytest.mark.parametrize("manifest_seed", range(12))
def test_no_video_on_both_sides_for_random_manifests(manifest_seed):
    rng = random.Random(manifest_seed)
    rows = random_manifest(rng)
    for seed in range(4):
        gap = rng.choice([0.0, 2.0, 5.0])
        try:
            split, metrics = make_split(rows, rng.choice([0.1, 0.2, 0.5]), seed, gap, LABELLED)
        except CharsegError as err:  # only allowed when no character could give a val side
            assert "no validation frames" in str(err)
            continue
        check_split(rows, split, metrics, gap)


def test_same_input_same_json_regardless_of_row_order(tmp_path):
    rows = random_manifest(random.Random(3)) + frames("solo", "movie.mkv", 60)
    outputs = []
    for order_seed in range(3):
        shuffled = rows[:]
        random.Random(order_seed).shuffle(shuffled)
        outputs.append(json.dumps(make_split(shuffled, 0.2, 7, 5.0, LABELLED)))
    assert outputs[0] == outputs[1] == outputs[2]


def test_cli_writes_identical_files_for_shuffled_manifests(tmp_path):
    rows = random_manifest(random.Random(5))
    params = tmp_path / "params.yaml"
    params.write_text("split:\n  val_fraction: 0.2\n  seed: 1\n  gap_seconds: 5\nlabels:\n  keep_empty: true\n")
    written = []
    for order_seed in range(2):
        random.Random(order_seed).shuffle(rows)
        manifest = write_manifest(tmp_path / f"m{order_seed}.csv", rows)
        out, metrics = tmp_path / f"split{order_seed}.json", tmp_path / f"metrics{order_seed}.json"
        main(["--manifest", str(manifest), "--out", str(out), "--metrics", str(metrics), "--params", str(params)])
        written.append((out.read_bytes(), metrics.read_bytes()))
    assert written[0] == written[1]
    assert set(json.loads(written[0][0])) == {"train", "val"}


def test_seed_chooses_among_equally_good_assignments():
    rows = [r for v in range(5) for r in frames("alice", f"ep{v}.mp4", 10)]
    val_sets = {tuple(make_split(rows, 0.2, seed, 5.0, LABELLED)[0]["val"]) for seed in range(12)}
    assert len(val_sets) > 1
    assert all(len(v) == 10 for v in val_sets)  # always exactly one of the five equal videos


def test_val_videos_closest_to_fraction_and_both_sides_kept():
    rng = np.random.default_rng(0)
    assert choose_val_videos({"a": 10, "b": 20, "c": 30, "d": 40}, 0.2, rng) == {"b"}
    assert choose_val_videos({"a": 1, "b": 100}, 0.9, rng) in ({"a"}, {"b"})  # never both, never none
    assert choose_val_videos({"a": 1, "b": 100}, 0.01, rng) == {"a"}


def test_many_videos_use_the_seeded_search_and_stay_close():
    sizes = {f"ep{i:02d}": 5 + (i * 7) % 23 for i in range(30)}  # > 16 videos: greedy + swaps
    total = sum(sizes.values())
    for seed in range(3):
        val = choose_val_videos(sizes, 0.2, np.random.default_rng(seed))
        assert 0 < len(val) < len(sizes)
        assert abs(sum(sizes[v] for v in val) - 0.2 * total) <= 0.5
    assert choose_val_videos(sizes, 0.2, np.random.default_rng(1)) == choose_val_videos(
        sizes, 0.2, np.random.default_rng(1))


def test_single_video_character_is_cut_in_time_with_the_gap():
    rows = frames("solo", "movie.mkv", 100) + frames("duo", "a.mp4", 10) + frames("duo", "b.mp4", 10)
    split, metrics = make_split(rows, 0.2, 0, 5.0, LABELLED)
    check_split(rows, split, metrics, 5.0)
    times = {r["id"]: r["timestamp"] for r in rows}
    val_times = sorted(times[i] for i in split["val"] if i.startswith("solo"))
    train_times = sorted(times[i] for i in split["train"] if i.startswith("solo"))
    assert val_times[-1] == 99.0 and train_times[0] == 0.0  # validation is the end of the video
    assert val_times[0] - train_times[-1] >= 5.0
    # 1 frame per second and a 5 s gap: the 4 frames strictly inside the gap are dropped.
    assert metrics["per_character/solo/dropped_by_gap"] == metrics["dropped_by_gap"] == 4
    assert abs(len(val_times) / (len(val_times) + len(train_times)) - 0.2) < 0.01
    assert metrics["per_character/solo/train_videos"] == metrics["per_character/solo/val_videos"] == 1
    assert metrics["videos_split_in_time"] == 1


def test_gap_zero_drops_nothing():
    rows = frames("solo", "movie.mkv", 50, step=0.5) + frames("duo", "a.mp4", 5) + frames("duo", "b.mp4", 5)
    split, metrics = make_split(rows, 0.2, 0, 0.0, LABELLED)
    check_split(rows, split, metrics, 0.0)
    assert metrics["dropped_by_gap"] == 0


def test_short_single_video_goes_to_train_with_a_warning(capsys):
    rows = frames("tiny", "clip.mp4", 3) + frames("duo", "a.mp4", 5) + frames("duo", "b.mp4", 5)
    split, metrics = make_split(rows, 0.2, 0, 5.0, LABELLED)
    assert {r["id"] for r in rows if r["character"] == "tiny"} <= set(split["train"])
    assert metrics["characters_train_only"] == 1
    assert "tiny" in capsys.readouterr().err


def test_status_filtering():
    rows = (frames("alice", "a.mp4", 4, status="labelled") + frames("alice", "a.mp4", 2, start=10, status="empty")
            + frames("alice", "b.mp4", 4, status="labelled") + frames("alice", "b.mp4", 3, start=10, status="failed")
            + frames("ghost", "g.mp4", 3, status="failed"))
    kept_empty, m_keep = make_split(rows, 0.2, 0, 5.0, usable_statuses(keep_empty=True))
    dropped_empty, m_drop = make_split(rows, 0.2, 0, 5.0, usable_statuses(keep_empty=False))
    ids = lambda status: {r["id"] for r in rows if r["status"] == status}  # noqa: E731
    all_keep = set(kept_empty["train"]) | set(kept_empty["val"])
    all_drop = set(dropped_empty["train"]) | set(dropped_empty["val"])
    assert all_keep == ids("labelled") | ids("empty")
    assert all_drop == ids("labelled")
    assert m_keep["dropped_by_status"] == 6 and m_drop["dropped_by_status"] == 8
    assert m_keep["characters_skipped"] == 1 and m_keep["per_character/ghost/dropped_by_status"] == 3
    with pytest.raises(CharsegError, match="status 'maybe'"):
        make_split(frames("x", "a.mp4", 2, status="maybe"), 0.2, 0, 5.0, LABELLED)


def test_manifest_without_status_column_keeps_every_row():
    rows = frames("alice", "a.mp4", 5) + frames("alice", "b.mp4", 5)
    split, metrics = make_split(rows, 0.5, 0, 5.0, LABELLED)
    assert len(split["train"]) + len(split["val"]) == 10 and metrics["dropped_by_status"] == 0


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.1])
def test_val_fraction_must_be_inside_zero_one(fraction, tmp_path):
    """The params schema refuses it when the stage reads params.yaml, before any split is made."""
    manifest = write_manifest(tmp_path / "m.csv", frames("a", "a.mp4", 5) + frames("a", "b.mp4", 5))
    params = tmp_path / "params.yaml"
    params.write_text(f"split:\n  val_fraction: {fraction}\n  seed: 0\n  gap_seconds: 5.0\n"
                      f"labels:\n  keep_empty: false\n")
    with pytest.raises(CharsegError, match="split.val_fraction"):
        main(["--manifest", str(manifest), "--out", str(tmp_path / "split.json"),
              "--metrics", str(tmp_path / "metrics.json"), "--params", str(params)])
    assert not (tmp_path / "split.json").exists()


def test_split_with_an_empty_side_says_what_to_change():
    rows = frames("a", "one.mp4", 1) + frames("b", "two.mp4", 3)
    with pytest.raises(CharsegError, match="gap_seconds"):
        make_split(rows, 0.2, 0, 5.0, LABELLED)


def test_video_listed_under_two_characters_is_an_error():
    rows = frames("a", "x.mp4", 3) + frames("a", "y.mp4", 3)
    rows[0] = {**rows[0], "character": "b", "id": "b--x--0"}
    with pytest.raises(CharsegError, match="several characters"):
        make_split(rows, 0.2, 0, 5.0, LABELLED)


def write_manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["id", "character", "video", "timestamp"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_manifest_errors(tmp_path):
    with pytest.raises(CharsegError, match="lists no frames"):
        read_rows(write_manifest(tmp_path / "empty.csv", []))
    rows = frames("a", "x.mp4", 3)
    with pytest.raises(CharsegError, match="more than once.*a--x--00001000"):
        read_rows(write_manifest(tmp_path / "dup.csv", rows + [rows[1]]))
    with pytest.raises(CharsegError, match="not found"):
        read_rows(tmp_path / "missing.csv")


def test_cli_params_errors(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", frames("a", "x.mp4", 3) + frames("a", "y.mp4", 3))
    params = tmp_path / "params.yaml"
    params.write_text("split:\n  val_fraction: 0.2\n  seed: 1\n  gap_seconds: 5\n")
    with pytest.raises(CharsegError, match="labels.keep_empty"):
        main(["--manifest", str(manifest), "--params", str(params)])
    params.write_text("split:\n  val_fraction: 0.2\n  seed: 1.5\n  gap_seconds: 5\nlabels:\n  keep_empty: false\n")
    with pytest.raises(CharsegError, match="split.seed"):
        main(["--manifest", str(manifest), "--params", str(params)])


def test_adding_a_character_leaves_the_others_unchanged():
    rows = [r for v in range(4) for r in frames("alice", f"ep{v}.mp4", 10 + v)]
    before, _ = make_split(rows, 0.3, 3, 5.0, LABELLED)
    after, _ = make_split(rows + frames("bob", "a.mp4", 9) + frames("bob", "b.mp4", 9), 0.3, 3, 5.0, LABELLED)
    assert [i for i in after["val"] if i.startswith("alice")] == before["val"]
