"""Helper processes end with the process that started them: a SIGKILLed parent (a Dask worker, the driver)
leaves no decode worker or local executor pool worker behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curate.stage import Phase, Stage, StageContext, TaskOutput

REPO = Path(__file__).resolve().parents[1]


class PidsThenWait(Stage):
    """Each task writes its process's pid into the folder named by its task, then waits to be killed."""

    name = "pids"
    section = None
    decides_fates = False

    def phases(self) -> list[Phase]:
        return [Phase("wait", lambda _ctx: [], self._wait)]

    def _wait(self, _ctx: StageContext, task: str, _workdir: Path) -> TaskOutput:
        (Path(task) / f"{os.getpid()}.pid").write_text("")
        time.sleep(600)
        return TaskOutput()


# A parent that starts two real decode workers (an empty batch job each), then runs two waiting tasks on the
# local executor's 2-process pool; the pids land in the folder it is given.
PARENT = """
import os, sys
from pathlib import Path
from curate.config import validate_config
from curate.executors.local import LocalExecutor
from curate.stage import RunLayout, StageContext
from curate.stages.embed_input import BatchJob, DecodeSpec, decode_workers
from tests.test_processes import PidsThenWait

if __name__ == "__main__":
    folder = Path(sys.argv[1])
    spec = DecodeSpec(tokenizer=str, steps=None, preprocess=None, normalize=False, draft_side=None)
    workers = decode_workers(spec, 2)
    for _ in range(2):
        workers.submit(BatchJob("none.tar", [], [], [], [])).result()
    for pid in workers.pids():
        (folder / f"{pid}.pid").write_text("")
    config = validate_config({"output": str(folder / "run"), "input": {"path": "unused.csv"}})
    stage = PidsThenWait(config)
    ctx = StageContext(config, RunLayout(folder / "run"), "print")
    list(LocalExecutor().map_tasks(stage, ctx, "wait", [str(folder), str(folder)], workers=2))
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_decode_workers_and_pool_workers_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("*.pid"))) < 3 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.1)
        children = [int(path.stem) for path in tmp_path.glob("*.pid")]
        assert len(children) >= 3 and all(alive(pid) for pid in children), children
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
