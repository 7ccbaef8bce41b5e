"""Helper processes end with the process that started them: a SIGKILLed parent (a Dask worker, the driver)
leaves no decode worker or local pool worker behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A parent that starts two real decode workers (an empty batch job each) and a 2-process local executor pool,
# prints their pids, and waits to be killed.
PARENT = """
import os, time
from curate.stages.embed_input import BatchJob, DecodeSpec, decode_workers

if __name__ == "__main__":
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing
    from curate.executors.local import _join_pool

    spec = DecodeSpec(tokenizer=str, steps=None, preprocess=None, normalize=False, draft_side=None)
    workers = decode_workers(spec, 2)
    for _ in range(2):
        workers.submit(BatchJob("none.tar", [], [], [], [])).result()
    context = multiprocessing.get_context("spawn")
    ranks = context.Value("i", 0)
    pool = ProcessPoolExecutor(2, mp_context=context, initializer=_join_pool, initargs=(ranks, 2, os.getpid()))
    list(pool.map(abs, range(4)))
    print(*workers.pids(), *sorted(pool._processes), flush=True)
    time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_decode_workers_and_pool_workers_exit_when_their_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        children = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(children) >= 3 and all(alive(pid) for pid in children)
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in children if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running after their parent died: {left}"
