"""Run one task of one phase: skip when done, write to a scratch dir, check, put in place, marker last."""

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
from pathlib import Path

from curate.io.fs import (
    SCRATCH_SUFFIX,
    is_scratch_name,
    move_tree_into,
    replace_dir,
    write_parquet_atomic,
)
from curate.ledger import StageStats, check_fates, count_fates
from curate.stage import FATE_PHASE, Phase, RunLayout, ShardState, Stage, StageContext, TaskOutput

log = logging.getLogger(__name__)

_WORKER_STAGES: dict[tuple[str, str, str], Stage] = {}


@dataclass(frozen=True)
class TaskReport:
    stage: str
    shard: str
    """The task's name: a shard for per-shard phases."""
    stats: StageStats
    skipped: bool
    phase: str = FATE_PHASE


ShardReport = TaskReport


class ShardFailed(RuntimeError):
    def __init__(self, stage: str, shard: str, cause: BaseException | str, phase: str = FATE_PHASE) -> None:
        where = f"shard {shard}" if phase == FATE_PHASE else f"phase {phase!r} task {shard}"
        super().__init__(f"stage {stage!r} failed on {where}: {cause}")
        self.stage, self.shard = stage, shard


def output_root(phase: Phase, ctx: StageContext, stage: str) -> Path:
    return phase.output_root(ctx) if phase.output_root else ctx.layout.stage_dir(stage)


def task_state(ctx: StageContext, stage: str, task: str, phase: Phase | str = FATE_PHASE) -> ShardState:
    """done only when the marker has this fingerprint and every file it lists is there with its size."""
    phase_name = phase if isinstance(phase, str) else phase.name
    marker_path = ctx.layout.marker_path(stage, task, phase_name)
    try:
        marker = ctx.layout.read_json(marker_path)
    except FileNotFoundError:
        return ShardState.PENDING
    except ValueError:  # a marker cut short by a crash of an older version: not done
        return ShardState.PENDING
    if marker.get("fingerprint") != ctx.fingerprint:
        return ShardState.STALE
    files = marker.get("files")
    if files and not isinstance(phase, str):
        root = output_root(phase, ctx, stage)
        for relative, size in files.items():
            path = root / relative
            if ctx.layout.size(path) != size:
                where = ctx.layout.where(path)
                log.warning("stage %s %s %s: %s is missing or damaged; redoing it", stage, phase_name, task, where)
                return ShardState.DAMAGED
    return ShardState.DONE


def shard_state(ctx: StageContext, stage: str, shard: str) -> ShardState:
    return task_state(ctx, stage, shard)


def marker_stats(ctx: StageContext, stage: str, task: str, phase: str = FATE_PHASE) -> StageStats:
    marker = ctx.layout.marker(stage, task, phase)
    return StageStats(Counter(marker["counts"]), marker["seconds"])


def worker_stage(stage: Stage, ctx: StageContext) -> Stage:
    """The set-up copy of `stage` in this process: models load once per worker, not once per task."""
    # A stage pickles without its loaded resources, so equal pickles mean an equivalent stage.
    key = (stage.name, ctx.fingerprint, hashlib.sha256(pickle.dumps(stage)).hexdigest())
    if key not in _WORKER_STAGES:
        stage.setup()
        _WORKER_STAGES[key] = stage
    return _WORKER_STAGES[key]


def clear_worker_stages() -> None:
    """Forget this process's set-up stages, and with them their loaded models."""
    _WORKER_STAGES.clear()


def run_shard(stage: Stage, ctx: StageContext, shard: str) -> TaskReport:
    return run_task(stage, ctx, FATE_PHASE, shard)


def run_task(stage: Stage, ctx: StageContext, phase_name: str, task: str) -> TaskReport:
    """Idempotent: running it twice, or in two processes at once, leaves the same committed result."""
    with ctx.layout.task_scope():
        return _run_task(stage, ctx, phase_name, task)


def _run_task(stage: Stage, ctx: StageContext, phase_name: str, task: str) -> TaskReport:
    phase = stage.phase(phase_name)
    if task_state(ctx, stage.name, task, phase) is ShardState.DONE:
        return TaskReport(stage.name, task, marker_stats(ctx, stage.name, task, phase_name), True, phase_name)
    stage = worker_stage(stage, ctx)
    phase = stage.phase(phase_name)
    layout = ctx.layout
    marker = layout.marker_path(stage.name, task, phase_name)
    if phase.commit != "replace":  # a replaced folder takes its old marker with it, and only on success
        layout.delete(marker)
    root = output_root(phase, ctx, stage.name)
    workdir = scratch_workdir(ctx, stage.name, phase, root, task)
    started = time.perf_counter()
    try:
        result = phase.run(ctx, task, workdir)
        output = result if isinstance(result, TaskOutput) else TaskOutput(fates=result)
        counts = Counter(output.counts)
        if phase.decides_fates:
            assert phase.expected is not None and output.fates is not None, f"{stage.name}: a fate phase returns fates"
            check_fates(output.fates, phase.expected(ctx, task), where=f"stage {stage.name!r}, shard {task}")
            fates_path = layout.fates_path(stage.name, task)
            write_parquet_atomic(output.fates, workdir / fates_path.relative_to(root))
            counts = count_fates(output.fates)
        files = commit(phase, workdir, root, output.files)
        publish(layout, phase, root, files)
    finally:
        if phase.commit != "in_place":
            shutil.rmtree(workdir, ignore_errors=True)
    stats = StageStats(counts, time.perf_counter() - started)
    layout.write_json(  # last: for a run on a bucket, the marker is the only truth about the task's objects
        marker,
        {"fingerprint": ctx.fingerprint, "counts": dict(stats.counts), "seconds": stats.seconds, "files": files},
    )
    log.debug("stage %s %s %s: %s", stage.name, phase_name, task, dict(stats.counts))
    return TaskReport(stage.name, task, stats, False, phase_name)


def scratch_workdir(ctx: StageContext, stage: str, phase: Phase, root: Path, task: str) -> Path:
    if phase.commit == "in_place":
        root.mkdir(parents=True, exist_ok=True)
        return root
    unique = f"{task}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    if phase.commit == "replace":  # beside the folder it replaces
        workdir = root.parent / f".{root.name}.{unique}{SCRATCH_SUFFIX}"
    else:
        workdir = ctx.layout.scratch_dir(stage) / unique
    workdir.mkdir(parents=True)
    return workdir


def commit(phase: Phase, workdir: Path, root: Path, in_place: tuple[str, ...] = ()) -> dict[str, int]:
    """Put the task's files in place; returns them (relative to `root`) with their sizes, for the marker."""
    if phase.commit == "in_place":
        return {name: (root / name).stat().st_size for name in in_place}
    files = {str(p.relative_to(workdir)): p.stat().st_size for p in sorted(workdir.rglob("*")) if p.is_file()}
    if phase.commit == "replace":
        replace_dir(workdir, root)
    else:
        move_tree_into(workdir, root)
    return files


def publish(layout: RunLayout, phase: Phase, root: Path, files: dict[str, int]) -> None:
    """For a run on a bucket, upload the committed files under their final names; a replaced folder also
    loses the objects the new one does not have (after the new ones are up, before the marker)."""
    mirror = layout.mirror
    if mirror is None:
        return
    # a `_done.json` a task writes among its files (curated/_done.json) goes up last, just before the marker
    last = sorted(files, key=lambda name: (Path(name).name == "_done.json", name))
    layout.publish(*(root / name for name in last))
    if phase.commit == "replace":
        keep = {root / name for name in files}
        mirror.delete([path for path in mirror.sizes(root) if path not in keep])


def clear_scratch(ctx: StageContext, stage: str) -> None:
    """Remove leftovers of tasks that died before committing (the run lock makes sure none is running)."""
    shutil.rmtree(ctx.layout.scratch_dir(stage), ignore_errors=True)


def sweep_leftovers(layout: RunLayout) -> int:
    """Remove what killed runs left anywhere in the run: every stage's scratch folder and every scratch-named
    file or folder (`is_scratch_name`). Only under the run lock: a running task's scratch looks the same."""
    removed = 0
    for folder, subfolders, files in os.walk(layout.root):
        here = Path(folder)
        for name in list(subfolders):
            path = here / name
            if is_scratch_name(name) or (here.parent == layout.root and path == layout.scratch_dir(here.name)):
                shutil.rmtree(path, ignore_errors=True)
                subfolders.remove(name)
                removed += 1
        for name in files:
            if is_scratch_name(name):
                (here / name).unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info("%s: removed %d leftovers of an interrupted run", layout.root, removed)
    return removed


def remove_orphans(ctx: StageContext, stage: Stage, phase: Phase, tasks: list[str]) -> None:
    """Forget markers (and the files they list) and fate parts of tasks that are no longer part of the run."""
    wanted = set(tasks)
    layout = ctx.layout
    root = output_root(phase, ctx, stage.name)
    for marker in layout.glob(layout.marker_dir(stage.name, phase.name), "*.json"):
        if marker.stem in wanted:
            continue
        try:
            listed = layout.read_json(marker).get("files") or {}
        except ValueError:
            listed = {}
        layout.delete(marker, *(root / relative for relative in listed))
    if phase.decides_fates:
        orphans = [p for p in layout.glob(layout.fates_dir(stage.name), "*.parquet") if p.stem not in wanted]
        layout.delete(*orphans)
