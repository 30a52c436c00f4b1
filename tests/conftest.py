"""Test-wide settings: never touch the network, never write outside the project or tmp dirs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

for var, value in {"YOLO_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
                   "YOLO_CONFIG_DIR": str(REPO_ROOT / ".ultralytics"), "MPLBACKEND": "Agg"}.items():
    os.environ.setdefault(var, value)

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from charseg import environment  # noqa: E402  (after sys.path)

environment.configure()  # what run_cli does for every stage and command: tests call the library directly too


@pytest.fixture
def one_torch_thread():
    """Model tests share 2 cores with the rest of the suite: one torch thread each is faster overall."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
