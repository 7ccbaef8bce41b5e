"""The same pipeline on a real Dask LocalCluster (worker processes) gives the same result as locally."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pytest

from curate.config import DaskConfig, load_config, validate_config
from curate.executors.dask import DaskExecutor
from curate.ledger import make_fates, read_ledger
from curate.pipeline import run_pipeline
from curate.stage import RunLayout, StageContext
from tests.test_download import tar_samples
from tests.world_fixtures import ServedWorld

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


class WhereDidItRun:
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
