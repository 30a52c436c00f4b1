"""params.yaml is checked against one schema of every known key (charseg.config.SCHEMA) when any
stage or tool loads it: typos name the closest known key, nonsense values name the key and the allowed range."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from charseg.errors import CharsegError
from charseg.config import check_params, known_keys, load_params
from tests.conftest import REPO_ROOT

BASE = load_params(REPO_ROOT / "params.yaml")


def merged(base: dict, top: dict) -> dict:
    """`top` applied on `base` the way `dvc exp run -S key=value` applies each nested key."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def error_of(tmp_path: Path, changes: dict) -> str:
    with pytest.raises(CharsegError) as err:
        load_params(write(tmp_path, merged(BASE, changes)))
    prefix = f"{tmp_path / 'params.yaml'}: "
    assert str(err.value).startswith(prefix)
    return str(err.value)[len(prefix):]


def test_the_committed_params_and_the_sample_profile_on_top_pass():
    check_params(BASE)
    profile = load_params(REPO_ROOT / "params.sample.yaml")
    check_params(merged(BASE, profile))
    out = subprocess.run([sys.executable, "-m", "charseg", "sample", "--print-overrides", "params.sample.yaml"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "-S labels.method=import" in out.stdout and "-S models.dinov2.encoder_weights=null" in out.stdout


def test_every_key_of_params_yaml_is_in_the_schema_and_the_schema_has_no_stale_key():
    def dotted(value: dict, prefix: str = "") -> set[str]:
        keys: set[str] = set()
        for key, inner in value.items():
            name = f"{prefix}{key}"
            if name.startswith("models."):
                keys |= {f"models.<name>.{k}" for k in inner}
            elif isinstance(inner, dict) and name != "models":
                keys |= dotted(inner, f"{name}.")
            elif name == "models":
                keys |= dotted(inner, "models.")
            else:
                keys.add(name)
        return keys
    schema = set(known_keys())
    in_file = dotted(BASE)
    assert in_file <= schema
    assert {k for k in schema if "<name>" not in k} == {k for k in in_file if "<name>" not in k}


@pytest.mark.parametrize("changes, message", [
    ({"frames": {"max_sid": 64}}, "unknown key 'frames.max_sid' (did you mean 'frames.max_side'?)"),
    ({"epoch": 5}, "unknown key 'epoch' (did you mean 'epochs'?)"),
    ({"train": {"lr": 1e-3}}, "unknown key 'train.lr' (did you mean 'lr'?)"),
    ({"labels": {"refine": {"min_aera": 0.1}}}, "unknown key 'labels.refine.min_aera' (did you mean "
                                                "'labels.refine.min_area'?)"),
    ({"models": {"unetpp": {"encoder_weight": None}}},
     "unknown key 'models.unetpp.encoder_weight' (did you mean 'models.unetpp.encoder_weights'?)"),
    ({"models": {"unetpp": {"encoder_dpth": 4}}},
     "unknown key 'models.unetpp.encoder_dpth' (did you mean 'models.unetpp.encoder_depth'?)"),
    ({"models": {"pspnet": {"decoder_channels": 64}}},
     "'models.pspnet.decoder_channels' is an option of arch unetpp, deeplabv3, not of 'pspnet', which accepts "
     "encoder_depth, psp_out_channels, decoder_use_norm, psp_dropout, upsampling"),
    ({"wibble": 1}, "unknown key 'wibble': the keys of the top level are frames, eda, labels, identity, task, "
                    "split, lr, weight_decay, epochs, batch_size, img_size, seed, train, models, evaluate"),
])
def test_unknown_keys_name_the_closest_known_key(tmp_path, changes, message):
    assert error_of(tmp_path, changes) == message


def test_arch_specific_options_are_known_keys(tmp_path):
    load_params(write(tmp_path, merged(BASE, {"models": {
        "unetpp": {"encoder_depth": 4, "decoder_channels": [128, 64, 32, 16]},
        "deeplabv3": {"encoder_output_stride": 16}, "dinov2": {"dropout": 0.1},
        "pspnet_wide": {"arch": "pspnet", "psp_out_channels": 256}}})))


@pytest.mark.parametrize("changes, message", [
    ({"lr": 0}, "'lr' = 0 is outside (0, inf)"),
    ({"lr": -1.0e-4}, "'lr' = -0.0001 is outside (0, inf)"),
    ({"epochs": 0}, "'epochs' = 0 is outside [1, inf)"),
    ({"batch_size": 0}, "'batch_size' = 0 is outside [2, inf)"),
    ({"img_size": -64}, "'img_size' = -64 is outside [32, inf)"),
    ({"frames": {"fps": 0}}, "'frames.fps' = 0 is outside [0.001, 1000]"),
    ({"frames": {"jpeg_quality": 120}}, "'frames.jpeg_quality' = 120 is outside [1, 100]"),
    ({"split": {"val_fraction": 1}}, "'split.val_fraction' = 1 is outside (0, 1)"),
    ({"train": {"augment": {"hflip": 2}}}, "'train.augment.hflip' = 2 is outside [0, 1]"),
    ({"models": {"unetpp": {"encoder_lr_mult": -1}}}, "'models.unetpp.encoder_lr_mult' = -1 is outside [0, inf)"),
    ({"epochs": 2.5}, "'epochs' must be a whole number, got 2.5"),
    ({"lr": "fast"}, "'lr' must be a number, got 'fast'"),
    ({"train": {"amp": "yes"}}, "'train.amp' must be true or false, got 'yes'"),
    ({"labels": {"method": "imports"}}, "'labels.method' is 'imports' (did you mean 'import'?): use one of "
                                        "yolo_sam, yolo_seg, import"),
    ({"models": {"unetpp": {"arch": "unet"}}},
     "'models.unetpp.arch' is 'unet' (did you mean 'unetpp'?): use one of unetpp, pspnet, deeplabv3, dinov2_fpn"),
    ({"labels": {"sam": {"image_size": 600}}},
     "'labels.sam.image_size' = 600 is not a multiple of 32 (the nearest are 576 and 608)"),
    ({"labels": {"sam": {"image_size": 2048}}}, "'labels.sam.image_size' = 2048 is outside [256, 1024]"),
    ({"labels": {"sam": {"image_size": 128}}}, "'labels.sam.image_size' = 128 is outside [256, 1024]"),
    ({"labels": {"sam": {"image_size": 640.5}}}, "'labels.sam.image_size' must be a whole number, got 640.5"),
    ({"labels": {"sam": {"image_size": "640px"}}}, "'labels.sam.image_size' must be a whole number, got '640px'"),
])
def test_values_that_make_no_sense_name_the_key_and_the_allowed_range(tmp_path, changes, message):
    assert error_of(tmp_path, changes) == message


def test_exponent_floats_still_pass_the_schema(tmp_path):
    text = yaml.safe_dump(BASE, sort_keys=False).replace("lr: 0.0003", "lr: 1e-05")
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml")["lr"] == 1e-05


# --- new bad inputs -----------------------------------------------------------------------------

def test_a_section_written_as_a_list_is_refused(tmp_path):
    assert error_of(tmp_path, {"train": ["workers", 0]}) == (
        "'train' must be a mapping of keys (warmup_epochs, min_lr_ratio, patience, workers, amp, augment), "
        "got a list")


def test_an_empty_models_section_is_refused(tmp_path):
    params = {**BASE, "models": {}}
    with pytest.raises(CharsegError) as err:
        load_params(write(tmp_path, params))
    assert str(err.value) == (f"{tmp_path / 'params.yaml'}: 'models' is empty: define at least one model, e.g. "
                              "unetpp: {arch: unetpp, encoder: resnet34} (see params.yaml's comments)")


@pytest.mark.parametrize("name", ["unet.r50", "unet/r50", "unet@2", "my model", "-x"])
def test_a_model_name_dvc_cannot_use_is_refused(tmp_path, name):
    assert error_of(tmp_path, {"models": {name: {"arch": "unetpp"}}}) == (
        f"model name '{name}' cannot be used: it becomes the DVC stage train@{name} and the param path "
        f"models.{name}, so it may hold only letters, digits, '_' and '-' (and must not start with '-')")


# --- every stage gets the check, and a stage run fails with one clear line -------------------------

STAGE_ARGS = {
    "frames": [], "eda": [], "masks": [], "split": [], "evaluate": [],
    "train": ["unetpp"], "export": ["--model", "unetpp"],
    "predict": ["--model", "unetpp", "--input", "x.jpg", "--output", "out"],
}
TOOLS = {"export", "predict"}  # `charseg <tool>`: they read params.yaml only to cross-check a named model


@pytest.mark.parametrize("stage", sorted(STAGE_ARGS))
def test_every_stage_refuses_a_misspelt_key(tmp_path, stage):
    import importlib
    module = importlib.import_module(f"charseg.{stage}" if stage in TOOLS else f"stages.{stage}")
    path = write(tmp_path, merged(BASE, {"frames": {"max_sid": 64}}))
    with pytest.raises(CharsegError, match=r"unknown key 'frames\.max_sid' \(did you mean 'frames\.max_side'\?\)"):
        module.main([*STAGE_ARGS[stage], "--params", str(path)])


def test_a_stage_run_exits_2_with_the_message(tmp_path):
    path = write(tmp_path, merged(BASE, {"epoch": 5}))
    out = subprocess.run([sys.executable, "-m", "stages.split", "--params", str(path)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == f"error: {path}: unknown key 'epoch' (did you mean 'epochs'?)"
