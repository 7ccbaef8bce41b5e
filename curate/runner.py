"""Run one stage on one shard: skip when done, write to a scratch dir, check, rename, marker last."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from curate.io.fs import move_tree_into, read_json, write_json_atomic, write_parquet_atomic
from curate.ledger import StageStats, check_fates, count_fates
from curate.stage import ShardStage, StageContext

log = logging.getLogger(__name__)

_WORKER_STAGES: dict[tuple[str, str, str], ShardStage] = {}


class ShardState(StrEnum):
    DONE = "done"
    STALE = "stale"
    PENDING = "pending"


@dataclass(frozen=True)
class ShardReport:
    stage: str
    shard: str
    stats: StageStats
    skipped: bool


class ShardFailed(RuntimeError):
    def __init__(self, stage: str, shard: str, cause: BaseException | str) -> None:
        super().__init__(f"stage {stage!r} failed on shard {shard}: {cause}")
        self.stage, self.shard = stage, shard


def shard_state(ctx: StageContext, stage: str, shard: str) -> ShardState:
    marker = ctx.layout.marker_path(stage, shard)
    if not marker.exists():
        return ShardState.PENDING
    return ShardState.DONE if read_json(marker).get("fingerprint") == ctx.fingerprint else ShardState.STALE


def marker_stats(ctx: StageContext, stage: str, shard: str) -> StageStats:
    marker = read_json(ctx.layout.marker_path(stage, shard))
    return StageStats(Counter(marker["counts"]), marker["seconds"])


def worker_stage(stage: ShardStage, ctx: StageContext) -> ShardStage:
    """The set-up copy of `stage` in this process: models load once per worker, not once per shard."""
    # A stage pickles without its loaded resources, so equal pickles mean an equivalent stage.
    key = (stage.name, ctx.fingerprint, hashlib.sha256(pickle.dumps(stage)).hexdigest())
    if key not in _WORKER_STAGES:
        stage.setup()
        _WORKER_STAGES[key] = stage
    return _WORKER_STAGES[key]


def clear_worker_stages() -> None:
    """Forget this process's set-up stages, and with them their loaded models."""
    _WORKER_STAGES.clear()


def run_shard(stage: ShardStage, ctx: StageContext, shard: str) -> ShardReport:
    """Idempotent: running it twice, or in two processes at once, leaves the same committed result."""
    if shard_state(ctx, stage.name, shard) is ShardState.DONE:
        return ShardReport(stage.name, shard, marker_stats(ctx, stage.name, shard), skipped=True)
    stage = worker_stage(stage, ctx)
    layout = ctx.layout
    layout.marker_path(stage.name, shard).unlink(missing_ok=True)
    workdir = layout.scratch_dir(stage.name) / f"{shard}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    workdir.mkdir(parents=True)
    started = time.perf_counter()
    try:
        expected = stage.expected_uids(ctx, shard)
        fates = stage.process_shard(ctx, shard, workdir)
        check_fates(fates, expected, where=f"stage {stage.name!r}, shard {shard}")
        write_parquet_atomic(
            fates, workdir / layout.fates_path(stage.name, shard).relative_to(layout.stage_dir(stage.name))
        )
        move_tree_into(workdir, layout.stage_dir(stage.name))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stats = StageStats(count_fates(fates), time.perf_counter() - started)
    write_json_atomic(
        layout.marker_path(stage.name, shard),
        {"fingerprint": ctx.fingerprint, "counts": dict(stats.counts), "seconds": stats.seconds},
    )
    log.debug("stage %s shard %s: %s", stage.name, shard, dict(stats.counts))
    return ShardReport(stage.name, shard, stats, skipped=False)


def clear_scratch(ctx: StageContext, stage: str) -> None:
    """Remove leftovers of shards that died before committing (safe only when nothing is running)."""
    shutil.rmtree(ctx.layout.scratch_dir(stage), ignore_errors=True)


def remove_orphans(ctx: StageContext, stage: str, shards: list[str]) -> None:
    """Forget markers and fate parts of shards that are no longer part of the run."""
    wanted = set(shards)
    for kind in ("_done", "fates"):
        folder = ctx.layout.stage_dir(stage) / kind
        if folder.exists():
            for path in folder.iterdir():
                if path.stem not in wanted:
                    path.unlink()


def shard_paths(ctx: StageContext, stage: str, shards: list[str]) -> list[Path]:
    return [ctx.layout.fates_path(stage, shard) for shard in shards]
