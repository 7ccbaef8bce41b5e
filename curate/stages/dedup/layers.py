"""All dedup layers in their order over one run's arrays: contaminated, then exact, near and semantic
duplicates, each layer deciding only the rows the layers before it kept."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from curate.stages.dedup.compute import concat_pairs
from curate.stages.dedup.decisions import Decisions, as_uids, canonical_order, combine
from curate.stages.dedup.decontaminate import contamination_decisions
from curate.stages.dedup.exact import exact_duplicates
from curate.stages.dedup.near import (
    FLAT_MAX_N,
    IVFParams,
    decisions_from_pairs,
    near_duplicate_pairs,
    near_duplicates,
    unique_pairs,
)
from curate.stages.dedup.partitions import (
    PARTITION_ROWS,
    SPILL,
    Partitioning,
    in_sample,
    partition_count,
    partition_members,
)
from curate.stages.dedup.semantic import semantic_duplicates

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DedupParams:
    """Algorithm settings; field names match `DedupConfig` where they overlap."""

    contamination_threshold: float = 0.95
    exact: bool = True
    near_threshold: float | None = 0.95  # None: no near-duplicate layer
    near_method: str = "auto"
    near_flat_max_n: int = FLAT_MAX_N
    ivf: IVFParams = dataclasses.field(default_factory=IVFParams)
    semantic_eps: float | None = None  # None: no semantic layer
    semantic_clusters: int | None = None
    partition_rows: int = PARTITION_ROWS
    spill: float = SPILL
    seed: int = 0
    threads: int | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> DedupParams:
        """The settings a config object (e.g. `DedupConfig`) has under the same names."""
        values = cfg.model_dump() if hasattr(cfg, "model_dump") else vars(cfg)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def deduplicate(
    uids: np.ndarray,
    emb: np.ndarray,
    clip_score: np.ndarray,
    sha256: np.ndarray | None = None,
    *,
    eval_emb: np.ndarray | None = None,
    eval_ids: Sequence[str] | None = None,
    params: DedupParams | None = None,
    near_emb: np.ndarray | None = None,
) -> pa.Table:
    """The decision table (uid, reason, kept_uid, similarity) for every row, reason null for kept rows.

    `near_emb` (row-aligned with `emb`) replaces `emb` for the near-duplicate layer only."""
    params = params or DedupParams()
    uids = as_uids(uids)
    clip_score = np.asarray(clip_score, dtype=np.float32)
    alive = np.arange(len(uids))
    layers: list[tuple[str, Decisions]] = []

    def add(reason: str, decisions: Decisions) -> None:
        nonlocal alive
        layers.append((reason, decisions))
        alive = alive[~decisions.dropped]
        log.info("dedup %s: %d dropped, %d left", reason, decisions.n_dropped, len(alive))

    if eval_emb is not None:
        add(
            "contaminated",
            contamination_decisions(
                uids, emb, eval_emb, params.contamination_threshold, eval_ids, threads=params.threads
            ),
        )
    if params.exact and sha256 is not None:
        add("dup_exact", exact_duplicates(uids[alive], np.asarray(sha256, dtype=object)[alive], clip_score[alive]))
    near_x = emb if near_emb is None else near_emb
    partitioning = Partitioning.single()
    k = partition_count(len(uids), params.partition_rows)
    if k > 1 and (params.near_threshold is not None or params.semantic_eps is not None):
        screened = np.flatnonzero(~layers[0][1].dropped) if eval_emb is not None else np.arange(len(uids))
        sample = screened[in_sample(uids[screened], len(uids), k, params.seed)]
        sample = sample[canonical_order(uids[sample])]
        partitioning = Partitioning.train(near_x[sample], k, spill=params.spill, seed=params.seed)
    primary, spill_rows, spill_parts = partitioning.assign(rows_of(near_x, alive))
    primary_of = np.full(len(uids), -1, np.int64)
    primary_of[alive] = primary
    if params.near_threshold is not None:
        x = rows_of(near_x, alive)
        if partitioning.k == 1:
            decisions = near_duplicates(
                uids[alive],
                x,
                clip_score[alive],
                params.near_threshold,
                params.near_method,  # type: ignore[arg-type]
                flat_max_n=params.near_flat_max_n,
                ivf=dataclasses.replace(params.ivf, seed=params.seed),
                threads=params.threads,
            )
        else:
            members = partition_members(primary, spill_rows, spill_parts, partitioning.k)
            decisions = partitioned_near_duplicates(uids[alive], x, clip_score[alive], members, params)
        add("dup_near", decisions)
    if params.semantic_eps is not None:
        groups = [np.arange(len(alive))]
        if partitioning.k > 1:
            groups = [np.flatnonzero(primary_of[alive] == p) for p in range(partitioning.k)]
        add("dup_semantic", partitioned_semantic(uids[alive], rows_of(emb, alive), clip_score[alive], groups, params))
    return combine(uids, layers)


def partitioned_near_duplicates(
    uids: np.ndarray, x: np.ndarray, clip_score: np.ndarray, members: Sequence[np.ndarray], params: DedupParams
) -> Decisions:
    """Near duplicates from pairs found inside each partition (`members`: row indices, primary and spilled
    copies); groups are components over every partition's pairs."""
    assert params.near_threshold is not None
    found = []
    for rows in members:
        i, j = partition_pairs(uids[rows], x[rows], params)
        found.append((rows[i], rows[j]))
    i, j = concat_pairs(found)
    i, j = unique_pairs(i, j, len(uids))
    return decisions_from_pairs(uids, x, clip_score, i, j)


def partition_pairs(uids: np.ndarray, x: np.ndarray, params: DedupParams) -> tuple[np.ndarray, np.ndarray]:
    """Near-duplicate pairs (as row indices of `x`) inside one partition, searched in uid order."""
    assert params.near_threshold is not None
    return near_duplicate_pairs(
        x,
        params.near_threshold,
        params.near_method,  # type: ignore[arg-type]
        order=canonical_order(uids),
        flat_max_n=params.near_flat_max_n,
        ivf=dataclasses.replace(params.ivf, seed=params.seed),
        spanning=True,
        threads=params.threads,
    )


def partitioned_semantic(
    uids: np.ndarray, emb: np.ndarray, clip_score: np.ndarray, groups: Sequence[np.ndarray], params: DedupParams
) -> Decisions:
    """SemDeDup inside each group of rows (the primary partitions), merged into one verdict."""
    dropped = np.zeros(len(uids), bool)
    kept_uid = np.full(len(uids), None, object)
    similarity = np.full(len(uids), np.nan, np.float32)
    for rows in groups:
        part = semantic_in_partition(uids[rows], rows_of(emb, rows), clip_score[rows], len(uids), params)
        dropped[rows], kept_uid[rows], similarity[rows] = part.dropped, part.kept_uid, part.similarity
    return Decisions(uids, dropped, kept_uid, similarity)


def semantic_in_partition(
    uids: np.ndarray, emb: np.ndarray, clip_score: np.ndarray, total: int, params: DedupParams
) -> Decisions:
    """The semantic layer over one partition of a layer of `total` rows: `semantic_clusters` (when set) is
    shared out in proportion to the partition's rows."""
    assert params.semantic_eps is not None
    clusters = params.semantic_clusters
    if clusters is not None and len(uids) < total:
        clusters = max(1, round(clusters * len(uids) / total))
    return semantic_duplicates(
        uids, emb, clip_score, params.semantic_eps, clusters, params.seed, threads=params.threads
    )


def rows_of(emb: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`emb[rows]`, without a copy when `rows` is every row in order."""
    if len(rows) == len(emb):
        return emb
    return emb[rows]
