"""Which torch device a stage runs on."""
from __future__ import annotations

import torch

from .errors import CharsegError


def select_device(name: str, setting: str = "--device") -> torch.device:
    """'auto' is the GPU when one is visible, else the CPU; a named device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise CharsegError(f"{setting} {name!r} is not a device: use auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CharsegError(f"{setting} is {name!r} but no CUDA GPU is visible: use auto or cpu")
    return device
