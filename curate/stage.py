"""The contract every per-shard stage follows, and the context it runs in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import pyarrow as pa

if TYPE_CHECKING:
    from curate.config import PipelineConfig


@dataclass(frozen=True)
class RunLayout:
    """Where a run keeps each stage's outputs, fate parts and done-markers."""

    root: Path

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def fates_path(self, stage: str, shard: str) -> Path:
        return self.stage_dir(stage) / "fates" / f"{shard}.parquet"

    def marker_path(self, stage: str, shard: str) -> Path:
        return self.stage_dir(stage) / "_done" / f"{shard}.json"

    def scratch_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / "_tmp"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.parquet"

    @property
    def stats_path(self) -> Path:
        return self.root / "stats.json"


@dataclass(frozen=True)
class StageContext:
    config: PipelineConfig
    layout: RunLayout
    fingerprint: str
    """Fingerprint of this stage's config and of everything upstream; a marker with another one is stale."""


def kept_uids(layout: RunLayout, stage: str, shard: str) -> pa.Array:
    """The uids `stage` kept in `shard`: what the next stage must decide."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fates = pq.read_table(layout.fates_path(stage, shard), columns=["uid", "status"])
    return fates.filter(pc.equal(fates["status"], "kept"))["uid"].combine_chunks()


class ShardStage(Protocol):
    """A stage that turns one shard into outputs plus exactly one fate per uid it was given.

    `process_shard` writes its outputs under `workdir` with the paths they must have under the stage
    directory; the runner checks the fates, renames the outputs into place and writes the marker last.
    Expected failures (a 404, a bad image) are fates; anything raised fails the shard.
    """

    name: ClassVar[str]

    def expected_uids(self, ctx: StageContext, shard: str) -> pa.Array: ...

    def setup(self) -> None:
        """Once per worker process, before its first shard (load models here, not in __init__)."""

    def process_shard(self, ctx: StageContext, shard: str, workdir: Path) -> pa.Table: ...
