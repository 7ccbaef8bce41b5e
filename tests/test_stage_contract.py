"""The stage contract on real runs: markers make a finished run a no-op (also moved, with a re-copied input),
run-wide phases resume task by task after a SIGKILL (of the driver, or of one Dask worker), empty shards
pass every stage, embed asks Dask for a GPU, and a new stage is one class plus one registry entry."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import curate.stages
from curate.config import ConfigError, DaskConfig, PipelineConfig, load_config
from curate.executors.dask import DaskExecutor, pre_spawn_keys
from curate.ledger import Status, make_fates, read_ledger
from curate.pipeline import RunResult, run_pipeline
from curate.runner import ShardFailed
from curate.stage import RunLayout, Stage, StageContext
from curate.stages.filters import FilterOutputs
from curate.stages.materialize import CuratedOutputs
from tests.world_fixtures import ServedWorld, full_pipeline_overrides

REPO = Path(__file__).resolve().parent.parent
LEDGER_COLUMNS = ["uid", "status", "stage", "reason", "detail"]


def overrides(checkpoint: Path, *extra: str) -> list[str]:
    return [*full_pipeline_overrides(checkpoint), "materialize.samples_per_shard=10", *extra]


def markers(run_dir: Path) -> dict[str, int]:
    """Every done-marker of the run with its modification time."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("_done/**/*.json")}


def ledger_of(run_dir: Path) -> pd.DataFrame:
    return read_ledger(run_dir)[LEDGER_COLUMNS].sort_values("uid").reset_index(drop=True)


def curated_uids(run_dir: Path) -> list[tuple[int, int]]:
    return np.load(CuratedOutputs(run_dir).uids_path).tolist()


@pytest.fixture(scope="module")
def finished(served_world: ServedWorld, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """(pipeline, overrides, run) of one finished run, which the tests copy before changing anything."""
    folder = tmp_path_factory.mktemp("contract")
    pipeline = served_world.pipeline(folder, output=folder / "run")
    settings = overrides(tiny_checkpoint)
    result = run_pipeline(load_config(pipeline, settings))
    assert result.complete and result.tasks_run > 0
    assert len(CuratedOutputs(result.layout).shards()) >= 3  # materialize's tasks are several output shards
    return pipeline, settings, result


def copy_run(result: RunResult, dest: Path) -> Path:
    shutil.copytree(result.layout.root, dest)
    return dest


def test_a_finished_run_does_no_work_again_also_moved_and_with_its_input_and_weights_copied(
    finished: tuple[Path, list[str], RunResult], served_world: ServedWorld, tmp_path: Path
) -> None:
    pipeline, settings, result = finished
    before = markers(result.layout.root)
    started = time.perf_counter()
    again = run_pipeline(load_config(pipeline, settings))
    assert again.complete and again.tasks_run == 0
    assert time.perf_counter() - started < 10
    assert markers(result.layout.root) == before

    moved = copy_run(result, tmp_path / "elsewhere" / "moved-run")
    table = tmp_path / "recopied" / served_world.table.name  # same name and bytes, a new path and mtime
    table.parent.mkdir()
    table.write_bytes(served_world.table.read_bytes())
    checkpoint = tmp_path / "recopied" / "weights.pt"  # the model's weights, copied under another name
    checkpoint.write_bytes(
        Path(next(s for s in settings if s.startswith("embed.pretrained=")).split("=", 1)[1]).read_bytes()
    )
    moved_settings = [*settings, f"output={moved}", f"input.path={table}", f"embed.pretrained={checkpoint}"]
    config = load_config(pipeline, moved_settings)
    moved_again = run_pipeline(config)
    assert moved_again.complete and moved_again.tasks_run == 0
    assert ledger_of(moved).equals(ledger_of(result.layout.root))


@pytest.mark.parametrize(
    ("kill_at", "redone"),
    [("dedup:screen:00002", ["dedup", "ledger", "materialize"]), ("materialize:shards:00001", ["materialize"])],
)
def test_a_run_killed_in_a_run_wide_phase_resumes_without_redoing_finished_tasks(
    finished: tuple[Path, list[str], RunResult], tmp_path: Path, kill_at: str, redone: list[str]
) -> None:
    pipeline, settings, result = finished
    run_dir = copy_run(result, tmp_path / "run")
    for name in [*redone, "curated"]:
        shutil.rmtree(run_dir / name)
    if "ledger" in redone:
        (run_dir / "ledger.parquet").unlink()
    command = [sys.executable, "-m", "tests.kill_during", kill_at, str(pipeline), *settings, f"output={run_dir}"]
    killed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]

    stage, phase, task = kill_at.split(":")
    done_before = markers(run_dir)
    assert any(m.startswith(f"{stage}/_done/") for m in done_before), "nothing of the killed stage was committed"
    assert not RunLayout(run_dir).marker_path(stage, task, phase).exists()
    assert list((run_dir / stage / "_tmp").iterdir()), "the killed task left its scratch files"

    resumed = run_pipeline(load_config(pipeline, [*settings, f"output={run_dir}"]))
    assert resumed.complete
    after = markers(run_dir)
    assert {m: after[m] for m in done_before} == done_before  # no finished task ran again
    assert ledger_of(run_dir).equals(ledger_of(result.layout.root))
    assert curated_uids(run_dir) == curated_uids(result.layout.root)
    assert not (run_dir / stage / "_tmp").exists()


def kill_a_worker_in_the_middle_of(
    executor: DaskExecutor, run_dir: Path, stage: str, phase: str, tasks: int, stop: threading.Event, killed: dict
) -> None:
    """Once some but not all of the phase's tasks are committed, snapshots every marker of the run and SIGKILLs a
    worker that holds the result of one of them: Dask runs that task again, with the ones the worker was running."""
    pids = executor.client.run(os.getpid)
    folder = RunLayout(run_dir).marker_dir(stage, phase)
    while not stop.is_set():
        committed = len(list(folder.glob("*.json")))
        if committed >= tasks:
            return
        if committed:
            held = executor.client.has_what()
            holders = [pids[w] for w, keys in held.items() if any(str(k).startswith(f"{stage}-{phase}-") for k in keys)]
            if holders:
                killed["markers"] = {
                    str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("_done/**/*.json")
                }
                os.kill(holders[0], signal.SIGKILL)
                killed["pid"], killed["unfinished"] = holders[0], tasks - len(list(folder.glob("*.json")))
                return
        time.sleep(0.005)


def is_daemon() -> bool:
    import multiprocessing

    return multiprocessing.current_process().daemon


def test_a_dask_worker_killed_in_a_run_wide_dedup_phase_costs_only_its_tasks(
    finished: tuple[Path, list[str], RunResult], tmp_path: Path
) -> None:
    from distributed import get_task_stream

    environment = {key: os.environ.get(key) for key in pre_spawn_keys()}
    pipeline, settings, result = finished
    stage, phase = "dedup", "screen"
    tasks = len(list(result.layout.marker_dir(stage, phase).glob("*.json")))
    run_dir = copy_run(result, tmp_path / "run")
    for name in ["dedup", "ledger", "materialize", "curated"]:
        shutil.rmtree(run_dir / name)
    (run_dir / "ledger.parquet").unlink()
    config = load_config(pipeline, [*settings, f"output={run_dir}", "executor=dask"])

    executor = DaskExecutor(DaskConfig(n_workers=2, shard_retries=3))
    stop, killed = threading.Event(), {}
    killer = threading.Thread(
        target=kill_a_worker_in_the_middle_of, args=(executor, run_dir, stage, phase, tasks, stop, killed)
    )
    killer.start()
    try:
        with get_task_stream(executor.client) as stream:
            run = run_pipeline(config, executor=executor)
        survivors = executor.client.run(os.getpid)
        daemonic = executor.client.run(is_daemon)
    finally:
        stop.set()
        killer.join()
        executor.close()
    # the restarted worker can start processes like the others; the nanny's variables left this process at close
    assert set(daemonic.values()) == {False} and len(daemonic) == 2
    assert {key: os.environ.get(key) for key in pre_spawn_keys()} == environment
    assert killed, f"no worker was killed: {stage}:{phase} finished before the killer saw one of its tasks committed"
    assert killed["unfinished"] > 0 and killed["pid"] not in survivors.values()
    assert any(m.startswith(f"{stage}/_done/{phase}/") for m in killed["markers"])
    ran = [task["key"] for task in stream.data if task["key"].startswith(f"{stage}-{phase}-")]
    assert len(ran) > len(set(ran)) == tasks  # a task the dead worker had finished ran again

    assert run.complete
    assert {m: (run_dir / m).read_bytes() for m in killed["markers"]} == killed["markers"]
    assert ledger_of(run_dir).equals(ledger_of(result.layout.root))
    assert curated_uids(run_dir) == curated_uids(result.layout.root)
    assert not (run_dir / stage / "_tmp").exists()


def test_a_shard_with_no_samples_left_goes_through_every_stage(
    served_world: ServedWorld, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    crawl = pd.read_parquet(served_world.table)
    missing = pd.DataFrame(
        {"url": [f"{served_world.server.base_url}/no/such/image-{i}.jpg" for i in range(8)], "caption": "lost"}
    )
    table = tmp_path / "crawl.parquet"
    pd.concat([missing, crawl], ignore_index=True).to_parquet(table, index=False)  # shard 00000: all 404
    pipeline = served_world.pipeline(tmp_path, output=tmp_path / "run")
    result = run_pipeline(load_config(pipeline, overrides(tiny_checkpoint, f"input.path={table}")))
    assert result.complete
    ledger = read_ledger(tmp_path / "run")
    lost = ledger[ledger.caption == "lost"]
    assert len(lost) == 8 and (lost.reason == "http_404").all() and (lost.stage == "download").all()
    assert len(ledger) == len(crawl) + 8 and ledger.uid.is_unique


def test_a_threshold_nothing_passes_completes_with_an_empty_curated_set(
    finished: tuple[Path, list[str], RunResult], tmp_path: Path
) -> None:
    pipeline, settings, result = finished
    run_dir = copy_run(result, tmp_path / "run")
    strict = run_pipeline(load_config(pipeline, [*settings, f"output={run_dir}", "filter.clip_threshold=0.999"]))
    assert strict.complete
    ledger = read_ledger(run_dir)
    assert (ledger.status != Status.KEPT.value).all() and len(ledger) == len(read_ledger(result.layout.root))
    assert CuratedOutputs(run_dir).shards() == [] and len(np.load(CuratedOutputs(run_dir).uids_path)) == 0
    assert FilterOutputs(run_dir).summary()["clip_cutoff"] == pytest.approx(0.999)


# ---------------------------------------------------------------- GPU resources


def downloaded_run(finished: tuple[Path, list[str], RunResult], tmp_path: Path, *extra: str):
    """A copy of the finished run without its embeddings, and the config that embeds on cuda through Dask."""
    pipeline, settings, result = finished
    run_dir = copy_run(result, tmp_path / "run")
    shutil.rmtree(run_dir / "embed")  # the device only changes speed: embed's markers would still count as done
    config = load_config(pipeline, [*settings, f"output={run_dir}", "embed.device=cuda", "executor=dask", *extra])
    return config, run_dir


def fake_a_cuda_device() -> None:
    import torch

    torch.cuda.is_available = lambda: True


@contextmanager
def spec_cluster(config: PipelineConfig, workers: dict[str, dict[str, float]]) -> Iterator[DaskExecutor]:
    """An executor on a cluster of one-thread workers, each named and offering the resources given."""
    from distributed import Client, Nanny, Scheduler, SpecCluster

    cluster = SpecCluster(
        scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0", "host": "127.0.0.1"}},
        workers={
            name: {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1", "resources": resources}}
            for name, resources in workers.items()
        },
    )
    executor = DaskExecutor(config.dask, scheduler=cluster.scheduler_address)
    try:
        yield executor
    finally:
        executor.close()
        Client(cluster).close()
        cluster.close()


def test_the_real_embed_stage_on_cuda_runs_only_on_the_gpu_worker(
    finished: tuple[Path, list[str], RunResult], tmp_path: Path
) -> None:
    from distributed import get_task_stream

    config, _ = downloaded_run(finished, tmp_path, "dask.shard_retries=0")
    with spec_cluster(config, {"cpu-worker": {}, "gpu-worker": {"GPU": 1}}) as executor:
        names = {addr: info["name"] for addr, info in executor.client.scheduler_info()["workers"].items()}
        gpu_address = next(addr for addr, name in names.items() if name == "gpu-worker")
        executor.client.run(fake_a_cuda_device, workers=[gpu_address])  # torch there says a GPU is present
        with get_task_stream(executor.client) as stream, pytest.raises(ShardFailed) as failed:
            run_pipeline(config, executor=executor, only_stage="embed")
        ran_on = {names[task["worker"]] for task in stream.data if task["key"].startswith("embed-")}
    assert ran_on == {"gpu-worker"}
    # the model reached the (absent) device on the GPU worker; a CPU worker would have refused at once
    assert "torch sees no CUDA device" not in str(failed.value)


def test_a_gpu_worker_whose_torch_sees_no_cuda_device_stops_the_run_with_the_config_error_after_one_try(
    finished: tuple[Path, list[str], RunResult], tmp_path: Path
) -> None:
    from distributed import get_task_stream

    config, run_dir = downloaded_run(finished, tmp_path, "dask.shard_retries=2")
    with spec_cluster(config, {"gpu-worker": {"GPU": 1}}) as executor:
        with get_task_stream(executor.client) as stream, pytest.raises(ConfigError) as error:
            run_pipeline(config, executor=executor, only_stage="embed")
        tries = [task["key"] for task in stream.data if task["key"].startswith("embed-")]
    # the real stage's model load on the worker found no device: one line, as on a machine without one
    assert str(error.value).startswith("embed.device is 'cuda' but") and "\n" not in str(error.value)
    assert len(tries) == len(set(tries)) >= 1  # a config error is not retried: dask.shard_retries is for faults
    assert not list((run_dir / "embed").glob("_done/*.json"))


def test_a_cluster_without_a_gpu_worker_fails_at_once_naming_the_resource(
    finished: tuple[Path, list[str], RunResult], tmp_path: Path
) -> None:
    config, run_dir = downloaded_run(finished, tmp_path)
    executor = DaskExecutor(DaskConfig(n_workers=1, dashboard_address=":0"))
    try:
        started = time.perf_counter()
        with pytest.raises(ConfigError, match=r"stage 'embed' needs worker resource GPU=1 but none of the"):
            run_pipeline(config, executor=executor, only_stage="embed")
        assert time.perf_counter() - started < 10
    finally:
        executor.close()
    assert not (run_dir / "embed" / "_done").exists()


def test_cuda_on_a_machine_without_one_is_a_config_error_before_anything_is_written(tmp_path: Path) -> None:
    table = tmp_path / "crawl.csv"
    table.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a red circle\n")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"output: {tmp_path / 'run'}\ninput:\n  path: {table}\nembed:\n  model: curate-tiny\n")
    command = [sys.executable, "-m", "curate", "run", str(pipeline), "--set", "embed.device=cuda"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("curate: error: embed.device is 'cuda' but")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- a new stage


class CaptionAuditStage(Stage):
    """A stage only this test knows: drops the samples whose caption names a colour it was told to avoid."""

    name = "audit"
    avoid = "red"

    def expected_uids(self, ctx: StageContext, shard: str) -> pa.Array:
        from curate.stages.dedup.stage import DedupOutputs

        return DedupOutputs(ctx.layout).kept_uids(shard)

    def process_shard(self, ctx: StageContext, shard: str, workdir: Path) -> pa.Table:

        from curate.stages.input import InputOutputs

        uids = self.expected_uids(ctx, shard).to_pylist()
        captions = InputOutputs(ctx.layout).fates(shard, ["uid", "caption"])
        by_uid = dict(zip(captions["uid"].to_pylist(), captions["caption"].to_pylist(), strict=True))
        avoided = [self.avoid in by_uid[uid] for uid in uids]
        return make_fates(
            uids, ["dropped" if a else "kept" for a in avoided], ["audit_colour" if a else None for a in avoided]
        )


def test_a_new_stage_is_one_class_and_one_registry_line(
    finished: tuple[Path, list[str], RunResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = curate.stages.STAGES
    position = registry.index(curate.stages.DedupStage) + 1
    monkeypatch.setattr(curate.stages, "STAGES", (*registry[:position], CaptionAuditStage, *registry[position:]))
    pipeline, settings, result = finished
    run_dir = copy_run(result, tmp_path / "run")
    stages = "stages=[input,download,embed,filter,dedup,audit,materialize]"
    audited = run_pipeline(load_config(pipeline, [*settings, f"output={run_dir}", stages]))

    assert audited.complete and "audit" in audited.stats
    ledger = read_ledger(run_dir)
    before = read_ledger(result.layout.root).set_index("uid")
    dropped = ledger[ledger.reason == "audit_colour"]
    assert len(dropped) > 0 and dropped.caption.str.contains("red").all()
    assert (before.loc[dropped.uid, "status"] == "kept").all()  # they were kept before the new stage
    kept = ledger[ledger.status == "kept"]
    assert not kept.caption.str.contains("red").any()
    assert len(np.load(CuratedOutputs(run_dir).uids_path)) == len(kept)
    assert os.listdir(run_dir / "audit" / "fates")


def test_status_names_the_commonest_detail_from_the_ledger_summary_not_the_ledger(
    finished: tuple[Path, list[str], RunResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    from curate.pipeline import run_status

    _, _, result = finished
    ledger = read_ledger(result.layout.root)
    reads: list[str] = []
    read_table = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda path, *a, **k: reads.append(str(path)) or read_table(path, *a, **k))
    status = run_status(result.layout.root)
    assert not [path for path in reads if path.endswith("ledger.parquet")]
    top = {(item["stage"], item["outcome"]): item for item in status["top_failures"]}
    lost = ledger[ledger.status != "kept"]
    for (stage, outcome), item in top.items():
        status_, reason = outcome.split("/")
        rows = lost[(lost.stage == stage) & (lost.status == status_) & (lost.reason == reason)]
        assert item["rows"] == len(rows)
        if rows.detail.notna().any():
            counts = rows.detail.dropna().str[:160].value_counts()
            assert counts[item["common_detail"]] == counts.max()  # one of the commonest (ties: any of them)


def test_uids_npy_from_buckets_is_every_kept_uid_sorted(
    finished: tuple[Path, list[str], RunResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from curate.stages import materialize
    from curate.stages.materialize import uid_array

    pipeline, settings, result = finished
    run_dir = copy_run(result, tmp_path / "run")
    shutil.rmtree(run_dir / "materialize")
    shutil.rmtree(run_dir / "curated")
    monkeypatch.setattr(materialize, "BUCKET_UIDS", 16)  # several buckets even for this small run
    again = run_pipeline(load_config(pipeline, [*settings, f"output={run_dir}"]))
    assert again.complete
    buckets = sorted((run_dir / "materialize" / "_done" / "buckets").glob("*.json"))
    assert len(buckets) >= 4
    kept = read_ledger(run_dir).query("status == 'kept'").uid.tolist()
    uids = np.load(CuratedOutputs(run_dir).uids_path)
    assert uids.dtype == np.dtype("u8,u8") and np.array_equal(uids, uid_array(kept))
    assert np.array_equal(uids, np.load(CuratedOutputs(result.layout).uids_path))


def test_only_settings_written_like_paths_are_fingerprinted_by_content(tmp_path: Path, monkeypatch) -> None:
    from curate.stage import identify_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "curate").mkdir()
    (tmp_path / "curate" / "module.py").write_text("edited often")
    (tmp_path / "weights.pt").write_bytes(b"\0" * 10)
    settings = {"user_agent_token": "curate", "model": "ViT-B-32", "pretrained": "weights.pt", "evals": "./curate"}
    identified = identify_paths(settings)
    assert identified["user_agent_token"] == "curate" and identified["model"] == "ViT-B-32"
    assert identified["pretrained"]["size"] == 10
    assert identified["evals"]["folder"][0]["name"] == "module.py"


def test_each_stage_has_the_phases_the_readme_lists_and_the_ledger_follows_the_last_deciding_stage(
    tmp_path: Path,
) -> None:
    """README, "Design": the STAGES loop and each stage's phases, every optional one switched on."""
    from curate.config import validate_config
    from curate.stages import plan

    config = validate_config(
        {
            "output": str(tmp_path / "run"),
            "input": {"path": str(tmp_path / "crawl.parquet"), "uid_col": "uid"},
            "stages": ["input", "download", "embed", "filter", "dedup", "materialize", "validate"],
            "dedup": {"eval_sets": [str(tmp_path / "eval")], "semantic_eps": 0.1},
            "validate": {"eval_set": str(tmp_path / "eval")},
        }
    )
    assert {stage.name: [phase.name for phase in stage.phases()] for stage in plan(config)} == {
        "input": ["files", "plan", "buckets", "uids", "repeats", "shards", "manifest"],
        "download": ["shards"],
        "embed": ["shards"],
        "filter": ["counts", "plan", "refine", "cutoff", "shards"],
        "dedup": ["eval", "plan", "screen", "exact", "train", "assign", "near", "groups", "semantic", "shards"],
        "ledger": ["parts", "merge"],
        "materialize": ["shards", "uids", "buckets", "index"],
        "validate": ["subsets", "runs", "metrics"],
    }
    assert [stage.name for stage in plan(config)][4:7] == ["dedup", "ledger", "materialize"]
