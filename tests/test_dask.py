"""The same pipeline on a real Dask LocalCluster (worker processes) gives the same result as locally."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pytest

from curate.config import ConfigError, DaskConfig, load_config, validate_config
from curate.executors.dask import DaskExecutor
from curate.ledger import make_fates, read_ledger
from curate.pipeline import run_pipeline
from curate.stage import RunLayout, Stage, StageContext
from tests.readme import readme_section
from tests.test_download import tar_samples
from tests.world_fixtures import ServedWorld, full_pipeline_overrides

pytestmark = pytest.mark.timeout(300)


def test_dask_local_cluster_gives_the_same_ledger_and_shards_as_local(served_world: ServedWorld, tmp_path: Path):
    local_pipeline = served_world.pipeline(tmp_path / "local", output=tmp_path / "local-run")
    dask_pipeline = served_world.pipeline(tmp_path / "dask", output=tmp_path / "dask-run")
    run_pipeline(load_config(local_pipeline))
    executor = DaskExecutor(DaskConfig(n_workers=2, dashboard_address=":0"))
    try:
        assert executor.dashboard_link.startswith("http://")
        result = run_pipeline(load_config(dask_pipeline, ["executor=dask"]), executor=executor)
    finally:
        executor.close()
    assert result.complete
    columns = ["uid", "status", "stage", "reason", "sha256", "width", "height"]
    local = read_ledger(tmp_path / "local-run")[columns].sort_values("uid").reset_index(drop=True)
    on_dask = read_ledger(tmp_path / "dask-run")[columns].sort_values("uid").reset_index(drop=True)
    assert local.equals(on_dask)
    strip = lambda samples: {u: (s["key"], s["jpg_sha"]) for u, s in samples.items()}  # noqa: E731
    assert strip(tar_samples(tmp_path / "local-run")) == strip(tar_samples(tmp_path / "dask-run"))


def worker_environ() -> dict[str, str | None]:
    return {key: os.environ.get(key) for key in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "PYTHONHASHSEED")}


def worker_profiles(dask_worker) -> bool:
    import dask

    return (
        bool(dask.config.get("distributed.worker.profile.enabled"))
        and dask_worker.periodic_callbacks.get("profile") is not None
    )


def scheduler_timers_ms(dask_scheduler) -> dict[str, float]:
    """The periods of Dask's housekeeping timers on the scheduler."""
    return {name: dask_scheduler.periodic_callbacks[name].callback_time for name in ("tick", "monitor")}


def worker_timers_ms(dask_worker) -> dict[str, float]:
    timers = {name: dask_worker.periodic_callbacks[name].callback_time for name in ("tick", "monitor")}
    return {**timers, "memory": dask_worker.memory_manager.memory_monitor_interval * 1000}


def test_local_cluster_workers_keep_default_malloc_and_the_driver_environment_is_untouched(monkeypatch):
    for key in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "PYTHONHASHSEED"):
        monkeypatch.delenv(key, raising=False)
    executor = DaskExecutor(DaskConfig(n_workers=1, dashboard_address=":0"))
    try:
        (on_worker,) = executor.client.run(worker_environ).values()
        (profiling,) = executor.client.run(worker_profiles).values()
        (worker_timers,) = executor.client.run(worker_timers_ms).values()
        scheduler_timers = executor.client.run_on_scheduler(scheduler_timers_ms)
    finally:
        executor.close()
    assert not profiling  # Dask's 10 ms stack sampler is off in curate's LocalCluster workers
    # Dask's defaults are 20 ms, 500 ms and 100 ms
    assert worker_timers == {"tick": 1000, "monitor": 2000, "memory": 500}
    assert scheduler_timers == {"tick": 1000, "monitor": 2000}
    assert on_worker["MALLOC_TRIM_THRESHOLD_"] is None  # glibc's dynamic mmap threshold stays on
    assert on_worker["OMP_NUM_THREADS"] == "1"  # Dask's other pre-spawn settings still apply
    assert worker_environ() == dict.fromkeys(worker_environ())  # nothing leaked into the driver


def test_the_worker_profiler_is_there_when_asked_for():
    executor = DaskExecutor(DaskConfig(n_workers=1, dashboard_address=":0", worker_profiler=True))
    try:
        (profiling,) = executor.client.run(worker_profiles).values()
    finally:
        executor.close()
    assert profiling


class WhereDidItRun(Stage):
    """A stage that records which worker ran each shard; asks for a GPU when told to."""

    name: ClassVar[str] = "where"

    def __init__(self, needs_gpu: bool) -> None:
        self.needs_gpu = needs_gpu

    def resources(self) -> dict[str, int] | None:
        return {"GPU": 1} if self.needs_gpu else None

    def setup(self) -> None:
        pass

    def expected_uids(self, ctx: StageContext, shard: str) -> pa.Array:
        return pa.array([f"{shard}-0"])

    def process_shard(self, ctx: StageContext, shard: str, workdir: Path) -> pa.Table:
        from distributed import get_worker

        (workdir / f"{shard}.worker").write_text(str(get_worker().name))
        return make_fates([f"{shard}-0"], "kept", detail=str(os.getpid()))


def test_a_stage_asking_for_a_gpu_runs_only_on_workers_that_offer_one(tmp_path: Path):
    from distributed import Client, Nanny, Scheduler, SpecCluster

    cluster = SpecCluster(
        scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0", "host": "127.0.0.1"}},
        workers={
            "cpu-worker": {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1"}},
            "gpu-worker": {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1", "resources": {"GPU": 1}}},
        },
    )
    executor = DaskExecutor(DaskConfig(), scheduler=cluster.scheduler_address)
    config = validate_config({"output": str(tmp_path), "input": {"path": "unused"}})
    ctx = StageContext(config, RunLayout(tmp_path), "fp")
    shards = [f"{i:05d}" for i in range(6)]
    try:
        list(executor.map_shards(WhereDidItRun(needs_gpu=True), ctx, shards, workers=2))
        gpu_names = {(tmp_path / "where" / f"{s}.worker").read_text() for s in shards}
    finally:
        executor.close()
        Client(cluster).close()
        cluster.close()
    assert gpu_names == {"gpu-worker"}


class FailsOnOneShard(Stage):
    """A stage whose `bad` shard raises on every attempt while `switch` exists; each attempt leaves a file.
    With `config_error` it raises a ConfigError (what a task finds that no retry can mend)."""

    name: ClassVar[str] = "flaky"

    def __init__(self, bad: str, switch: Path, attempts: Path, config_error: bool = False) -> None:
        self.bad, self.switch, self.attempts, self.config_error = bad, switch, attempts, config_error

    def setup(self) -> None:
        pass

    def expected_uids(self, ctx: StageContext, shard: str) -> pa.Array:
        return pa.array([f"{shard}-0"])

    def process_shard(self, ctx: StageContext, shard: str, workdir: Path) -> pa.Table:
        if shard == self.bad and self.switch.exists():
            (self.attempts / f"{shard}.{os.getpid()}.{len(list(self.attempts.iterdir()))}").touch()
            if self.config_error:
                raise ConfigError(f"embed.device: cuda:3 is not on this worker (shard {shard})")
            raise ValueError(f"unreadable tar for shard {shard}")
        return make_fates([f"{shard}-0"], "kept")


def test_a_shard_that_keeps_failing_ends_the_run_naming_it_and_keeps_what_was_done(tmp_path: Path):
    from curate.runner import ShardFailed, ShardState, shard_state

    switch, attempts = tmp_path / "fail", tmp_path / "attempts"
    switch.touch()
    attempts.mkdir()
    config = validate_config({"output": str(tmp_path / "run"), "input": {"path": "unused"}})
    ctx = StageContext(config, RunLayout(tmp_path / "run"), "fp")
    shards = [f"{i:05d}" for i in range(6)]
    stage = FailsOnOneShard("00005", switch, attempts)
    executor = DaskExecutor(DaskConfig(n_workers=1, shard_retries=2, dashboard_address=":0"))
    try:
        with pytest.raises(ShardFailed, match=r"stage 'flaky' failed on shard 00005: ValueError: unreadable tar"):
            list(executor.map_shards(stage, ctx, shards, workers=1))
        tries = len(list(attempts.iterdir()))
        done_after_failure = [s for s in shards if shard_state(ctx, "flaky", s) is ShardState.DONE]
        switch.unlink()  # the fault is mended; the next run does only what is left
        reports = list(executor.map_shards(stage, ctx, shards, workers=1))

        switch.touch()  # a config error in a task: raised in the driver as itself, after one attempt
        for tried in attempts.iterdir():
            tried.unlink()
        elsewhere = StageContext(config, RunLayout(tmp_path / "run-config"), "fp")
        misconfigured = FailsOnOneShard("00005", switch, attempts, config_error=True)
        with pytest.raises(ConfigError, match=r"^embed\.device: cuda:3 is not on this worker \(shard 00005\)$"):
            list(executor.map_shards(misconfigured, elsewhere, shards, workers=1))
        config_tries = len(list(attempts.iterdir()))
    finally:
        executor.close()
    assert config_tries == 1  # not retried: dask.shard_retries is for faults a retry can mend
    assert tries == 3  # the first attempt and dask.shard_retries=2 more
    assert done_after_failure == shards[:5]  # one worker ran the shards in order: all others were committed
    assert sorted(r.shard for r in reports if r.skipped) == shards[:5]
    assert [r.shard for r in reports if not r.skipped] == ["00005"]
    assert all(shard_state(ctx, "flaky", s) is ShardState.DONE for s in shards)


def kill_one_worker_when_embedding_starts(executor: DaskExecutor, run_dir: Path, killed: dict[str, Any]) -> None:
    """Waits for the first committed embed shard, then snapshots every marker of the run and SIGKILLs one worker
    process."""
    import signal
    import time

    pids = executor.client.run(os.getpid)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if len(list((run_dir / "embed" / "_done").glob("*.json"))) >= 1:
            victim = sorted(pids.values())[0]
            killed["markers"] = {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("_done/**/*.json")}
            os.kill(victim, signal.SIGKILL)
            killed["pid"] = victim
            return
        time.sleep(0.02)


def test_a_worker_killed_during_embed_costs_only_its_shards(
    served_world: ServedWorld, tmp_path: Path, tiny_checkpoint: Path
):
    import threading

    overrides = full_pipeline_overrides(tiny_checkpoint)
    local_dir, dask_dir = tmp_path / "local-run", tmp_path / "dask-run"
    run_pipeline(load_config(served_world.pipeline(tmp_path / "l", output=local_dir), overrides))
    dask_config = load_config(served_world.pipeline(tmp_path / "d", output=dask_dir), [*overrides, "executor=dask"])
    for stage in ("input", "download"):  # the kill must land in embed, not in download
        run_pipeline(dask_config, only_stage=stage)

    executor = DaskExecutor(DaskConfig(n_workers=2, shard_retries=3))
    killed: dict[str, Any] = {}
    killer = threading.Thread(target=kill_one_worker_when_embedding_starts, args=(executor, dask_dir, killed))
    killer.start()
    try:
        result = run_pipeline(dask_config, executor=executor)
    finally:
        killer.join()
        executor.close()
    assert killed, "no worker was killed: embed finished before the first marker was seen"
    assert result.complete
    assert any(m.startswith("embed/_done/") for m in killed["markers"])
    # what was committed before the kill (input, download, the first embed shards) was not redone
    assert {m: (dask_dir / m).read_bytes() for m in killed["markers"]} == killed["markers"]

    ledger = read_ledger(dask_dir)
    assert len(ledger) == len(served_world.world.truth) and ledger.uid.is_unique
    columns = ["uid", "status", "stage", "reason"]
    local = read_ledger(local_dir)[columns].sort_values("uid").reset_index(drop=True)
    assert local.equals(ledger[columns].sort_values("uid").reset_index(drop=True))
    curated = tar_samples_in(dask_dir / "curated")
    assert len(curated) == len(set(curated)) == int((ledger.status == "kept").sum())
    assert sorted(curated) == sorted(ledger.loc[ledger.status == "kept", "uid"])


def tar_samples_in(folder: Path) -> list[str]:
    import tarfile

    uids = []
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            uids += [m.name.split(".")[0] for m in tar if m.name.endswith(".json")]
    return uids


def readme_dask_config() -> dict[str, Any]:
    """The README's Dask config for a cluster one starts oneself, as dotted keys."""
    import yaml

    block = readme_section("Running on a Dask cluster").split("```yaml\n", 1)[1].split("```", 1)[0]

    def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        items: dict[str, Any] = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                items |= flat(value, f"{prefix}{key}.")
            else:
                items[f"{prefix}{key}"] = value
        return items

    return flat(yaml.safe_load(block))


def test_the_readmes_dask_config_is_what_the_local_cluster_sets_and_leaves_dasks_safeguards_on():
    import dask
    import distributed  # noqa: F401  (loads Dask's distributed defaults)

    from curate.executors.dask import worker_environment

    readme = readme_dask_config()
    assert readme == {
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
        "distributed.worker.daemon": False,
        "distributed.worker.profile.enabled": False,
        "distributed.worker.memory.monitor-interval": "500ms",
        "distributed.admin.tick.interval": "1s",
        "distributed.admin.system-monitor.interval": "2s",
    }
    with worker_environment():  # what curate's LocalCluster starts its scheduler, nannies and workers under
        assert {key: dask.config.get(key) for key in readme} == readme
        assert dask.config.get("distributed.admin.tick.limit") == "3s"  # a blocked event loop is still reported
        assert dask.config.get("distributed.worker.memory.terminate") == 0.95  # and a worker over its limit stopped


def test_curate_run_joins_a_running_scheduler_runs_its_tasks_there_and_prints_the_dashboard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from urllib.parse import urlparse

    from distributed import Client, LocalCluster, get_task_stream

    from curate.cli import main

    rows = "".join(f"http://127.0.0.1:9/{i}.jpg,a dog {i}\n" for i in range(5))
    (tmp_path / "crawl.csv").write_text(f"url,caption\n{rows}")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"output: {tmp_path / 'run'}\nstages: [input]\ninput:\n  path: {tmp_path / 'crawl.csv'}\n")
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0")
    client = Client(cluster)
    try:
        with get_task_stream(client) as stream:
            command = ["run", str(pipeline), "--executor", "dask", "--scheduler", cluster.scheduler_address]
            assert main([*command, "--no-progress"]) == 0
        port = urlparse(client.dashboard_link).port
    finally:
        client.close()
        cluster.close()
    printed = capsys.readouterr().out.splitlines()[0]  # the CLI prints it before the run starts
    assert printed.startswith("dask dashboard: http://") and urlparse(printed.split(": ", 1)[1]).port == port
    assert {str(task["key"]).split("-")[0] for task in stream.data} >= {"input", "ledger"}
    assert len(read_ledger(tmp_path / "run")) == 5
