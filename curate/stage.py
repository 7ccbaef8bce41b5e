"""The one stage contract: a stage describes itself (name, config, resources, phases, outputs) in one place.

A stage is a list of phases; a phase is a set of tasks (one per shard, one per partition, or a single one),
each committed by `curate.runner.run_task` like a shard: scratch directory, check, rename into place (on a bucket:
upload under the final names), done-marker last with the stage's fingerprint inside. A fate phase
(`Phase.decides_fates`) returns exactly one fate for every uid it was given; other phases only write outputs. The
pipeline is one loop over stages and their phases.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

if TYPE_CHECKING:
    from curate.config import PipelineConfig
    from curate.io.run_store import RunMirror
    from curate.io.storage import Storage

FATE_PHASE = "shards"
"""The per-shard fate phase of a stage; its markers are `<stage>/_done/<shard>.json`."""


@dataclass(frozen=True)
class RunLayout:
    """Where a run keeps each stage's outputs, fate parts and done-markers, and how they are read and written.

    `location` is a local folder, or an fsspec URL (`s3://bucket/run`) read and written with `storage_options`.
    For a URL, `root` is this process's mirror of the run (`curate.io.run_store`): stage code reads the paths
    below it after `fetch`, and everything written under it reaches the bucket through `publish` (the runner
    does that for every task's outputs, done-marker last). For a local folder, `fetch` and `publish` do nothing.
    """

    location: Path | str
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, output: str | Path, storage_options: dict[str, Any] | None = None) -> RunLayout:
        """The layout of a run directory as a user names it (a path, `~/runs/x`, `file://...` or a URL)."""
        from curate.io.storage import locate

        return cls(locate(output), dict(storage_options or {}))

    @classmethod
    def of_config(cls, config: PipelineConfig) -> RunLayout:
        return cls.of(config.output, config.storage.options)

    @property
    def remote(self) -> bool:
        return isinstance(self.location, str)

    @property
    def mirror(self) -> RunMirror | None:
        if not isinstance(self.location, str):
            return None
        from curate.io.run_store import mirror_of
        from curate.io.storage import Storage

        return mirror_of(self.location, Storage(self.storage_options))

    @property
    def root(self) -> Path:
        return self.location if isinstance(self.location, Path) else self.mirror.root  # type: ignore[union-attr]

    @property
    def label(self) -> str:
        """The run as the user named it, for messages."""
        return str(self.location)

    def where(self, path: Path) -> str:
        """A path of the run as a user finds it: the local path, or the object's URL."""
        mirror = self.mirror
        return str(path) if mirror is None else mirror.url_of(path)

    # -- reading --------------------------------------------------------------------------------------------

    def fetch(self, path: Path) -> Path:
        """`path`, ready to be read like any local file (for a run on a bucket: the object's current bytes)."""
        mirror = self.mirror
        return path if mirror is None else mirror.fetch(path)

    def exists(self, path: Path) -> bool:
        mirror = self.mirror
        return path.exists() if mirror is None else mirror.info(path) is not None

    def size(self, path: Path) -> int | None:
        """The file's size in bytes, None when it is not there."""
        mirror = self.mirror
        if mirror is None:
            return path.stat().st_size if path.is_file() else None
        info = mirror.info(path)
        return None if info is None or info.get("type") == "directory" else int(info.get("size") or 0)

    def glob(self, folder: Path, pattern: str) -> list[Path]:
        """The files in `folder` matching `pattern` (no `**`), in name order; nothing is fetched."""
        mirror = self.mirror
        if mirror is None:
            return sorted(p for p in folder.glob(pattern) if p.is_file())
        return mirror.glob(folder, pattern)

    def open(self, path: Path) -> IO[bytes]:
        """A seekable binary stream of the file; on a bucket read by ranges, not fetched whole (for a few
        record batches of a large Arrow file)."""
        mirror = self.mirror
        return open(path, "rb") if mirror is None else mirror.open(path)

    def read_bytes(self, path: Path) -> bytes:
        mirror = self.mirror
        return path.read_bytes() if mirror is None else mirror.read_bytes(path)

    def read_json(self, path: Path) -> Any:
        return json.loads(self.read_bytes(path))

    def marker(self, stage: str, task: str, phase: str = FATE_PHASE) -> dict[str, Any]:
        """A task's done-marker: its fingerprint, counts, seconds and files."""
        return dict(self.read_json(self.marker_path(stage, task, phase)))

    # -- writing --------------------------------------------------------------------------------------------

    def publish(self, *paths: Path) -> None:
        """Put files written under `root` in the run (for a run on a bucket: upload them, in this order)."""
        mirror = self.mirror
        if mirror is not None:
            for path in paths:
                mirror.upload(path)

    def write_bytes(self, path: Path, data: bytes) -> None:
        from curate.io.fs import write_bytes_atomic

        write_bytes_atomic(path, data)
        self.publish(path)

    def write_json(self, path: Path, payload: Any) -> None:
        self.write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())

    def delete(self, *paths: Path) -> None:
        mirror = self.mirror
        if mirror is None:
            for path in paths:
                path.unlink(missing_ok=True)
        else:
            mirror.delete(list(paths))

    def delete_tree(self, folder: Path) -> None:
        import shutil

        mirror = self.mirror
        if mirror is None:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            mirror.delete_tree(folder)

    def task_scope(self) -> AbstractContextManager[None]:
        """For a run on a bucket, what a task fetches and writes leaves this process's mirror when it ends."""
        mirror = self.mirror
        return nullcontext() if mirror is None else mirror.task_scope()

    # -- the run's places -----------------------------------------------------------------------------------

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def fates_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / "fates"

    def fates_path(self, stage: str, shard: str) -> Path:
        return self.fates_dir(stage) / f"{shard}.parquet"

    def marker_path(self, stage: str, task: str, phase: str = FATE_PHASE) -> Path:
        folder = self.stage_dir(stage) / "_done"
        return folder / f"{task}.json" if phase == FATE_PHASE else folder / phase / f"{task}.json"

    def marker_dir(self, stage: str, phase: str = FATE_PHASE) -> Path:
        folder = self.stage_dir(stage) / "_done"
        return folder if phase == FATE_PHASE else folder / phase

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
    shards: tuple[str, ...] = ()
    """The run's input shards (empty before the input stage has run)."""


@dataclass(frozen=True)
class TaskOutput:
    """What a task hands the runner: the fates of a fate phase, or counts that describe a non-fate task."""

    fates: pa.Table | None = None
    counts: dict[str, int] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    """For an "in_place" phase: the files (relative to the output root) the marker vouches for."""


TaskFn = Callable[[StageContext, str, Path], TaskOutput | pa.Table]


@dataclass(frozen=True)
class Phase:
    """A set of tasks of one stage. `tasks` is evaluated in the driver once the earlier phases are done.

    `commit` says how the runner puts a task's scratch directory in place: "move" renames each file into
    `output_root` (relative paths kept), "replace" swaps the whole `output_root` for it (all or nothing), and
    "in_place" means the task writes its final files itself (e.g. a resumable training run) and the runner
    only writes the marker.
    """

    name: str
    tasks: Callable[[StageContext], list[str]]
    run: TaskFn
    expected: Callable[[StageContext, str], pa.Array] | None = None
    """For a fate phase: the uids a task must decide (one fate each)."""
    output_root: Callable[[StageContext], Path] | None = None
    commit: str = "move"
    resources: dict[str, float] | None = None
    """Overrides the stage's resources for this phase."""
    workers: int | None = None
    """Overrides the stage's local worker count for this phase."""

    @property
    def decides_fates(self) -> bool:
        return self.expected is not None


class Stage:
    """Every hook has a default. Subclasses set `name` and implement `phases` (or, for a stage that only
    decides fates per shard, `expected_uids` and `process_shard`)."""

    name: ClassVar[str]
    section: ClassVar[str | None] = None
    """The config section of this stage's settings (None: the section named like the stage, if there is one)."""
    speed_only: ClassVar[frozenset[str]] = frozenset()
    """Settings that change how fast the stage runs, never what it produces: left out of its fingerprint."""
    decides_fates: ClassVar[bool] = True
    """False for stages that decide no row's fate (materialize copies the kept rows, validate trains)."""
    default: ClassVar[bool] = True
    """Part of the pipeline when the config does not list `stages`."""
    shard_local: ClassVar[bool] = False
    """Each shard's outputs depend on that shard's upstream outputs only (no run-wide phase, no other shard):
    when `curate retry` changes some download shards, only those shards of this stage are redone."""
    outputs: ClassVar[type[StageOutputs] | None] = None

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config

    @property
    def cfg(self) -> Any:
        return getattr(self.config, self.section or self.name, None)

    def fingerprint(self, upstream: str) -> str:
        """This stage's settings (less `speed_only`; a file they name counts by its bytes) and extras, chained
        to the upstream fingerprint."""
        settings = self.cfg.model_dump(mode="json", exclude=set(self.speed_only)) if self.cfg is not None else {}
        payload = {"stage": self.name, "upstream": upstream, "settings": identify_paths(settings, self.storage)}
        return digest({**payload, **self.fingerprint_extras()})

    def fingerprint_extras(self) -> dict[str, Any]:
        """Content identities of files the settings name (a checkpoint's bytes, not its path)."""
        return {}

    @property
    def storage(self) -> Storage:
        """How this run reads URLs (the config's `storage.options`)."""
        from curate.io.storage import Storage

        return Storage(self.config.storage.options)

    def resources(self) -> dict[str, float]:
        """Worker resources its tasks need, e.g. {"GPU": 1} for a model on cuda."""
        return {}

    def workers(self) -> int:
        """Tasks run at once by the local executor."""
        return 1

    def preflight(self) -> None:
        """Config errors in the driver before any work (unknown model, missing file); loads nothing heavy."""

    def setup(self) -> None:
        """Once per worker process, before its first task (load models here, not in __init__)."""

    def phases(self) -> list[Phase]:
        return [self.fate_phase()]

    def fate_phase(self, **options: Any) -> Phase:
        return Phase(FATE_PHASE, run_shards, self.process_shard, expected=self.expected_uids, **options)

    def expected_uids(self, ctx: StageContext, shard: str) -> pa.Array:
        raise NotImplementedError(f"stage {self.name!r} has no fate phase")

    def process_shard(self, ctx: StageContext, shard: str, workdir: Path) -> pa.Table:
        raise NotImplementedError(f"stage {self.name!r} has no fate phase")

    def phase(self, name: str) -> Phase:
        for phase in self.phases():
            if phase.name == name:
                return phase
        raise KeyError(f"stage {self.name!r} has no phase {name!r}")

    def __getstate__(self) -> dict[str, Any]:
        """Loaded resources (models, connections: attributes starting with `_`) are never pickled into tasks."""
        return {k: (None if k.startswith("_") else v) for k, v in self.__dict__.items()}


def run_shards(ctx: StageContext) -> list[str]:
    """The tasks of a per-shard phase: every input shard of the run."""
    return list(ctx.shards)


def single_task(_ctx: StageContext) -> list[str]:
    return ["all"]


def digest(payload: Any) -> str:
    """The one fingerprint recipe: a short sha256 of canonical JSON."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


BLOCK = 1 << 20


def content_identity(path: str | Path, name: str | None = None) -> dict[str, Any]:
    """A file identified by its bytes, not by where it lies or when it was copied: its size and a hash of its
    first and last MiB (for parquet that covers the footer, so any rewrite of its row groups shows). `name`
    is kept when the file's name is part of what it means (generated uids hash the source file's name)."""
    path = Path(path)
    size = path.stat().st_size
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        hasher.update(handle.read(BLOCK))
        if size > BLOCK:
            handle.seek(max(BLOCK, size - BLOCK))
            hasher.update(handle.read(BLOCK))
    identity: dict[str, Any] = {"size": size, "sha256_ends": hasher.hexdigest()}
    if name is not None:
        identity["name"] = name
    return identity


def identify_paths(value: Any, storage: Storage | None = None) -> Any:
    """`value` (a settings tree) with every string that names an existing file replaced by the file's
    content identity, and every folder or glob by its files' (relative name and content): a checkpoint or an
    eval set moved elsewhere, or copied again, is the same setting. Only strings written like paths count (a
    "/", a suffix such as ".pt", a leading "~" or ".", a glob character): a bare word such as a model name
    or the user-agent token "curate" is a name even when a folder of that name is in the working directory.
    With `storage`, a URL (s3://, gs://, ...; not http) counts as the file or folder it names, so weights
    moved from a disk into a bucket are the same setting."""
    from glob import glob

    if isinstance(value, dict):
        return {key: identify_paths(item, storage) for key, item in value.items()}
    if isinstance(value, list):
        return [identify_paths(item, storage) for item in value]
    if not isinstance(value, str) or not written_like_a_path(value):
        return value
    if storage is not None and "://" in value:
        return identify_url(value, storage)
    path = Path(value).expanduser()
    if path.is_file():
        return content_identity(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {"folder": [content_identity(f, str(f.relative_to(path))) for f in files]}
    if any(c in value for c in "*?["):
        matches = sorted(Path(m) for m in glob(str(path)))
        if matches:
            return {"glob": [content_identity(m, m.name) for m in matches if m.is_file()]}
    return value


def identify_url(url: str, storage: Storage) -> Any:
    """What `identify_paths` gives the local copy of `url`; the URL itself for http(s) and for nothing there."""
    from curate.io.local_copy import local_copy
    from curate.io.storage import StorageError, has_magic, locate, name_of, protocol_of

    location = locate(url)
    if isinstance(location, Path):
        return identify_paths(str(location))
    if protocol_of(url) in ("http", "https"):
        return url
    try:
        if has_magic(url):
            matches = [match for match, is_file in storage.glob(url) if is_file]
            return {"glob": [storage.content_identity(m, name_of(m)) for m in matches]} if matches else url
        info = storage.info(url)
        if info is None:
            return url  # the stage's preflight names the missing object
        if info.get("type") == "directory":
            return identify_paths(str(local_copy(url, storage, "a setting's folder")))
        return storage.content_identity(url)
    except (OSError, StorageError):
        return url


def written_like_a_path(value: str) -> bool:
    if not value:
        return False
    return (
        "/" in value
        or os.sep in value
        or value[0] in "~."
        or bool(Path(value).suffix)
        or any(c in value for c in "*?[")
    )


class StageOutputs:
    """A typed reader of what a stage wrote; consumers use it instead of spelling the stage's paths."""

    stage: ClassVar[str]

    def __init__(self, layout: RunLayout | Path | str) -> None:
        self.layout = layout if isinstance(layout, RunLayout) else RunLayout.of(layout)

    @property
    def folder(self) -> Path:
        return self.layout.stage_dir(self.stage)

    def fates_path(self, shard: str) -> Path:
        return self.layout.fates_path(self.stage, shard)

    def fate_shards(self) -> list[str]:
        """The shards this stage has finished so far (those with a done-marker), in name order. Only a marker
        vouches for a task's files: on a bucket, a task killed while uploading leaves objects without one."""
        return [path.stem for path in self.layout.glob(self.layout.marker_dir(self.stage), "*.json")]

    def fates(self, shard: str, columns: list[str] | None = None) -> pa.Table:
        import pyarrow.parquet as pq

        from curate.ledger import FATE_SCHEMA

        table = pq.read_table(self.layout.fetch(self.fates_path(shard)), schema=FATE_SCHEMA)
        return table.select(columns) if columns else table

    def kept_uids(self, shard: str) -> pa.Array:
        return kept_uids(self.layout, self.stage, shard)


def kept_uids(layout: RunLayout, stage: str, shard: str) -> pa.Array:
    """The uids `stage` kept in `shard`: what the next stage must decide."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fates = pq.read_table(layout.fetch(layout.fates_path(stage, shard)), columns=["uid", "status"])
    return fates.filter(pc.equal(fates["status"], "kept"))["uid"].combine_chunks().cast(pa.string())


class ShardState(StrEnum):
    DONE = "done"
    STALE = "stale"
    DAMAGED = "damaged"
    """The marker matches but a file it lists is missing or has another size: redone."""
    PENDING = "pending"
