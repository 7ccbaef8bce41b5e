"""`curate retry OUTPUT`: fetch again the rows of a finished download that failed for a transient reason
(timeouts, connection errors, 429, 5xx), then redo what those rows change.

A retry is a new attempt at some download shards, not a new download. For every finished download shard
whose marker counts a failure with one of the chosen reasons, one task fetches those rows only (through the
same download code: guarded fetch, img2dataset's resize, hash and writer), then writes the shard again: its
tar is its earlier samples plus the newly fetched ones (under the keys img2dataset first gave those rows),
its parquet and its fates have the retried rows' new records, and each retried row's `detail` tells its
history ("fetched on retry 2 | retry 1: http_503 (...) | first run: timeout (...)"). Nothing else is fetched.

What then has to be redone, and how the next run knows (all under the run lock, in this order):

1. The shard-local stages after download (`Stage.shard_local`: embed) forget the retried shards' markers,
   so exactly those shards are embedded again.
2. The attempt is recorded in `download/retries.json`. The fingerprint of the first stage after the
   shard-local ones (filter) chains it, and so every stage after it: their run-wide work (a top-fraction
   cutoff, dedup's survivors, the ledger, the curated shards, validation) is redone, since one new sample
   can change it anywhere. The download's and embed's own fingerprints do not change.
3. The retry tasks run; each writes its shard's marker last, as every task does.
4. The pipeline runs as `curate run` would, and redoes only what 1 and 2 made stale.

An interruption leaves a consistent run: a shard whose retry task did not commit has no download marker,
so the next `curate run` downloads it again in full; everything after the download is stale already.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import ConfigError, PipelineConfig, load_config
from curate.executors import Executor
from curate.executors.local import LocalExecutor
from curate.io.fs import write_json_atomic
from curate.io.lock import run_lock
from curate.io.wds import iter_members, iter_samples
from curate.ledger import FATE_SCHEMA, Status
from curate.pipeline import IncompleteRun, ProgressFactory, RunResult, no_progress, run_pipeline, stage_fingerprints
from curate.runner import task_state
from curate.stage import FATE_PHASE, RunLayout, ShardState, Stage, StageContext
from curate.stages import plan
from curate.stages.download import DownloadOutputs, DownloadStage, check_tar_matches_fates, with_kept_columns
from curate.stages.input import InputOutputs

log = logging.getLogger(__name__)

DEFAULT_REASONS = ("timeout", "connection_error", "http_408", "http_429", "http_5xx")
"""Failures that a later attempt can cure. Not ssl_error (a bad certificate stays bad), not download_error
(unknown), and never a drop (robots_txt, opt_out, min_side ...): those are decisions, not failures."""
_REASON = re.compile(r"[a-z0-9_]+")
_HTTP_FAMILY = re.compile(r"http_([1-5])xx")
_HISTORY = re.compile(r"^(retry \d+: |fetched on retry \d+)")
_ENTRY_CHARS = 200


@dataclass(frozen=True)
class RetryResult:
    attempt: int | None
    """The attempt number (1 for the first retry of this run); None when no row matched."""
    rows: dict[str, int] = field(default_factory=dict)
    """Per retried shard, the rows fetched again."""
    fetched: int = 0
    """Of those rows, how many the download now keeps."""
    failed_reasons: dict[str, int] = field(default_factory=dict)
    """The run's download failures by reason before the retry (to tell why nothing matched)."""
    run: RunResult | None = None


def parse_reasons(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """`timeout,http_5xx` -> ("timeout", "http_5xx"); `http_Nxx` stands for every http_N.. code."""
    if text is None:
        return DEFAULT_REASONS
    tokens = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not tokens:
        raise ConfigError("--reasons: give at least one reason code, e.g. timeout,http_5xx")
    for token in tokens:
        if not _REASON.fullmatch(token):
            raise ConfigError(
                f"--reasons: {token!r} is not a reason code (snake_case, e.g. timeout, http_503, http_5xx)"
            )
    return tuple(dict.fromkeys(tokens))


def reason_matcher(reasons: Sequence[str]) -> Callable[[str], bool]:
    exact = {r for r in reasons if not _HTTP_FAMILY.fullmatch(r)}
    families = {m.group(1) for r in reasons if (m := _HTTP_FAMILY.fullmatch(r))}

    def matches(reason: str) -> bool:
        family = re.fullmatch(r"http_([1-5])\d\d", reason)
        return reason in exact or (family is not None and family.group(1) in families)

    return matches


class RetryDownloadStage(DownloadStage):
    """The download stage's shard task on a finished shard: only its failed rows of the chosen reasons are
    fetched; the shard's earlier samples, records and fates are kept."""

    def __init__(self, config: PipelineConfig, reasons: tuple[str, ...], attempt: int) -> None:
        super().__init__(config)
        self.reasons, self.attempt = reasons, attempt

    def process_shard(self, ctx: StageContext, shard: str, workdir: Path) -> pa.Table:
        outputs, inputs = DownloadOutputs(ctx.layout), InputOutputs(ctx.layout)
        before = outputs.fates(shard)
        matches = reason_matcher(self.reasons)
        chosen = [
            uid
            for uid, status, reason in zip(*(before[c].to_pylist() for c in ("uid", "status", "reason")), strict=True)
            if status == Status.FAILED and reason is not None and matches(reason)
        ]
        if not chosen:  # the marker counted them, so the fates hold them: only a damaged run gets here
            return before
        rows = with_kept_columns(inputs.rows(shard), inputs.kept_columns(shard))
        samples_per_shard = max(int(inputs.manifest()["shard_size"]), rows.num_rows)  # type: ignore[index]
        rows = rows.filter(pc.is_in(rows["uid"], value_set=pa.array(chosen, pa.string())))
        attempt_dir = workdir / "_attempt"
        attempt_dir.mkdir()
        try:
            fresh = self.download_rows(rows, shard, attempt_dir, samples_per_shard)
            keys = merge_results(
                outputs.results_path(shard), attempt_dir / f"{shard}.parquet", workdir / f"{shard}.parquet"
            )
            merge_tars(outputs.tar_path(shard), attempt_dir / f"{shard}.tar", keys, workdir / f"{shard}.tar")
        finally:
            shutil.rmtree(attempt_dir, ignore_errors=True)
        fates = merge_fates(before, fresh, self.attempt)
        check_tar_matches_fates(workdir / f"{shard}.tar", fates)
        log.info("retry %d: shard %s: %d of %d rows fetched", self.attempt, shard, fetched_count(fresh), len(chosen))
        return fates


def fetched_count(fates: pa.Table) -> int:
    return int(pc.sum(pc.equal(fates["status"], Status.KEPT.value)).as_py() or 0)


def merge_results(old_path: Path, new_path: Path, out: Path) -> dict[str, str]:
    """img2dataset's records of the shard with the retried rows' replaced; returns uid -> key for the retried
    rows: the key each had in the first attempt (img2dataset numbers the rows of whatever it was given)."""
    old, new = pq.read_table(old_path), pq.read_table(new_path)
    first_keys = dict(zip(old["uid"].to_pylist(), old["key"].to_pylist(), strict=True))
    keys = {uid: first_keys[uid] for uid in new["uid"].to_pylist()}
    new = new.set_column(new.schema.get_field_index("key"), "key", pa.array([keys[u] for u in new["uid"].to_pylist()]))
    unchanged = old.filter(pc.invert(pc.is_in(old["uid"], value_set=new["uid"].combine_chunks())))
    pq.write_table(pa.concat_tables([unchanged, new.select(old.schema.names)], promote_options="permissive"), out)
    return keys


def merge_tars(old_tar: Path, new_tar: Path, keys: dict[str, str], out: Path) -> None:
    """The shard's earlier samples, byte for byte, then the newly fetched ones under their first keys."""
    import webdataset as wds

    with wds.TarWriter(str(out)) as writer:
        if old_tar.exists():
            for key, members in iter_members(old_tar):
                writer.write({"__key__": key, **members})
        if new_tar.exists():
            for sample in iter_samples(new_tar):
                key = keys[sample.uid]
                meta = json.dumps({**sample.meta, "key": key}, indent=4).encode()
                writer.write({"__key__": key, **sample.members, "json": meta})


def merge_fates(before: pa.Table, fresh: pa.Table, attempt: int) -> pa.Table:
    """The shard's fates with each retried row's new fate, its `detail` carrying the row's history."""
    retried = pc.is_in(before["uid"], value_set=fresh["uid"].combine_chunks())
    earlier = {row["uid"]: row for row in before.filter(retried).to_pylist()}
    rows = fresh.to_pylist()
    for row in rows:
        row["detail"] = history(attempt, row, earlier[row["uid"]])
    unchanged = before.filter(pc.invert(retried))
    return pa.concat_tables([unchanged, pa.Table.from_pylist(rows, schema=FATE_SCHEMA)])


def history(attempt: int, now: dict[str, Any], before: dict[str, Any]) -> str:
    """Newest first: this attempt, then what the row's detail said (the first run's failure, earlier retries)."""
    if now["status"] == Status.KEPT:
        entry = f"fetched on retry {attempt}" + (f" ({now['detail']})" if now["detail"] else "")
    else:
        entry = f"retry {attempt}: {outcome(now)}"
    previous = before["detail"] or ""
    if not _HISTORY.match(previous):
        previous = f"first run: {outcome(before)}"
    return f"{entry} | {previous}"


def outcome(fate: dict[str, Any]) -> str:
    detail = (fate["detail"] or "").strip()
    return f"{fate['reason']} ({detail[:_ENTRY_CHARS]})" if detail else str(fate["reason"])


def retry(
    run_dir: Path | str,
    reasons: str | Sequence[str] | None = None,
    *,
    executor: Executor | None = None,
    progress: ProgressFactory | None = None,
) -> RetryResult:
    """Fetch again the chosen failures of a finished download (see the module docstring), then run the
    pipeline; returns what was retried and the run's result. Nothing is fetched when no row matches."""
    layout = RunLayout(Path(run_dir))
    if not layout.config_path.exists():
        raise FileNotFoundError(f"{layout.root}: not a curate run (no config.yaml)")
    config = load_config(layout.config_path)
    tokens = parse_reasons(reasons)
    if DownloadStage.name not in config.stages:
        raise ConfigError(f"{layout.config_path}: the run has no download stage to retry")
    executor = executor or LocalExecutor()
    progress = progress or no_progress
    stages = plan(config)
    for stage in stages:
        stage.preflight()  # the same config errors `curate run` would stop at, before anything changes
    prints = stage_fingerprints(stages)
    download = next(stage for stage in stages if stage.name == DownloadStage.name)
    shards = InputOutputs(layout).shards()
    ctx = StageContext(config, layout, prints[download.name], tuple(shards))
    counts = finished_download_counts(download, ctx)
    matches = reason_matcher(tokens)
    chosen = {
        shard: n for shard, shard_counts in counts.items() if (n := sum(matching(shard_counts, matches).values()))
    }
    failed: dict[str, int] = {}
    for shard_counts in counts.values():
        for key, n in shard_counts.items():
            if key.startswith(f"{Status.FAILED.value}/"):
                failed[key.partition("/")[2]] = failed.get(key.partition("/")[2], 0) + n
    if not chosen:
        return RetryResult(None, failed_reasons=failed)
    attempt = len(DownloadOutputs(layout).retry_attempts()) + 1
    with run_lock(layout.root):
        forget_shard_local_outputs(stages, layout, list(chosen))
        record_attempt(layout, attempt, tokens, chosen)
        for shard in chosen:
            layout.marker_path(download.name, shard).unlink()
        stage = RetryDownloadStage(config, tokens, attempt)
        with progress(f"retry {attempt}", len(chosen)) as bar:
            for _ in executor.map_tasks(stage, ctx, FATE_PHASE, list(chosen), stage.workers(), stage.resources()):
                bar.update(1)
    after = {shard: layout.marker(download.name, shard)["counts"] for shard in chosen}
    fetched = sum(after[s].get(Status.KEPT.value, 0) - counts[s].get(Status.KEPT.value, 0) for s in chosen)
    run = run_pipeline(config, executor=executor, progress=progress)
    return RetryResult(attempt, chosen, fetched, failed, run)


def finished_download_counts(download: Stage, ctx: StageContext) -> dict[str, dict[str, int]]:
    """Each download shard's fate counts, from its marker; every shard must be done."""
    phase = download.phase(FATE_PHASE)
    missing = [s for s in ctx.shards if task_state(ctx, download.name, s, phase) is not ShardState.DONE]
    if missing:
        raise IncompleteRun(
            f"{ctx.layout.root}: the download is not finished ({len(missing)} of {len(ctx.shards)} shards, "
            f"e.g. {missing[0]}); run `curate run` first"
        )
    return {s: dict(ctx.layout.marker(download.name, s)["counts"]) for s in ctx.shards}


def matching(counts: dict[str, int], matches: Callable[[str], bool]) -> dict[str, int]:
    prefix = f"{Status.FAILED.value}/"
    return {k: n for k, n in counts.items() if k.startswith(prefix) and matches(k.removeprefix(prefix))}


def forget_shard_local_outputs(stages: list[Stage], layout: RunLayout, shards: list[str]) -> None:
    """Drop the markers of the retried shards in the shard-local stages right after download."""
    start = next(i for i, stage in enumerate(stages) if stage.name == DownloadStage.name) + 1
    for stage in stages[start:]:
        if not stage.shard_local:
            break
        for phase in stage.phases():
            for shard in shards:
                layout.marker_path(stage.name, shard, phase.name).unlink(missing_ok=True)


def record_attempt(layout: RunLayout, attempt: int, reasons: tuple[str, ...], rows: dict[str, int]) -> None:
    outputs = DownloadOutputs(layout)
    entry = {
        "attempt": attempt,
        "started": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "reasons": list(reasons),
        "shards": rows,
    }
    write_json_atomic(outputs.retries_path, {"attempts": [*outputs.retry_attempts(), entry]})
