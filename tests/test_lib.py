from pathlib import Path

import numpy as np
import pytest

from charseg.errors import CharsegError
from charseg.io import atomic_dir, imread, imwrite_atomic, read_csv, slugify, write_csv
from charseg.config import Params, check_params, load_params, parse_yaml


def test_exponent_floats_written_by_dvc_are_floats():
    loaded = parse_yaml("lr: 1e-05\nwd: 5E-3\nn: 3\nx: 0.5\nname: 1e5x\n")
    assert loaded == {"lr": 1e-05, "wd": 5e-3, "n": 3, "x": 0.5, "name": "1e5x"}
    assert isinstance(loaded["lr"], float)


def test_number_rejects_wrong_types_and_ranges():
    """The params schema checks each number once, when params.yaml is read; the typed section converts it."""
    frames = {"fps": 2, "max_side": None, "jpeg_quality": 90, "workers": 0}
    fps = Params({"frames": frames}).frames.fps
    assert fps == 2.0 and isinstance(fps, float)
    with pytest.raises(CharsegError, match="frames.fps"):
        check_params({"frames": {"fps": "fast"}})
    with pytest.raises(CharsegError, match=r"outside \[0, 1\]"):
        check_params({"labels": {"detector": {"conf": 1.5}}})
    with pytest.raises(CharsegError, match="whole number"):
        check_params({"frames": {"workers": 2.5}})


def test_load_params_missing_file(tmp_path):
    with pytest.raises(CharsegError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_repo_params_load():
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    assert isinstance(params["frames"]["fps"], float)


def test_slugify_is_safe_and_injective():
    assert slugify("alice") == "alice"
    names = ["Zoë Ünal", "Zoe Unal", "Zoe_Unal", "日本語", "中文"]
    slugs = [slugify(n) for n in names]
    assert len(set(slugs)) == len(names)
    assert all(s.isascii() and "/" not in s and " " not in s for s in slugs)


def test_atomic_dir_keeps_old_output_on_failure(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_csv_and_image_roundtrip_with_unicode_path(tmp_path):
    rows = [{"id": "a b", "n": "1"}, {"id": "é,\"q\"", "n": "2"}]
    write_csv(tmp_path / "m.csv", rows, ["id", "n"])
    assert read_csv(tmp_path / "m.csv") == rows
    image = np.full((4, 5), 255, np.uint8)
    imwrite_atomic(tmp_path / "ünï cødé.png", image)
    assert np.array_equal(imread(tmp_path / "ünï cødé.png", 0), image)
    (tmp_path / "bad.png").write_bytes(b"")
    with pytest.raises(CharsegError, match="bad.png"):
        imread(tmp_path / "bad.png")


def test_outputs_get_umask_permissions_not_private_temp_modes(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        imwrite_atomic(tmp_path / "m.png", np.zeros((2, 2), np.uint8))
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "m.png").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_select_device_names_the_setting_on_bad_values():
    import torch

    from charseg.device import select_device

    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(CharsegError, match="labels.device 'gpu0' is not a device"):
        select_device("gpu0", "labels.device")
    if not torch.cuda.is_available():
        with pytest.raises(CharsegError, match="no CUDA GPU is visible"):
            select_device("cuda:1")
