"""The largest duplicate groups of a layer, kept small: each task that decides duplicates (an exact bucket, the
near groups task, a semantic partition) writes its own few largest groups, and a reader merges them. A group
(a survivor and the copies dropped in its favour) never spans two such tasks, so the merged top groups are
the layer's own, whatever the size of the run."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import pyarrow as pa

GROUPS = 4
COPIES = 5
SCHEMA = pa.schema(
    [
        pa.field("kept_uid", pa.string()),
        pa.field("copies", pa.int64()),
        pa.field("uid", pa.string()),
        pa.field("similarity", pa.float32()),
    ]
)


def largest_groups(drops: pa.Table, groups: int = GROUPS, copies: int = COPIES) -> pa.Table:
    """The `groups` largest groups in `drops` (uid, kept_uid, similarity), most copies first (ties: smallest
    survivor uid); each with its group size and up to `copies` of its members, most similar first (a missing
    similarity, an exact copy, counts as 1; ties: smallest uid)."""
    frame = drops.select(["uid", "kept_uid", "similarity"]).to_pandas().dropna(subset=["kept_uid"])
    frame["copies"] = frame.groupby("kept_uid")["uid"].transform("size").astype("int64")
    return _top(frame, groups, copies)


def merge_largest(parts: Iterable[pa.Table], groups: int = GROUPS, copies: int = COPIES) -> pa.Table:
    """The largest groups over several tasks' `largest_groups`."""
    frames = [part.to_pandas() for part in parts]
    frame = pd.concat(frames) if frames else SCHEMA.empty_table().to_pandas()
    return _top(frame, groups, copies)


def _top(frame: pd.DataFrame, groups: int, copies: int) -> pa.Table:
    sizes = frame.drop_duplicates("kept_uid")[["kept_uid", "copies"]]
    chosen = sizes.sort_values(["copies", "kept_uid"], ascending=[False, True]).head(groups)["kept_uid"]
    members = frame[frame["kept_uid"].isin(set(chosen))].assign(sim=lambda t: t["similarity"].fillna(1.0))
    members = members.sort_values(["copies", "kept_uid", "sim", "uid"], ascending=[False, True, False, True])
    members = members.groupby("kept_uid", sort=False).head(copies)
    return pa.Table.from_pandas(members[SCHEMA.names], schema=SCHEMA, preserve_index=False)
