"""Tables split into numbered partitions in one Arrow IPC file: record batch p holds partition p, so a
reader of one partition reads the file's footer and that batch only. Vectors travel as fixed-size lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.io.fs import temp_sibling


def write_partitions(path: Path, table: pa.Table, partition: np.ndarray, count: int) -> None:
    """Rows of `table` go to batch `partition[row]` (0 <= partition < count); empty partitions are empty
    batches, so batch numbers always equal partition numbers."""
    order = np.argsort(partition, kind="stable")
    bounds = np.searchsorted(partition[order], np.arange(count + 1))
    ordered = table.take(pa.array(order))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for p in range(count):
            part = ordered.slice(bounds[p], bounds[p + 1] - bounds[p])
            writer.write_batch(part.combine_chunks().to_batches()[0] if len(part) else empty_batch(table.schema))
    tmp.replace(path)


def empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=schema)


def read_partition(path: Path, partition: int) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        return pa.Table.from_batches([reader.get_batch(partition)], schema=reader.schema)


def read_partition_of_all(paths: list[Path], partition: int, schema: pa.Schema) -> pa.Table:
    return pa.concat_tables([schema.empty_table(), *(read_partition(p, partition) for p in paths)])


def vectors_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def column_vectors(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).reshape(-1, dim)


KEY_COLUMN = "_key"


def write_keyed(path: Path, table: pa.Table, key: np.ndarray) -> None:
    """`table` sorted by a non-negative integer `key` per row, stored with it in one Arrow IPC file, so that
    reading one key's rows is a binary search over a memory map: the cost of a read does not grow with the
    number of keys (a file of drops for every input shard is read once per shard)."""
    order = np.argsort(key, kind="stable")
    keyed = table.take(pa.array(order)).append_column(KEY_COLUMN, pa.array(np.asarray(key)[order], pa.int64()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, keyed.schema) as writer:
        writer.write_batch(keyed.combine_chunks().to_batches()[0] if len(keyed) else empty_batch(keyed.schema))
    tmp.replace(path)


def read_keyed(path: Path, key: int) -> pa.Table:
    """The rows `write_keyed` stored under `key`, without the key column."""
    with pa.memory_map(str(path)) as source:
        batch = pa.ipc.open_file(source).get_batch(0)
        keys = batch.column(KEY_COLUMN).to_numpy()
        start, stop = np.searchsorted(keys, [key, key + 1])
        rows = batch.slice(start, stop - start)
        return pa.Table.from_batches([rows.drop_columns([KEY_COLUMN])])
