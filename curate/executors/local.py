"""Run tasks in this process, or in a pool of spawned worker processes.

Each pool process takes a rank (0, 1, ... in the order they start) before its first task; a stage's setup reads
it with `worker_rank()` to pick its share of the machine (the embed stage: one GPU per worker). Each also learns
its share of the host's cores (`curate.cores.task_threads`), unless the environment already sets one.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from curate.cores import TASK_THREADS_ENV, share_of
from curate.executors import ConfigFailure, ShardMapping, execute_task, reported
from curate.processes import exit_with_parent
from curate.runner import ShardFailed, TaskReport
from curate.stage import Stage, StageContext

log = logging.getLogger(__name__)

_rank: int | None = None


def worker_rank() -> int | None:
    """This process's rank in the local executor's pool; None outside a pool (in the driver, on Dask)."""
    return _rank


def _join_pool(counter: Any, pool_size: int, driver: int) -> None:
    """Pool initializer: the next free rank of this pool and this process's share of the cores; the process
    ends with the driver."""
    global _rank
    exit_with_parent(driver)
    os.environ.setdefault(TASK_THREADS_ENV, str(share_of(pool_size)))
    with counter.get_lock():
        _rank = counter.value
        counter.value += 1


class LocalExecutor(ShardMapping):
    def __init__(self, shard_retries: int = 1) -> None:
        self.shard_retries = shard_retries

    def map_tasks(
        self,
        stage: Stage,
        ctx: StageContext,
        phase: str,
        tasks: list[str],
        workers: int,
        resources: dict[str, float] | None = None,
    ) -> Iterator[TaskReport]:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                yield self._run_with_retries(stage, ctx, phase, task)
            return
        # spawn, not fork: img2dataset and torch are not fork-safe once threads exist
        context = multiprocessing.get_context("spawn")
        ranks = context.Value("i", 0)
        size = min(workers, len(tasks))
        pool = ProcessPoolExecutor(
            max_workers=size, mp_context=context, initializer=_join_pool, initargs=(ranks, size, os.getpid())
        )
        with pool:
            attempts = dict.fromkeys(tasks, 0)
            running: dict[Future[TaskReport | ConfigFailure], str] = {
                pool.submit(execute_task, stage, ctx, phase, t): t for t in tasks
            }
            try:
                while running:
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        task = running.pop(future)
                        error = future.exception()
                        if error is None:
                            yield reported(future.result())
                            continue
                        attempts[task] += 1
                        if attempts[task] > self.shard_retries:
                            raise ShardFailed(stage.name, task, error, phase) from error
                        log.warning("stage %s %s %s failed (%s); retrying", stage.name, phase, task, error)
                        running[pool.submit(execute_task, stage, ctx, phase, task)] = task
            finally:
                for future in running:
                    future.cancel()

    def _run_with_retries(self, stage: Stage, ctx: StageContext, phase: str, task: str) -> TaskReport:
        for attempt in range(self.shard_retries + 1):
            try:
                outcome = execute_task(stage, ctx, phase, task)
            except Exception as error:
                if attempt == self.shard_retries:
                    raise ShardFailed(stage.name, task, error, phase) from error
                log.warning("stage %s %s %s failed (%s); retrying", stage.name, phase, task, error)
                continue
            return reported(outcome)
        raise AssertionError("unreachable")

    def close(self) -> None:
        pass
