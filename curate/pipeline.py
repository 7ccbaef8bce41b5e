"""Run the configured stages in order over the run's shards, then merge the ledger and check it."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from curate.config import NON_FATE_STAGES, PipelineConfig, dump_config
from curate.executors import Executor
from curate.executors.local import LocalExecutor
from curate.stages.input import STAGE as INPUT_STAGE
from curate.stages.input import InputError, build_input, input_fingerprint, inspect_sources, read_manifest
from curate.io.fs import read_json, temp_sibling, write_bytes_atomic, write_json_atomic
from curate.ledger import LEDGER_SCHEMA, FateError, StageStats, Status, ledger_table, merge_ledger, read_fate_parts
from curate.runner import (
    ShardState,
    clear_scratch,
    marker_stats,
    remove_orphans,
    shard_state,
)
from curate.stage import RunLayout, ShardStage, StageContext

log = logging.getLogger(__name__)

# Settings that change how fast a stage runs, never what it produces: not part of its fingerprint.
SCHEDULING_KEYS = {
    "download": {"threads", "processes", "per_host_connections"},
    "embed": {"batch_size", "decode_threads", "workers", "device"},
    "validate": {"device", "checkpoint_every", "decode_workers", "eval_batch_size"},
}


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


def fate_stages(config: PipelineConfig) -> list[str]:
    """The configured stages that decide fates per shard (materialize only copies what they kept)."""
    return [name for name in config.stages if name not in NON_FATE_STAGES]


def make_stage(name: str, config: PipelineConfig) -> ShardStage:
    if name == "download":
        from curate.stages.download import DownloadStage

        return DownloadStage(config.download)
    if name == "embed":
        from curate.stages.embed import EmbedStage

        return EmbedStage(config.embed)
    if name == "filter":
        from curate.stages.filters import FilterStage

        return FilterStage(config.filter)
    if name == "dedup":
        from curate.stages.dedup.stage import DedupStage

        return DedupStage(config.dedup, config.embed)
    raise ValueError(f"unknown stage {name!r}")


def stage_workers(name: str, config: PipelineConfig) -> int:
    return {"download": config.download.processes, "embed": config.embed.workers}.get(name, 1)


def stage_fingerprints(config: PipelineConfig, input_print: str) -> dict[str, str]:
    """Each stage's fingerprint covers its own settings and every upstream fingerprint."""
    prints = {INPUT_STAGE: input_print}
    previous = input_print
    for name in config.stages[1:]:
        settings = getattr(config, name).model_dump(mode="json", exclude=SCHEDULING_KEYS.get(name, set()))
        if name == "embed":
            settings["files"] = file_identities([config.embed.model, config.embed.pretrained])
        digest = hashlib.sha256(f"{name}|{previous}|{sorted(settings.items())}".encode()).hexdigest()[:16]
        prints[name] = previous = digest
    return prints


def file_identities(values: list[str | None]) -> list[list[object]]:
    """Size and mtime of the values that are files (a checkpoint replaced in place is a new model)."""
    identities: list[list[object]] = []
    for value in values:
        if value and Path(value).is_file():
            stat = Path(value).stat()
            identities.append([value, stat.st_size, stat.st_mtime_ns])
    return identities


def run_pipeline(
    config: PipelineConfig,
    *,
    executor: Executor | None = None,
    only_stage: str | None = None,
    progress: ProgressFactory | None = None,
) -> RunResult:
    """Run all configured stages (or `only_stage`, whose upstream must be done). Raises InputError
    before writing anything when an input file is unusable."""
    progress = progress or (lambda *_args: nullcontext(_NoProgress()))
    executor = executor or LocalExecutor()
    layout = RunLayout(Path(config.output))
    stages = {name: make_stage(name, config) for name in fate_stages(config)[1:]}
    for stage in stages.values():
        preflight = getattr(stage, "preflight", None)
        if preflight is not None:
            preflight()  # raises ConfigError (unknown model, missing file) before anything is written
    sources = inspect_sources(config.input)
    prints = stage_fingerprints(config, input_fingerprint(config.input, sources))

    first_created = first_missing_ancestor(layout.root)
    manifest = read_manifest(layout.stage_dir(INPUT_STAGE))
    if only_stage in (None, INPUT_STAGE) and (manifest is None or manifest["fingerprint"] != prints[INPUT_STAGE]):
        layout.root.mkdir(parents=True, exist_ok=True)
        try:
            log.info("input: reading %d file(s)", len(sources))
            build_input(config.input, sources, layout.stage_dir(INPUT_STAGE), prints[INPUT_STAGE])
        except BaseException:
            if first_created is not None:
                shutil.rmtree(first_created, ignore_errors=True)
            raise
        manifest = read_manifest(layout.stage_dir(INPUT_STAGE))
    if manifest is None or manifest["fingerprint"] != prints[INPUT_STAGE]:
        raise IncompleteRun(f"{layout.root}: the input stage is not done for this config; run it first")
    write_bytes_atomic(layout.config_path, dump_config(config).encode())

    shards: list[str] = list(manifest["shards"])
    for name in fate_stages(config)[1:]:
        if only_stage not in (None, name):
            continue
        stage = stages[name]
        ctx = StageContext(config, layout, prints[name])
        _require_upstream_done(config, layout, prints, name, shards)
        remove_orphans(ctx, name, shards)
        clear_scratch(ctx, name)
        prepare = getattr(stage, "prepare", None)
        if prepare is not None:
            prepare(ctx, shards)  # a global step in the driver, e.g. a run-wide score cutoff
        pending = [s for s in shards if shard_state(ctx, name, s) is not ShardState.DONE]
        log.info("%s: %d of %d shards to run", name, len(pending), len(shards))
        with progress(name, len(shards)) as bar:
            bar.update(len(shards) - len(pending))
            for _report in executor.map_shards(stage, ctx, pending, stage_workers(name, config)):
                bar.update(1)
        clear_scratch(ctx, name)
    if "materialize" in config.stages and only_stage in (None, "materialize"):
        run_materialize(config, layout, prints, shards)
    result = finalize_run(config, layout, prints, shards, int(manifest["rows"]))
    if result.complete and "validate" in config.stages and only_stage in (None, "validate"):
        from curate.stages.validate.stage import run_validation

        run_validation(config, layout, progress)
    return result


def run_materialize(config: PipelineConfig, layout: RunLayout, prints: dict[str, str], shards: list[str]) -> None:
    from curate.stages.materialize import is_done, materialize

    last = fate_stages(config)[-1]
    _require_upstream_done(config, layout, prints, "materialize", shards)
    if not is_done(layout, prints["materialize"]):
        materialize(config.materialize, layout, shards, last, prints["materialize"])


def first_missing_ancestor(path: Path) -> Path | None:
    """The outermost folder that creating `path` would create, or None when it exists."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def _require_upstream_done(
    config: PipelineConfig, layout: RunLayout, prints: dict[str, str], name: str, shards: list[str]
) -> None:
    upstream = config.stages[config.stages.index(name) - 1]
    if upstream == INPUT_STAGE:
        return
    ctx = StageContext(config, layout, prints[upstream])
    not_done = [s for s in shards if shard_state(ctx, upstream, s) is not ShardState.DONE]
    if not_done:
        raise IncompleteRun(f"stage {name!r} needs {upstream!r}, which has {len(not_done)} shards not done")


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass


def collect_stats(
    config: PipelineConfig, layout: RunLayout, prints: dict[str, str], shards: list[str]
) -> tuple[dict[str, StageStats], dict[str, dict[str, int]]]:
    """Sum of per-shard marker stats per stage, and per stage the shard states."""
    stats: dict[str, StageStats] = {}
    states: dict[str, dict[str, int]] = {}
    for name in fate_stages(config):
        ctx = StageContext(config, layout, prints[name])
        total, state_counts = StageStats(), {state.value: 0 for state in ShardState}
        for shard in shards:
            state = shard_state(ctx, name, shard)
            state_counts[state.value] += 1
            if state is ShardState.DONE:
                total = total + marker_stats(ctx, name, shard)
        stats[name], states[name] = total, state_counts
    return stats, states


def finalize_run(
    config: PipelineConfig, layout: RunLayout, prints: dict[str, str], shards: list[str], rows: int
) -> RunResult:
    stats, states = collect_stats(config, layout, prints, shards)
    result = RunResult(layout, rows, stats)
    stages = fate_stages(config)
    if any(states[name][ShardState.DONE.value] != len(shards) for name in stages):
        return result
    if "materialize" in config.stages:
        from curate.stages.materialize import count_curated_samples, is_done

        if not is_done(layout, prints["materialize"]):
            return result
    ledger_rows, ledger_kept = write_ledger(stages, layout, shards)
    check_run_invariants(ledger_rows, ledger_kept, stats, rows, stages)
    if "materialize" in config.stages:
        curated = count_curated_samples(layout)
        if curated != ledger_kept:
            raise FateError(f"curated/ holds {curated} samples but the ledger keeps {ledger_kept}")
    write_json_atomic(layout.stats_path, stats_document(stats, rows, prints, layout))
    result.complete = True
    return result


def write_ledger(stages: list[str], layout: RunLayout, shards: list[str]) -> tuple[int, int]:
    """Merge the fates shard by shard (a uid never changes shard), so memory stays one shard deep."""
    rows = kept = 0
    tmp = temp_sibling(layout.ledger_path)
    try:
        with pq.ParquetWriter(tmp, LEDGER_SCHEMA) as writer:
            for shard in shards:
                parts = [(name, read_fate_parts([layout.fates_path(name, shard)])) for name in stages]
                ledger = merge_ledger(parts)
                writer.write_table(ledger_table(ledger))
                rows += len(ledger)
                kept += int((ledger["status"] == Status.KEPT.value).sum())
        os.replace(tmp, layout.ledger_path)
    finally:
        tmp.unlink(missing_ok=True)
    return rows, kept


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
        if summary.exists():
            stages[name]["summary"] = read_json(summary)
    return {"input_rows": rows, "stages": stages}


def run_status(run_dir: Path) -> dict[str, Any]:
    """Per-stage shard states and counts of an existing run, from its saved config and markers."""
    from curate.config import load_config

    layout = RunLayout(run_dir)
    if not layout.config_path.exists():
        raise FileNotFoundError(f"{run_dir}: not a curate run (no config.yaml)")
    config = load_config(layout.config_path)
    manifest = read_manifest(layout.stage_dir(INPUT_STAGE))
    if manifest is None:
        raise FileNotFoundError(f"{run_dir}: the input stage has not finished")
    prints = {INPUT_STAGE: str(manifest["fingerprint"])}
    try:
        prints = stage_fingerprints(config, input_fingerprint(config.input, inspect_sources(config.input)))
    except InputError as err:
        log.warning("cannot re-check the input files (%s); using the recorded input fingerprint", err)
        prints = stage_fingerprints(config, prints[INPUT_STAGE])
    shards = list(manifest["shards"])
    stats, states = collect_stats(config, layout, prints, shards)
    ledger_rows = pq.read_metadata(layout.ledger_path).num_rows if layout.ledger_path.exists() else None
    return {
        "run": str(run_dir),
        "input_rows": manifest["rows"],
        "shards": len(shards),
        "ledger_rows": ledger_rows,
        "stages": {name: {"shards": states[name], **stats[name].to_json()} for name in fate_stages(config)},
        "top_failures": top_failures(layout, stats),
    }


def top_failures(layout: RunLayout, stats: dict[str, StageStats], limit: int = 8) -> list[dict[str, Any]]:
    """The most frequent failed/dropped reasons across stages, with their most common detail when a
    ledger exists (it tells, say, a robots.txt timeout from a plain timeout)."""
    totals = [
        {"stage": stage, "outcome": key, "rows": rows}
        for stage, stage_stats in stats.items()
        for key, rows in stage_stats.counts.items()
        if key != Status.KEPT.value
    ]
    totals.sort(key=lambda item: (-item["rows"], item["stage"], item["outcome"]))
    totals = totals[:limit]
    if totals and layout.ledger_path.exists():
        ledger = pq.read_table(layout.ledger_path, columns=["stage", "status", "reason", "detail"]).to_pandas()
        for item in totals:
            status, _, reason = item["outcome"].partition("/")
            same = ledger[(ledger.stage == item["stage"]) & (ledger.status == status) & (ledger.reason == reason)]
            details = same["detail"].dropna()
            item["common_detail"] = str(details.mode().iloc[0])[:160] if len(details) else None
    return totals
