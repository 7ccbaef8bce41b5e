"""Partitions for near and semantic dedup at crawl scale: rows split into groups of about
`partition_rows` by k-means, so each group fits one task and the run never holds every embedding at once.

- Partitions come from k-means centroids (in a PCA projection) trained on a bounded sample of rows
  chosen by a hash of their uid, so the sample does not depend on how rows are sharded or ordered.
- Each row belongs to its nearest centroid's partition (its primary partition) and is also copied into
  every other partition whose centroid is almost as near (squared distance within `1 + spill` of the
  nearest): near duplicates on either side of a boundary still meet in one partition. Near-duplicate
  pairs are searched inside each partition with `near_duplicate_pairs`; groups are connected
  components over all partitions' pairs, so chains that cross partitions join.
- The semantic layer (SemDeDup) runs inside each primary partition: its k-means clusters nest in the
  partitions.
With one partition (runs up to `partition_rows` samples) this is exactly the single-table algorithm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from curate.stages.dedup.compute import (
    as_matrix,
    blocks,
    pca_basis,
    project,
    sample_rows,
    train_kmeans,
)

PARTITION_ROWS = 250_000
SPILL = 0.07  # measured on random 512-d vectors: 0.5-1.2 copies per row, recall >= 0.99 of pairs at cosine >= 0.95
PROJ_DIM = 32
PCA_SAMPLE = 20_000
TRAIN_PER_PARTITION = 256
KMEANS_ITER = 10


def partition_count(n: int, partition_rows: int) -> int:
    return max(1, math.ceil(n / partition_rows))


def uid_hash(uids: np.ndarray, seed: int = 0) -> np.ndarray:
    """A uint64 per uid, the same on every machine and in every process (pandas' fixed-key SipHash)."""
    key = f"curate{seed:010d}"[-16:]
    return pd.util.hash_array(np.asarray(uids, dtype=object), hash_key=key, categorize=False)


def sample_size(k: int) -> int:
    return max(PCA_SAMPLE, k * TRAIN_PER_PARTITION)


def in_sample(uids: np.ndarray, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Whether each uid is in the training sample for `k` partitions of `n` rows: about `sample_size(k)`
    rows, chosen by uid hash alone."""
    rate = min(1.0, sample_size(k) / max(n, 1))
    if rate >= 1.0:
        return np.ones(len(uids), dtype=bool)
    return uid_hash(uids, seed) < np.uint64(int(rate * 2.0**64))


@dataclass(frozen=True)
class Partitioning:
    """Where rows go: `centroids` in the space `basis` projects to (None: no projection)."""

    centroids: np.ndarray
    basis: np.ndarray | None = None
    spill: float = SPILL

    @property
    def k(self) -> int:
        return len(self.centroids)

    @classmethod
    def single(cls) -> Partitioning:
        return cls(np.zeros((1, 1), np.float32))

    @classmethod
    def train(cls, sample: np.ndarray, k: int, *, spill: float = SPILL, seed: int = 0) -> Partitioning:
        """`k` partitions from sample rows (in canonical order, e.g. by uid)."""
        x = as_matrix(sample, "sample")
        if k <= 1 or len(x) <= 1:
            return cls.single()
        order = np.arange(len(x))
        basis = pca_basis(x, sample_rows(order, PCA_SAMPLE, seed), PROJ_DIM) if x.shape[1] > PROJ_DIM else None
        y = x if basis is None else project(x, basis, order, threads=1)
        centroids = train_kmeans(y, min(k, len(y)), seed=seed, niter=KMEANS_ITER, threads=1)
        return cls(centroids, basis, spill)

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(primary partition per row, and the (row, partition) pairs of spilled copies)."""
        n = len(x)
        if self.k == 1:
            return np.zeros(n, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        x = as_matrix(x)
        y = x if self.basis is None else project(x, self.basis, np.arange(n), threads=1)
        c2 = (self.centroids * self.centroids).sum(axis=1)
        primary = np.empty(n, np.int64)
        rows, parts = [], []
        for start, stop in blocks(n, 4096):
            block = y[start:stop]
            d = (block * block).sum(axis=1)[:, None] - 2 * block @ self.centroids.T + c2
            best = d.argmin(axis=1)
            primary[start:stop] = best
            nearest = d[np.arange(len(d)), best]
            r, p = np.nonzero(d <= np.maximum(nearest, 0)[:, None] * (1 + self.spill))
            spilled = p != best[r]
            rows.append(r[spilled] + start)
            parts.append(p[spilled])
        return (
            primary,
            np.concatenate(rows or [np.zeros(0, np.int64)]),
            np.concatenate(parts or [np.zeros(0, np.int64)]),
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"centroids": self.centroids, "spill": np.float64(self.spill)}
        if self.basis is not None:
            arrays["basis"] = self.basis
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Partitioning:
        basis = arrays.get("basis")
        return cls(
            np.asarray(arrays["centroids"]), None if basis is None else np.asarray(basis), float(arrays["spill"])
        )


def partition_members(primary: np.ndarray, spill_rows: np.ndarray, spill_parts: np.ndarray, k: int) -> list[np.ndarray]:
    """Rows of each partition (primary and spilled), ascending."""
    rows = np.concatenate([np.arange(len(primary)), spill_rows])
    parts = np.concatenate([primary, spill_parts])
    order = np.lexsort((rows, parts))
    bounds = np.searchsorted(parts[order], np.arange(k + 1))
    return [rows[order[bounds[p] : bounds[p + 1]]] for p in range(k)]
