"""A real S3 API on loopback: moto's standalone server in a subprocess (as s3fs's own tests run it), one bucket
per test. Skipped only where moto or s3fs is not installed (`pip install -e '.[dev]'` installs both)."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CREDENTIALS = {"key": "testing", "secret": "testing"}
"""moto accepts any credentials; fixed dummy ones keep the tests off a developer's own AWS setup."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(endpoint: str, server: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"moto_server exited with status {server.returncode} before it served {endpoint}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer on {endpoint} within {timeout:.0f} s")


@contextmanager
def moto_server() -> Iterator[str]:
    """The URL of a moto S3 server on 127.0.0.1, running until the block ends."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(endpoint, server)
        yield endpoint
    finally:
        stop(server, timeout=10)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server for the session."""
    for module in ("moto", "s3fs"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")
    with moto_server() as endpoint:
        yield endpoint


def stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass(frozen=True)
class S3Bucket:
    endpoint: str
    name: str

    @property
    def options(self) -> dict[str, Any]:
        """`storage.options` that reach this server."""
        return {**CREDENTIALS, "client_kwargs": {"endpoint_url": self.endpoint}}

    @property
    def fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(**self.options)

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"

    def upload(self, local: Path, key: str | None = None) -> str:
        """Copy a local file into the bucket (under its own name by default); its URL."""
        url = self.url(key or local.name)
        self.fs.put_file(str(local), url)
        return url


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[S3Bucket]:
    """An empty bucket of its own on the session's S3 server."""
    bucket = S3Bucket(s3_endpoint, f"test-{uuid.uuid4().hex[:12]}")
    bucket.fs.mkdir(bucket.name)
    yield bucket
    bucket.fs.rm(bucket.name, recursive=True)
