"""A run directory on a bucket written by Dask workers that share no filesystem with the driver or each other
(`dask worker` processes each in its own working, home and temp directory, with no AWS_* environment): the
same run as on disk, though one worker is SIGKILLed mid-upload; then a local re-run from the bucket alone does
no work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from curate.config import DaskConfig, load_config
from curate.executors.dask import DaskExecutor
from curate.io.local_copy import CACHE_ENV
from curate.pipeline import run_pipeline
from curate.stage import RunLayout
from tests.s3_fixtures import S3Bucket, stop
from tests.storage_runs import REPO, assert_same_ledger, bucket_pipeline, curated_of
from tests.world_fixtures import ServedWorld

pytestmark = pytest.mark.timeout(400)


@contextmanager
def workers_of_their_own(count: int, folder: Path) -> Iterator[DaskExecutor]:
    """A scheduler and `count` `dask worker` processes, as on pods: each in its own working directory with its
    own HOME, temp and cache directories, and no AWS_* environment (the run's storage.options reach them)."""
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=":0")
    workers = []
    try:
        for i in range(count):
            home = folder / f"worker-{i}"
            (home / "tmp").mkdir(parents=True)
            env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
            env |= {"HOME": str(home), "TMPDIR": str(home / "tmp"), CACHE_ENV: str(home / "cache")}
            env["PYTHONPATH"] = str(REPO)  # the test's own worker hook (die_mid_upload) is imported from tests/
            command = [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address, "--nthreads"]
            command += ["1", "--name", f"worker-{i}", "--local-directory", str(home / "scratch"), "--no-dashboard"]
            log = open(home / "worker.log", "wb")  # noqa: SIM115 (closed with the process)
            workers.append((subprocess.Popen(command, cwd=home, env=env, stdout=log, stderr=log), log))
        executor = DaskExecutor(DaskConfig(shard_retries=2), scheduler=cluster.scheduler_address)
        try:
            executor.client.wait_for_workers(count, timeout=120)
            yield executor
        finally:
            executor.close()
    finally:
        for process, log in workers:
            stop(process, timeout=30)
            log.close()
        cluster.close()


def die_mid_upload(marker: str) -> None:
    """In a worker: SIGKILL this process once it has uploaded the first object of an embed task (not its
    marker), the first time any worker gets there (`marker` is the file that says it happened)."""
    from curate.io import run_store

    upload = run_store.RunMirror.upload

    def upload_then_die(self: run_store.RunMirror, path: Path) -> None:
        upload(self, path)
        relative = path.relative_to(self.root)
        if relative.parts[0] == "embed" and "_done" not in relative.parts and not os.path.exists(marker):
            Path(marker).write_text(self.url_of(path))
            os.kill(os.getpid(), signal.SIGKILL)

    run_store.RunMirror.upload = upload_then_die  # type: ignore[method-assign]


def mirrors(dask_worker: Any) -> list[str]:
    return [p.name for p in Path(dask_worker.local_directory).glob("curate-run-*")]


def test_dask_workers_sharing_no_filesystem_give_the_run_on_disk_though_one_dies_mid_upload(
    served_world: ServedWorld,
    s3_bucket: S3Bucket,
    tiny_checkpoint: Path,
    tmp_path: Path,
    disk_run: Path,
    env_credentials: None,
) -> None:
    from distributed import get_task_stream

    pipeline, overrides = bucket_pipeline(served_world, s3_bucket, tmp_path, tiny_checkpoint)
    config = load_config(pipeline, [*overrides, "executor=dask"])
    died = tmp_path / "died.txt"
    with workers_of_their_own(2, tmp_path / "pods") as executor:
        victim = sorted(executor.client.scheduler_info()["workers"])[0]
        executor.client.run(die_mid_upload, str(died), workers=[victim])
        with get_task_stream(executor.client) as stream:
            result = run_pipeline(config, executor=executor)
        used = executor.client.run(mirrors)
    assert died.exists(), "no worker died: the hook never ran"
    assert result.complete
    assert_same_ledger(config.output, disk_run)
    assert curated_of(RunLayout.of(config.output, s3_bucket.options)) == curated_of(RunLayout(disk_run))
    assert len(used) == 2 and all(used.values())  # both workers read and wrote the run through mirrors of their own
    ran = {tuple(str(task["key"]).split("-")[:2]) for task in stream.data}
    run_wide = {("filter", "cutoff"), ("dedup", "exact"), ("materialize", "index"), ("ledger", "merge")}
    assert run_wide <= ran  # the run-wide steps were tasks on the workers too, not work in the driver

    again = run_pipeline(load_config(pipeline, overrides))  # locally, from the bucket alone
    assert again.complete and again.tasks_run == 0
