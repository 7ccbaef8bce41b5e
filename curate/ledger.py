"""Fates: what happened to each input row, per stage and shard, merged into one ledger."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


class Status(StrEnum):
    KEPT = "kept"
    DROPPED = "dropped"
    FAILED = "failed"


ATTRIBUTE_FIELDS = [
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("clip_score", pa.float32()),
    pa.field("sha256", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
]
FATE_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        *ATTRIBUTE_FIELDS,
    ]
)
LEDGER_COLUMNS = [
    "uid",
    "url",
    "caption",
    "status",
    "stage",
    "reason",
    "detail",
    "clip_score",
    "sha256",
    "width",
    "height",
]


class FateError(RuntimeError):
    """A stage broke the contract: not exactly one fate for every uid it was given."""


def make_fates(
    uid: Sequence[str] | pa.Array, status: Any, reason: Any = None, detail: Any = None, **attributes: Any
) -> pa.Table:
    """Build a fate table; scalar arguments are broadcast, missing attributes are null."""
    n = len(uid)
    columns: dict[str, Any] = {"uid": uid, "status": status, "reason": reason, "detail": detail, **attributes}
    unknown = set(columns) - set(FATE_SCHEMA.names)
    if unknown:
        raise ValueError(f"unknown fate columns {sorted(unknown)}")
    arrays = []
    for fate_field in FATE_SCHEMA:
        value = columns.get(fate_field.name)
        if isinstance(value, pa.ChunkedArray):
            value = value.combine_chunks()
        if isinstance(value, pa.Array):
            arrays.append(value.cast(fate_field.type))
        elif isinstance(value, (list, tuple)) or hasattr(value, "__array__"):
            arrays.append(pa.array(value, type=fate_field.type, from_pandas=True))
        else:
            arrays.append(pa.array([value] * n, type=fate_field.type))
    return pa.Table.from_arrays(arrays, schema=FATE_SCHEMA)


def empty_fates() -> pa.Table:
    return FATE_SCHEMA.empty_table()


def check_fates(fates: pa.Table, expected_uids: pa.Array | pa.ChunkedArray, where: str) -> None:
    """Raise FateError unless `fates` has exactly one row per expected uid and valid statuses."""
    got = fates["uid"]
    if pc.any(pc.is_null(got)).as_py():
        raise FateError(f"{where}: fate with a null uid")
    counts = pc.value_counts(got)
    repeated = [c["values"] for c in counts.to_pylist() if c["counts"] > 1]
    if repeated:
        raise FateError(f"{where}: {len(repeated)} uids have more than one fate, e.g. {repeated[:3]}")
    expected = pa.chunked_array([expected_uids]) if isinstance(expected_uids, pa.Array) else expected_uids
    missing = pc.filter(expected, pc.invert(pc.is_in(expected, value_set=got.combine_chunks())))
    extra = pc.filter(got, pc.invert(pc.is_in(got, value_set=expected.combine_chunks())))
    if len(missing) or len(extra):
        raise FateError(
            f"{where}: fates do not match the uids given: {len(missing)} missing "
            f"(e.g. {missing[:3].to_pylist()}), {len(extra)} unexpected (e.g. {extra[:3].to_pylist()})"
        )
    bad_status = pc.filter(fates["status"], pc.invert(pc.is_in(fates["status"], pa.array(list(Status)))))
    if len(bad_status):
        raise FateError(f"{where}: unknown status {bad_status[0].as_py()!r}")
    undecided = pc.and_(pc.not_equal(fates["status"], Status.KEPT.value), pc.is_null(fates["reason"]))
    if pc.any(undecided).as_py():
        raise FateError(f"{where}: a dropped or failed fate without a reason")


def count_fates(fates: pa.Table) -> Counter[str]:
    """'kept', 'dropped/<reason>', 'failed/<reason>' -> rows."""
    counts: Counter[str] = Counter()
    grouped = fates.group_by(["status", "reason"], use_threads=False).aggregate([("uid", "count")])
    for row in grouped.to_pylist():
        key = row["status"] if row["status"] == Status.KEPT else f"{row['status']}/{row['reason']}"
        counts[key] += row["uid_count"]
    return counts


@dataclass
class StageStats:
    counts: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def __add__(self, other: StageStats) -> StageStats:
        return StageStats(self.counts + other.counts, self.seconds + other.seconds)

    @property
    def rows(self) -> int:
        return sum(self.counts.values())

    @property
    def kept(self) -> int:
        return self.counts.get(Status.KEPT.value, 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "kept": self.kept,
            "counts": dict(sorted(self.counts.items())),
            "seconds": round(self.seconds, 3),
        }


def read_fate_parts(paths: Iterable[Path]) -> pa.Table:
    tables = [pq.read_table(path, schema=FATE_SCHEMA) for path in paths]
    return pa.concat_tables(tables) if tables else empty_fates()


def merge_ledger(stage_fates: list[tuple[str, pa.Table]]) -> pd.DataFrame:
    """One row per input row: the last stage that decided a uid sets its status, attributes accumulate, and
    a stage that keeps a row without a word keeps the earlier `detail` ("fetched on retry 1", "control
    characters removed from caption").

    `stage_fates` is in pipeline order; the first entry (the input stage) must cover every input row,
    and every later stage must decide exactly the uids the previous stage kept.
    """
    first_stage, first = stage_fates[0]
    ledger = _fates_frame(first)
    ledger["stage"] = first_stage
    previous_kept = ledger.index[ledger["status"] == Status.KEPT.value]
    for stage, fates in stage_fates[1:]:
        decided = _fates_frame(fates)
        if len(decided) != len(previous_kept) or not decided.index.isin(previous_kept).all():
            raise FateError(
                f"stage {stage!r} decided {len(decided)} uids, but the previous stage kept {len(previous_kept)}"
            )
        silent = (decided["status"] == Status.KEPT.value) & decided["detail"].isna()
        decided.loc[silent, "detail"] = ledger.loc[decided.index[silent], "detail"]
        ledger.loc[decided.index, ["status", "reason", "detail"]] = decided[["status", "reason", "detail"]]
        ledger.loc[decided.index, "stage"] = stage
        for attribute in (f.name for f in ATTRIBUTE_FIELDS):
            values = decided[attribute].dropna()
            if len(values):
                ledger.loc[values.index, attribute] = values
        previous_kept = decided.index[decided["status"] == Status.KEPT.value]
    return ledger.reset_index()[LEDGER_COLUMNS]


_NULLABLE_DTYPES = {pa.int32(): pd.Int32Dtype(), pa.float32(): pd.Float32Dtype()}


def _fates_frame(fates: pa.Table) -> pd.DataFrame:
    return fates.to_pandas(types_mapper=_NULLABLE_DTYPES.get).set_index("uid")


LEDGER_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string()),
        *ATTRIBUTE_FIELDS[:2],
        pa.field("status", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        *ATTRIBUTE_FIELDS[2:],
    ]
)


def ledger_table(ledger: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(ledger, schema=LEDGER_SCHEMA, preserve_index=False)


def ledger_schema(kept: pa.Schema | None) -> pa.Schema:
    """The ledger's columns, then the input's kept columns (`input.keep_columns`, typed as the input stored them)."""
    if kept is None:
        return LEDGER_SCHEMA
    return pa.schema([*LEDGER_SCHEMA, *(kept_field for kept_field in kept if kept_field.name != "uid")])


def add_kept_columns(ledger: pa.Table, kept: pa.Table | None) -> pa.Table:
    """Ledger rows with the kept columns of the same uids appended (joined by uid, not by position)."""
    if kept is None:
        return ledger
    where = pc.index_in(ledger["uid"], value_set=kept["uid"].combine_chunks())
    for kept_field in kept.schema:
        if kept_field.name != "uid":
            ledger = ledger.append_column(kept_field, kept[kept_field.name].combine_chunks().take(where))
    return ledger


def read_ledger(run_dir: str | Path) -> pd.DataFrame:
    """The ledger of a run on disk or on a bucket (`s3://...`, read with the environment's credentials)."""
    from curate.stage import RunLayout

    layout = RunLayout.of(run_dir)
    return pq.read_table(layout.fetch(layout.ledger_path)).to_pandas(types_mapper=_NULLABLE_DTYPES.get)
