"""The one device and precision policy: which device a `--device` / `labels.device` string means, and how a
model runs there (autocast dtype, memory format). Training, labelling, evaluation, prediction and ONNX
Runtime all ask here, so `auto`, `cpu`, `cuda` and `cuda:N` mean the same thing everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from charseg.errors import CharsegError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:<index>"
ORT_CPU = "CPUExecutionProvider"
ORT_CUDA = "CUDAExecutionProvider"


def parse_device(name: str, setting: str = "--device") -> torch.device | None:
    """The device a setting names, without checking that it exists; None for 'auto'."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise CharsegError(f"{setting} {name!r} is not a device: use {DEVICE_CHOICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise CharsegError(f"{setting} {name!r} is not a device: use {DEVICE_CHOICES}")
    return device


def select_device(name: str, setting: str = "--device") -> torch.device:
    """'auto' is the GPU when one is visible, else the CPU; a named device must exist."""
    device = parse_device(name, setting)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CharsegError(f"{setting} is {name!r} but no CUDA GPU is visible: use auto or cpu")
    return device


def wants_cuda(name: str, setting: str = "--device") -> bool:
    """Whether a device setting resolves to CUDA (auto: when a GPU is visible)."""
    device = parse_device(name, setting)
    return torch.cuda.is_available() if device is None else device.type == "cuda"


@dataclass(frozen=True)
class Precision:
    """How models run on a device: autocast dtype (None: float32) and memory format.

    Mixed precision and channels-last only on CUDA: bf16 where the GPU supports it (no loss scaling
    needed), else fp16; on the CPU autocast is slower than float32 for these convolutions.
    """
    device: torch.device
    amp_dtype: torch.dtype | None

    @classmethod
    def for_device(cls, device: torch.device, amp: bool) -> Precision:
        dtype = None
        if amp and device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return cls(device, dtype)

    @property
    def memory_format(self) -> torch.memory_format:
        """channels-last on CUDA, the layout cuDNN's fastest convolution kernels use."""
        return torch.channels_last if self.device.type == "cuda" else torch.contiguous_format

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


def ort_providers(name: str, setting: str = "--device") -> list[Any] | None:
    """ONNX Runtime providers for a device setting; None for 'auto' (CUDA when this build has it)."""
    device = parse_device(name, setting)
    if device is None:
        return None
    if device.type == "cpu":
        return [ORT_CPU]
    return [(ORT_CUDA, {"device_id": device.index or 0}), ORT_CPU]
