"""Executors schedule tasks; the code they run is the same everywhere (`curate.runner.run_task`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from curate.config import ConfigError
from curate.runner import TaskReport, run_task
from curate.stage import FATE_PHASE, Stage, StageContext


class Executor(Protocol):
    def map_tasks(
        self, stage: Stage, ctx: StageContext, phase: str, tasks: list[str], workers: int, resources: dict[str, float]
    ) -> Iterator[TaskReport]: ...

    def close(self) -> None: ...


class ShardMapping:
    """`map_shards`: a stage's per-shard fate phase through the executor's own `map_tasks`."""

    def map_shards(self, stage: Stage, ctx: StageContext, shards: list[str], workers: int) -> Iterator[TaskReport]:
        return self.map_tasks(stage, ctx, FATE_PHASE, shards, workers, stage.resources())  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ConfigFailure:
    """A task found a config error (a cuda device that this worker lacks, an unusable input file): retrying
    cannot help, so it comes back as a value the executor raises in the driver, not as a task failure."""

    error: ConfigError


def execute_task(stage: Stage, ctx: StageContext, phase: str, task: str) -> TaskReport | ConfigFailure:
    try:
        return run_task(stage, ctx, phase, task)
    except ConfigError as err:
        return ConfigFailure(err)


def reported(outcome: TaskReport | ConfigFailure) -> TaskReport:
    if isinstance(outcome, ConfigFailure):
        raise outcome.error
    return outcome
