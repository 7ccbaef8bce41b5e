"""One writer per run directory: an OS lock on the directory itself, which dies with its process."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOLDER_NAME = ".curate.lock"
"""Names the lock's holder (host, pid) while it is held; removed on release."""


class RunLocked(RuntimeError):
    """Another process is writing this run directory."""


@contextmanager
def run_lock(root: Path) -> Iterator[None]:
    """Hold the run's lock while the body runs; refuse at once, naming the holder, if another process has it.

    The lock is a `flock` on the run directory's own descriptor, so the kernel releases it when the holder
    dies (SIGKILL included), and a finished run leaves no file behind.
    """
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY)
    holder = root / HOLDER_NAME
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(f"{root}: another curate run is writing this directory ({describe(holder)})") from None
        holder.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                holder.unlink()
    finally:
        os.close(fd)  # closing releases the lock


def describe(holder: Path) -> str:
    try:
        who = json.loads(holder.read_text())
    except (OSError, ValueError):
        return "holder unknown"
    return f"host {who.get('host', '?')}, pid {who.get('pid', '?')}"
