"""All dedup layers in their order over one run's arrays: contaminated, then exact, near and semantic
duplicates, each layer deciding only the rows the layers before it kept."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from curate.stages.dedup.decisions import Decisions, as_uids, combine
from curate.stages.dedup.decontaminate import contamination_decisions
from curate.stages.dedup.exact import exact_duplicates
from curate.stages.dedup.near import FLAT_MAX_N, IVFParams, near_duplicates
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
    if params.near_threshold is not None:
        add(
            "dup_near",
            near_duplicates(
                uids[alive],
                rows_of(emb if near_emb is None else near_emb, alive),
                clip_score[alive],
                params.near_threshold,
                params.near_method,  # type: ignore[arg-type]
                flat_max_n=params.near_flat_max_n,
                ivf=dataclasses.replace(params.ivf, seed=params.seed),
                threads=params.threads,
            ),
        )
    if params.semantic_eps is not None:
        add(
            "dup_semantic",
            semantic_duplicates(
                uids[alive],
                rows_of(emb, alive),
                clip_score[alive],
                params.semantic_eps,
                params.semantic_clusters,
                params.seed,
                threads=params.threads,
            ),
        )
    return combine(uids, layers)


def rows_of(emb: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`emb[rows]`, without a copy when `rows` is every row in order."""
    if len(rows) == len(emb):
        return emb
    return emb[rows]


class DedupArrays(Protocol):
    uids: np.ndarray
    clip_score: np.ndarray
    sha256: np.ndarray
    image_embeddings: np.ndarray
    near_embeddings: np.ndarray | None


def run_layers(
    inputs: DedupArrays, cfg: Any, eval_embeddings: np.ndarray | None = None, eval_ids: Sequence[str] | None = None
) -> pa.Table:
    """`deduplicate` for the dedup stage: its gathered arrays and its config section."""
    return deduplicate(
        inputs.uids,
        inputs.image_embeddings,
        inputs.clip_score,
        inputs.sha256,
        eval_emb=eval_embeddings,
        eval_ids=eval_ids,
        params=DedupParams.from_config(cfg),
        near_emb=inputs.near_embeddings,
    )
