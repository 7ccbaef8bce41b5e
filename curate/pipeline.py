"""Run the pipeline: one loop over the planned stages and their phases; every task goes through an executor.

A task whose marker holds this run's fingerprint (and whose listed files are intact) is skipped, so a
second run of a finished pipeline reads markers and does no stage work.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from curate.config import PipelineConfig, dump_config
from curate.executors import Executor
from curate.executors.local import LocalExecutor
from curate.io.lock import run_lock
from curate.ledger import FateError, StageStats, Status
from curate.runner import TaskReport, clear_scratch, marker_stats, remove_orphans, sweep_leftovers, task_state
from curate.stage import FATE_PHASE, Phase, RunLayout, ShardState, Stage, StageContext, digest
from curate.stages import fate_stage_names, plan
from curate.stages.download import DownloadOutputs
from curate.stages.input import InputError, InputOutputs, InputStage, discard_unfinished
from curate.stages.ledger import LedgerOutputs, LedgerStage

log = logging.getLogger(__name__)

ProgressFactory = Callable[..., AbstractContextManager[Any]]
"""progress(description, total, unit="shard") -> a context manager giving a bar with update(n) and set_postfix()."""


class IncompleteRun(RuntimeError):
    """The run finished without error but is not complete and consistent."""


@dataclass
class RunResult:
    layout: RunLayout
    rows: int
    stats: dict[str, StageStats] = field(default_factory=dict)
    complete: bool = False
    tasks_run: int = 0
    """Tasks that did work in this call (0 when everything was already done)."""


def fate_stages(config: PipelineConfig) -> list[str]:
    """The configured stages that decide fates per shard (materialize only copies what they kept)."""
    return fate_stage_names(config.stages)


def stage_fingerprints(stages: list[Stage], input_print: str | None = None) -> dict[str, str]:
    """Each stage's fingerprint covers its own settings and, chained, everything upstream. The first stage
    after the shard-local ones (download, embed) also covers the run's `curate retry` attempts, which change
    download shards without changing a setting. `input_print`: the input stage's recorded fingerprint, for
    when its files cannot be read again."""
    prints: dict[str, str] = {}
    upstream = ""
    for previous, stage in zip([None, *stages], stages, strict=False):
        if previous is not None and previous.shard_local and not stage.shard_local:
            upstream = with_retries(upstream, RunLayout.of_config(stage.config))
        if input_print is not None and isinstance(stage, InputStage):
            prints[stage.name] = upstream = input_print
        else:
            prints[stage.name] = upstream = stage.fingerprint(upstream)
    return prints


def with_retries(upstream: str, layout: RunLayout) -> str:
    attempts = DownloadOutputs(layout).retry_attempts()
    return digest({"upstream": upstream, "retries": attempts}) if attempts else upstream


def run_pipeline(
    config: PipelineConfig,
    *,
    executor: Executor | None = None,
    only_stage: str | None = None,
    progress: ProgressFactory | None = None,
) -> RunResult:
    """Run all planned stages (or `only_stage`, whose upstream must be done). Raises ConfigError (InputError
    among them) before writing anything when the config or an input file is unusable."""
    progress = progress or no_progress
    executor = executor or LocalExecutor()
    layout = RunLayout.of_config(config)
    stages = plan(config)
    for stage in stages:
        stage.preflight()  # ConfigError / InputError (unknown model, unusable file) before anything is written
    if layout.mirror is not None:
        layout.mirror.check_writable()
    prints = stage_fingerprints(stages)
    first_created = None if layout.remote else first_missing_ancestor(layout.root)
    tasks_run = 0
    try:
        with run_lock(layout.root):
            sweep_leftovers(layout)
            shards: tuple[str, ...] = ()
            for stage in stages:
                ctx = StageContext(config, layout, prints[stage.name], shards)
                if only_stage in (None, stage.name) or isinstance(stage, LedgerStage):
                    if only_stage is not None:
                        if isinstance(stage, LedgerStage) and not upstream_done(stages, stage, layout, prints, shards):
                            continue  # the ledger is written once every stage that decides fates is done
                        require_upstream_done(stages, stage, layout, prints, shards)
                    tasks_run += run_stage(stage, ctx, executor, progress)
                if isinstance(stage, InputStage):
                    if not stage_done(stage, ctx):
                        raise IncompleteRun(
                            f"{layout.label}: the input stage is not done for this config; run it first"
                        )
                    shards = tuple(InputOutputs(layout).shards())
                    layout.write_bytes(layout.config_path, dump_config(config).encode())
    except InputError:
        if first_created is not None:
            shutil.rmtree(first_created, ignore_errors=True)
        else:
            discard_unfinished(layout)
        raise
    result = finalize_run(config, stages, layout, prints, list(shards))
    result.tasks_run = tasks_run
    return result


def run_stage(stage: Stage, ctx: StageContext, executor: Executor, progress: ProgressFactory | None = None) -> int:
    """Every phase of `stage`, in order; returns how many tasks did work."""
    progress = progress or no_progress
    ran = 0
    for phase in stage.phases():
        tasks = phase.tasks(ctx)
        remove_orphans(ctx, stage, phase, tasks)
        pending = [task for task in tasks if task_state(ctx, stage.name, task, phase) is not ShardState.DONE]
        log.info("%s %s: %d of %d tasks to run", stage.name, phase.name, len(pending), len(tasks))
        if not pending:
            continue
        clear_scratch(ctx, stage.name)
        label = stage.name if phase.name == FATE_PHASE else f"{stage.name}:{phase.name}"
        resources = phase.resources if phase.resources is not None else stage.resources()
        workers = phase.workers or stage.workers()
        samples: int | None = None
        with progress(label, len(tasks)) as bar:
            bar.update(len(tasks) - len(pending))
            for report in executor.map_tasks(stage, ctx, phase.name, pending, workers, resources):
                ran += not report.skipped
                if (done := task_samples(report)) is not None:
                    samples = (samples or 0) + done
                    bar.set_postfix(samples=samples, refresh=False)
                bar.update(1)
        clear_scratch(ctx, stage.name)
    return ran


def task_samples(report: TaskReport) -> int | None:
    """The samples a task went through: its "samples" count, or the rows it gave fates (None for a task that
    counts other things, such as training steps)."""
    counts = report.stats.counts
    if "samples" in counts:
        return int(counts["samples"])
    fates = all(key == Status.KEPT.value or "/" in key for key in counts)
    return report.stats.rows if fates else None


def stage_done(stage: Stage, ctx: StageContext) -> bool:
    for phase in stage.phases():
        if any(task_state(ctx, stage.name, task, phase) is not ShardState.DONE for task in phase.tasks(ctx)):
            return False
    return True


def upstream_done(
    stages: list[Stage], stage: Stage, layout: RunLayout, prints: dict[str, str], shards: tuple[str, ...]
) -> bool:
    index = stages.index(stage)
    if index == 0:
        return True
    upstream = stages[index - 1]
    return stage_done(upstream, StageContext(upstream.config, layout, prints[upstream.name], shards))


def require_upstream_done(
    stages: list[Stage], stage: Stage, layout: RunLayout, prints: dict[str, str], shards: tuple[str, ...]
) -> None:
    if not upstream_done(stages, stage, layout, prints, shards):
        upstream = stages[stages.index(stage) - 1]
        raise IncompleteRun(f"stage {stage.name!r} needs {upstream.name!r}, which is not done")


def first_missing_ancestor(path: Path) -> Path | None:
    """The outermost folder that creating `path` would create, or None when it exists."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass


def no_progress(*_args: Any, **_kwargs: Any) -> AbstractContextManager[Any]:
    return nullcontext(_NoProgress())


def collect_stats(
    config: PipelineConfig, layout: RunLayout, prints: dict[str, str], shards: list[str]
) -> tuple[dict[str, StageStats], dict[str, dict[str, int]]]:
    """Sum of per-shard marker stats per fate stage, and per stage the shard states."""
    stats: dict[str, StageStats] = {}
    states: dict[str, dict[str, int]] = {}
    phases = {stage.name: fate_phase_of(stage) for stage in plan(config)}  # with it, markers' files are checked
    for name in fate_stages(config):
        ctx = StageContext(config, layout, prints[name], tuple(shards))
        total, state_counts = StageStats(), {state.value: 0 for state in ShardState if state is not ShardState.DAMAGED}
        for shard in shards:
            state = task_state(ctx, name, shard, phases[name])
            state_counts[state.value] = state_counts.get(state.value, 0) + 1  # "damaged" only when there are
            if state is ShardState.DONE:
                total = total + marker_stats(ctx, name, shard)
        stats[name], states[name] = total, state_counts
    return stats, states


def fate_phase_of(stage: Stage) -> Phase | str:
    """The stage's per-shard fate phase, or its name for a stage that writes its shards' markers otherwise."""
    try:
        return stage.phase(FATE_PHASE)
    except KeyError:
        return FATE_PHASE


def finalize_run(
    config: PipelineConfig, stages: list[Stage], layout: RunLayout, prints: dict[str, str], shards: list[str]
) -> RunResult:
    """Complete when every planned stage is done; then the run-wide invariants are checked from markers."""
    manifest = InputOutputs(layout).manifest()
    rows = int(manifest["rows"]) if manifest else 0  # type: ignore[index]
    stats, _ = collect_stats(config, layout, prints, shards)
    result = RunResult(layout, rows, stats)
    if not all(stage_done(s, StageContext(config, layout, prints[s.name], tuple(shards))) for s in stages):
        return result
    ledger = marker_stats(StageContext(config, layout, prints[LedgerStage.name]), LedgerStage.name, "all", "merge")
    check_run_invariants(ledger.counts["rows"], ledger.counts["kept"], stats, rows, fate_stages(config))
    layout.write_json(layout.stats_path, stats_document(stats, rows, prints, layout))
    result.complete = True
    return result


def check_run_invariants(
    ledger_rows: int, ledger_kept: int, stats: dict[str, StageStats], rows: int, stages: list[str]
) -> None:
    if ledger_rows != rows:
        raise FateError(f"ledger has {ledger_rows} rows for {rows} input rows")
    accounted = sum(s.rows - s.kept for s in stats.values()) + stats[stages[-1]].kept
    if accounted != rows:
        raise FateError(f"per-stage counts add up to {accounted}, not to the {rows} input rows")
    if ledger_kept != stats[stages[-1]].kept:
        raise FateError(f"ledger keeps {ledger_kept} rows but the last stage kept {stats[stages[-1]].kept}")


def stats_document(
    stats: dict[str, StageStats], rows: int, prints: dict[str, str], layout: RunLayout
) -> dict[str, Any]:
    stages = {}
    for name, stage_stats in stats.items():
        stages[name] = {**stage_stats.to_json(), "fingerprint": prints[name]}
        summary = layout.stage_dir(name) / "summary.json"
        with contextlib.suppress(FileNotFoundError):
            stages[name]["summary"] = layout.read_json(summary)
    return {"input_rows": rows, "stages": stages}


def run_status(run_dir: Path | str) -> dict[str, Any]:
    """Per-stage shard states and counts of an existing run, from its saved config and markers."""
    layout = RunLayout.of(run_dir)
    config = saved_config(layout)
    manifest = InputOutputs(layout).manifest()
    if manifest is None:
        raise FileNotFoundError(f"{run_dir}: the input stage has not finished")
    stages = plan(config)
    try:
        prints = stage_fingerprints(stages)
    except InputError as err:
        log.warning("cannot re-check the input files (%s); using the recorded input fingerprint", err)
        prints = stage_fingerprints(stages, input_print=InputOutputs(layout).recorded_fingerprint())
    shards = list(manifest["shards"])  # type: ignore[call-overload]
    stats, states = collect_stats(config, layout, prints, shards)
    ledger = layout.fetch(layout.ledger_path)
    ledger_rows = pq.read_metadata(ledger).num_rows if ledger.exists() else None
    return {
        "run": str(run_dir),
        "input_rows": manifest["rows"],
        "shards": len(shards),
        "ledger_rows": ledger_rows,
        "stages": {name: {"shards": states[name], **stats[name].to_json()} for name in fate_stages(config)},
        "top_failures": top_failures(layout, stats),
    }


def saved_config(layout: RunLayout) -> PipelineConfig:
    """The config a run was made with (its config.yaml); FileNotFoundError when it is not a curate run."""
    from curate.config import load_config

    path = layout.fetch(layout.config_path)  # on a bucket, one request whether or not it is there
    if not path.exists():
        raise FileNotFoundError(f"{layout.label}: not a curate run (no config.yaml)")
    return load_config(path)


def top_failures(layout: RunLayout, stats: dict[str, StageStats], limit: int = 8) -> list[dict[str, Any]]:
    """The most frequent failed/dropped reasons across stages, with their most common detail once the
    ledger is written (it tells, say, a robots.txt timeout from a plain timeout)."""
    totals = [
        {"stage": stage, "outcome": key, "rows": rows}
        for stage, stage_stats in stats.items()
        for key, rows in stage_stats.counts.items()
        if key != Status.KEPT.value
    ]
    totals.sort(key=lambda item: (-item["rows"], item["stage"], item["outcome"]))
    totals = totals[:limit]
    details = LedgerOutputs(layout).details()
    if totals and details is not None:
        for item in totals:
            common = details.get(f"{item['stage']}/{item['outcome']}", {}).get("details", {})
            item["common_detail"] = next(iter(common), None)
    return totals
