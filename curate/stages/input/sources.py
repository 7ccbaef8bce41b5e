"""Locating the input files, checking them before any work, and reading them as streams of batches."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from curate.config import ConfigError, InputConfig
from curate.io.storage import LOCAL, Location, Storage, has_magic, locate, name_of
from curate.stages.input.columns import JSON_TEXT, JSON_TEXT_MARK, json_values, kept_array, unmarked
from curate.stages.input.rows import decode_utf8

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
    path: Location
    """A local Path, or an fsspec URL (str) read through `storage`."""
    format: str
    gzipped: bool
    storage: Storage = field(default=LOCAL, compare=False, repr=False)

    @property
    def name(self) -> str:
        return name_of(self.path)

    @property
    def is_local(self) -> bool:
        return isinstance(self.path, Path)

    def open(self) -> IO[bytes]:
        """The file's raw bytes (still gzip-compressed for a .gz file)."""
        return self.storage.open(self.path)

    def size(self) -> int:
        return self.storage.size(self.path)

    def parquet_metadata(self) -> pq.FileMetaData:
        if self.is_local:
            return pq.read_metadata(self.path)
        with self.open() as handle:
            return pq.read_metadata(handle)


# ---------------------------------------------------------------- locating and checking files


def resolve_sources(cfg: InputConfig, storage: Storage = LOCAL) -> list[SourceFile]:
    """The input files in order; each `input.path` entry is a local path or URL, or a glob of them."""
    sources = []
    for pattern in cfg.paths():
        if has_magic(pattern):
            matches = _glob(pattern, storage)
        else:
            location = locate(pattern)
            matches = [(location, _is_file(location, storage))]
        for location, is_file in matches:
            if not is_file:
                raise InputError(f"{location}: no such input file")
            sources.append(source_file(location, cfg.format, storage))
    seen: set[Location] = set()
    for source in sources:
        key = source.path.resolve() if isinstance(source.path, Path) else source.path
        if key in seen:
            raise InputError(f"{source.path}: listed more than once in input.path")
        seen.add(key)
    if cfg.uid_col is None:
        by_name: dict[str, Location] = {}
        for source in sources:
            if source.name in by_name:
                raise InputError(
                    f"{source.path}: has the same file name as {by_name[source.name]}, so their generated "
                    "uids would collide; rename one or set input.uid_col"
                )
            by_name[source.name] = source.path
    return sources


def _glob(pattern: str, storage: Storage) -> list[tuple[Location, bool]]:
    try:
        matches = storage.glob(pattern)
    except OSError as err:
        raise InputError(f"input.path: cannot list {pattern!r}: {err}") from None
    if not matches:
        raise InputError(f"input.path: no file matches {pattern!r}")
    return matches


def _is_file(location: Location, storage: Storage) -> bool:
    if isinstance(location, Path):
        return location.is_file()
    try:
        info = storage.info(location)
    except OSError as err:  # no permission, no connection: one line naming the URL
        raise InputError(f"{location}: cannot read the input file: {err}") from None
    return info is not None and info.get("type") == "file"


def source_file(path: Location, declared_format: str, storage: Storage = LOCAL) -> SourceFile:
    suffixes = [s.lower() for s in (path if isinstance(path, Path) else PurePosixPath(name_of(path))).suffixes]
    gzipped = bool(suffixes) and suffixes[-1] == ".gz"
    if gzipped:
        suffixes = suffixes[:-1]
    if declared_format != "auto":
        fmt = declared_format
    elif suffixes and suffixes[-1] in _FORMATS:
        fmt = _FORMATS[suffixes[-1]]
    else:
        raise InputError(f"{path}: cannot tell the format from the name; set input.format")
    return SourceFile(path, fmt, gzipped, storage)


def sniff(source: SourceFile) -> None:
    """Refuse a file whose bytes contradict its name (a csv that is parquet, a .gz that is not gzip)."""
    with source.open() as handle:
        head = handle.read(4096)
    if not head:
        raise InputError(f"{source.path}: file is empty")
    if source.gzipped:
        if not head.startswith(b"\x1f\x8b"):
            raise InputError(f"{source.path}: named .gz but is not gzip-compressed")
        try:
            with source.open() as raw, gzip.open(raw, "rb") as handle:
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


def inspect_sources(cfg: InputConfig, storage: Storage = LOCAL) -> list[SourceFile]:
    """Check every file's format and columns before anything is written or fetched."""
    sources = resolve_sources(cfg, storage)
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

    def __init__(self, source: SourceFile, cfg: InputConfig, row_groups: tuple[int, int] | None = None) -> None:
        self.source, self.cfg, self.row_groups = source, cfg, row_groups
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
        stream = self.source.open()
        self._cleanup.append(stream)
        if self.source.gzipped:
            stream = gzip.open(stream, "rb")  # noqa: SIM115  (closing it leaves the raw stream open: both are cleaned up)
            self._cleanup.append(stream)
        return stream  # type: ignore[return-value]

    def _open(self) -> pa.Schema:
        fmt, path = self.source.format, self.source.path
        try:
            if fmt == "parquet":
                target: Location | IO[bytes] = path
                if self.source.gzipped:  # parquet needs random access: decompress to a temporary file
                    handle, name = tempfile.mkstemp(prefix="curate-", suffix=".parquet")
                    target = Path(name)
                    self._cleanup.append(target)
                    with self.source.open() as raw, gzip.open(raw, "rb") as src, open(handle, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                elif not self.source.is_local:
                    target = self.source.open()  # seekable: pyarrow reads the footer, then the row groups it needs
                    self._cleanup.append(target)
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
        with self._stream() as handle:
            first_line = handle.read(65536).split(b"\n", 1)[0]
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
                kept = [kept_array(batch.column(c), self.source.format) for c in cfg.keep_columns]
                yield pa.Table.from_arrays([*columns, *kept], names=[*names, *cfg.keep_columns])
        except InputError:
            raise
        except _READ_ERRORS as err:
            raise InputError(f"{self.source.path}: read failed (truncated or corrupt?): {err}") from None

    def _raw_batches(self, wanted: list[str]) -> Iterator[pa.RecordBatch | pa.Table]:
        fmt = self.source.format
        if fmt == "parquet":
            groups = range(*self.row_groups) if self.row_groups else None
            yield from self._parquet.iter_batches(batch_size=self.cfg.batch_rows, row_groups=groups, columns=wanted)
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
        return pa.Table.from_arrays([unmarked(a) for a in arrays.values()], schema=pa.schema(fields))

    def first_row(self) -> int:
        """The file row the reader starts at: 0, or the rows of the parquet row groups before its range."""
        if not self.row_groups:
            return 0
        metadata = self._parquet.metadata
        return sum(metadata.row_group(i).num_rows for i in range(self.row_groups[0]))


def open_table_reader(source: SourceFile, cfg: InputConfig, row_groups: tuple[int, int] | None = None) -> _TableReader:
    """A reader of the whole file, or of the parquet row groups `row_groups` = (start, stop)."""
    return _TableReader(source, cfg, row_groups)


def _json_string_bytes(value: str) -> bytes:
    """The bytes a JSON string stood for; undecodable bytes and lone surrogates stay invalid UTF-8."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


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


def given_uids(column: pa.Array, source: SourceFile, first_row: int) -> pa.Array:
    uids, invalid = decode_utf8(column)
    uids = pc.utf8_trim_whitespace(uids)
    bad = invalid | pc.fill_null(pc.equal(uids, ""), True).to_numpy(zero_copy_only=False)
    if bad.any():
        row = first_row + int(np.flatnonzero(bad)[0])
        raise InputError(f"{source.path}: row {row}: empty or non-UTF-8 uid in the uid column")
    return uids
