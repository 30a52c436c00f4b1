"""`charseg app` started for a test: a real process on a free port of 127.0.0.1, stopped afterwards."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

START_TIMEOUT_S = 120  # importing gradio and torch and loading the models, on 2 busy cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(project: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """The page's URL while `charseg app --project project --port <free> *args` serves it."""
    port = free_port()
    log = project / f"app-{port}.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "charseg", "app", "--project", str(project), "--port",
                                    str(port), *args], stdout=out, stderr=subprocess.STDOUT, cwd=project, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"charseg app exited with {process.returncode}:\n{log.read_text()}"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            assert time.monotonic() < deadline, f"charseg app did not answer in {START_TIMEOUT_S} s:\n{log.read_text()}"
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
