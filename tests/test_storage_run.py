"""A run directory on a bucket (moto's S3 server on loopback): `input.path` and `output` both on s3:// give the
same ledger, fates and curated shards as the run on disk, also on Dask workers that share no filesystem with
the driver or each other; nothing is renamed in the bucket, and a task's objects count only once its
done-marker (uploaded last) is there: a run killed while uploading leaves nothing a reader trusts, and the
next run redoes just that task; a re-run of a finished run does no work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import s3fs

from curate.config import DaskConfig, load_config
from curate.executors.dask import DaskExecutor
from curate.io.local_copy import CACHE_ENV
from curate.io.run_store import MIRROR_GB_ENV
from curate.ledger import read_ledger
from curate.pipeline import run_pipeline, run_status, stage_fingerprints
from curate.runner import task_state
from curate.stage import RunLayout, ShardState, StageContext
from curate.stages import plan
from curate.stages.embed import EmbedOutputs, EmbedStage
from curate.stages.materialize import CuratedOutputs
from tests.s3_fixtures import S3Bucket, stop
from tests.world_fixtures import ServedWorld, full_pipeline_overrides

pytestmark = pytest.mark.timeout(400)
REPO = Path(__file__).resolve().parent.parent

LEDGER_COLUMNS = ["uid", "status", "stage", "reason", "sha256", "width", "height", "clip_score"]


def ledger_of(run: str | Path) -> pd.DataFrame:
    return read_ledger(run)[LEDGER_COLUMNS].sort_values("uid").reset_index(drop=True)


def curated_of(layout: RunLayout) -> dict[str, Any]:
    curated = CuratedOutputs(layout)
    uids = np.load(layout.fetch(curated.uids_path))
    sizes = layout.read_json(curated.sizes_path)
    return {"uids": uids.tolist(), "sizes": sizes, "tars": [p.name for p in curated.shards()]}


@pytest.fixture
def env_credentials(s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What a user's shell holds: the reopening commands read the run with the environment's credentials."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint)
    # A filesystem cached by an earlier test in this process resolved its credentials without these.
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def bucket_pipeline(world: ServedWorld, bucket: S3Bucket, tmp_path: Path, checkpoint: Path) -> tuple[str, list[str]]:
    """The world's crawl and the model in the bucket, the run directory in it too."""
    crawl = bucket.upload(world.table, f"crawl/{world.table.name}")  # generated uids hash the file name
    model = bucket.upload(checkpoint, "models/tiny.pt")
    run = bucket.url("runs/demo")
    path = world.pipeline(tmp_path / "bucket", output=tmp_path / "unused")
    overrides = [
        *full_pipeline_overrides(checkpoint),
        f"input.path={crawl}",
        f"output={run}",
        f"embed.pretrained={model}",
    ]
    overrides += [f"storage.options={json.dumps(bucket.options)}"]
    return str(path), overrides


@pytest.fixture(scope="module")
def disk_run(served_world: ServedWorld, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same pipeline with its crawl, model and run directory on local disk."""
    folder = tmp_path_factory.mktemp("disk")
    result = run_pipeline(
        load_config(served_world.pipeline(folder, output=folder / "run"), full_pipeline_overrides(tiny_checkpoint))
    )
    assert result.complete and result.rows > 0
    return folder / "run"


def test_a_run_in_a_bucket_gives_the_run_on_disk_and_a_rerun_does_no_work(
    served_world: ServedWorld,
    s3_bucket: S3Bucket,
    tiny_checkpoint: Path,
    tmp_path: Path,
    disk_run: Path,
    env_credentials: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(MIRROR_GB_ENV, "0")  # every task leaves the mirror empty: nothing is read from local disk
    pipeline, overrides = bucket_pipeline(served_world, s3_bucket, tmp_path, tiny_checkpoint)
    config = load_config(pipeline, overrides)
    remote = run_pipeline(config)
    assert remote.complete and remote.rows == len(served_world.world.truth)

    run = config.output
    assert ledger_of(run).equals(ledger_of(disk_run))
    want = curated_of(RunLayout(disk_run))
    assert want["uids"] and curated_of(RunLayout.of(run, s3_bucket.options)) == want

    objects = [key.removeprefix(f"{s3_bucket.name}/runs/demo/") for key in s3_bucket.fs.find(run)]
    assert "ledger.parquet" in objects and "config.yaml" in objects and "curated/_done.json" in objects
    assert not [key for key in objects if key.endswith(".tmp") or "/_tmp/" in key or "staging/" in key]
    disk = sorted(str(p.relative_to(disk_run)) for p in disk_run.rglob("*") if p.is_file())
    assert sorted(objects) == [name for name in disk if name != ".curate.lock"]

    again = run_pipeline(load_config(pipeline, overrides))
    assert again.complete and again.tasks_run == 0
    status = run_status(run)  # as `curate status s3://...` reopens it: credentials from the environment
    assert status["ledger_rows"] == remote.rows
    assert all(stage["shards"]["done"] == status["shards"] for stage in status["stages"].values())


def test_a_run_killed_while_uploading_a_task_leaves_nothing_a_reader_trusts_and_the_next_run_redoes_only_it(
    served_world: ServedWorld, s3_bucket: S3Bucket, tiny_checkpoint: Path, tmp_path: Path, disk_run: Path
) -> None:
    pipeline, overrides = bucket_pipeline(served_world, s3_bucket, tmp_path, tiny_checkpoint)
    overrides = [*overrides, "stages=[input,download,embed]"]
    command = [sys.executable, "-m", "tests.kill_during", "upload:embed:00001", pipeline, *overrides]
    killed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    config = load_config(pipeline, overrides)
    layout = RunLayout.of(config.output, s3_bucket.options)
    embed = EmbedOutputs(layout)
    assert layout.exists(embed.fates_path("00001"))  # its first object is up ...
    assert not layout.exists(embed.paths("00001")[2]) and not layout.exists(layout.marker_path("embed", "00001"))
    assert "00000" in embed.shards() and "00001" not in embed.shards()  # ... and no reader takes it as done
    ctx, phase = (
        StageContext(config, layout, stage_fingerprints(plan(config))["embed"]),
        EmbedStage(config).phase("shards"),
    )
    assert task_state(ctx, "embed", "00000", phase) is ShardState.DONE
    assert task_state(ctx, "embed", "00001", phase) is ShardState.PENDING

    before = {shard: layout.marker("embed", shard) for shard in embed.shards()}
    again = run_pipeline(config)
    assert again.complete
    redone = {shard for shard in embed.shards() if layout.marker("embed", shard) != before.get(shard)}
    assert "00001" in redone and not redone & set(before)  # what was marked before the kill stays as it was
    disk = EmbedOutputs(RunLayout(disk_run))
    for shard in embed.shards():
        assert embed.fates(shard).equals(disk.fates(shard))
        assert np.array_equal(embed.image_embeddings(shard), disk.image_embeddings(shard))


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
    pipeline, overrides = bucket_pipeline(served_world, s3_bucket, tmp_path, tiny_checkpoint)
    config = load_config(pipeline, [*overrides, "executor=dask"])
    died = tmp_path / "died.txt"
    with workers_of_their_own(2, tmp_path / "pods") as executor:
        victim = sorted(executor.client.scheduler_info()["workers"])[0]
        executor.client.run(die_mid_upload, str(died), workers=[victim])
        result = run_pipeline(config, executor=executor)
        used = executor.client.run(mirrors)
    assert died.exists(), "no worker died: the hook never ran"
    assert result.complete
    assert ledger_of(config.output).equals(ledger_of(disk_run))
    assert curated_of(RunLayout.of(config.output, s3_bucket.options)) == curated_of(RunLayout(disk_run))
    assert len(used) == 2 and all(used.values())  # both workers read and wrote the run through mirrors of their own

    again = run_pipeline(load_config(pipeline, overrides))  # locally, from the bucket alone
    assert again.complete and again.tasks_run == 0
