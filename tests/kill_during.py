"""Run a pipeline and SIGKILL this process when one task is about to commit: `python -m tests.kill_during
STAGE:PHASE:TASK PIPELINE [KEY=VALUE ...]`. The task has written its scratch files; nothing of it is in place."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from curate import runner
from curate.config import load_config
from curate.pipeline import run_pipeline


def main(argv: list[str]) -> None:
    stage, phase_name, task = argv[1].split(":")
    commit = runner.commit

    def commit_or_die(phase, workdir: Path, root: Path, in_place=()):  # type: ignore[no-untyped-def]
        if phase.name == phase_name and workdir.name.startswith(f"{task}.") and workdir.parent.parent.name == stage:
            os.kill(os.getpid(), signal.SIGKILL)
        return commit(phase, workdir, root, in_place)

    runner.commit = commit_or_die
    run_pipeline(load_config(argv[2], argv[3:]))
    raise SystemExit(f"the run finished without reaching {argv[1]}")


if __name__ == "__main__":
    main(sys.argv)
