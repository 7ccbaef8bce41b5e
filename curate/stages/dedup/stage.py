"""Dedup stage: run-wide duplicate decisions in the driver, then one fate per uid per shard.

`prepare` gathers, for every sample the filter kept, its uid, CLIP score, sha256 and image
embedding (arrays, read from the embed stage's files), runs the layered dedup (decontamination,
exact, near, semantic) and saves a decision table keyed by uid. Each shard then joins its uids
against that table: decisions never depend on shard order, worker count or executor.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import DedupConfig, EmbedConfig
from curate.stages.dedup.thumbnails import shard_thumbnail_features
from curate.io.fs import write_json_atomic, write_parquet_atomic
from curate.ledger import FATE_SCHEMA, Status, make_fates
from curate.stage import RunLayout, StageContext, kept_uids

log = logging.getLogger(__name__)

DECISION_SCHEMA = pa.schema(
    [("uid", pa.string()), ("reason", pa.string()), ("kept_uid", pa.string()), ("similarity", pa.float32())]
)


@dataclass(frozen=True)
class DedupInputs:
    """Everything dedup needs about the samples that reached it, sorted by uid."""

    uids: np.ndarray
    clip_score: np.ndarray
    sha256: np.ndarray
    image_embeddings: np.ndarray
    near_embeddings: np.ndarray | None = None  # thumbnail features when dedup.near_features is "thumbnail"


def gather_inputs(layout: RunLayout, shards: list[str], upstream: str, thumbnails: bool = False) -> DedupInputs:
    uid_parts, score_parts, sha_parts, emb_parts, thumb_parts = [], [], [], [], []
    for shard in shards:
        wanted = kept_uids(layout, upstream, shard)
        fates = pq.read_table(layout.fates_path(upstream, shard), schema=FATE_SCHEMA).select(["uid", "clip_score"])
        hashes = pq.read_table(layout.fates_path("download", shard), schema=FATE_SCHEMA).select(["uid", "sha256"])
        metadata = pq.read_table(layout.stage_dir("embed") / "metadata" / f"metadata_{shard}.parquet", columns=["uid"])
        embeddings = np.load(layout.stage_dir("embed") / "img_emb" / f"img_emb_{shard}.npy").astype(np.float32)
        row_of = {uid: i for i, uid in enumerate(metadata["uid"].to_pylist())}
        table = (
            pa.table({"uid": wanted})
            .join(fates, "uid", join_type="left outer")
            .join(hashes, "uid", join_type="left outer")
            .sort_by("uid")
        )
        uids = table["uid"].to_pylist()
        uid_parts.append(np.array(uids, dtype=object))
        score_parts.append(table["clip_score"].to_numpy(zero_copy_only=False).astype(np.float32))
        sha_parts.append(np.array(table["sha256"].to_pylist(), dtype=object))
        emb_parts.append(embeddings[[row_of[u] for u in uids]] if uids else embeddings[:0])
        if thumbnails:
            thumb_parts.append(shard_thumbnail_features(layout, shard, uids))
    if not uid_parts:
        return DedupInputs(
            np.zeros(0, object), np.zeros(0, np.float32), np.zeros(0, object), np.zeros((0, 1), np.float32)
        )
    uids = np.concatenate(uid_parts)
    order = np.argsort(uids, kind="stable")
    embeddings = np.concatenate(emb_parts)[order]
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    embeddings = embeddings / np.where(norms == 0, 1, norms)  # float16 storage: renormalise
    near = np.concatenate(thumb_parts)[order] if thumbnails else None
    return DedupInputs(
        uids[order], np.concatenate(score_parts)[order], np.concatenate(sha_parts)[order], embeddings, near
    )


class DedupStage:
    name: ClassVar[str] = "dedup"
    upstream: ClassVar[str] = "filter"

    def __init__(self, cfg: DedupConfig, embed_cfg: EmbedConfig) -> None:
        self.cfg, self.embed_cfg = cfg, embed_cfg

    def setup(self) -> None:
        pass

    def decisions_path(self, ctx: StageContext) -> Path:
        return ctx.layout.stage_dir(self.name) / "decisions.parquet"

    def prepare(self, ctx: StageContext, shards: list[str]) -> None:
        inputs = gather_inputs(ctx.layout, shards, self.upstream, thumbnails=self.cfg.near_features == "thumbnail")
        decisions = self.decide(inputs)
        write_parquet_atomic(decisions, self.decisions_path(ctx))
        reasons = Counter(r for r in decisions["reason"].to_pylist() if r)
        write_json_atomic(
            ctx.layout.stage_dir(self.name) / "summary.json",
            {"samples": len(inputs.uids), "dropped": dict(sorted(reasons.items())), "config": self.cfg.model_dump()},
        )

    def decide(self, inputs: DedupInputs) -> pa.Table:
        from curate.stages.dedup import run_layers

        if not self.cfg.eval_sets:
            return run_layers(inputs, self.cfg)
        from curate.stages.dedup.decontaminate import embed_eval_sets

        eval_embeddings, eval_ids = embed_eval_sets(self.cfg.eval_sets, self.embed_cfg)
        return run_layers(inputs, self.cfg, eval_embeddings, eval_ids)

    def expected_uids(self, ctx: StageContext, shard: str) -> pa.Array:
        return kept_uids(ctx.layout, self.upstream, shard)

    def process_shard(self, ctx: StageContext, shard: str, workdir: Path) -> pa.Table:
        uids = self.expected_uids(ctx, shard)
        upstream = pq.read_table(ctx.layout.fates_path(self.upstream, shard), schema=FATE_SCHEMA)
        upstream = upstream.filter(pc.is_in(upstream["uid"], uids)).select(["uid", "clip_score"])
        decisions = pq.read_table(
            self.decisions_path(ctx), schema=DECISION_SCHEMA, filters=pc.field("uid").isin(uids.to_pylist())
        )
        table = upstream.join(decisions, "uid", join_type="left outer").sort_by("uid")
        reasons = table["reason"].to_pylist()
        status = [Status.DROPPED.value if r else Status.KEPT.value for r in reasons]
        detail = [k if r else None for r, k in zip(reasons, table["kept_uid"].to_pylist(), strict=True)]
        return make_fates(table["uid"], status, reasons, detail, clip_score=table["clip_score"])
