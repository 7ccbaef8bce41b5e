"""Input stage: read URL/caption tables as a stream, validate, give each row a stable uid, shard them.

File-level problems (missing column, wrong type, empty or corrupt file, duplicate uids) raise InputError
and nothing is committed. Row-level problems become fates:

- url null, empty, longer than `input.max_url_chars`, not http(s), no host, or containing whitespace
  -> failed / invalid_url
- caption that is not valid UTF-8 -> failed / invalid_caption
- caption longer than `input.max_caption_chars` -> dropped / caption_too_long (the ledger keeps its
  first `max_caption_chars` characters)
- control characters in a caption are replaced by spaces and runs of whitespace collapsed; the row is
  kept and its ledger `detail` says so. A null caption is read as "".
- an exact repeat of an earlier (url, caption) pair (after cleaning, across shards and files)
  -> dropped / dup_url_caption, detail = the uid of the first occurrence

With `input.uid_col`, that column (text or integers, trimmed) is the uid and must be unique over all
files. Without it, a row's uid is blake2b-128 (hex) of "<file name>\x1f<row number in the file>"
(rows counted from 0, blank jsonl lines not counted): stable across runs, unique while file names are.

The stage makes two passes: the files are read once, validated and written to an Arrow IPC staging area
while 64-bit uid hashes and 128-bit (url, caption) hashes are collected; once every row has been seen,
duplicate uids fail the stage and repeats are resolved to their first occurrence, and the staging
shards are rewritten as the final shards and fates. Memory is bounded by the batch size plus 32 bytes
per input row.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from curate.config import ConfigError, InputConfig
from curate.io.fs import SCRATCH_SUFFIX, replace_dir, write_json_atomic
from curate.ledger import StageStats, Status, count_fates, make_fates
from curate.stage import Phase, Stage, StageContext, StageOutputs, TaskOutput, content_identity, digest, single_task

log = logging.getLogger(__name__)

STAGE = "input"
SHARD_SCHEMA = pa.schema([("uid", pa.string()), ("url", pa.string()), ("caption", pa.string())])
_STAGING_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("row", pa.int64()),
    ]
)
_CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
# A caption that needs more than trimming: control characters (tab, newline ... included) or a space run.
_NEEDS_CLEANING = r"[\x00-\x1f\x7f-\x9f]| {2}"
_VALID_URL = r"^[hH][tT][tT][pP][sS]?://[^/?#\s@]*[^/?#\s:@][^\s]*$"
_HASH_KEYS = ("curate-urlcap-01", "curate-urlcap-02")
_UID_HASH_KEY = "curate-uidhash01"
_READ_ERRORS = (pa.ArrowInvalid, OSError, EOFError, zlib.error)
_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
_STRING_TYPES = (
    pa.types.is_string,
    pa.types.is_large_string,
    pa.types.is_binary,
    pa.types.is_large_binary,
    pa.types.is_null,
)


class InputError(ConfigError):
    """An input file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class SourceFile:
    path: Path
    format: str
    gzipped: bool

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class InputSummary:
    shards: list[str]
    rows: int
    stats: StageStats


# ---------------------------------------------------------------- locating and checking files


def resolve_sources(cfg: InputConfig) -> list[SourceFile]:
    sources = []
    for pattern in map(os.path.expanduser, cfg.paths()):
        matches = sorted(glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise InputError(f"input.path: no file matches {pattern!r}")
        for match in matches:
            path = Path(match)
            if not path.is_file():
                raise InputError(f"{path}: no such input file")
            sources.append(source_file(path, cfg.format))
    seen: set[Path] = set()
    for source in sources:
        if source.path.resolve() in seen:
            raise InputError(f"{source.path}: listed more than once in input.path")
        seen.add(source.path.resolve())
    if cfg.uid_col is None:
        by_name: dict[str, Path] = {}
        for source in sources:
            if source.name in by_name:
                raise InputError(
                    f"{source.path}: has the same file name as {by_name[source.name]}, so their generated "
                    "uids would collide; rename one or set input.uid_col"
                )
            by_name[source.name] = source.path
    return sources


def source_file(path: Path, declared_format: str) -> SourceFile:
    suffixes = [s.lower() for s in path.suffixes]
    gzipped = bool(suffixes) and suffixes[-1] == ".gz"
    if gzipped:
        suffixes = suffixes[:-1]
    if declared_format != "auto":
        fmt = declared_format
    elif suffixes and suffixes[-1] in _FORMATS:
        fmt = _FORMATS[suffixes[-1]]
    else:
        raise InputError(f"{path}: cannot tell the format from the name; set input.format")
    return SourceFile(path, fmt, gzipped)


def sniff(source: SourceFile) -> None:
    """Refuse a file whose bytes contradict its name (a csv that is parquet, a .gz that is not gzip)."""
    with open(source.path, "rb") as handle:
        head = handle.read(4096)
    if not head:
        raise InputError(f"{source.path}: file is empty")
    if source.gzipped:
        if not head.startswith(b"\x1f\x8b"):
            raise InputError(f"{source.path}: named .gz but is not gzip-compressed")
        try:
            with gzip.open(source.path, "rb") as handle:
                head = handle.read(4096)
        except (OSError, EOFError, zlib.error) as err:
            raise InputError(f"{source.path}: corrupt gzip data: {err}") from None
        if not head:
            raise InputError(f"{source.path}: file is empty")
    elif head.startswith(b"\x1f\x8b"):
        raise InputError(f"{source.path}: gzip-compressed data in a file not named .gz")
    if source.format == "parquet":
        if not head.startswith(b"PAR1"):
            raise InputError(f"{source.path}: not a parquet file (no PAR1 magic bytes)")
    elif head.startswith(b"PAR1") or b"\x00" in head:
        kind = "parquet" if head.startswith(b"PAR1") else "binary"
        raise InputError(f"{source.path}: named {source.format} but holds {kind} data")


def inspect_sources(cfg: InputConfig) -> list[SourceFile]:
    """Check every file's format and columns before anything is written or fetched."""
    sources = resolve_sources(cfg)
    for source in sources:
        sniff(source)
        schema = read_schema(source, cfg)
        check_columns(source, schema, cfg)
    return sources


def read_schema(source: SourceFile, cfg: InputConfig) -> pa.Schema:
    with open_table_reader(source, cfg) as reader:
        return reader.schema


def check_columns(source: SourceFile, schema: pa.Schema, cfg: InputConfig) -> None:
    for key, column in (("url_col", cfg.url_col), ("caption_col", cfg.caption_col), ("uid_col", cfg.uid_col)):
        if column is None:
            continue
        if column not in schema.names:
            raise InputError(f"{source.path}: missing column {column!r} (input.{key}); columns are {schema.names}")
        column_type = schema.field(column).type
        if pa.types.is_dictionary(column_type):
            column_type = column_type.value_type
        integer_uid = key == "uid_col" and pa.types.is_integer(column_type)  # e.g. LAION's SAMPLE_ID
        if not (integer_uid or any(check(column_type) for check in _STRING_TYPES)):
            raise InputError(f"{source.path}: column {column!r} has type {column_type}, expected a string")
    for column in cfg.keep_columns:
        if column not in schema.names:
            raise InputError(
                f"{source.path}: missing column {column!r} (input.keep_columns); columns are {schema.names}"
            )


# ---------------------------------------------------------------- streaming readers


class _TableReader:
    """Batches of the url/caption/uid columns of one file, with the file's own schema for checking."""

    def __init__(self, source: SourceFile, cfg: InputConfig) -> None:
        self.source, self.cfg = source, cfg
        self._cleanup: list[object] = []
        try:
            self.schema = self._open()
        except BaseException:
            self.__exit__()
            raise

    def __enter__(self) -> _TableReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for resource in reversed(self._cleanup):
            if isinstance(resource, Path):
                resource.unlink(missing_ok=True)
            else:
                resource.close()  # type: ignore[attr-defined]

    def _stream(self) -> io.BufferedIOBase:
        stream = gzip.open(self.source.path, "rb") if self.source.gzipped else open(self.source.path, "rb")  # noqa: SIM115
        self._cleanup.append(stream)
        return stream

    def _open(self) -> pa.Schema:
        fmt, path = self.source.format, self.source.path
        try:
            if fmt == "parquet":
                target: Path | io.BufferedIOBase = path
                if self.source.gzipped:  # parquet needs random access: decompress to a temporary file
                    handle, name = tempfile.mkstemp(prefix="curate-", suffix=".parquet")
                    target = Path(name)
                    self._cleanup.append(target)
                    with gzip.open(path, "rb") as src, open(handle, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                # pre_buffer would keep every column chunk read so far until the file is closed: the
                # whole file, for a streaming read. Buffered reads keep one page's worth at a time.
                self._parquet = pq.ParquetFile(target, pre_buffer=False, buffer_size=1 << 20)
                if self._parquet.metadata.num_rows == 0:
                    raise InputError(f"{path}: parquet file has no rows")
                return self._parquet.schema_arrow
            if fmt in ("csv", "tsv"):
                self._csv, schema = self._open_csv()
                return schema
            self._lines = self._stream()
            first = self._peek_json_line()
            return pa.schema([(name, _json_type(value)) for name, value in first.items()])
        except InputError:
            raise
        except _READ_ERRORS as err:
            raise InputError(f"{path}: not a readable {fmt} file (truncated or corrupt?): {err}") from None

    def _open_csv(self) -> tuple[pcsv.CSVStreamingReader, pa.Schema]:
        """The reader of the wanted columns (as binary), and every column of the file for checking."""
        cfg, delimiter = self.cfg, "\t" if self.source.format == "tsv" else ","
        header = cfg.header
        if header == "auto":
            header = "no" if self._first_field_is_url(delimiter) else "yes"
        read = pcsv.ReadOptions(
            block_size=1 << 22,
            use_threads=False,
            column_names=cfg.columns if header == "no" else None,
        )
        parse = pcsv.ParseOptions(
            delimiter=delimiter,
            quote_char='"' if delimiter == "," else False,
            newlines_in_values=delimiter == ",",
        )
        if header == "no":
            names = list(cfg.columns)
        else:
            with self._stream() as stream:
                names = pcsv.open_csv(stream, read_options=read, parse_options=parse).schema.names
        wanted = [c for c in (cfg.url_col, cfg.caption_col, cfg.uid_col, *cfg.keep_columns) if c and c in names]
        convert = pcsv.ConvertOptions(
            column_types={c: pa.binary() for c in wanted}, strings_can_be_null=False, include_columns=wanted
        )
        reader = pcsv.open_csv(self._stream(), read_options=read, parse_options=parse, convert_options=convert)
        return reader, pa.schema([(name, pa.binary()) for name in names])

    def _first_field_is_url(self, delimiter: str) -> bool:
        opener = gzip.open if self.source.gzipped else open
        with opener(self.source.path, "rb") as handle:
            first_line = handle.readline(65536)
        first_field = first_line.removeprefix(b"\xef\xbb\xbf").split(delimiter.encode(), 1)[0]
        return first_field.strip().strip(b'"').lower().startswith((b"http://", b"https://"))

    def _peek_json_line(self) -> dict[str, object]:
        self._line_number = 0
        self._pending: list[bytes] = []
        for line in self._lines:
            self._line_number += 1
            if line.strip():
                self._pending.append(line)
                return self._parse_json(line, self._line_number)
        raise InputError(f"{self.source.path}: file has no rows")

    def _parse_json(self, line: bytes, number: int) -> dict[str, object]:
        try:
            record = json.loads(line.decode("utf-8", "surrogateescape"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{self.source.path}: line {number} is not valid JSON: {err}") from None
        if not isinstance(record, dict):
            raise InputError(f"{self.source.path}: line {number} is not a JSON object")
        return record

    def batches(self) -> Iterator[pa.Table]:
        """Tables with columns url, caption, uid (binary; uid only with input.uid_col), then the
        `keep_columns` under their own names, as the file types them (csv/tsv: strings)."""
        cfg = self.cfg
        wanted = [c for c in (cfg.url_col, cfg.caption_col, cfg.uid_col) if c]
        names = ["url", "caption", "uid"][: len(wanted)]
        try:
            for batch in self._raw_batches([*wanted, *cfg.keep_columns]):
                columns = [_as_binary(batch.column(c)) for c in wanted]
                kept = [_kept_array(batch.column(c), self.source.format) for c in cfg.keep_columns]
                yield pa.Table.from_arrays([*columns, *kept], names=[*names, *cfg.keep_columns])
        except InputError:
            raise
        except _READ_ERRORS as err:
            raise InputError(f"{self.source.path}: read failed (truncated or corrupt?): {err}") from None

    def _raw_batches(self, wanted: list[str]) -> Iterator[pa.RecordBatch | pa.Table]:
        fmt = self.source.format
        if fmt == "parquet":
            yield from self._parquet.iter_batches(batch_size=self.cfg.batch_rows, columns=wanted)
        elif fmt in ("csv", "tsv"):
            rows = 0
            for batch in self._csv:
                rows += batch.num_rows
                yield batch
            if rows == 0:
                raise InputError(f"{self.source.path}: file has no rows")
        else:
            yield from self._json_batches(wanted)

    def _json_batches(self, wanted: list[str]) -> Iterator[pa.Table]:
        def lines() -> Iterator[tuple[int, bytes]]:
            yield from ((self._line_number, line) for line in self._pending)
            for line in self._lines:
                self._line_number += 1
                yield self._line_number, line

        cfg_uid, keep = self.cfg.uid_col, set(self.cfg.keep_columns)
        buffer: dict[str, list[object]] = {c: [] for c in wanted}
        for number, line in lines():
            if not line.strip():
                continue
            record = self._parse_json(line, number)
            for column in wanted:
                if column in keep:
                    buffer[column].append(record.get(column))
                    continue
                value = record.get(column)
                if column == cfg_uid and isinstance(value, int) and not isinstance(value, bool):
                    value = str(value)
                if value is not None and not isinstance(value, str):
                    raise InputError(
                        f"{self.source.path}: line {number}: column {column!r} is {type(value).__name__}, "
                        "expected a string"
                    )
                buffer[column].append(None if value is None else _json_string_bytes(value))
            if len(buffer[wanted[0]]) >= self.cfg.batch_rows:
                yield self._json_table(buffer, keep)
                buffer = {c: [] for c in wanted}
        if buffer[wanted[0]]:
            yield self._json_table(buffer, keep)

    @staticmethod
    def _json_table(buffer: dict[str, list[object]], keep: set[str]) -> pa.Table:
        arrays = {c: json_values(v) if c in keep else pa.array(v, pa.binary()) for c, v in buffer.items()}
        fields = [
            pa.field(c, pa.string(), metadata=JSON_TEXT) if a.type == JSON_TEXT_MARK else pa.field(c, a.type)
            for c, a in arrays.items()
        ]
        return pa.Table.from_arrays([_unmarked(a) for a in arrays.values()], schema=pa.schema(fields))


def open_table_reader(source: SourceFile, cfg: InputConfig) -> _TableReader:
    return _TableReader(source, cfg)


def _json_string_bytes(value: str) -> bytes:
    """The bytes a JSON string stood for; undecodable bytes and lone surrogates stay invalid UTF-8."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------- kept columns (input.keep_columns)
#
# A kept column is carried with the type the input gives it (parquet: its schema; csv/tsv: text; jsonl: what
# pyarrow infers). Where files, batches or shards disagree, the type they all widen to is used (int64 and
# float64 -> float64); where there is none (text here, numbers there), the column holds JSON text, marked
# by JSON_TEXT in its field's metadata.

JSON_TEXT = {b"curate": b"json"}
JSON_TEXT_MARK = pa.large_string()  # json_values' way to say "JSON text" to _json_table; never stored


def is_json_text(field: pa.Field) -> bool:
    return (field.metadata or {}).get(b"curate") == b"json"


def json_values(values: list[object]) -> pa.Array:
    """A kept jsonl column as pyarrow types it; values of mixed kinds (1 and "a") as JSON text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else json.dumps(v) for v in values], JSON_TEXT_MARK)


def _unmarked(array: pa.Array) -> pa.Array:
    return array.cast(pa.string()) if array.type == JSON_TEXT_MARK else array


def json_text(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    return pa.array([None if v is None else json.dumps(v, default=str) for v in array.to_pylist()], pa.string())


def kept_field(fields: list[pa.Field]) -> pa.Field:
    """The one field a kept column's parts (batches, shards) are stored as."""
    name = fields[0].name
    if not any(map(is_json_text, fields)):
        real = [f.type for f in fields if not pa.types.is_null(f.type)] or [pa.string()]
        try:
            schemas = [pa.schema([(name, t)]) for t in real]
            target = pa.unify_schemas(schemas, promote_options="permissive").field(name).type
            for source in real:  # the cast must exist (struct<a> to struct<a, b> does not)
                pa.array([], source).cast(target)
            return pa.field(name, target)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            pass
    return pa.field(name, pa.string(), metadata=JSON_TEXT)


def as_kept_field(array: pa.Array | pa.ChunkedArray, source: pa.Field, target: pa.Field) -> pa.Array:
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if is_json_text(target):
        return array if is_json_text(source) else json_text(array)
    return array.cast(target.type, safe=False)  # only widening casts get here (int64 -> float64 may round)


def conform_kept(tables: list[pa.Table], keep: list[str]) -> list[pa.Table]:
    """`tables` with each kept column stored as one field (kept_field) in all of them."""
    for name in keep:
        sources = [t.schema.field(name) for t in tables]
        target = kept_field(sources)
        tables = [
            t.set_column(t.schema.get_field_index(name), target, as_kept_field(t[name], f, target))
            for t, f in zip(tables, sources, strict=True)
        ]
    return tables


def _kept_array(column: pa.Array | pa.ChunkedArray, fmt: str) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if fmt in ("csv", "tsv"):  # read as bytes: text that is not UTF-8 becomes null rather than failing the file
        column = decode_utf8(column)[0]
    return column


def _json_type(value: object) -> pa.DataType:
    if value is None:
        return pa.null()
    if isinstance(value, str):
        return pa.string()
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    return pa.struct([]) if isinstance(value, dict) else pa.list_(pa.null())


def _as_binary(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), pa.binary())
    if pa.types.is_integer(column.type):
        column = column.cast(pa.string())
    return column.cast(pa.binary())


# ---------------------------------------------------------------- row validation


def decode_utf8(column: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Binary -> string; rows that are not valid UTF-8 become null and are flagged."""
    invalid = np.zeros(len(column), dtype=bool)
    try:
        return column.cast(pa.string()), invalid
    except pa.ArrowInvalid:
        pass
    _flag_invalid_utf8(column, 0, invalid)
    valid = pc.if_else(pa.array(invalid), pa.scalar(None, column.type), column)
    return valid.cast(pa.string()), invalid


def _flag_invalid_utf8(column: pa.Array, offset: int, invalid: np.ndarray) -> None:
    """Bisect `column` (which holds invalid UTF-8) down to the bad rows: cost ~ bad rows x log(rows)."""
    if len(column) <= 16:
        for i in range(len(column)):
            try:
                column.slice(i, 1).cast(pa.string())
            except pa.ArrowInvalid:
                invalid[offset + i] = True
        return
    half = len(column) // 2
    for start, part in ((0, column.slice(0, half)), (half, column.slice(half))):
        try:
            part.cast(pa.string())
        except pa.ArrowInvalid:
            _flag_invalid_utf8(part, offset + start, invalid)


def generated_uids(source_name: str, first_row: int, count: int) -> pa.Array:
    """blake2b-128 hex of "<file name>\\x1f<row>" for rows first_row .. first_row + count - 1."""
    copy = hashlib.blake2b(f"{source_name}\x1f".encode(), digest_size=16).copy
    digests = bytearray()
    for row in range(first_row, first_row + count):  # the one per-row loop: ~0.8 us a row
        digest = copy()
        digest.update(b"%d" % row)
        digests += digest.digest()
    return _hex_strings(np.frombuffer(bytes(digests), dtype=np.uint8), 16)


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _hex_strings(data: np.ndarray, width: int) -> pa.Array:
    """Lower-case hex of each consecutive `width`-byte run of `data`, as a string array."""
    count = len(data) // width
    hexed = np.empty(2 * len(data), dtype=np.uint8)
    hexed[0::2], hexed[1::2] = _HEX_DIGITS[data >> 4], _HEX_DIGITS[data & 15]
    offsets = np.arange(0, 2 * width * (count + 1), 2 * width, dtype=np.int32)
    return pa.StringArray.from_buffers(count, pa.py_buffer(offsets), pa.py_buffer(hexed))


def clean_captions(caption: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Null -> "", control characters -> space, whitespace runs -> one space, trimmed; and which had
    control characters. Only the few captions that need more than trimming go through the regexes."""
    caption = pc.fill_null(caption, "")
    had_control = np.zeros(len(caption), dtype=bool)
    messy = pc.match_substring_regex(caption, _NEEDS_CLEANING)
    if pc.any(messy).as_py():
        subset = caption.filter(messy)
        where = np.flatnonzero(messy.to_numpy(zero_copy_only=False))
        had_control[where] = pc.match_substring_regex(subset, _CONTROL_CHARS).to_numpy(zero_copy_only=False)
        subset = pc.replace_substring_regex(subset, _CONTROL_CHARS, " ")
        subset = pc.replace_substring_regex(subset, r"\s+", " ")
        caption = pc.replace_with_mask(caption, messy, subset)
    return pc.utf8_trim_whitespace(caption), had_control


def validate_batch(batch: pa.Table, cfg: InputConfig, uids: pa.Array, rows: pa.Array) -> pa.Table:
    """One staging row per input row: cleaned url/caption plus status/reason/detail so far."""
    n = batch.num_rows
    url, url_not_utf8 = decode_utf8(batch["url"].combine_chunks())
    caption, caption_not_utf8 = decode_utf8(batch["caption"].combine_chunks())

    url = pc.utf8_trim_whitespace(url)
    url_length = pc.fill_null(pc.utf8_length(url), 0).to_numpy(zero_copy_only=False)
    url_ok = pc.fill_null(pc.match_substring_regex(url, _VALID_URL), False).to_numpy(zero_copy_only=False)

    caption, had_control = clean_captions(caption)
    caption_length = pc.utf8_length(caption).to_numpy(zero_copy_only=False)

    status = np.full(n, Status.KEPT.value, dtype=object)
    reason = np.full(n, None, dtype=object)
    detail = np.where(had_control, "control characters removed from caption", None).astype(object)

    def mark(mask: np.ndarray, new_status: Status, new_reason: str, new_detail: np.ndarray | str) -> None:
        mask = mask & (reason == None)  # noqa: E711  (object array: elementwise test for unset)
        status[mask] = new_status.value
        reason[mask] = new_reason
        detail[mask] = new_detail[mask] if isinstance(new_detail, np.ndarray) else new_detail

    mark(url_not_utf8, Status.FAILED, "invalid_url", "url is not valid UTF-8")
    mark(url_length == 0, Status.FAILED, "invalid_url", "empty url")
    mark(
        url_length > cfg.max_url_chars,
        Status.FAILED,
        "invalid_url",
        f"url longer than {cfg.max_url_chars} characters",
    )
    mark(~url_ok, Status.FAILED, "invalid_url", "not an http(s) url with a host")
    mark(caption_not_utf8, Status.FAILED, "invalid_caption", "caption is not valid UTF-8")
    too_long = caption_length > cfg.max_caption_chars
    if too_long.any():
        too_long_detail = np.full(n, None, dtype=object)
        too_long_detail[too_long] = [
            f"caption has {length} characters > {cfg.max_caption_chars}" for length in caption_length[too_long]
        ]
        mark(too_long, Status.DROPPED, "caption_too_long", too_long_detail)
        caption = pc.utf8_slice_codeunits(caption, 0, cfg.max_caption_chars)

    return pa.Table.from_arrays(
        [
            uids,
            url,
            caption,
            pa.array(status, pa.string()),
            pa.array(reason, pa.string()),
            pa.array(detail, pa.string()),
            rows,
        ],
        schema=_STAGING_SCHEMA,
    )


def _hash_strings(column: pa.ChunkedArray | pa.Array, keys: tuple[str, ...]) -> list[np.ndarray]:
    values = column.to_numpy(zero_copy_only=False)
    return [pd.util.hash_array(values, hash_key=key, categorize=False) for key in keys]


def url_caption_hashes(staged: pa.Table) -> np.ndarray:
    """128-bit hash per row of (url, caption) as an (n, 2) uint64 array. A caption never holds the
    separator (control characters are cleaned away), so different pairs never join to the same string."""
    joined = pc.binary_join_element_wise(pc.fill_null(staged["url"], ""), staged["caption"], "\x1f")
    return np.stack(_hash_strings(joined, _HASH_KEYS), axis=1)


def string_hashes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """64-bit hash per value; equal hashes must be confirmed on the values themselves."""
    return _hash_strings(column, (_UID_HASH_KEY,))[0]


# ---------------------------------------------------------------- the stage


def shard_name(index: int) -> str:
    return f"{index:05d}"


class _StagingWriter:
    """Cuts the stream of validated rows into shards of `shard_size` input rows (Arrow IPC files)."""

    def __init__(self, folder: Path, shard_size: int, keep: list[str] | None = None) -> None:
        self.folder, self.shard_size, self.keep = folder, shard_size, keep or []
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.shards: list[str] = []
        self.kept_fields: dict[str, list[pa.Field]] = {name: [] for name in self.keep}
        """Per kept column, the field each staging shard stores it as."""

    def add(self, table: pa.Table) -> None:
        while table.num_rows:
            take = min(self.shard_size - self.pending_rows, table.num_rows)
            self.pending.append(table.slice(0, take))
            self.pending_rows += take
            table = table.slice(take)
            if self.pending_rows == self.shard_size:
                self.flush()

    def flush(self) -> None:
        if not self.pending_rows:
            return
        name = shard_name(len(self.shards))
        table = pa.concat_tables(conform_kept(self.pending, self.keep))
        for column in self.keep:
            self.kept_fields[column].append(table.schema.field(column))
        with pa.ipc.new_file(self.path(name), table.schema) as writer:
            writer.write_table(table)
        self.shards.append(name)
        self.pending, self.pending_rows = [], 0

    def path(self, shard: str) -> Path:
        return self.folder / f"{shard}.arrow"

    def read(self, shard: str, columns: list[str] | None = None) -> pa.Table:
        with pa.OSFile(str(self.path(shard))) as handle:
            table = pa.ipc.open_file(handle).read_all()
        return table.select(columns) if columns else table


def source_identities(cfg: InputConfig, sources: list[SourceFile]) -> list[dict[str, object]]:
    """The input files by content, in order (the order decides which repeat of a pair is the first). A file's
    name counts only when generated uids hash it."""
    return [content_identity(s.path, s.name if cfg.uid_col is None else None) for s in sources]


def input_fingerprint(cfg: InputConfig, sources: list[SourceFile]) -> str:
    return InputStage.settings_digest(cfg, sources)


def build_input(cfg: InputConfig, sources: list[SourceFile], stage_dir: Path, fingerprint: str) -> InputSummary:
    """Stream every source into `stage_dir` (shards/, fates/, _done/, manifest.json), all or nothing:
    on any error nothing is left behind and an existing `stage_dir` is untouched."""
    created = [p for p in (stage_dir.parent, *stage_dir.parent.parents) if not p.exists()]
    scratch = stage_dir.parent / f".{stage_dir.name}.{uuid.uuid4().hex[:8]}{SCRATCH_SUFFIX}"
    committed = False
    try:
        summary = write_input(cfg, sources, scratch, fingerprint)
        replace_dir(scratch, stage_dir)
        committed = True
        return summary
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not committed:
            for folder in created:  # innermost first; only folders this call made
                with contextlib.suppress(OSError):
                    folder.rmdir()


def write_input(cfg: InputConfig, sources: list[SourceFile], folder: Path, fingerprint: str) -> InputSummary:
    staging = folder / "staging"
    staging.mkdir(parents=True)
    summary = _stream_and_shard(cfg, sources, folder, staging, fingerprint)
    shutil.rmtree(staging)
    return summary


@dataclass
class _Seen:
    """What the first pass remembers of every row: hashes to find repeated uids and (url, caption) pairs."""

    uid_hashes: list[np.ndarray]
    pair_hashes: list[np.ndarray]  # (n, 2) uint64, for the rows still kept after validation
    pair_rows: list[np.ndarray]  # their global row numbers
    file_starts: list[tuple[int, SourceFile]]  # global row where each file begins


def _stream_and_shard(
    cfg: InputConfig, sources: list[SourceFile], scratch: Path, staging: Path, fingerprint: str
) -> InputSummary:
    writer = _StagingWriter(staging, cfg.shard_size, cfg.keep_columns)
    seen = _Seen([], [], [], [])
    global_row = 0
    for source in sources:
        file_row = 0
        seen.file_starts.append((global_row, source))
        with open_table_reader(source, cfg) as reader:
            check_columns(source, reader.schema, cfg)
            for batch in reader.batches():
                n = batch.num_rows
                rows = pa.array(np.arange(global_row, global_row + n), pa.int64())
                if cfg.uid_col:
                    uids = _given_uids(batch["uid"].combine_chunks(), source, file_row)
                else:
                    uids = generated_uids(source.name, file_row, n)
                staged = validate_batch(batch, cfg, uids, rows)
                for column in cfg.keep_columns:
                    staged = staged.append_column(batch.schema.field(column), batch[column])
                seen.uid_hashes.append(string_hashes(uids))
                candidates = staged.filter(pc.equal(staged["status"], Status.KEPT.value))
                seen.pair_hashes.append(url_caption_hashes(candidates))
                seen.pair_rows.append(candidates["row"].to_numpy())
                writer.add(staged)
                global_row += n
                file_row += n
    writer.flush()
    _refuse_duplicate_uids(np.concatenate(seen.uid_hashes) if seen.uid_hashes else np.zeros(0, np.uint64), writer, seen)
    seen.uid_hashes.clear()
    repeats, firsts = _first_occurrences(seen.pair_hashes, seen.pair_rows)
    seen.pair_hashes.clear()
    seen.pair_rows.clear()
    kept_fields = [kept_field(fields) for fields in writer.kept_fields.values()]
    return _finalize_shards(writer, scratch, repeats, firsts, cfg.shard_size, fingerprint, kept_fields)


def _given_uids(column: pa.Array, source: SourceFile, first_row: int) -> pa.Array:
    uids, invalid = decode_utf8(column)
    uids = pc.utf8_trim_whitespace(uids)
    bad = invalid | pc.fill_null(pc.equal(uids, ""), True).to_numpy(zero_copy_only=False)
    if bad.any():
        row = first_row + int(np.flatnonzero(bad)[0])
        raise InputError(f"{source.path}: row {row}: empty or non-UTF-8 uid in the uid column")
    return uids


def _refuse_duplicate_uids(hashes: np.ndarray, writer: _StagingWriter, seen: _Seen) -> None:
    """Raise InputError naming the first repeated uid and where it occurs. 64-bit hashes find the
    candidates; the uids themselves decide, so a hash collision is never reported as a repeat."""
    ordered = np.sort(hashes)
    suspicious = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if not len(suspicious):
        return
    parts = []
    for shard in writer.shards:
        staged = writer.read(shard, ["uid", "row"])
        hit = np.isin(string_hashes(staged["uid"]), suspicious)
        if hit.any():
            parts.append(staged.filter(pa.array(hit)).to_pandas())
    suspects = pd.concat(parts).sort_values("row")
    repeated = suspects[suspects.duplicated("uid", keep=False)]
    if repeated.empty:
        return
    uid = repeated.iloc[0]["uid"]
    places = [_file_row(int(row), seen.file_starts) for row in repeated.loc[repeated.uid == uid, "row"]]
    where = ", ".join(f"{source.path} row {row}" for source, row in places[:5])
    raise InputError(f"{places[0][0].path}: uid {uid!r} appears {len(places)} times ({where}); uids must be unique")


def _file_row(row: int, file_starts: list[tuple[int, SourceFile]]) -> tuple[SourceFile, int]:
    """The file a global row number belongs to, and the row number within that file."""
    index = int(np.searchsorted([start for start, _ in file_starts], row, side="right")) - 1
    start, source = file_starts[index]
    return source, row - start


def _first_occurrences(hash_parts: list[np.ndarray], row_parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The global rows that repeat an earlier (url, caption) pair, ascending, and for each the global row
    of the pair's first occurrence. `row_parts` ascend within and across parts."""
    empty = np.zeros(0, np.int64)
    if not hash_parts:
        return empty, empty
    high = np.concatenate([h[:, 0] for h in hash_parts])
    if not len(high):
        return empty, empty
    # A stable sort on the first 64 bits keeps rows ascending within equal hashes; only rows whose
    # first 64 bits repeat need the full comparison.
    order = np.argsort(high, kind="stable")
    sorted_high = high[order]
    del high
    same = sorted_high[1:] == sorted_high[:-1]
    del sorted_high
    in_run = np.zeros(len(order), dtype=bool)
    in_run[1:] |= same
    in_run[:-1] |= same
    del same
    candidates = np.sort(order[in_run])  # positions into the concatenated parts
    del order, in_run
    hashes = np.concatenate(hash_parts)[candidates]
    rows = np.concatenate(row_parts)[candidates]
    order = np.lexsort((rows, hashes[:, 1], hashes[:, 0]))
    sorted_hashes, sorted_rows = hashes[order], rows[order]
    same_as_previous = np.zeros(len(rows), dtype=bool)
    same_as_previous[1:] = (sorted_hashes[1:] == sorted_hashes[:-1]).all(axis=1)
    group_start = np.maximum.accumulate(np.where(same_as_previous, 0, np.arange(len(rows))))
    repeats = np.flatnonzero(same_as_previous)
    repeat_rows, first_rows = sorted_rows[repeats], sorted_rows[group_start[repeats]]
    by_row = np.argsort(repeat_rows)
    return repeat_rows[by_row].astype(np.int64), first_rows[by_row].astype(np.int64)


def _finalize_shards(
    writer: _StagingWriter,
    scratch: Path,
    repeats: np.ndarray,
    firsts: np.ndarray,
    shard_size: int,
    fingerprint: str,
    kept_fields: list[pa.Field],
) -> InputSummary:
    """Rewrite each staging shard as its final shard and fates, marking the repeats found; the kept columns
    of every row go to columns/, each stored as `kept_fields` says."""
    needed = np.unique(firsts)  # rows whose uid some repeat names
    needed_uids: list[pa.Array] = []  # their uids, in the order of `needed`, filled shard by shard
    total = StageStats()
    for path in ("shards", "fates", "_done", *(["columns"] if kept_fields else [])):
        (scratch / path).mkdir(parents=True, exist_ok=True)
    for shard in writer.shards:
        staged = writer.read(shard)
        writer.path(shard).unlink()
        rows = staged["row"].to_numpy()
        first, last = int(rows[0]), int(rows[-1])
        assert last - first + 1 == len(rows), "staging shards hold consecutive rows"
        lo, hi = np.searchsorted(needed, [first, last + 1])
        needed_uids.append(staged["uid"].take(pa.array(needed[lo:hi] - first)).combine_chunks())
        lo, hi = np.searchsorted(repeats, [first, last + 1])
        status, reason, detail = staged["status"], staged["reason"], staged["detail"]
        if hi > lo:
            mask = np.zeros(len(rows), dtype=bool)
            mask[repeats[lo:hi] - first] = True
            mask_array = pa.array(mask)
            first_uids = pa.chunked_array(needed_uids, pa.string()).take(
                pa.array(np.searchsorted(needed, firsts[lo:hi]))
            )
            status = pc.if_else(mask_array, Status.DROPPED.value, status)
            reason = pc.if_else(mask_array, "dup_url_caption", reason)
            detail = pc.replace_with_mask(detail.combine_chunks(), mask_array, first_uids.combine_chunks())
        fates = make_fates(staged["uid"], status, reason, detail, url=staged["url"], caption=staged["caption"])
        kept = pc.equal(fates["status"], Status.KEPT.value)
        shard_rows = staged.select(["uid", "url", "caption"]).filter(kept).cast(SHARD_SCHEMA)
        pq.write_table(shard_rows, scratch / "shards" / f"{shard}.parquet", use_dictionary=False)
        pq.write_table(fates, scratch / "fates" / f"{shard}.parquet", use_dictionary=["status", "reason"])
        if kept_fields:
            columns = [as_kept_field(staged[f.name], staged.schema.field(f.name), f) for f in kept_fields]
            kept_table = pa.Table.from_arrays([staged["uid"], *columns], schema=pa.schema([_UID_FIELD, *kept_fields]))
            pq.write_table(kept_table, scratch / "columns" / f"{shard}.parquet")
        stats = StageStats(count_fates(fates))
        write_json_atomic(
            scratch / "_done" / f"{shard}.json",
            {"fingerprint": fingerprint, "counts": dict(stats.counts), "seconds": 0.0},
        )
        total = total + stats
    manifest = {"fingerprint": fingerprint, "shards": writer.shards, "rows": total.rows, "shard_size": shard_size}
    if kept_fields:
        manifest["keep_columns"] = {f.name: "json" if is_json_text(f) else str(f.type) for f in kept_fields}
    write_json_atomic(scratch / "manifest.json", manifest)
    return InputSummary(writer.shards, total.rows, total)


def read_manifest(stage_dir: Path) -> dict[str, object] | None:
    path = stage_dir / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


def read_shard_rows(stage_dir: Path, shard: str) -> pa.Table:
    return pq.read_table(stage_dir / "shards" / f"{shard}.parquet", schema=SHARD_SCHEMA)


_UID_FIELD = pa.field("uid", pa.string())


class InputOutputs(StageOutputs):
    stage = STAGE

    def manifest(self) -> dict[str, object] | None:
        return read_manifest(self.folder)

    def shards(self) -> list[str]:
        manifest = self.manifest()
        if manifest is None:
            raise FileNotFoundError(f"{self.layout.root}: the input stage has not finished")
        return list(manifest["shards"])  # type: ignore[call-overload]

    def rows(self, shard: str) -> pa.Table:
        return read_shard_rows(self.folder, shard)

    def kept_columns_path(self, shard: str) -> Path:
        return self.folder / "columns" / f"{shard}.parquet"

    def kept_columns(self, shard: str) -> pa.Table | None:
        """uid and the `input.keep_columns` of every input row of the shard (None when none are kept). A
        column whose field metadata says `is_json_text` holds JSON text: its files disagreed on its type."""
        path = self.kept_columns_path(shard)
        return pq.read_table(path) if path.exists() else None

    def kept_columns_schema(self) -> pa.Schema | None:
        """The schema of every shard's kept columns (the input stage stores each column as one type)."""
        shards = self.shards()
        path = self.kept_columns_path(shards[0]) if shards else None
        return pq.read_schema(path) if path is not None and path.exists() else None


class InputStage(Stage):
    """Reads, validates and shards the input files; every row gets a uid and a fate. All or nothing: the
    stage folder is replaced as a whole, so an unusable file leaves a previous input untouched."""

    name = STAGE
    speed_only = frozenset({"batch_rows"})
    outputs = InputOutputs

    def preflight(self) -> None:
        inspect_sources(self.cfg)  # format and columns of every file, before anything is written or fetched

    def fingerprint(self, upstream: str) -> str:
        return self.settings_digest(self.cfg, resolve_sources(self.cfg))

    @classmethod
    def settings_digest(cls, cfg: InputConfig, sources: list[SourceFile]) -> str:
        settings = cfg.model_dump(mode="json", exclude={"path", *cls.speed_only})
        return digest({"stage": cls.name, "settings": settings, "files": source_identities(cfg, sources)})

    def phases(self) -> list[Phase]:
        return [
            Phase(
                "build", single_task, self._build, commit="replace", output_root=lambda ctx: ctx.layout.stage_dir(STAGE)
            )
        ]

    def _build(self, ctx: StageContext, _task: str, workdir: Path) -> TaskOutput:
        summary = write_input(self.cfg, inspect_sources(self.cfg), workdir, ctx.fingerprint)
        return TaskOutput(counts=dict(summary.stats.counts))
