"""A run directory on a bucket (moto's S3 server on loopback): `input.path` and `output` both on s3:// give the
same ledger, fates and curated shards as the run on disk, and the validate stage trains on them; nothing is
renamed in the bucket, and a task's objects count only once its done-marker (uploaded last) is there: a run
killed while uploading leaves nothing a reader trusts, and the next run redoes just that task; a re-run of a
finished run does no work."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from curate.config import load_config
from curate.io.run_store import MIRROR_GB_ENV
from curate.pipeline import run_pipeline, run_status, stage_fingerprints
from curate.runner import task_state
from curate.stage import RunLayout, ShardState, StageContext
from curate.stages import plan
from curate.stages.embed import EmbedOutputs, EmbedStage
from curate.stages.validate.evalsets import make_demo_eval_set
from curate.stages.validate.stage import ValidateOutputs
from tests.s3_fixtures import S3Bucket
from tests.storage_runs import REPO, assert_same_embeddings, assert_same_ledger, bucket_pipeline, curated_of
from tests.test_validate import MICRO_CONFIG
from tests.world_fixtures import ServedWorld

pytestmark = pytest.mark.timeout(400)


def test_a_bucket_run_killed_mid_upload_trusts_nothing_of_that_task_then_completes_as_the_run_on_disk(
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
    remote = run_pipeline(config)
    assert remote.complete and remote.rows == len(served_world.world.truth)
    redone = {shard for shard in embed.shards() if layout.marker("embed", shard) != before.get(shard)}
    assert "00001" in redone and not redone & set(before)  # what was marked before the kill stays as it was

    run = config.output
    disk = EmbedOutputs(RunLayout(disk_run))
    for shard in embed.shards():
        assert_same_embeddings(embed, disk, shard)
    assert_same_ledger(run, disk_run)
    want = curated_of(RunLayout(disk_run))
    assert want["uids"] and curated_of(layout) == want

    objects = [key.removeprefix(f"{s3_bucket.name}/runs/demo/") for key in s3_bucket.fs.find(run)]
    assert "ledger.parquet" in objects and "config.yaml" in objects and "curated/_done.json" in objects
    assert not [key for key in objects if key.endswith(".tmp") or "/_tmp/" in key or "staging/" in key]
    on_disk = sorted(str(p.relative_to(disk_run)) for p in disk_run.rglob("*") if p.is_file())
    assert sorted(objects) == [name for name in on_disk if name != ".curate.lock"]

    again = run_pipeline(load_config(pipeline, overrides))
    assert again.complete and again.tasks_run == 0
    status = run_status(run)  # as `curate status s3://...` reopens it: credentials from the environment
    assert status["ledger_rows"] == remote.rows
    assert all(stage["shards"]["done"] == status["shards"] for stage in status["stages"].values())

    validating = [*overrides, *validate_overrides(tmp_path)]  # the finished run's shards train the small CLIPs
    validated = run_pipeline(load_config(pipeline, validating), only_stage="validate")
    metrics = ValidateOutputs(layout).metrics()
    assert validated.complete and sorted(metrics["runs"]) == ["baseline", "curated"]
    assert all(run["steps"] == 3 and run["samples_seen"] == 24 for runs in metrics["runs"].values() for run in runs)
    assert run_pipeline(load_config(pipeline, validating), only_stage="validate").tasks_run == 0


def validate_overrides(folder: Path) -> list[str]:
    """The validate stage at its smallest: one seed of a micro CLIP per arm, 24 samples seen."""
    model = folder / "micro.json"
    model.write_text(json.dumps(MICRO_CONFIG))
    eval_set = make_demo_eval_set(folder / "eval", n=24, seed=2024, image_size=64)
    settings = {"model": str(model), "eval_set": str(eval_set), "batch_size": 8, "samples_seen": 24, "seeds": 1}
    settings |= {"warmup_steps": 1, "device": "cpu", "decode_workers": 0, "shuffle_buffer": 16}
    stages = "stages=[input,download,embed,filter,dedup,materialize,validate]"
    return [stages, *(f"validate.{key}={value}" for key, value in settings.items())]


def test_a_mirror_fetches_an_object_again_only_once_it_changed_and_trims_the_oldest_files_but_a_running_tasks(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from curate.io.run_store import RunMirror
    from curate.io.storage import Storage

    monkeypatch.setenv(MIRROR_GB_ENV, str(2500 / (1 << 30)))  # room for two of the 1,000-byte objects
    for name in "abcd":
        s3_bucket.fs.pipe(f"{s3_bucket.name}/run/{name}.bin", name.encode() * 1000)
    mirror = RunMirror(s3_bucket.url("run"), Storage(s3_bucket.options))
    a, b, c, d = (mirror.root / f"{name}.bin" for name in "abcd")

    with mirror.task_scope():
        assert mirror.fetch(a).read_bytes() == b"a" * 1000
    fetched_at = a.stat().st_mtime_ns
    with mirror.task_scope():
        assert mirror.fetch(a).stat().st_mtime_ns == fetched_at  # unchanged: not fetched again
    s3_bucket.fs.pipe(f"{s3_bucket.name}/run/a.bin", b"A" * 1000)
    with mirror.task_scope():
        assert mirror.fetch(a).read_bytes() == b"A" * 1000  # changed in the bucket: fetched again

    with mirror.task_scope():  # 3,000 bytes at the task's end: the file used longest ago leaves
        mirror.fetch(b)
        mirror.fetch(c)
    assert [p.exists() for p in (a, b, c)] == [False, True, True]

    holding, release = threading.Event(), threading.Event()

    def running_task() -> None:
        with mirror.task_scope():
            mirror.fetch(b)
            holding.set()
            release.wait(30)

    other = threading.Thread(target=running_task)
    other.start()
    try:
        assert holding.wait(30)
        with mirror.task_scope():  # b is now the oldest, but a task still running uses it: c leaves instead
            mirror.fetch(c)
            mirror.fetch(d)
        assert [p.exists() for p in (b, c, d)] == [True, False, True]
    finally:
        release.set()
        other.join()
    assert [p.exists() for p in (b, d)] == [True, True]  # 2,000 bytes: within the mirror's capacity
