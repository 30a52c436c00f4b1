"""The model registry: every configured architecture trains at a small size, checkpoints round-trip,
and bad params fail with messages that say what to change."""
from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch

from charseg.errors import CharsegError
from charseg.models import (ARCHITECTURES, IMAGENET_MEAN, build_model, check_img_size, load_checkpoint,
                               normalization, param_groups, save_checkpoint)
from charseg.config import load_params
from charseg.task import characters_task
from tests.conftest import REPO_ROOT

IMG_SIZE = 64
MODELS = load_params(REPO_ROOT / "params.yaml")["models"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def offline(cfg: dict) -> dict:
    return {**cfg, "encoder_weights": None}


def test_params_cover_every_architecture():
    assert {cfg["arch"] for cfg in MODELS.values()} == set(ARCHITECTURES)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward_at_small_size(name):
    cfg = offline(MODELS[name])
    check_img_size(cfg, IMG_SIZE, name=name)
    torch.manual_seed(0)
    model = build_model(cfg, name=name).train()
    x = torch.randn(2, 3, IMG_SIZE, IMG_SIZE)
    logits = model(x)
    assert logits.shape == (2, 1, IMG_SIZE, IMG_SIZE)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, (x[:, :1] > 0).float()).backward()
    encoder_grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    assert encoder_grads and all(g is not None for g in encoder_grads), "encoder not trained end to end"
    assert any(g.abs().sum() > 0 for g in encoder_grads)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_multiclass_forward_backward_at_small_size(name):
    # The characters task: one logit map per class (background, 2 characters, other), softmax + cross entropy.
    cfg = offline(MODELS[name])
    torch.manual_seed(0)
    model = build_model(cfg, name=name, outputs=4).train()
    x = torch.randn(2, 3, IMG_SIZE, IMG_SIZE)
    logits = model(x)
    assert logits.shape == (2, 4, IMG_SIZE, IMG_SIZE)
    target = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long() + (x[:, 2] > 1).long()  # ids 0-3
    torch.nn.functional.cross_entropy(logits, target).backward()
    head = [p for p in model.segmentation_head.parameters()]
    assert head[0].shape[0] == 4 and head[0].grad is not None and head[0].grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch, bad, nearest", [("unetpp", 100, "96 or 128"), ("dinov2_fpn", 80, "64 or 96"),
                                                ("pspnet", 60, "56 or 64"), ("deeplabv3", 4, "8")])
def test_img_size_error_names_nearest_valid_sizes(arch, bad, nearest):
    with pytest.raises(CharsegError, match=f"img_size {bad} .*models.m .*use {nearest}$"):
        check_img_size({"arch": arch}, bad, name="m")


def test_stride_follows_the_cfg():
    check_img_size({"arch": "deeplabv3", "encoder_output_stride": 16}, 64)
    with pytest.raises(CharsegError, match="multiple of 16"):
        check_img_size({"arch": "deeplabv3", "encoder_output_stride": 16}, 72)


@pytest.mark.parametrize("cfg, message", [
    ({"arch": "unetp"}, r"models.m.arch = 'unetp' .*did you mean 'unetpp'"),
    ({"arch": "unetpp", "encoder": "resnet35"}, r"models.m.encoder = 'resnet35' .*resnet34"),
    ({"arch": "dinov2_fpn", "encoder": "resnet34"}, r"not available for arch 'dinov2_fpn'.*vit_small_patch14_dinov2"),
    ({"arch": "dinov2_fpn", "encoder_weights": "imagenet"}, r"'imagenet' does not exist .*\['lvd142m'\] or null"),
    ({"arch": "pspnet", "encoder_weights": None, "decoder_chanels": 8}, r"\['decoder_chanels'\] .*psp_out_channels"),
    ({"arch": "pspnet", "encoder_weights": None, "classes": 3}, r"\['classes'\]"),
])
def test_bad_model_cfg_is_a_user_error(cfg, message):
    with pytest.raises(CharsegError, match=message):
        build_model(cfg, name="m")


@pytest.mark.parametrize("name", ["unetpp", "dinov2"])
def test_pretrained_weights_offline_and_uncached_say_what_to_do(name, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = MODELS[name]
    assert cfg["encoder_weights"] is not None
    with pytest.raises(CharsegError) as err:
        build_model(cfg, name=name)
    assert cfg["encoder"] in str(err.value) and str(tmp_path) in str(err.value)
    assert f"models.{name}.encoder_weights=null" in str(err.value)


def test_normalization_matches_encoder_without_network():
    assert normalization(offline(MODELS["unetpp"])) == (IMAGENET_MEAN, [0.229, 0.224, 0.225])
    # timm knows DINOv2's preprocessing from its model registry: no download needed.
    mean, std = normalization(MODELS["dinov2"])
    assert mean == pytest.approx(IMAGENET_MEAN) and len(std) == 3


def test_param_groups_slow_encoder_and_skip_decay_on_norms_and_biases():
    cfg = {"arch": "pspnet", "encoder": "resnet18", "encoder_weights": None, "encoder_lr_mult": 0.1}
    model = build_model(cfg)
    groups = param_groups(model, cfg, lr=1e-3, weight_decay=0.01)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    for group in groups:
        in_encoder = {id(p) in encoder_ids for p in group["params"]}
        assert len(in_encoder) == 1
        assert group["lr"] == pytest.approx(1e-4 if in_encoder.pop() else 1e-3)
        assert group["weight_decay"] == (0.0 if all(p.ndim <= 1 for p in group["params"]) else 0.01)
    with pytest.raises(CharsegError, match=r"models.m.encoder_lr_mult' = -1"):
        param_groups(model, {**cfg, "encoder_lr_mult": -1}, lr=1e-3, weight_decay=0.01, name="m")


def test_checkpoint_round_trip_rebuilds_model_and_preprocessing(tmp_path):
    cfg = {"arch": "deeplabv3", "encoder": "resnet18", "encoder_weights": "imagenet", "decoder_channels": 32}
    model = build_model(cfg, pretrained=False).eval()
    path = tmp_path / "small" / "best.pt"
    save_checkpoint(path, model, model_name="small", cfg=cfg, img_size=IMG_SIZE, mean=[0.5] * 3, std=[0.25] * 3,
                    epoch=3, val_dice=0.75, train_frames=10)
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temp file left behind
    # Loading never downloads, even though the cfg names pretrained weights (conftest is offline).
    loaded, meta = load_checkpoint(path, expect_arch="deeplabv3")
    assert not loaded.training
    assert meta["img_size"] == IMG_SIZE and meta["mean"] == [0.5] * 3 and meta["threshold"] == 0.5
    assert meta["epoch"] == 3 and meta["train_frames"] == 10 and meta["cfg"] == cfg and "state_dict" not in meta
    x = torch.randn(1, 3, IMG_SIZE, IMG_SIZE)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert (meta["task"], meta["classes"]) == ("person", ["background", "person"])


def test_checkpoint_keeps_the_task_and_its_classes(tmp_path):
    cfg = {"arch": "pspnet", "encoder": "resnet18", "encoder_weights": None, "psp_out_channels": 16}
    classes = ["background", "alice", "bob", "other"]
    model = build_model(cfg, outputs=len(classes)).eval()
    path = tmp_path / "best.pt"
    save_checkpoint(path, model, model_name="small", cfg=cfg, img_size=IMG_SIZE, mean=[0.5] * 3, std=[0.25] * 3,
                    epoch=1, val_dice=0.5, task=characters_task(classes), val_miou=0.25)
    loaded, meta = load_checkpoint(path)
    assert (meta["task"], meta["classes"], meta["val_miou"]) == ("characters", classes, 0.25)
    x = torch.randn(1, 3, IMG_SIZE, IMG_SIZE)
    with torch.no_grad():
        assert loaded(x).shape == (1, 4, IMG_SIZE, IMG_SIZE) and torch.equal(model(x), loaded(x))
    # A checkpoint from before the characters task (no task, no classes) is a person-task checkpoint.
    payload = torch.load(path, weights_only=True)
    person = {k: v for k, v in payload.items() if k not in ("task", "classes")}
    person["state_dict"] = build_model(cfg).state_dict()
    torch.save(person, tmp_path / "old.pt")
    old, meta = load_checkpoint(tmp_path / "old.pt")
    assert (meta["task"], meta["classes"]) == ("person", ["background", "person"])
    assert old(x).shape == (1, 1, IMG_SIZE, IMG_SIZE)


def test_checkpoint_errors_tell_how_to_fix(tmp_path):
    with pytest.raises(CharsegError, match=r"dvc repro train@unetpp.*dvc pull"):
        load_checkpoint(tmp_path / "models" / "unetpp" / "best.pt", model_name="unetpp")
    cfg = {"arch": "pspnet", "encoder": "resnet18", "encoder_weights": None}
    path = tmp_path / "models" / "unetpp" / "best.pt"
    save_checkpoint(path, build_model(cfg), model_name="unetpp", cfg=cfg, img_size=IMG_SIZE,
                    mean=IMAGENET_MEAN, std=IMAGENET_MEAN, epoch=0, val_dice=0.0)
    with pytest.raises(CharsegError, match=r"holds a 'pspnet' model .*arch 'unetpp'.*train@unetpp"):
        load_checkpoint(path, expect_arch="unetpp", model_name="unetpp")
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CharsegError, match="not a readable charseg checkpoint"):
        load_checkpoint(path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CharsegError, match="not a charseg checkpoint"):
        load_checkpoint(path)


def test_only_a_train_output_of_a_known_model_is_sent_back_to_training(tmp_path):
    """A checkpoint outside models/<name>/best.pt (or of a model the caller did not name) is the wrong
    file: the fix is a valid --checkpoint, not `dvc repro train@<its folder name>`."""
    cfg = {"arch": "pspnet", "encoder": "resnet18", "encoder_weights": None}
    mine = tmp_path / "downloads" / "best.pt"
    with pytest.raises(CharsegError) as err:
        load_checkpoint(mine, model_name="unetpp")
    assert str(err.value) == (f"checkpoint {mine} not found: pass a valid --checkpoint (a best.pt that "
                              f"`python -m stages.train` wrote)")
    save_checkpoint(mine, build_model(cfg), model_name="pspnet", cfg=cfg, img_size=IMG_SIZE,
                    mean=IMAGENET_MEAN, std=IMAGENET_MEAN, epoch=0, val_dice=0.0)
    with pytest.raises(CharsegError) as err:
        load_checkpoint(mine, expect_arch="unetpp", model_name="unetpp")
    assert str(err.value) == (f"{mine} holds a 'pspnet' model but params.yaml says arch 'unetpp': "
                              f"pass a valid --checkpoint of a 'unetpp' model")
    mine.write_bytes(b"junk")
    for model_name in (None, "unetpp", "downloads"):  # its folder name is no model: no train@downloads
        with pytest.raises(CharsegError) as err:
            load_checkpoint(mine, model_name=model_name)
        assert "train@" not in str(err.value)
        assert str(err.value).startswith(f"{mine} is not a readable charseg checkpoint (")
        assert str(err.value).endswith("): this file is not a usable checkpoint: pass a valid --checkpoint (a best.pt "
                                       "that `python -m stages.train` wrote)")
    other = tmp_path / "models" / "pspnet" / "best.pt"  # a train output, but not of the model asked for
    with pytest.raises(CharsegError, match="pass a valid --checkpoint"):
        load_checkpoint(other, model_name="unetpp")


def test_schema_lists_exactly_the_options_each_constructor_takes():
    from charseg.models import constructor_options
    from charseg.config import ARCH_OPTIONS
    assert set(ARCH_OPTIONS) == set(ARCHITECTURES)
    for arch_name, arch in ARCHITECTURES.items():
        assert set(ARCH_OPTIONS[arch_name]) == constructor_options(arch), arch_name


def test_a_corrupt_onnx_hint_names_the_model_only_when_it_is_known(tmp_path):
    pytest.importorskip("onnxruntime")
    from charseg.onnx import OnnxSegmenter
    garbage = tmp_path / "my_download.onnx"
    garbage.write_bytes(b"not a protobuf")
    with pytest.raises(CharsegError) as err:
        OnnxSegmenter(garbage)
    message = str(err.value)
    assert "--model my_download" not in message and message.startswith(f"{garbage} is not a readable ONNX model (")
    assert message.endswith(f"): replace {garbage} with a file that `charseg export --model <name>` wrote, "
                            f"or pass a valid --onnx")
    with pytest.raises(CharsegError) as err:
        OnnxSegmenter(garbage, model_name="unetpp")
    assert str(err.value).endswith("): re-export it with `charseg export --model unetpp --overwrite` with "
                                   f"`--output {garbage}` to write it there")
    with pytest.raises(CharsegError) as err:
        OnnxSegmenter(tmp_path / "gone.onnx")
    assert str(err.value) == (f"ONNX model {tmp_path / 'gone.onnx'} not found: pass the path of a file that "
                              f"`charseg export` wrote")
