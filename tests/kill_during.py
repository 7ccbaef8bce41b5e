"""Run a pipeline and stop this process at one point of it: `python -m tests.kill_during WHERE PIPELINE
[KEY=VALUE ...]`, WHERE being

- `STAGE:PHASE:TASK`: SIGKILL when that task is about to commit (its scratch files are written, nothing of it
  is in place);
- `STAGE:PHASE:TASK:stop`: SIGSTOP there instead (holding the run lock); after SIGCONT the run goes on;
- `write:PATH`: SIGKILL when an atomic write of OUTPUT/PATH has written its temporary file, before the rename;
- `upload:STAGE:TASK`: for a run on a bucket, SIGKILL once the first object of that task whose name holds
  TASK is uploaded (its other objects and its marker are not).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from curate import runner
from curate.config import load_config
from curate.pipeline import run_pipeline


def main(argv: list[str]) -> None:
    config = load_config(argv[2], argv[3:])
    if argv[1].startswith("write:"):
        kill_at_write(Path(config.output).absolute() / argv[1].removeprefix("write:"))
    elif argv[1].startswith("upload:"):
        kill_after_upload(*argv[1].split(":")[1:])
    else:
        stop_at_commit(*argv[1].split(":"))
    complete = run_pipeline(config).complete
    if not argv[1].endswith(":stop"):  # a stopped run goes on when continued
        raise SystemExit(f"the run finished without reaching {argv[1]}")
    raise SystemExit(0 if complete else "the run is not complete")


def stop_at_commit(stage: str, phase_name: str, task: str, how: str = "kill") -> None:
    sig = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}[how]
    commit = runner.commit

    def commit_or_stop(phase, workdir: Path, root: Path, in_place=()):  # type: ignore[no-untyped-def]
        if phase.name == phase_name and workdir.name.startswith(f"{task}.") and workdir.parent.parent.name == stage:
            os.kill(os.getpid(), sig)
        return commit(phase, workdir, root, in_place)

    runner.commit = commit_or_stop


def kill_at_write(target: Path) -> None:
    replace = os.replace

    def replace_or_die(src, dst, **kwargs):  # type: ignore[no-untyped-def]
        if Path(dst).absolute() == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst, **kwargs)

    os.replace = replace_or_die


def kill_after_upload(stage: str, task: str) -> None:
    from curate.io import run_store

    upload = run_store.RunMirror.upload

    def upload_then_die(self, path: Path) -> None:  # type: ignore[no-untyped-def]
        upload(self, path)
        relative = path.relative_to(self.root)
        if relative.parts[0] == stage and "_done" not in relative.parts and task in path.name:
            os.kill(os.getpid(), signal.SIGKILL)

    run_store.RunMirror.upload = upload_then_die  # type: ignore[method-assign]


if __name__ == "__main__":
    main(sys.argv)
