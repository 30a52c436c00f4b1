"""Process-wide settings of the libraries charseg drives, applied once by the entry points (`run_cli`: every
stage and `charseg` command), never at import time: importing charseg changes nothing.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def configure() -> None:
    """Quiet OpenCV/ffmpeg (charseg reports damaged videos itself, in one line) and keep ultralytics local.

    Each is a default: a variable the user set wins. OPENCV_FFMPEG_LOGLEVEL=32 shows ffmpeg's own messages.
    """
    # ffmpeg prints a line per damaged packet; read when OpenCV's ffmpeg backend first opens a file.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    # Errors only: no "backend can't capture by name" warnings for unreadable files.
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    if "cv2" in sys.modules and os.environ["OPENCV_LOG_LEVEL"] == "ERROR":
        sys.modules["cv2"].setLogLevel(2)
    # Ultralytics keeps its settings file in the project (not the user's home) and never pip-installs
    # packages at run time.
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.cwd() / ".ultralytics"))
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    # Gradio (charseg app) sends usage analytics unless told not to: the page works on closed networks.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
