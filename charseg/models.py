"""The four segmentation architectures, their checkpoints and preprocessing, behind one registry.

params.yaml `models:` maps a model name to a cfg whose `arch` picks an entry of ARCHITECTURES, so a
second variant of one architecture is just another name (`unetpp_r50: {arch: unetpp, encoder: resnet50}`).
Every model returns logits of shape (B, outputs, H, W) at the input's H, W: one channel for the person task,
one per class for the characters task (charseg.task).
"""
from __future__ import annotations

import difflib
import inspect
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError
from segmentation_models_pytorch.base.heads import SegmentationHead
from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder
from segmentation_models_pytorch.encoders import encoders as SMP_ENCODERS
from torch import nn

from charseg.config import ARCH_OPTIONS, MODEL_KEYS
from charseg.errors import CharsegError
from charseg.io import write_bytes_atomic
from charseg.layout import train_output_name
from charseg.task import THRESHOLD, Task, person_task, task_of_checkpoint

CHECKPOINT_FORMAT = "charseg-checkpoint"
CHECKPOINT_VERSION = 1
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# Keys of a models.<name> cfg that are ours (params.MODEL_KEYS); anything else is passed to the
# architecture's constructor.
# Constructor options charseg fixes: 3-channel RGB in, the task's logit maps out (no activation, no aux head).
_FIXED_OPTIONS = {"self", "encoder_name", "encoder_weights", "in_channels", "classes", "activation", "aux_params"}


@dataclass(frozen=True)
class Architecture:
    constructor: Callable[..., nn.Module]  # smp style: (encoder_name, encoder_weights, **options)
    default_encoder: str
    stride: Callable[[dict[str, Any]], int]  # img_size must be a multiple of this, given the cfg
    is_valid_encoder: Callable[[str], bool]
    encoder_choices: Callable[[], list[str]]


# ---------------------------------------------------------------------------------------------
# DINOv2 + FPN: smp's FPN refuses plain ViTs and smp's DPT breaks on patch-14 models, so a small
# adapter turns four ViT blocks' stride-14 token grids into the stride 4/8/16/32 pyramid smp's FPN
# decoder expects (ViTDet/DPT style: upsample the shallow blocks, downsample the last one).

class DinoV2FPN(nn.Module):
    def __init__(self, encoder_name: str = "vit_small_patch14_dinov2", encoder_weights: str | None = None,
                 pyramid_channels: int = 256, segmentation_channels: int = 128, dropout: float = 0.2,
                 block_indices: list[int] | None = None, classes: int = 1) -> None:
        super().__init__()
        self.encoder = timm.create_model(f"{encoder_name}.{encoder_weights}" if encoder_weights else encoder_name,
                                         pretrained=encoder_weights is not None, dynamic_img_size=True)
        depth = len(self.encoder.blocks)
        # Evenly spread blocks (2, 5, 8, 11 of 12): DPT's choice, shallow blocks keep spatial detail.
        self.block_indices = list(block_indices or [round(depth * (i + 1) / 4) - 1 for i in range(4)])
        self.encoder.prune_intermediate_layers(self.block_indices, prune_norm=False, prune_head=True)
        self.patch = self.encoder.patch_embed.patch_size[0]
        dim = self.encoder.embed_dim
        channels = [dim // 4, dim // 2, dim, dim]  # strides 4, 8, 16, 32
        self.to_pyramid = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), nn.GELU(),
                          nn.ConvTranspose2d(dim // 2, channels[0], 2, stride=2)),
            nn.ConvTranspose2d(dim, channels[1], 2, stride=2),
            nn.Conv2d(dim, channels[2], 1),
            nn.Conv2d(dim, channels[3], 3, stride=2, padding=1),
        ])
        self.decoder = FPNDecoder(encoder_channels=channels, encoder_depth=3,
                                  pyramid_channels=pyramid_channels,
                                  segmentation_channels=segmentation_channels, dropout=dropout)
        self.segmentation_head = SegmentationHead(self.decoder.out_channels, classes, kernel_size=1, upsampling=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % 32 or width % 32:
            raise RuntimeError(f"DinoV2FPN needs height and width divisible by 32, got {height}x{width}")
        # Feed the ViT at (nearly) full resolution: resize by < patch/2 px to a whole number of patches,
        # then resample the token grids onto the stride-16 grid the pyramid is built from.
        grid = (max(1, round(height / self.patch)), max(1, round(width / self.patch)))
        vit_in = F.interpolate(x, size=(grid[0] * self.patch, grid[1] * self.patch), mode="bilinear",
                               align_corners=False)
        tokens = self.encoder.forward_intermediates(vit_in, indices=self.block_indices, norm=True,
                                                    output_fmt="NCHW", intermediates_only=True)
        grid16 = (height // 16, width // 16)
        tokens = [F.interpolate(t, size=grid16, mode="bilinear", align_corners=False) for t in tokens]
        pyramid = [layer(t) for layer, t in zip(self.to_pyramid, tokens)]
        return self.segmentation_head(self.decoder(pyramid))


# ---------------------------------------------------------------------------------------------
# Pretrained weights: a clear message instead of a hub traceback when offline and not cached.

def _weights_error(encoder: str, weights: str, err: Exception, name: str) -> CharsegError:
    return CharsegError(
        f"cannot load pretrained weights '{weights}' for encoder '{encoder}' ({type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else 'no detail'}). They are downloaded from the "
        f"Hugging Face hub into {hf_constants.HF_HUB_CACHE} on first use: connect once (or copy that "
        f"cache over), or train from scratch with `-S models.{name}.encoder_weights=null`")


def _is_smp_encoder(name: str) -> bool:
    return name in SMP_ENCODERS or (name.startswith("tu-") and timm.is_model(name[3:]))


def _smp_encoder_names() -> list[str]:
    return sorted(SMP_ENCODERS)


def _is_dinov2_encoder(name: str) -> bool:
    return name in timm.list_models("*dinov2*")


ARCHITECTURES: dict[str, Architecture] = {
    "unetpp": Architecture(smp.UnetPlusPlus, "resnet34",
                           lambda cfg: 2 ** int(cfg.get("encoder_depth", 5)),
                           _is_smp_encoder, _smp_encoder_names),
    "pspnet": Architecture(smp.PSPNet, "resnet34",
                           lambda cfg: 2 ** int(cfg.get("encoder_depth", 3)),
                           _is_smp_encoder, _smp_encoder_names),
    "deeplabv3": Architecture(smp.DeepLabV3, "resnet34",
                              lambda cfg: int(cfg.get("encoder_output_stride", 8)),
                              _is_smp_encoder, _smp_encoder_names),
    "dinov2_fpn": Architecture(DinoV2FPN, "vit_small_patch14_dinov2",
                               lambda cfg: 32, _is_dinov2_encoder,
                               lambda: timm.list_models("*dinov2*")),
}


def _arch(cfg: dict[str, Any], name: str) -> tuple[str, Architecture]:
    arch = cfg.get("arch")
    if arch not in ARCHITECTURES:
        close = difflib.get_close_matches(str(arch), ARCHITECTURES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise CharsegError(f"params.yaml: models.{name}.arch = {arch!r} is not a known architecture{hint}; "
                           f"choose one of {sorted(ARCHITECTURES)}")
    return arch, ARCHITECTURES[arch]


def _encoder(cfg: dict[str, Any], name: str) -> str:
    arch_name, arch = _arch(cfg, name)
    encoder = cfg.get("encoder") or arch.default_encoder
    if not arch.is_valid_encoder(encoder):
        choices = arch.encoder_choices()
        close = difflib.get_close_matches(encoder, choices, n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        shown = ", ".join(choices) if len(choices) <= 12 else \
            f"{len(choices)} smp encoders (smp.encoders.get_encoder_names()) or tu-<timm model>"
        raise CharsegError(f"params.yaml: models.{name}.encoder = '{encoder}' is not available for arch "
                           f"'{arch_name}': {hint}choices: {shown}")
    return encoder


def _check_weights(encoder: str, weights: str | None, name: str) -> None:
    if weights is None or encoder.startswith("tu-"):
        return
    if encoder in SMP_ENCODERS:
        available = list(SMP_ENCODERS[encoder]["pretrained_settings"])
    else:
        available = [tag.split(".", 1)[1] for tag in timm.list_pretrained(f"{encoder}.*")]
    if weights not in available:
        raise CharsegError(f"params.yaml: models.{name}.encoder_weights = '{weights}' does not exist for "
                           f"encoder '{encoder}': choose one of {available} or null (train from scratch)")


def constructor_options(arch: Architecture) -> set[str]:
    """The options arch's constructor takes that a cfg may set (params.ARCH_OPTIONS lists the same)."""
    return {p.name for p in inspect.signature(arch.constructor).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD} - _FIXED_OPTIONS


def _check_extra(arch_name: str, arch: Architecture, extra: dict[str, Any], name: str) -> None:
    """smp constructors swallow unknown **kwargs silently, so a typo in params.yaml would do nothing.
    The accepted options are the schema's (params.ARCH_OPTIONS), the one list params.yaml is checked against."""
    accepted = set(ARCH_OPTIONS[arch_name]) & constructor_options(arch)
    unknown = sorted(set(extra) - accepted)
    if unknown:
        raise CharsegError(f"params.yaml: models.{name} has option(s) {unknown} that "
                           f"{arch.constructor.__name__} does not accept; it accepts {sorted(accepted)}")


def build_model(cfg: dict[str, Any], *, pretrained: bool = True, name: str = "<name>", outputs: int = 1) -> nn.Module:
    """The model for one `models.<name>` cfg with `outputs` logit channels (Task.outputs); pretrained=False
    never downloads (checkpoint loading)."""
    arch_name, arch = _arch(cfg, name)
    encoder = _encoder(cfg, name)
    weights = cfg.get("encoder_weights")
    _check_weights(encoder, weights, name)
    extra = {k: v for k, v in cfg.items() if k not in MODEL_KEYS}
    _check_extra(arch_name, arch, extra, name)
    if not pretrained:
        weights = None
    elif encoder.startswith("tu-") and weights is not None:
        weights = True  # timm-universal encoders name their pretrained tag in the encoder name
    try:
        model = arch.constructor(encoder_name=encoder, encoder_weights=weights, classes=int(outputs), **extra)
    except (OSError, HfHubHTTPError) as err:
        raise _weights_error(encoder, str(weights), err, name) from err
    depth = extra.get("encoder_depth", inspect.signature(arch.constructor).parameters.get("encoder_depth"))
    depth = getattr(depth, "default", depth)
    if isinstance(depth, int) and depth < 5:
        _drop_unused_encoder_stages(model.encoder)
    return model


def _drop_unused_encoder_stages(encoder: nn.Module) -> None:
    """smp keeps the deep stages of a shallow encoder (PSPNet's depth-3 ResNet-34 carries 20M dead
    parameters): replace the submodules a forward pass never calls by Identity, so parameter counts,
    checkpoints and optimizer state hold only what the model uses."""
    called: set[str] = set()
    hooks = [module.register_forward_pre_hook(lambda *_, name=name: called.add(name))
             for name, module in encoder.named_modules() if name]
    with torch.no_grad():
        encoder.eval()(torch.zeros(1, 3, 64, 64))
    encoder.train()
    for hook in hooks:
        hook.remove()
    # A container a forward loops over (ModuleList) is never called itself: it is used when a child is.
    used = {".".join(name.split(".")[:i]) for name in called for i in range(1, name.count(".") + 2)}
    for name, module in list(encoder.named_modules()):
        parent, _, child = name.rpartition(".")
        if name and name not in used and (not parent or parent in used) and \
                any(True for _ in module.parameters()):
            setattr(encoder.get_submodule(parent), child, nn.Identity())


def normalization(cfg: dict[str, Any], *, name: str = "<name>") -> tuple[list[float], list[float]]:
    """(mean, std) on 0-1 RGB inputs that the encoder's pretrained weights expect.

    Every supported encoder was pretrained on ImageNet statistics except a few smp encoders whose
    hub config says otherwise; a model trained from scratch keeps ImageNet statistics so that
    switching weights on later does not change the preprocessing.
    """
    encoder = _encoder(cfg, name)
    weights = cfg.get("encoder_weights")
    _check_weights(encoder, weights, name)
    if weights is None:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    if encoder.startswith("tu-") or _is_dinov2_encoder(encoder):
        timm_name = encoder[3:] if encoder.startswith("tu-") else f"{encoder}.{weights}"
        pretrained_cfg = timm.models.get_pretrained_cfg(timm_name)
        if pretrained_cfg is None:
            return list(IMAGENET_MEAN), list(IMAGENET_STD)
        return list(pretrained_cfg.mean), list(pretrained_cfg.std)
    try:
        settings = smp.encoders.get_preprocessing_params(encoder, pretrained=weights)
    except (OSError, HfHubHTTPError) as err:
        raise _weights_error(encoder, weights, err, name) from err
    if list(settings["input_range"]) != [0, 1] or settings["input_space"] != "RGB":
        raise CharsegError(f"encoder '{encoder}' expects {settings['input_space']} input in range "
                           f"{settings['input_range']}; charseg feeds 0-1 RGB: pick another encoder")
    return [float(m) for m in settings["mean"]], [float(s) for s in settings["std"]]


def check_img_size(cfg: dict[str, Any], img_size: int, *, name: str = "<name>") -> None:
    """Raise with the nearest valid sizes when `img_size` does not fit the architecture's strides."""
    arch_name, arch = _arch(cfg, name)
    stride = arch.stride(cfg)
    if img_size >= stride and img_size % stride == 0:
        return
    lower = max(stride, img_size // stride * stride)
    upper = max(stride, (img_size // stride + 1) * stride)
    nearest = sorted({lower, upper}, key=lambda s: (abs(s - img_size), s))
    raise CharsegError(f"params.yaml: img_size {img_size} does not work with models.{name} (arch '{arch_name}'), which "
                       f"needs a multiple of {stride}: use {' or '.join(map(str, nearest))}")


def param_groups(model: nn.Module, cfg: dict[str, Any], lr: float, weight_decay: float,
                 *, name: str = "<name>") -> list[dict]:
    """AdamW groups: the encoder learns at lr * encoder_lr_mult; norms and biases get no weight decay."""
    mult = cfg.get("encoder_lr_mult", 1.0)
    # params.yaml passed this check at load; a cfg built in code (a test, a tool) gets the same one.
    MODEL_KEYS["encoder_lr_mult"].check(mult, f"models.{name}.encoder_lr_mult", "params.yaml")
    encoder_lr = lr * float(mult)
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            key = (id(param) in encoder_ids, param.ndim <= 1)
            groups.setdefault(key, []).append(param)
    return [{"params": params, "lr": encoder_lr if is_encoder else lr,
             "weight_decay": 0.0 if no_decay else weight_decay}
            for (is_encoder, no_decay), params in sorted(groups.items())]


def save_checkpoint(path: str | Path, model: nn.Module, *, model_name: str, cfg: dict[str, Any],
                    img_size: int, mean: list[float], std: list[float], epoch: int, val_dice: float,
                    task: Task | None = None, **extra: Any) -> None:
    """Everything predict/evaluate need to rebuild the model and its preprocessing, written atomically.
    `task` (default person) is stored as its name and class list (meta keys `task`, `classes`)."""
    task = task or person_task()
    arch_name, _ = _arch(cfg, model_name)
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "model_name": model_name, "arch": arch_name, "encoder": _encoder(cfg, model_name), "cfg": dict(cfg),
        "img_size": int(img_size), "mean": [float(m) for m in mean], "std": [float(s) for s in std],
        "threshold": THRESHOLD, "epoch": int(epoch), "val_dice": float(val_dice),
        "task": task.name, "classes": list(task.classes), **extra,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def load_checkpoint(path: str | Path, *, expect_arch: str | None = None, model_name: str | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, checkpoint metadata without the weights).

    model_name: the params.yaml model this checkpoint is meant to be. Only when the file is that
    model's train@<name> output (models/<name>/best.pt) do the errors suggest retraining it; any
    other file is named as the wrong one, to be replaced by a valid --checkpoint."""
    path = Path(path)
    name = train_output_name(path, model_name)
    valid = "pass a valid --checkpoint (a best.pt that `python -m stages.train` wrote)"
    wrong = (f"retrain with `dvc repro train@{name}` (or fetch it again with `dvc pull`)" if name else
             f"this file is not a usable checkpoint: {valid}")
    if not path.is_file():
        raise CharsegError(f"checkpoint {path} not found: " + (
            f"train it with `dvc repro train@{name}` (or fetch it with `dvc pull`)" if name else valid))
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not a torch pickle
        raise CharsegError(f"{path} is not a readable charseg checkpoint ({type(err).__name__}): {wrong}") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CharsegError(f"{path} is not a charseg checkpoint: {wrong}")
    if payload["version"] > CHECKPOINT_VERSION:
        raise CharsegError(f"{path} was written by a newer charseg (checkpoint version "
                           f"{payload['version']} > {CHECKPOINT_VERSION}): update the code")
    if expect_arch is not None and payload["arch"] != expect_arch:
        raise CharsegError(f"{path} holds a '{payload['arch']}' model but params.yaml says arch "
                           f"'{expect_arch}': " + (
                               f"use a checkpoint of a '{expect_arch}' model, or retrain this one with "
                               f"`dvc repro train@{name}` if its arch in params.yaml changed" if name else
                               f"pass a valid --checkpoint of a '{expect_arch}' model"))
    # Checkpoints from before the characters task have no task: they are person-task models.
    task = task_of_checkpoint(payload)
    payload["task"], payload["classes"] = task.name, list(task.classes)
    model = build_model(payload["cfg"], pretrained=False, name=payload["model_name"], outputs=task.outputs)
    try:
        model.load_state_dict(payload.pop("state_dict"))
    except RuntimeError as err:
        raise CharsegError(f"{path} does not match its own cfg ({str(err).splitlines()[0]}): {wrong}") from err
    return model.to(map_location).eval(), payload
