"""Run shards as Dask tasks: on a LocalCluster of worker processes, or on an existing cluster.

One task per shard (never per image). The task is the same `run_shard` the local executor calls, so a
re-executed task (Dask re-runs a dead worker's tasks, finished ones included) commits the same files
again: shard commits are idempotent. A stage whose model must run on a GPU asks for the `GPU` worker
resource; workers offer it when started with `dask worker ... --resources GPU=1`. The output
directory must be on a filesystem that every worker sees.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

from curate.config import DaskConfig
from curate.runner import ShardFailed, ShardReport, run_shard
from curate.stage import ShardStage, StageContext

log = logging.getLogger(__name__)


class DaskExecutor:
    def __init__(self, cfg: DaskConfig, scheduler: str | None = None) -> None:
        from distributed import Client, LocalCluster

        self.cfg = cfg
        self.cluster = None
        if scheduler:
            self.client = Client(scheduler)
        else:
            self.cluster = LocalCluster(
                n_workers=cfg.n_workers,
                threads_per_worker=cfg.threads_per_worker,
                processes=True,
                host="127.0.0.1",
                memory_limit=cfg.memory_limit,
                dashboard_address=cfg.dashboard_address,
            )
            self.client = Client(self.cluster)
        log.info("dask dashboard: %s", self.dashboard_link)

    @property
    def dashboard_link(self) -> str:
        return str(self.client.dashboard_link)

    def map_shards(
        self, stage: ShardStage, ctx: StageContext, shards: list[str], workers: int
    ) -> Iterator[ShardReport]:
        from distributed import as_completed

        if not shards:
            return
        resources = stage_resources(stage)
        submission = uuid.uuid4().hex[:8]  # a fresh key per submission: Dask remembers keys it has seen
        futures = self.client.map(
            run_shard,
            [stage] * len(shards),
            [ctx] * len(shards),
            shards,
            key=[f"{stage.name}-{shard}-{submission}" for shard in shards],
            resources=resources,
            retries=self.cfg.shard_retries,
            pure=False,
        )
        shard_of = {future.key: shard for future, shard in zip(futures, shards, strict=True)}
        try:
            for future in as_completed(futures):
                if future.status == "error":
                    error = future.exception()
                    raise ShardFailed(stage.name, shard_of[future.key], f"{type(error).__name__}: {error}")
                yield future.result()
        finally:
            unfinished = [future for future in futures if not future.done()]
            if unfinished:
                self.client.cancel(unfinished)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def stage_resources(stage: ShardStage) -> dict[str, Any] | None:
    """Worker resources a stage's tasks need, e.g. {"GPU": 1} for a model on cuda."""
    wanted = getattr(stage, "resources", None)
    return wanted() if callable(wanted) else None
