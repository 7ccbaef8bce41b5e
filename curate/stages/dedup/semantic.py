"""Semantic duplicates (SemDeDup): k-means clusters, then within each cluster drop what is too close to
something already kept.

Within a cluster rows are visited by CLIP score (best first, ties: smallest uid); a row is dropped when
its cosine to a row already kept exceeds 1 - eps, and names the kept row it is closest to. Clusters are
processed in blocks of rows against the kept rows in column chunks, so memory stays bounded however
large a cluster is; the work is quadratic in cluster size, as in SemDeDup.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from curate.stages.dedup.compute import (
    COL_BLOCK,
    ROW_BLOCK,
    as_matrix,
    blocks,
    nearest,
    parallel_map,
    sample_rows,
    train_kmeans,
)
from curate.stages.dedup.decisions import Decisions, as_uids, canonical_order

log = logging.getLogger(__name__)

KMEANS_ITER = 20
TRAIN_PER_CLUSTER = 64  # k-means training rows per centroid (faiss: 39 is its minimum, 256 its default)


def default_clusters(n: int) -> int:
    return max(1, min(n, round(math.sqrt(n) / 2)))


def semantic_duplicates(
    uids: np.ndarray,
    emb: np.ndarray,
    clip_score: np.ndarray,
    eps: float,
    n_clusters: int | None = None,
    seed: int = 0,
    *,
    kmeans_iter: int = KMEANS_ITER,
    train_per_cluster: int = TRAIN_PER_CLUSTER,
    threads: int | None = None,
) -> Decisions:
    uids = as_uids(uids)
    x = as_matrix(emb)
    n = len(x)
    if not (len(uids) == n == len(clip_score)):
        raise ValueError(f"uids, emb and clip_score differ in length: {len(uids)}, {n}, {len(clip_score)}")
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    if n == 0:
        return Decisions.keep_all(uids)
    started = time.perf_counter()
    order = canonical_order(uids)
    labels = cluster_labels(
        x, order, min(n_clusters or default_clusters(n), n), seed, kmeans_iter, train_per_cluster, threads
    )
    visit = visiting_order(labels, clip_score, order)
    bounds = np.searchsorted(labels[visit], np.arange(labels.max() + 2))
    clusters = [visit[bounds[c] : bounds[c + 1]] for c in range(len(bounds) - 1)]
    threshold = 1.0 - eps
    results = parallel_map(lambda members: greedy_keep(x, members, threshold), clusters, threads)

    dropped = np.zeros(n, dtype=bool)
    kept_uid = np.full(n, None, dtype=object)
    similarity = np.full(n, np.nan, dtype=np.float32)
    for members, (keep, closest, sim) in zip(clusters, results, strict=True):
        rows = members[~keep]
        dropped[rows] = True
        kept_uid[rows] = uids[members[closest[~keep]]]
        similarity[rows] = sim[~keep]
    log.info(
        "semantic dedup: %d of %d rows dropped (%d clusters, eps %g, %.1f s)",
        dropped.sum(),
        n,
        len(clusters),
        eps,
        time.perf_counter() - started,
    )
    return Decisions(uids, dropped, kept_uid, similarity)


def cluster_labels(
    x: np.ndarray, order: np.ndarray, k: int, seed: int, niter: int, train_per_cluster: int, threads: int | None
) -> np.ndarray:
    """Spherical k-means (faiss) on a seeded sample taken in canonical order; each row's nearest centroid."""
    if k <= 1:
        return np.zeros(len(x), dtype=np.int64)
    sample = sample_rows(order, k * train_per_cluster, seed)
    centroids = train_kmeans(x[sample], k, seed=seed, niter=niter, spherical=True, threads=threads)
    labels = np.empty(len(x), dtype=np.int64)
    labels[order], _ = nearest(x, centroids, threads=threads, rows=order)
    return labels


def visiting_order(labels: np.ndarray, clip_score: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Rows grouped by cluster, each cluster best CLIP score first (NaN last), ties by canonical order."""
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    score = np.nan_to_num(np.asarray(clip_score, dtype=np.float64), nan=-np.inf)
    return np.lexsort((rank, -score, labels))


def greedy_keep(x: np.ndarray, members: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Visit `members` in order and keep each unless its cosine to an already-kept member exceeds
    `threshold`. Returns, per member: kept?, the position of its closest kept member (for dropped ones)
    and that cosine."""
    s = len(members)
    keep = np.zeros(s, dtype=bool)
    closest = np.full(s, -1, dtype=np.int64)
    similarity = np.full(s, -np.inf, dtype=np.float32)
    for start, stop in blocks(s, ROW_BLOCK):
        block = x[members[start:stop]]
        best, best_sim = closest[start:stop], similarity[start:stop]  # views, updated in place
        kept_before = np.flatnonzero(keep[:start])
        for chunk_start, chunk_stop in blocks(len(kept_before), COL_BLOCK):
            cols = kept_before[chunk_start:chunk_stop]
            _improve(best, best_sim, block @ x[members[cols]].T, cols)
        inner = block @ block.T
        earlier_close = np.tril(inner > threshold, -1)  # [p, q]: q comes before p and is too close
        block_keep = best_sim <= threshold
        for p in np.flatnonzero(block_keep & earlier_close.any(axis=1)):
            # rows before p in the block are already decided, so this is the sequential rule
            if (earlier_close[p] & block_keep).any():
                block_keep[p] = False
        keep[start:stop] = block_keep
        earlier_kept = np.tril(np.ones(inner.shape, dtype=bool), -1) & block_keep[None, :]
        _improve(best, best_sim, np.where(earlier_kept, inner, -np.inf), np.arange(start, stop))
    return keep, closest, similarity


def _improve(best: np.ndarray, best_sim: np.ndarray, sims: np.ndarray, cols: np.ndarray) -> None:
    """Update each row's closest column (and its similarity) where `sims` beats what it has."""
    if sims.shape[1] == 0:
        return
    arg = sims.argmax(axis=1)
    top = sims[np.arange(len(sims)), arg]
    better = top > best_sim
    best[better] = cols[arg[better]]
    best_sim[better] = top[better]
