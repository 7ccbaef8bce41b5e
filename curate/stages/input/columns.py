"""Kept columns (`input.keep_columns`): carried with the type the input gives them, one type per column."""

from __future__ import annotations

import json

import pyarrow as pa

from curate.stages.input.rows import decode_utf8

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


def unmarked(array: pa.Array) -> pa.Array:
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


def kept_array(column: pa.Array | pa.ChunkedArray, fmt: str) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if fmt in ("csv", "tsv"):  # read as bytes: text that is not UTF-8 becomes null rather than failing the file
        column = decode_utf8(column)[0]
    return column
