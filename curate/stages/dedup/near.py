"""Near duplicates: pairs of images whose embeddings have cosine >= a threshold, grouped transitively.

Two ways to find the pairs:

- `flat`: every pair, exactly, in tiles: O(n²), the default up to `FLAT_MAX_N` rows.
- `ivf`: inverted lists from k-means, several times over. Each "table" partitions the rows into lists
  of about `list_size` rows with a two-level faiss k-means (~sqrt(lists) coarse clusters, each split
  into lists) in a PCA projection, and compares every pair within each list exactly, in all
  dimensions. A pair is found when any table puts both rows in one list. Two rows that close usually
  share a list, and the tables miss independently, so one table's recall r (about 0.6-0.7 on random
  512-d vectors at cosine 0.97, the hard case; higher on clustered, real embeddings) compounds to
  1 - (1 - r)**tables. Work per table: n * 2 * sqrt(lists) * proj_dim to assign, about
  n * list_size / 2 * dim to compare, so it grows close to linearly with n.

faiss's own IVF `range_search` does the comparing in its scanner one vector at a time, several times
slower here than blocked BLAS products (see `curate.stages.dedup.compute`), and every probe adds a full list
per query; HNSW graphs take minutes to build for a million 512-d vectors on two cores. Both are
therefore not used; faiss trains the k-means.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from curate.stages.dedup.compute import (
    as_matrix,
    blocks,
    concat_pairs,
    group_bounds,
    nearest,
    pairs_among,
    parallel_map,
    pca_basis,
    project,
    sample_rows,
    single_threaded_blas,
    train_kmeans,
)
from curate.stages.dedup.decisions import Decisions, as_uids, canonical_order
from curate.stages.dedup.groups import components, survivors

log = logging.getLogger(__name__)

Method = Literal["auto", "flat", "ivf"]
METHODS: tuple[str, ...] = ("auto", "flat", "ivf")
FLAT_MAX_N = 10_000  # exact all-pairs up to here (~1 s at 512-d on 2 cores); beyond, ivf is faster


@dataclass(frozen=True)
class IVFParams:
    list_size: int = 128  # mean rows per list: recall hardly depends on it, comparing cost is linear in it
    tables: int = 6  # independent partitions; recall 1 - (1 - r)**tables
    proj_dim: int = 32  # PCA dimensions the partitions are built in (comparisons use all dimensions)
    train_per_list: int = 32  # k-means training rows per centroid
    kmeans_iter: int = 5
    pca_sample: int = 20_000
    seed: int = 0


def choose_method(method: str, n: int, flat_max_n: int = FLAT_MAX_N) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown near-duplicate method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "auto":
        return "flat" if n <= flat_max_n else "ivf"
    return method


def near_duplicate_pairs(
    emb: np.ndarray,
    threshold: float,
    method: Method = "auto",
    *,
    order: np.ndarray | None = None,
    flat_max_n: int = FLAT_MAX_N,
    ivf: IVFParams | None = None,
    spanning: bool = False,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs (i, j), i < j, sorted, with `emb[i]·emb[j] >= threshold` (rows L2-normalised, so the dot
    product is the cosine). `order` is the canonical row order (e.g. by uid): rows are sampled, grouped
    and multiplied in that order, so the result does not depend on how they are laid out in `emb`.
    With `spanning`, dense blocks of pairs are thinned to spanning forests (same groups, bounded
    memory)."""
    x = as_matrix(emb)
    n = len(x)
    order = np.arange(n) if order is None else np.asarray(order)
    chosen = choose_method(method, n, flat_max_n)
    started = time.perf_counter()
    with single_threaded_blas():
        if chosen == "flat":
            i, j = flat_pairs(x, threshold, order, spanning=spanning, threads=threads)
        else:
            i, j = ivf_pairs(x, threshold, order, ivf or IVFParams(), spanning=spanning, threads=threads)
    i, j = unique_pairs(i, j, n)
    log.info("near-duplicate pairs: %d among %d rows (%s, %.1f s)", len(i), n, chosen, time.perf_counter() - started)
    return i, j


def near_duplicates(
    uids: np.ndarray,
    emb: np.ndarray,
    clip_score: np.ndarray,
    threshold: float,
    method: Method = "auto",
    *,
    flat_max_n: int = FLAT_MAX_N,
    ivf: IVFParams | None = None,
    threads: int | None = None,
) -> Decisions:
    """Groups of rows linked by cosine >= `threshold` (transitively: a~b and b~c make one group even when
    a and c are further apart); in each group the best CLIP score stays (ties: smallest uid) and the
    others are dropped in its favour. `similarity` is a dropped row's cosine to that survivor."""
    uids = as_uids(uids)
    x = as_matrix(emb)
    if not (len(x) == len(uids) == len(clip_score)):
        raise ValueError(f"uids, emb and clip_score differ in length: {len(uids)}, {len(x)}, {len(clip_score)}")
    order = canonical_order(uids)
    i, j = near_duplicate_pairs(
        x,
        threshold,
        method,
        order=order,
        flat_max_n=flat_max_n,
        ivf=ivf,
        spanning=True,
        threads=threads,
    )
    return decisions_from_pairs(uids, x, clip_score, i, j, order)


def decisions_from_pairs(
    uids: np.ndarray,
    x: np.ndarray,
    clip_score: np.ndarray,
    i: np.ndarray,
    j: np.ndarray,
    order: np.ndarray | None = None,
) -> Decisions:
    """Groups are the connected components of the pairs (i, j); in each the best CLIP score stays (ties:
    smallest uid) and every other row is dropped in its favour, with its cosine to that survivor."""
    chosen = survivors(components(len(x), i, j), clip_score, uids, order)
    dropped = ~chosen.keep
    similarity = np.full(len(x), np.nan, dtype=np.float32)
    rows = np.flatnonzero(dropped)
    similarity[rows] = pair_cosines(x, rows, chosen.survivor[rows])
    return Decisions(uids, dropped, chosen.kept_uid, similarity)


def pair_cosines(x: np.ndarray, rows: np.ndarray, others: np.ndarray) -> np.ndarray:
    """`x[rows[k]] · x[others[k]]` for each k, as float32."""
    return np.einsum("ij,ij->i", x[rows], x[others]).astype(np.float32)


def unique_pairs(i: np.ndarray, j: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.minimum(i, j).astype(np.int64), np.maximum(i, j).astype(np.int64)
    codes = np.unique(lo * n + hi)
    return codes // n, codes % n


def flat_pairs(
    x: np.ndarray, threshold: float, order: np.ndarray, *, spanning: bool = False, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    parts = _balanced_parts(len(order))
    return concat_pairs(parallel_map(lambda part: pairs_among(x, order, threshold, part, spanning), parts, threads))


def _balanced_parts(n: int, count: int = 64) -> list[tuple[int, int]]:
    """Row ranges for the upper triangle with about equal work each (early rows have more columns)."""
    edges = np.unique(np.round(n * (1 - np.sqrt(1 - np.linspace(0, 1, count + 1)))).astype(int))
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges) if b > a]


def ivf_pairs(
    x: np.ndarray,
    threshold: float,
    order: np.ndarray,
    params: IVFParams,
    *,
    spanning: bool = False,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs from `params.tables` partitions. Partitions are built on positions in the canonical `order`
    (position p is row order[p]), so sampling and every product are the same however rows are laid out."""
    started = time.perf_counter()
    y = projected(x, order, params, threads)
    found = []
    for table in range(params.tables):
        table_started = time.perf_counter()
        labels, n_lists = partition(y, params, seed=params.seed + 1000 * table, threads=threads)
        partitioned = time.perf_counter()
        found.append(pairs_in_lists(x, order, labels, n_lists, threshold, spanning, threads))
        log.debug(
            "ivf table %d: %d lists, %d pairs (partition %.1f s, compare %.1f s)",
            table,
            n_lists,
            len(found[-1][0]),
            partitioned - table_started,
            time.perf_counter() - partitioned,
        )
    log.debug("ivf: %d tables in %.1f s", params.tables, time.perf_counter() - started)
    return concat_pairs(found)


def pairs_in_lists(
    x: np.ndarray,
    order: np.ndarray,
    labels: np.ndarray,
    n_lists: int,
    threshold: float,
    spanning: bool,
    threads: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every pair above `threshold` within each list (positions sharing a label)."""
    positions, bounds = group_bounds(labels, n_lists)
    members = order[positions]  # each list's rows, in canonical order

    def compare(batch: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        lists = range(*batch)
        return concat_pairs(
            [pairs_among(x, members[bounds[k] : bounds[k + 1]], threshold, spanning=spanning) for k in lists]
        )

    return concat_pairs(parallel_map(compare, blocks(n_lists, 64), threads))


def projected(x: np.ndarray, order: np.ndarray, params: IVFParams, threads: int | None) -> np.ndarray:
    """`x[order]` in its top `proj_dim` principal directions (partitions only need coarse geometry)."""
    if x.shape[1] <= params.proj_dim:
        return x[order]
    basis = pca_basis(x, sample_rows(order, params.pca_sample, params.seed), params.proj_dim)
    return project(x, basis, order, threads)


def partition(y: np.ndarray, params: IVFParams, seed: int, threads: int | None) -> tuple[np.ndarray, int]:
    """A list label per row of `y`, from two-level k-means: ~sqrt(n_lists) coarse clusters, each split
    into lists of ~list_size. Returns (labels, number of lists)."""
    n_lists = max(1, round(len(y) / params.list_size))
    coarse = kmeans_labels(y, max(1, round(math.sqrt(n_lists))), params, seed, threads)
    k1 = int(coarse.max(initial=0)) + 1
    groups, bounds = group_bounds(coarse, k1)

    def split(cluster: int) -> np.ndarray:
        rows = groups[bounds[cluster] : bounds[cluster + 1]]
        k2 = max(1, round(len(rows) / params.list_size))
        return kmeans_labels(y[rows], k2, params, seed + 1 + cluster, threads=1)

    labels = np.empty(len(y), dtype=np.int64)
    offset = 0
    for cluster, sub in enumerate(parallel_map(split, range(k1), threads)):
        labels[groups[bounds[cluster] : bounds[cluster + 1]]] = offset + sub
        offset += int(sub.max(initial=-1)) + 1
    return labels, offset


def kmeans_labels(y: np.ndarray, k: int, params: IVFParams, seed: int, threads: int | None) -> np.ndarray:
    """Nearest-centroid (L2) label of each row of `y` for `k` k-means centroids trained on a sample."""
    if k <= 1 or len(y) <= 1:
        return np.zeros(len(y), dtype=np.int64)
    sample = sample_rows(np.arange(len(y)), k * params.train_per_list, seed)
    centroids = train_kmeans(y[sample], k, seed=seed, niter=params.kmeans_iter, threads=threads)
    labels, _ = nearest(y, centroids, bias=-0.5 * (centroids * centroids).sum(axis=1), threads=threads)
    # Empty clusters would leave gaps in the labels; renumber densely in centroid order.
    _, dense = np.unique(labels, return_inverse=True)
    return dense.astype(np.int64)
