"""One writer per run directory: an OS file lock that dies with its process."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".curate.lock"


class RunLocked(RuntimeError):
    """Another process is writing this run directory."""


@contextmanager
def run_lock(root: Path) -> Iterator[None]:
    """Hold the run's lock while the body runs; refuse at once, naming the holder, if another process has it."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    handle = open(path, "a+")  # noqa: SIM115 - held for the whole body
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "{}"
            try:
                who = json.loads(holder)
            except ValueError:
                who = {}
            raise RunLocked(
                f"{root}: another curate run is writing this directory (host {who.get('host', '?')}, "
                f"pid {who.get('pid', '?')}); wait for it to finish"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock
