"""Dense linear algebra shared by the dedup algorithms: blocked matrix products, k-means, projections.

Dot products go through numpy's BLAS in blocks, one BLAS thread per worker thread: on this project's
machines the faiss-cpu wheel bundles an OpenBLAS (0.3.15) that does not recognise the CPU and runs a
generic kernel, 4-8x slower than numpy's for the same product, and multi-threaded BLAS on small
blocks collapses when the cores are shared. faiss still trains every k-means (`faiss.Kmeans`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from curate.cores import task_threads

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

ROW_BLOCK = 2048  # rows per product: big enough for BLAS, small enough that tiles stay in memory
COL_BLOCK = 8192
SMALL_KMEANS = 10**9  # rows * centroids * dim below which faiss k-means runs on one thread


def resolve_threads(threads: int | None) -> int:
    """`threads` as configured, or this task's share of the host's cores."""
    return max(1, threads if threads is not None else task_threads())


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[bool]:
    """BLAS limited to one thread, yielding whether that held (it needs threadpoolctl). Our worker threads
    parallelise instead: multi-threaded BLAS on these block sizes collapses when cores are shared."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield False
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield True


def parallel_map(fn: Callable[[T], R], items: Iterable[T], threads: int | None = None) -> list[R]:
    """`[fn(item) for item in items]` on `threads` worker threads (numpy's BLAS releases the GIL)."""
    items = list(items)
    workers = min(resolve_threads(threads), len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    with single_threaded_blas() as limited:
        if not limited:  # without threadpoolctl, let BLAS do the threading instead
            return [fn(item) for item in items]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(fn, items))


@contextlib.contextmanager
def faiss_threads(threads: int | None) -> Iterator[None]:
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(resolve_threads(threads))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def as_matrix(x: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """`x` as a C-contiguous float32 2-d array (no copy when it already is one)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array (rows, dim), got shape {x.shape}")
    return x


def blocks(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def nearest(
    x: np.ndarray,
    y: np.ndarray,
    bias: np.ndarray | None = None,
    threads: int | None = None,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `x` (or of `x[rows]`, in that order), the row of `y` with the largest `x·y + bias`
    and that value; exact, blocked. Rows are gathered block by block in the order given, so passing the
    canonical order makes every product, to the last bit, independent of how `x` is laid out."""
    n = len(x) if rows is None else len(rows)
    best = np.zeros(n, dtype=np.int64)
    score = np.full(n, -np.inf, dtype=np.float32)
    if n == 0 or len(y) == 0:
        return best, score

    def run(block: tuple[int, int]) -> None:
        start, stop = block
        a = x[start:stop] if rows is None else x[rows[start:stop]]
        for col_start, col_stop in blocks(len(y), COL_BLOCK):
            s = a @ y[col_start:col_stop].T
            if bias is not None:
                s += bias[col_start:col_stop]
            arg = s.argmax(axis=1)
            top = s[np.arange(len(s)), arg]
            better = top > score[start:stop]
            score[start:stop][better] = top[better]
            best[start:stop][better] = arg[better] + col_start

    parallel_map(run, blocks(n, ROW_BLOCK), threads)
    return best, score


def pairs_among(
    x: np.ndarray,
    rows: np.ndarray,
    threshold: float,
    part: tuple[int, int] | None = None,
    spanning: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (rows[p], rows[q]), p < q, with `x[rows[p]]·x[rows[q]] >= threshold`, computed tile by tile so
    memory stays bounded. `part` = (start, stop) limits p to those positions (to split the work).

    With `spanning`, a tile with more pairs than rows and columns is thinned to a spanning forest of its
    pairs: the same groups come out of `components`, but a huge group of copies costs linear, not
    quadratic, memory."""
    start, stop = part or (0, len(rows))
    left, right = [], []
    for row_start, row_stop in blocks(stop - start, ROW_BLOCK):
        row_start, row_stop = row_start + start, row_stop + start
        a = x[rows[row_start:row_stop]]
        for col_start, col_stop in blocks(len(rows) - row_start, COL_BLOCK):
            col_start, col_stop = col_start + row_start, col_stop + row_start
            p, q = np.nonzero(a @ x[rows[col_start:col_stop]].T >= threshold)
            p, q = p + row_start, q + col_start
            upper = p < q
            i, j = rows[p[upper]].astype(np.int64), rows[q[upper]].astype(np.int64)
            if spanning and len(i) > (row_stop - row_start) + (col_stop - col_start):
                i, j = spanning_forest(i, j)
            left.append(i)
            right.append(j)
    return concat_pairs(list(zip(left, right, strict=True)))


def spanning_forest(i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs with the same connected components as (i, j): each component as a star around its first node."""
    from curate.stages.dedup.groups import components

    nodes, local = np.unique(np.concatenate([i, j]), return_inverse=True)
    labels = components(len(nodes), local[: len(i)], local[len(i) :])
    _, first = np.unique(labels, return_index=True)
    centre = nodes[first][labels]
    others = nodes != centre
    return centre[others], nodes[others]


def train_kmeans(
    x: np.ndarray,
    k: int,
    *,
    seed: int,
    niter: int,
    spherical: bool = False,
    threads: int | None = None,
) -> np.ndarray:
    """`k` centroids from faiss k-means on all rows of `x` (the caller samples); deterministic for a seed."""
    import faiss

    k = max(1, min(k, len(x)))
    if len(x) * k * x.shape[1] < SMALL_KMEANS:
        threads = 1  # OpenMP start-up and barriers cost more than they save here
    kmeans = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        seed=seed,
        spherical=spherical,
        min_points_per_centroid=1,  # small clusters are fine here; silences faiss's warning
        max_points_per_centroid=max(1, -(-len(x) // k)),  # train on every given row, no resampling
        verbose=False,
    )
    with faiss_threads(threads):
        kmeans.train(np.ascontiguousarray(x, dtype=np.float32))
    return np.asarray(kmeans.centroids, dtype=np.float32)


def sample_rows(order: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` rows drawn from `order` (the canonical row order) with a fixed seed, in canonical order."""
    if size >= len(order):
        return order
    picked = np.random.default_rng(seed).choice(len(order), size, replace=False)
    return order[np.sort(picked)]


def pca_basis(x: np.ndarray, rows: np.ndarray, dim: int) -> np.ndarray:
    """(d, dim) orthonormal basis of the top principal directions of `x[rows]`."""
    sample = x[rows].astype(np.float64)
    sample -= sample.mean(axis=0)
    with single_threaded_blas():
        _, vectors = np.linalg.eigh(sample.T @ sample)
    return np.ascontiguousarray(vectors[:, ::-1][:, :dim], dtype=np.float32)


def project(x: np.ndarray, basis: np.ndarray, rows: np.ndarray, threads: int | None = None) -> np.ndarray:
    """`x[rows] @ basis`, gathered block by block (no copy of `x`)."""
    out = np.empty((len(rows), basis.shape[1]), dtype=np.float32)

    def run(block: tuple[int, int]) -> None:
        out[block[0] : block[1]] = x[rows[block[0] : block[1]]] @ basis

    parallel_map(run, blocks(len(rows), 8 * ROW_BLOCK), threads)
    return out


def group_bounds(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows grouped by label (stable) and the start of each label's run: members of group g are
    `order[bounds[g]:bounds[g + 1]]`, in ascending row order."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    return order, bounds


def concat_pairs(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
