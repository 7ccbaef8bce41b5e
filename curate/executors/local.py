"""Run shards in this process, or in a pool of spawned worker processes."""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

from curate.runner import ShardFailed, ShardReport, run_shard
from curate.stage import ShardStage, StageContext

log = logging.getLogger(__name__)


class LocalExecutor:
    def __init__(self, shard_retries: int = 1) -> None:
        self.shard_retries = shard_retries

    def map_shards(
        self, stage: ShardStage, ctx: StageContext, shards: list[str], workers: int
    ) -> Iterator[ShardReport]:
        if workers <= 1 or len(shards) <= 1:
            for shard in shards:
                yield self._run_with_retries(stage, ctx, shard)
            return
        # spawn, not fork: img2dataset and torch are not fork-safe once threads exist
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(shards)), mp_context=context) as pool:
            attempts = dict.fromkeys(shards, 0)
            running: dict[Future[ShardReport], str] = {pool.submit(run_shard, stage, ctx, s): s for s in shards}
            try:
                while running:
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        shard = running.pop(future)
                        error = future.exception()
                        if error is None:
                            yield future.result()
                            continue
                        attempts[shard] += 1
                        if attempts[shard] > self.shard_retries:
                            raise ShardFailed(stage.name, shard, error) from error
                        log.warning("stage %s shard %s failed (%s); retrying", stage.name, shard, error)
                        running[pool.submit(run_shard, stage, ctx, shard)] = shard
            finally:
                for future in running:
                    future.cancel()

    def _run_with_retries(self, stage: ShardStage, ctx: StageContext, shard: str) -> ShardReport:
        for attempt in range(self.shard_retries + 1):
            try:
                return run_shard(stage, ctx, shard)
            except Exception as error:
                if attempt == self.shard_retries:
                    raise ShardFailed(stage.name, shard, error) from error
                log.warning("stage %s shard %s failed (%s); retrying", stage.name, shard, error)
        raise AssertionError("unreachable")

    def close(self) -> None:
        pass
