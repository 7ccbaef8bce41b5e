"""The value every dedup layer returns, and how the layers combine into one table keyed by uid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# The layers in the order they apply; each later layer only sees the rows earlier ones kept.
REASONS = ("contaminated", "dup_exact", "dup_near", "dup_semantic")

DECISION_SCHEMA = pa.schema(
    [("uid", pa.string()), ("reason", pa.string()), ("kept_uid", pa.string()), ("similarity", pa.float32())]
)


@dataclass(frozen=True)
class Decisions:
    """One layer's verdict on each of its input rows.

    `kept_uid` names what a dropped row lost to: its group's survivor for duplicates, the matched
    evaluation item (when ids were given) for contamination; None for kept rows. `similarity` is the
    embedding cosine behind the decision (NaN where none: kept rows, exact duplicates).
    """

    uid: np.ndarray  # object (str)
    dropped: np.ndarray  # bool
    kept_uid: np.ndarray  # object (str | None)
    similarity: np.ndarray  # float32, NaN for none

    def __post_init__(self) -> None:
        lengths = {len(self.uid), len(self.dropped), len(self.kept_uid), len(self.similarity)}
        if len(lengths) != 1:
            raise ValueError(f"Decisions columns differ in length: {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.uid)

    @property
    def n_dropped(self) -> int:
        return int(self.dropped.sum())

    @classmethod
    def keep_all(cls, uids: np.ndarray) -> Decisions:
        n = len(uids)
        return cls(as_uids(uids), np.zeros(n, bool), np.full(n, None, object), np.full(n, np.nan, np.float32))

    def to_table(self) -> pa.Table:
        return pa.table(
            {
                "uid": pa.array(self.uid, pa.string()),
                "dropped": pa.array(self.dropped, pa.bool_()),
                "kept_uid": pa.array(self.kept_uid, pa.string()),
                "similarity": pa.array(self.similarity, pa.float32(), mask=np.isnan(self.similarity)),
            }
        )


def as_uids(uids: object) -> np.ndarray:
    """uids as a 1-d object array of str (accepts a list, a numpy array or a pyarrow array)."""
    if isinstance(uids, pa.ChunkedArray | pa.Array):
        uids = uids.to_pylist()
    array = np.asarray(uids, dtype=object)
    if array.ndim != 1:
        raise ValueError(f"uids must be 1-d, got shape {array.shape}")
    return array


def canonical_order(uids: np.ndarray) -> np.ndarray:
    """Row order by uid, so that every algorithm sees its input in the same order however it came."""
    array = pa.array(as_uids(uids), pa.string())
    order = pc.sort_indices(array)
    ordered = array.take(order)
    if len(array) > 1 and pc.any(pc.equal(ordered[1:], ordered[:-1])).as_py():
        raise ValueError("uids must be unique")
    return order.to_numpy()


def combine(uids: np.ndarray, layers: Sequence[tuple[str, Decisions]]) -> pa.Table:
    """One row per uid (in the given order): the reason of the first layer that dropped it (or null), the
    uid it was kept in favour of and the similarity. Layers come in `REASONS` order, and each layer must
    have decided exactly the rows that the layers before it kept."""
    uids = as_uids(uids)
    index = pd.Index(uids)
    if not index.is_unique:
        raise ValueError("uids must be unique")
    n = len(uids)
    reason = np.full(n, None, dtype=object)
    kept_uid = np.full(n, None, dtype=object)
    similarity = np.full(n, np.nan, dtype=np.float32)
    alive = np.ones(n, dtype=bool)
    position = -1
    for name, decisions in layers:
        if name not in REASONS:
            raise ValueError(f"unknown dedup layer {name!r}; expected one of {', '.join(REASONS)}")
        if REASONS.index(name) <= position:
            raise ValueError(f"dedup layer {name!r} is out of order; the order is {', '.join(REASONS)}")
        position = REASONS.index(name)
        rows = index.get_indexer(decisions.uid)
        if not np.array_equal(np.sort(rows), np.flatnonzero(alive)):
            raise ValueError(f"dedup layer {name!r} must decide exactly the {alive.sum()} rows earlier layers kept")
        dropped = rows[decisions.dropped]
        reason[dropped] = name
        kept_uid[dropped] = decisions.kept_uid[decisions.dropped]
        similarity[dropped] = decisions.similarity[decisions.dropped]
        alive[dropped] = False
    return pa.table(
        {
            "uid": pa.array(uids, pa.string()),
            "reason": pa.array(reason, pa.string()),
            "kept_uid": pa.array(kept_uid, pa.string()),
            "similarity": pa.array(similarity, pa.float32(), mask=np.isnan(similarity)),
        },
        schema=DECISION_SCHEMA,
    )
