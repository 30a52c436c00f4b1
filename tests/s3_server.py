"""A real S3-API server (moto's server mode) on 127.0.0.1 for tests and benchmarks, never any other address.

    with S3Server(tmp_dir) as s3:
        s3.create_bucket("charseg")
        subprocess.run([...], env={**os.environ, **s3.env})   # dvc remote: url s3://charseg, endpointurl s3.endpoint

`env` holds fake credentials and pins botocore to local files (no ~/.aws, no EC2 metadata probe, no proxy for
127.0.0.1), so nothing leaves this machine and the user's own AWS set-up is never read.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
ACCESS_KEY = "testing-key"
SECRET_KEY = "testing-secret"


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def isolated_aws_env(config_dir: Path, credentials: bool = True) -> dict[str, str]:
    """Environment for botocore/boto3/DVC: local empty config files, no metadata endpoint, fake keys or none."""
    config_dir.mkdir(parents=True, exist_ok=True)
    for name in ("credentials", "config"):
        (config_dir / name).touch()
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(config_dir / "credentials"),
           "AWS_CONFIG_FILE": str(config_dir / "config"),
           "AWS_EC2_METADATA_DISABLED": "true",  # no credential probe of 169.254.169.254
           "AWS_DEFAULT_REGION": "us-east-1",
           "NO_PROXY": HOST, "no_proxy": HOST}
    if credentials:
        env |= {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    return env


class S3Server:
    """`moto_server` as a child process on 127.0.0.1:<free port>; stopped (always) on exit."""

    def __init__(self, work_dir: Path, start_timeout: float = 60.0) -> None:
        self.work_dir = Path(work_dir)
        self.start_timeout = start_timeout
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.env = isolated_aws_env(self.work_dir / "aws")

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> "S3Server":
        self.log_path = self.work_dir / "moto_server.log"
        for _ in range(3):  # another process may take the free port before moto binds it: try another one
            self.port = free_port()
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
                    stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
            try:
                if self._wait_ready():
                    return self
            except BaseException:
                self.stop()
                raise
        raise RuntimeError(f"moto_server exited ({self.process.returncode}): {self.log_path.read_text()}")

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wait_ready(self) -> bool:
        """True once the server answers on 127.0.0.1; False if it exited first."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + self.start_timeout
        while self.process.poll() is None:
            try:
                with opener.open(f"{self.endpoint}/moto-api/", timeout=2):
                    return True
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server not answering on {self.endpoint} after {self.start_timeout} s")
                time.sleep(0.2)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def client(self):
        """A boto3 S3 client against this server (same fake keys as `env`)."""
        import boto3
        import botocore.session

        core = botocore.session.Session()  # reads this server's empty config files, never ~/.aws
        core.set_config_variable("config_file", self.env["AWS_CONFIG_FILE"])
        core.set_config_variable("credentials_file", self.env["AWS_SHARED_CREDENTIALS_FILE"])
        return boto3.Session(botocore_session=core).client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)
