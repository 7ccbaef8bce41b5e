"""Executors schedule shards; the stage code they run is the same everywhere (`curate.runner.run_shard`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from curate.runner import ShardReport
from curate.stage import ShardStage, StageContext


class Executor(Protocol):
    def map_shards(
        self, stage: ShardStage, ctx: StageContext, shards: list[str], workers: int
    ) -> Iterator[ShardReport]: ...

    def close(self) -> None: ...
