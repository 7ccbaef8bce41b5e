"""The input stage as phases of tasks, so that no process holds per-row state for the whole input.

    files     one task per input file, or per range of whole row groups of a large parquet file: read,
              validate, give uids; write the task's rows, and the (url, caption) hashes of its valid rows
              (and, with `input.uid_col`, its uids) partitioned by hash into P buckets
    plan      one task: each file task's row count and first global row, the shards, the kept columns' types
    buckets   one task per bucket: the rows repeating an earlier (url, caption) pair of the bucket, each with
              the position of the pair's first occurrence; repeated uids
    uids      (with `input.uid_col`) one task: refuse the run when a uid repeats, naming the earliest
    repeats   one task per file task: its repeats, gathered from every bucket, with the first occurrence's uid
    shards    one task per shard: rows, fates and kept columns of `shard_size` consecutive input rows
    manifest  one task: manifest.json; then the working files of the phases above are removed

"First" means first by (file order, row in the file): a row's position is `file index << 40 | row`. The
shards are cut from the whole input's row order, exactly as a single pass over the files would cut them,
so uids, fates and shards do not depend on how the files are split into tasks, on the bucket count, or on
the executor. Every InputError (a corrupt file, a bad line, a repeated uid) is raised before the shards
phase changes anything a previous run wrote; the pipeline then removes this run's working files
(`discard_unfinished`), so a bad input leaves the run directory as it was.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import InputConfig
from curate.io.fs import write_json_atomic
from curate.ledger import Status, make_fates
from curate.stage import (
    FATE_PHASE,
    Phase,
    RunLayout,
    ShardState,
    Stage,
    StageContext,
    StageOutputs,
    TaskOutput,
    digest,
    single_task,
)
from curate.stages.input.columns import as_kept_field, is_json_text, kept_field
from curate.stages.input.rows import STAGED_SCHEMA, generated_uids, string_hashes, url_caption_hashes, validate_batch
from curate.stages.input.sources import (
    InputError,
    SourceFile,
    check_columns,
    given_uids,
    inspect_sources,
    open_table_reader,
    resolve_sources,
)

STAGE = "input"
SHARD_SCHEMA = pa.schema([("uid", pa.string()), ("url", pa.string()), ("caption", pa.string())])
WORK = "staging"
"""The working files of the phases before `shards`, under the stage folder; removed once the stage is done."""
WORK_PHASES = ("files", "plan", "buckets", "uids", "repeats")
ROW_BITS = 40
"""A position is `file index << ROW_BITS | row in the file`: files of up to 2**40 rows, 2**23 files."""
BUCKET_BYTES = 128 << 20
SPILL_ROWS = 1 << 21
"""A file task writes its bucketed hashes every this many rows, so its memory does not grow with the file."""
PAIR_SCHEMA = pa.schema([("h0", pa.uint64()), ("h1", pa.uint64()), ("pos", pa.int64())])
UID_SCHEMA = pa.schema([("uid", pa.string()), ("pos", pa.int64())])
REPEAT_SCHEMA = pa.schema([("pos", pa.int64()), ("first_pos", pa.int64())])
RESOLVED_SCHEMA = pa.schema([("row", pa.int64()), ("first_uid", pa.string())])
_UID_FIELD = pa.field("uid", pa.string())


def shard_name(index: int) -> str:
    return f"{index:05d}"


# ---------------------------------------------------------------- the plan of file tasks


@dataclass(frozen=True)
class FileTask:
    """Rows of one input file: the whole file, or the parquet row groups [start, stop)."""

    file: int
    row_groups: tuple[int, int] | None
    buckets: int

    @property
    def name(self) -> str:
        # The bucket count is part of the name: a task's hash parts are only usable with that many buckets.
        groups = f"-g{self.row_groups[0]:06d}-{self.row_groups[1]:06d}" if self.row_groups else ""
        return f"{self.file:05d}{groups}-p{self.buckets}"

    @classmethod
    def parse(cls, name: str) -> FileTask:
        parts = name.split("-")
        groups = (int(parts[1][1:]), int(parts[2])) if len(parts) == 4 else None
        return cls(int(parts[0]), groups, int(parts[-1][1:]))


def bucket_count(cfg: InputConfig, sources: list[SourceFile]) -> int:
    if cfg.hash_buckets is not None:
        return cfg.hash_buckets
    total = sum(source.size() for source in sources)
    return min(4096, max(1, math.ceil(total / BUCKET_BYTES)))


def plan_file_tasks(cfg: InputConfig, sources: list[SourceFile]) -> list[FileTask]:
    """In file order, then row order. A plain parquet file with more than `task_rows` rows is split into
    ranges of whole row groups of at least `task_rows` rows (the last may be smaller); other files are read
    whole (a csv or jsonl file can only be read from its start)."""
    buckets = bucket_count(cfg, sources)
    tasks = []
    for index, source in enumerate(sources):
        if source.format != "parquet" or source.gzipped:
            tasks.append(FileTask(index, None, buckets))
            continue
        metadata = source.parquet_metadata()
        if metadata.num_rows <= cfg.task_rows or metadata.num_row_groups < 2:
            tasks.append(FileTask(index, None, buckets))
            continue
        start, rows = 0, 0
        for group in range(metadata.num_row_groups):
            rows += metadata.row_group(group).num_rows
            if rows >= cfg.task_rows or group == metadata.num_row_groups - 1:
                tasks.append(FileTask(index, (start, group + 1), buckets))
                start, rows = group + 1, 0
    return tasks


def position(file: int, row: int | np.ndarray) -> int | np.ndarray:
    return (file << ROW_BITS) | row


def split_position(pos: int) -> tuple[int, int]:
    return pos >> ROW_BITS, pos & ((1 << ROW_BITS) - 1)


# ---------------------------------------------------------------- where the working files lie


@dataclass(frozen=True)
class InputWork:
    folder: Path
    layout: RunLayout

    def task_dir(self, task: str) -> Path:
        return self.folder / "files" / task

    def rows_path(self, task: str) -> Path:
        return self.task_dir(task) / "rows.arrow"

    def kept_path(self, task: str, segment: int) -> Path:
        return self.task_dir(task) / f"kept-{segment:05d}.arrow"

    def summary_path(self, task: str) -> Path:
        return self.task_dir(task) / "summary.json"

    def pairs_path(self, task: str, chunk: int) -> Path:
        return self.task_dir(task) / f"pairs-{chunk:05d}.arrow"

    def uids_path(self, task: str, chunk: int) -> Path:
        return self.task_dir(task) / f"uids-{chunk:05d}.arrow"

    @property
    def plan_path(self) -> Path:
        return self.folder / "plan.json"

    @property
    def kept_schema_path(self) -> Path:
        return self.folder / "kept_schema.arrow"

    def repeats_path(self, bucket: str) -> Path:
        return self.folder / "buckets" / bucket / "repeats.parquet"

    def uid_repeat_path(self, bucket: str) -> Path:
        return self.folder / "buckets" / bucket / "uid_repeat.json"

    def resolved_path(self, task: str) -> Path:
        return self.folder / "repeats" / f"{task}.arrow"


def work_of(layout: RunLayout) -> InputWork:
    return InputWork(layout.stage_dir(STAGE) / WORK, layout)


def relative(path: Path, layout: RunLayout) -> Path:
    return path.relative_to(layout.stage_dir(STAGE))


def read_arrow(path: Path) -> pa.Table:
    """An Arrow IPC file, memory-mapped: slices and takes read only the pages they touch."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def write_arrow(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.ipc.new_file(path, table.schema) as writer:
        writer.write_table(table)


def bucket_name(bucket: int, buckets: int) -> str:
    return f"{bucket:05d}-of-{buckets:05d}"


# ---------------------------------------------------------------- files: read, validate, stage, bucket


class _FileTaskWriter:
    """The outputs of one file task: its staged rows, its kept columns (a new segment file whenever their
    types change), and its hashes in bucket order (one record batch per bucket, a chunk file per spill)."""

    def __init__(self, work: InputWork, staged_dir: Path, task: str, buckets: int, uid_check: bool) -> None:
        self.work, self.dir, self.task, self.buckets, self.uid_check = work, staged_dir, task, buckets, uid_check
        self.dir.mkdir(parents=True)
        self.rows = pa.ipc.new_file(self.dir / "rows.arrow", STAGED_SCHEMA)
        self.kept_writer: pa.ipc.RecordBatchFileWriter | None = None
        self.kept_schema: pa.Schema | None = None
        self.segments: list[int] = []
        self.pairs: list[pa.Table] = []
        self.uids: list[pa.Table] = []
        self.pending = 0
        self.chunks = 0
        self.count = 0

    def add(self, staged: pa.Table, kept: pa.Table | None, positions: np.ndarray) -> None:
        self.rows.write_table(staged)
        if kept is not None:
            if self.kept_schema is None or not kept.schema.equals(self.kept_schema, check_metadata=True):
                self._close_kept()
                self.segments.append(self.count)
                self.kept_schema = kept.schema
                path = self.dir / self.work.kept_path(self.task, len(self.segments) - 1).name
                self.kept_writer = pa.ipc.new_file(path, kept.schema)
            assert self.kept_writer is not None
            self.kept_writer.write_table(kept)
        valid = pc.equal(staged["status"], Status.KEPT.value).to_numpy(zero_copy_only=False)
        hashes = url_caption_hashes(staged.filter(pa.array(valid)))
        self.pairs.append(pa.table([hashes[:, 0], hashes[:, 1], positions[valid]], schema=PAIR_SCHEMA))
        if self.uid_check:
            self.uids.append(pa.table([staged["uid"], positions], schema=UID_SCHEMA))
        self.count += staged.num_rows
        self.pending += staged.num_rows
        if self.pending >= SPILL_ROWS:
            self._spill()

    def _spill(self) -> None:
        pairs = pa.concat_tables([PAIR_SCHEMA.empty_table(), *self.pairs])
        self._write_buckets(self.dir / self.work.pairs_path(self.task, self.chunks).name, pairs, pairs["h0"].to_numpy())
        if self.uid_check:
            uids = pa.concat_tables([UID_SCHEMA.empty_table(), *self.uids])
            path = self.dir / self.work.uids_path(self.task, self.chunks).name
            self._write_buckets(path, uids, string_hashes(uids["uid"]))
        self.pairs, self.uids, self.pending = [], [], 0
        self.chunks += 1

    def _write_buckets(self, path: Path, table: pa.Table, hashes: np.ndarray) -> None:
        bucket = (hashes % np.uint64(self.buckets)).astype(np.int64)
        order = np.argsort(bucket, kind="stable")  # stable: positions stay ascending within a bucket
        table = table.take(pa.array(order)).combine_chunks()
        ends = np.cumsum(np.bincount(bucket, minlength=self.buckets))
        with pa.ipc.new_file(path, table.schema) as writer:
            for start, end in zip([0, *ends[:-1]], ends, strict=True):
                writer.write_batch(_one_batch(table.slice(int(start), int(end - start))))

    def _close_kept(self) -> None:
        if self.kept_writer is not None:
            self.kept_writer.close()
            self.kept_writer = None

    def finish(self) -> dict[str, object]:
        """Write what is pending and close the files; the task's summary."""
        if self.pending or not self.chunks:
            self._spill()
        self.close()
        return {"rows": self.count, "kept_segments": self.segments, "chunks": self.chunks}

    def close(self) -> None:
        self.rows.close()
        self._close_kept()

    def __enter__(self) -> _FileTaskWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # also on an InputError half-way through the file: the runner removes the scratch files


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    """The table as one record batch (an empty one when it has no rows): bucket b is batch b of a chunk."""
    batches = table.combine_chunks().to_batches()
    if not batches:
        return pa.RecordBatch.from_pylist([], schema=table.schema)
    assert len(batches) == 1
    return batches[0]


# ---------------------------------------------------------------- buckets: repeats and repeated uids


def first_occurrences(pairs: pa.Table) -> pa.Table:
    """(pos, first_pos) of every row whose (h0, h1) pair occurred at a smaller position, sorted by pos."""
    h0, h1, pos = (pairs[name].to_numpy() for name in ("h0", "h1", "pos"))
    order = np.lexsort((pos, h1, h0))
    h0, h1, pos = h0[order], h1[order], pos[order]
    same = np.zeros(len(pos), dtype=bool)
    same[1:] = (h0[1:] == h0[:-1]) & (h1[1:] == h1[:-1])
    group_start = np.maximum.accumulate(np.where(same, 0, np.arange(len(pos))))
    repeats = np.flatnonzero(same)
    repeat_pos, first_pos = pos[repeats], pos[group_start[repeats]]
    by_pos = np.argsort(repeat_pos)
    return pa.table([repeat_pos[by_pos], first_pos[by_pos]], schema=REPEAT_SCHEMA)


def earliest_repeated_uid(uids: pa.Table) -> dict[str, object] | None:
    """The repeated uid whose first occurrence comes first, with the count and its first five positions."""
    if not uids.num_rows:
        return None
    groups = uids.group_by("uid").aggregate([("pos", "min"), ("pos", "count")])
    repeated = groups.filter(pc.greater(groups["pos_count"], 1))
    if not repeated.num_rows:
        return None
    best = int(np.argmin(repeated["pos_min"].to_numpy()))
    uid = repeated["uid"][best].as_py()
    places = np.sort(uids.filter(pc.equal(uids["uid"], uid))["pos"].to_numpy())
    return {"uid": uid, "count": len(places), "places": places[:5].tolist()}


# ---------------------------------------------------------------- the stage's outputs


def read_manifest(layout: RunLayout | Path) -> dict[str, object] | None:
    layout = layout if isinstance(layout, RunLayout) else RunLayout(layout.parent)
    try:
        return layout.read_json(layout.stage_dir(STAGE) / "manifest.json")
    except FileNotFoundError:
        return None


def read_shard_rows(layout: RunLayout, shard: str) -> pa.Table:
    path = layout.fetch(layout.stage_dir(STAGE) / "shards" / f"{shard}.parquet")
    return pq.read_table(path, schema=SHARD_SCHEMA)


class InputOutputs(StageOutputs):
    stage = STAGE

    def manifest(self) -> dict[str, object] | None:
        return read_manifest(self.layout)

    def recorded_fingerprint(self) -> str:
        """The fingerprint the finished input stage recorded (its last phase's marker), for readers of a run
        whose input files they cannot reach."""
        return self.layout.read_json(self.layout.marker_path(STAGE, "all", "manifest"))["fingerprint"]

    def shards(self) -> list[str]:
        manifest = self.manifest()
        if manifest is None:
            raise FileNotFoundError(f"{self.layout.label}: the input stage has not finished")
        return list(manifest["shards"])  # type: ignore[call-overload]

    def rows(self, shard: str) -> pa.Table:
        return read_shard_rows(self.layout, shard)

    def kept_columns_path(self, shard: str) -> Path:
        return self.folder / "columns" / f"{shard}.parquet"

    def kept_columns(self, shard: str) -> pa.Table | None:
        """uid and the `input.keep_columns` of every input row of the shard (None when none are kept). A
        column whose field metadata says `is_json_text` holds JSON text: its files disagreed on its type."""
        path = self.layout.fetch(self.kept_columns_path(shard))
        return pq.read_table(path) if path.exists() else None

    def kept_columns_schema(self) -> pa.Schema | None:
        """The schema of every shard's kept columns (the input stage stores each column as one type)."""
        shards = self.shards()
        path = self.layout.fetch(self.kept_columns_path(shards[0])) if shards else None
        return pq.read_schema(path) if path is not None and path.exists() else None


def source_identities(cfg: InputConfig, sources: list[SourceFile]) -> list[dict[str, object]]:
    """The input files by content, in order (the order decides which repeat of a pair is the first). A file's
    name counts only when generated uids hash it."""
    return [s.storage.content_identity(s.path, s.name if cfg.uid_col is None else None) for s in sources]


def input_fingerprint(cfg: InputConfig, sources: list[SourceFile]) -> str:
    return InputStage.settings_digest(cfg, sources)


def discard_unfinished(layout: RunLayout) -> None:
    """Remove the working files and markers of an input stage that stopped on an InputError: what a
    previous run wrote (shards, fates, manifest) is only replaced after every InputError could have come.
    On Dask, a task that was already running when the error came may still commit its working files after
    this; they carry this input's fingerprint, so a later run redoes or removes them (orphans)."""
    stage_dir = layout.stage_dir(STAGE)
    layout.delete_tree(stage_dir / WORK)
    shutil.rmtree(layout.scratch_dir(STAGE), ignore_errors=True)
    for phase in WORK_PHASES:
        layout.delete_tree(layout.marker_dir(STAGE, phase))
    for folder in (layout.marker_dir(STAGE), stage_dir):
        if folder.exists() and not any(folder.iterdir()):
            folder.rmdir()


@functools.lru_cache(maxsize=4)
def _read_plan(path: str, _size: int, _mtime_ns: int) -> dict[str, object]:
    return json.loads(Path(path).read_text())


@dataclass(frozen=True)
class Plan:
    """plan.json: the file tasks in order with their rows and first global row, and the shards."""

    tasks: list[str]
    files: list[int]
    first_rows: list[int]
    """Each task's first row within its file."""
    rows: list[int]
    starts: np.ndarray
    """Each task's first global row (its rows' place in the whole input's order)."""
    total: int
    shard_size: int
    shards: list[str]

    @classmethod
    def load(cls, work: InputWork) -> Plan:
        path = work.layout.fetch(work.plan_path)
        stat = path.stat()
        data = _read_plan(str(path), stat.st_size, stat.st_mtime_ns)
        tasks = data["tasks"]
        return cls(
            [t["name"] for t in tasks],
            [t["file"] for t in tasks],
            [t["first_row"] for t in tasks],
            [t["rows"] for t in tasks],
            np.array([t["start"] for t in tasks], dtype=np.int64),
            int(data["rows"]),
            int(data["shard_size"]),
            list(data["shards"]),
        )

    def spans(self, shard: str) -> Iterator[tuple[int, int, int]]:
        """(task index, first, end) of the task rows that make up `shard`, in order."""
        begin = int(shard) * self.shard_size
        end = min(begin + self.shard_size, self.total)
        index = int(np.searchsorted(self.starts, begin, side="right")) - 1
        while begin < end:
            start = int(self.starts[index])
            stop = min(end, start + self.rows[index])
            if stop > begin:
                yield index, begin - start, stop - start
            begin = max(begin, stop)
            index += 1

    def task_of(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For positions, the index of the task that holds each and the row within that task."""
        file, row = pos >> ROW_BITS, pos & ((1 << ROW_BITS) - 1)
        keys = position(np.array(self.files, dtype=np.int64), np.array(self.first_rows, dtype=np.int64))
        index = np.searchsorted(keys, position(file, row), side="right") - 1
        return index, row - np.array(self.first_rows, dtype=np.int64)[index]


class InputStage(Stage):
    """Reads, validates and shards the input files; every row gets a uid and a fate."""

    name = STAGE
    speed_only = frozenset({"batch_rows", "task_rows", "hash_buckets", "workers"})
    outputs = InputOutputs

    def preflight(self) -> None:
        inspect_sources(self.cfg, self.storage)  # formats and columns, before anything is written or fetched

    def fingerprint(self, upstream: str) -> str:
        return self.settings_digest(self.cfg, resolve_sources(self.cfg, self.storage))

    @classmethod
    def settings_digest(cls, cfg: InputConfig, sources: list[SourceFile]) -> str:
        settings = cfg.model_dump(mode="json", exclude={"path", *cls.speed_only})
        return digest({"stage": cls.name, "settings": settings, "files": source_identities(cfg, sources)})

    def workers(self) -> int:
        return self.cfg.workers

    def phases(self) -> list[Phase]:
        phases = [
            Phase("files", self._file_tasks, self._read_file),
            Phase("plan", self._plan_task, self._plan),
            Phase("buckets", self._bucket_tasks, self._find_repeats),
        ]
        if self.cfg.uid_col:
            phases.append(Phase("uids", self._uid_tasks, self._check_uids))
        phases += [
            Phase("repeats", self._repeat_tasks, self._resolve_repeats),
            Phase(FATE_PHASE, self._shard_tasks, self._write_shard, expected=self._expected_uids),
            Phase("manifest", single_task, self._write_manifest),
        ]
        return phases

    # ------------------------------------------------------------ task lists (in the driver)

    def finished(self, ctx: StageContext) -> bool:
        """The manifest and every shard are done for this fingerprint: the working phases have nothing to do."""
        if task_state_of(ctx, self.phase("manifest"), "all") is not ShardState.DONE:
            return False
        manifest = read_manifest(ctx.layout) or {}
        shards = self.phase(FATE_PHASE)
        return all(task_state_of(ctx, shards, shard) is ShardState.DONE for shard in manifest.get("shards", []))

    def _file_tasks(self, ctx: StageContext) -> list[str]:
        if self.finished(ctx):
            return []
        return [task.name for task in plan_file_tasks(self.cfg, resolve_sources(self.cfg, self.storage))]

    def _plan_task(self, ctx: StageContext) -> list[str]:
        tasks = self._file_tasks(ctx)
        return [f"tasks-{digest(tasks)}"] if tasks else []

    def _bucket_tasks(self, ctx: StageContext) -> list[str]:
        if self.finished(ctx):
            return []
        buckets = bucket_count(self.cfg, resolve_sources(self.cfg, self.storage))
        return [bucket_name(b, buckets) for b in range(buckets)]

    def _uid_tasks(self, ctx: StageContext) -> list[str]:
        return [] if self.finished(ctx) else ["all"]

    def _repeat_tasks(self, ctx: StageContext) -> list[str]:
        return [] if self.finished(ctx) else Plan.load(work_of(ctx.layout)).tasks

    def _shard_tasks(self, ctx: StageContext) -> list[str]:
        manifest = read_manifest(ctx.layout)
        if task_state_of(ctx, self.phase("manifest"), "all") is ShardState.DONE and manifest is not None:
            return list(manifest["shards"])  # type: ignore[call-overload]
        work = work_of(ctx.layout)
        return Plan.load(work).shards if ctx.layout.exists(work.plan_path) else []

    # ------------------------------------------------------------ tasks

    def _read_file(self, ctx: StageContext, task: str, workdir: Path) -> TaskOutput:
        cfg, spec = self.cfg, FileTask.parse(task)
        source = resolve_sources(cfg, self.storage)[spec.file]
        work = work_of(ctx.layout)
        staged_dir = workdir / relative(work.task_dir(task), ctx.layout)
        writer = _FileTaskWriter(work, staged_dir, task, spec.buckets, uid_check=cfg.uid_col is not None)
        with writer, open_table_reader(source, cfg, spec.row_groups) as reader:
            check_columns(source, reader.schema, cfg)
            first_row = reader.first_row()
            row = first_row
            for batch in reader.batches():
                n = batch.num_rows
                if cfg.uid_col:
                    uids = given_uids(batch["uid"].combine_chunks(), source, row)
                else:
                    uids = generated_uids(source.name, row, n)
                staged = validate_batch(batch, cfg, uids)
                kept = batch.select(cfg.keep_columns) if cfg.keep_columns else None
                positions = position(spec.file, np.arange(row, row + n, dtype=np.int64))
                writer.add(staged, kept, positions)
                row += n
            summary = {"first_row": first_row, **writer.finish()}
        write_json_atomic(workdir / relative(work.summary_path(task), ctx.layout), summary)
        return TaskOutput(counts={"samples": writer.count})

    def _plan(self, ctx: StageContext, _task: str, workdir: Path) -> TaskOutput:
        cfg, work = self.cfg, work_of(ctx.layout)
        sources = resolve_sources(cfg, self.storage)
        tasks, total = [], 0
        kept_fields: dict[str, list[pa.Field]] = {name: [] for name in cfg.keep_columns}
        for spec in plan_file_tasks(cfg, sources):
            summary = ctx.layout.read_json(work.summary_path(spec.name))
            tasks.append(
                {
                    "name": spec.name,
                    "file": spec.file,
                    "first_row": summary["first_row"],
                    "rows": summary["rows"],
                    "start": total,
                }
            )
            total += summary["rows"]
            for segment in range(len(summary["kept_segments"])):
                with ctx.layout.open(work.kept_path(spec.name, segment)) as stream:
                    schema = pa.ipc.open_file(stream).schema
                for name in cfg.keep_columns:
                    kept_fields[name].append(schema.field(name))
        shards = [shard_name(i) for i in range(math.ceil(total / cfg.shard_size))]
        plan = {"tasks": tasks, "rows": total, "shard_size": cfg.shard_size, "shards": shards}
        write_json_atomic(workdir / relative(work.plan_path, ctx.layout), plan)
        if cfg.keep_columns:
            fields = [_UID_FIELD, *(kept_field(fields) for fields in kept_fields.values())]
            schema = pa.schema(fields)
            write_arrow(workdir / relative(work.kept_schema_path, ctx.layout), schema.empty_table())
        return TaskOutput(counts={"rows": total, "shards": len(shards)})

    def _find_repeats(self, ctx: StageContext, task: str, workdir: Path) -> TaskOutput:
        bucket = int(task.split("-")[0])
        work = work_of(ctx.layout)
        pairs, uids = [], []
        plan = Plan.load(work)
        for name in plan.tasks:
            chunks = int(ctx.layout.read_json(work.summary_path(name))["chunks"])
            for chunk in range(chunks):
                pairs.append(_bucket_batch(ctx.layout, work.pairs_path(name, chunk), bucket))
                if self.cfg.uid_col:
                    uids.append(_bucket_batch(ctx.layout, work.uids_path(name, chunk), bucket))
        table = pa.Table.from_batches(pairs, schema=PAIR_SCHEMA)
        repeats = first_occurrences(table)
        target = workdir / relative(work.repeats_path(task), ctx.layout)
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(repeats, target, row_group_size=1 << 16)
        if self.cfg.uid_col:
            found = earliest_repeated_uid(pa.Table.from_batches(uids, schema=UID_SCHEMA))
            if found is not None:
                write_json_atomic(workdir / relative(work.uid_repeat_path(task), ctx.layout), found)
        return TaskOutput(counts={"pairs": table.num_rows, "repeats": repeats.num_rows})

    def _check_uids(self, ctx: StageContext, _task: str, _workdir: Path) -> TaskOutput:
        work = work_of(ctx.layout)
        found = [ctx.layout.read_json(p) for p in ctx.layout.glob(work.folder, "buckets/*/uid_repeat.json")]
        if found:
            first = min(found, key=lambda f: f["places"][0])
            sources = resolve_sources(self.cfg, self.storage)
            places = [split_position(int(p)) for p in first["places"]]
            where = ", ".join(f"{sources[file].path} row {row}" for file, row in places)
            raise InputError(
                f"{sources[places[0][0]].path}: uid {first['uid']!r} appears {first['count']} times ({where}); "
                "uids must be unique"
            )
        return TaskOutput(counts={"repeated_uids": 0})

    def _resolve_repeats(self, ctx: StageContext, task: str, workdir: Path) -> TaskOutput:
        """This task's repeats from every bucket, each with the uid of its pair's first occurrence."""
        work = work_of(ctx.layout)
        plan = Plan.load(work)
        index = plan.tasks.index(task)
        low = int(position(plan.files[index], plan.first_rows[index]))
        high = low + plan.rows[index]
        parts = [
            pq.read_table(
                ctx.layout.fetch(path), filters=[("pos", ">=", low), ("pos", "<", high)], schema=REPEAT_SCHEMA
            )
            for path in ctx.layout.glob(work.folder, "buckets/*/repeats.parquet")
        ]
        repeats = pa.concat_tables(parts) if parts else REPEAT_SCHEMA.empty_table()
        repeats = repeats.sort_by("pos")
        first_pos = repeats["first_pos"].to_numpy()
        first_uids = np.empty(len(first_pos), dtype=object)
        owner, row = plan.task_of(first_pos)
        for holder in np.unique(owner):
            here = owner == holder
            uids = read_arrow(ctx.layout.fetch(work.rows_path(plan.tasks[holder])))["uid"]
            first_uids[here] = uids.take(pa.array(row[here])).to_numpy(zero_copy_only=False)
        resolved = pa.table(
            [pa.array(repeats["pos"].to_numpy() - low), pa.array(first_uids, pa.string())], schema=RESOLVED_SCHEMA
        )
        write_arrow(workdir / relative(work.resolved_path(task), ctx.layout), resolved)
        return TaskOutput(counts={"repeats": resolved.num_rows})

    def _shard_parts(self, ctx: StageContext, shard: str) -> Iterator[tuple[str, int, int]]:
        plan = Plan.load(work_of(ctx.layout))
        for index, begin, end in plan.spans(shard):
            yield plan.tasks[index], begin, end

    def _expected_uids(self, ctx: StageContext, shard: str) -> pa.Array:
        work = work_of(ctx.layout)
        rows = [(ctx.layout.fetch(work.rows_path(t)), b, e) for t, b, e in self._shard_parts(ctx, shard)]
        parts = [read_arrow(path)["uid"].slice(b, e - b) for path, b, e in rows]
        return pa.chunked_array(parts, pa.string()).combine_chunks()

    def _write_shard(self, ctx: StageContext, shard: str, workdir: Path) -> pa.Table:
        work = work_of(ctx.layout)
        kept_schema = read_arrow(ctx.layout.fetch(work.kept_schema_path)).schema if self.cfg.keep_columns else None
        staged_parts, kept_parts = [], []
        for task, begin, end in self._shard_parts(ctx, shard):
            staged = read_arrow(ctx.layout.fetch(work.rows_path(task))).slice(begin, end - begin)
            resolved = read_arrow(ctx.layout.fetch(work.resolved_path(task)))
            rows = resolved["row"].to_numpy()
            lo, hi = np.searchsorted(rows, [begin, end])
            if hi > lo:
                mask = np.zeros(end - begin, dtype=bool)
                mask[rows[lo:hi] - begin] = True
                marked = pa.array(mask)
                first_uids = resolved["first_uid"].slice(lo, hi - lo).combine_chunks()
                detail = pc.replace_with_mask(staged["detail"].combine_chunks(), marked, first_uids)
                staged = staged.set_column(3, "status", pc.if_else(marked, Status.DROPPED.value, staged["status"]))
                staged = staged.set_column(4, "reason", pc.if_else(marked, "dup_url_caption", staged["reason"]))
                staged = staged.set_column(5, "detail", detail)
            staged_parts.append(staged)
            if kept_schema is not None:
                kept_parts.append(self._kept_slice(work, task, begin, end, staged["uid"], kept_schema))
        staged = pa.concat_tables(staged_parts)
        fates = make_fates(
            staged["uid"],
            staged["status"],
            staged["reason"],
            staged["detail"],
            url=staged["url"],
            caption=staged["caption"],
        )
        keep = pc.equal(fates["status"], Status.KEPT.value)
        rows = staged.select(["uid", "url", "caption"]).filter(keep).cast(SHARD_SCHEMA)
        (workdir / "shards").mkdir()
        pq.write_table(rows, workdir / "shards" / f"{shard}.parquet", use_dictionary=False)
        if kept_schema is not None:
            (workdir / "columns").mkdir()
            pq.write_table(pa.concat_tables(kept_parts), workdir / "columns" / f"{shard}.parquet")
        return fates

    def _kept_slice(
        self, work: InputWork, task: str, begin: int, end: int, uids: pa.ChunkedArray, schema: pa.Schema
    ) -> pa.Table:
        """uid and the kept columns of rows [begin, end) of a file task, each stored as `schema` says."""
        summary = work.layout.read_json(work.summary_path(task))
        bounds = [*summary["kept_segments"], summary["rows"]]
        columns: dict[str, list[pa.Array]] = {name: [] for name in schema.names[1:]}
        for segment, (first, stop) in enumerate(itertools.pairwise(bounds)):
            lo, hi = max(begin, first), min(end, stop)
            if lo >= hi:
                continue
            part = read_arrow(work.layout.fetch(work.kept_path(task, segment))).slice(lo - first, hi - lo)
            for name in columns:
                columns[name].append(as_kept_field(part[name], part.schema.field(name), schema.field(name)))
        arrays = [uids.combine_chunks(), *(pa.concat_arrays(parts) for parts in columns.values())]
        return pa.Table.from_arrays(arrays, schema=schema)

    def _write_manifest(self, ctx: StageContext, _task: str, workdir: Path) -> TaskOutput:
        work = work_of(ctx.layout)
        plan = Plan.load(work)
        manifest: dict[str, object] = {
            "fingerprint": ctx.fingerprint,
            "shards": plan.shards,
            "rows": plan.total,
            "shard_size": plan.shard_size,
        }
        if self.cfg.keep_columns:
            fields = list(read_arrow(ctx.layout.fetch(work.kept_schema_path)).schema)[1:]
            manifest["keep_columns"] = {f.name: "json" if is_json_text(f) else str(f.type) for f in fields}
        write_json_atomic(workdir / "manifest.json", manifest)
        # The working files are not needed once the shards are written; the markers of their phases go with
        # them (those phases list no tasks once this one is done).
        ctx.layout.delete_tree(work.folder)
        for phase in WORK_PHASES:
            ctx.layout.delete_tree(ctx.layout.marker_dir(STAGE, phase))
        return TaskOutput(counts={"rows": plan.total, "shards": len(plan.shards)})


def _bucket_batch(layout: RunLayout, path: Path, bucket: int) -> pa.RecordBatch:
    """One bucket's batch of a file task's pairs (on a bucket: read by range, not the whole file)."""
    if not layout.remote:
        return pa.ipc.open_file(pa.memory_map(str(path))).get_batch(bucket)
    with layout.open(path) as stream:
        return pa.ipc.open_file(stream).get_batch(bucket)


def task_state_of(ctx: StageContext, phase: Phase, task: str) -> ShardState:
    from curate.runner import task_state

    return task_state(ctx, STAGE, task, phase)
