"""Duplicate groups: connected components of "is a copy of" pairs, and the one survivor per group."""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from curate.stages.dedup.decisions import canonical_order

log = logging.getLogger(__name__)


def components(n: int, pairs_i: np.ndarray, pairs_j: np.ndarray) -> np.ndarray:
    """Connected-component label (0..k-1) of each of `n` nodes given undirected edges (i, j): copies of
    copies form one group, whatever the order the pairs come in."""
    pairs_i = np.asarray(pairs_i, dtype=np.int64)
    pairs_j = np.asarray(pairs_j, dtype=np.int64)
    if len(pairs_i) != len(pairs_j):
        raise ValueError(f"pairs_i and pairs_j differ in length: {len(pairs_i)} != {len(pairs_j)}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    try:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
    except ImportError:
        return union_find(n, pairs_i, pairs_j)
    graph = coo_matrix((np.ones(len(pairs_i), dtype=np.int8), (pairs_i, pairs_j)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


def union_find(n: int, pairs_i: np.ndarray, pairs_j: np.ndarray) -> np.ndarray:
    """`components` without scipy: vectorised hooking of roots onto smaller roots, then pointer jumping."""
    parent = np.arange(n, dtype=np.int64)
    while True:
        a, b = parent[pairs_i], parent[pairs_j]
        differ = a != b
        if not differ.any():
            break
        a, b = a[differ], b[differ]
        # Both ends are roots here, so this merges trees; the smaller root wins, so no cycles form.
        np.minimum.at(parent, np.maximum(a, b), np.minimum(a, b))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    _, labels = np.unique(parent, return_inverse=True)
    return labels.astype(np.int64)


class Survivors(NamedTuple):
    keep: np.ndarray  # bool per row: the row is its group's survivor
    survivor: np.ndarray  # int per row: the row index of its group's survivor (itself when kept)
    kept_uid: np.ndarray  # object per row: the survivor's uid for a dropped row, None for a kept one


def survivors(
    labels: np.ndarray, clip_score: np.ndarray, uids: np.ndarray, order: np.ndarray | None = None
) -> Survivors:
    """In each group (rows sharing a label) the survivor is the row with the highest CLIP score, ties
    broken by the smallest uid; a missing (NaN) score ranks last. Every other row names the survivor.
    `order` is the rows' order by uid, when the caller already has it."""
    labels = np.asarray(labels)
    uids = np.asarray(uids, dtype=object)
    n = len(labels)
    if not (len(clip_score) == len(uids) == n):
        raise ValueError(f"labels, clip_score and uids differ in length: {n}, {len(clip_score)}, {len(uids)}")
    score = np.nan_to_num(np.asarray(clip_score, dtype=np.float64), nan=-np.inf)
    uid_rank = np.empty(n, dtype=np.int64)
    uid_rank[canonical_order(uids) if order is None else order] = np.arange(n)
    order = np.lexsort((uid_rank, -score, labels))  # by label, then best score, then smallest uid
    starts = np.ones(n, dtype=bool)
    starts[1:] = labels[order][1:] != labels[order][:-1]
    head = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    survivor = np.empty(n, dtype=np.int64)
    survivor[order] = order[head]
    keep = survivor == np.arange(n)
    kept_uid = np.where(keep, None, uids[survivor])
    return Survivors(keep, survivor, kept_uid)
