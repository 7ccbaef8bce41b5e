"""Dedup stage: run-wide duplicate decisions as a task, then one fate per uid per shard.

Phases: `eval` (with `dedup.eval_sets`) embeds the evaluation images once with the run's model; `decide`
gathers, for every sample the filter kept, its uid, CLIP score, sha256 and image embedding (read through
the embed stage's outputs), runs the layered dedup (decontamination, exact, near, semantic) and writes the
decisions keyed by uid, one part per input shard; `shards` joins each shard's uids against its own part.
Decisions never depend on shard order, worker count or executor.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import DedupConfig
from curate.io.fs import read_json, write_json_atomic, write_parquet_atomic
from curate.ledger import FATE_SCHEMA, Status, make_fates
from curate.stage import (
    Phase,
    RunLayout,
    Stage,
    StageContext,
    StageOutputs,
    TaskOutput,
    kept_uids,
    single_task,
)
from curate.stages.dedup.thumbnails import shard_thumbnail_features
from curate.stages.download import DownloadOutputs
from curate.stages.embed import EmbedOutputs, EmbedStage

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
    shards: np.ndarray | None = None  # the input shard of each sample


def gather_inputs(layout: RunLayout, shards: list[str], upstream: str, thumbnails: bool = False) -> DedupInputs:
    uid_parts, score_parts, sha_parts, emb_parts, thumb_parts, shard_parts = [], [], [], [], [], []
    embed, download = EmbedOutputs(layout), DownloadOutputs(layout)
    for shard in shards:
        wanted = kept_uids(layout, upstream, shard)
        fates = pq.read_table(layout.fates_path(upstream, shard), schema=FATE_SCHEMA).select(["uid", "clip_score"])
        hashes = download.fates(shard, ["uid", "sha256"])
        metadata = embed.metadata(shard, columns=["uid"])
        embeddings = embed.image_embeddings(shard).astype(np.float32)
        row_of = {uid: i for i, uid in enumerate(metadata["uid"].to_pylist())}
        table = (
            pa.table({"uid": wanted})
            .join(fates, "uid", join_type="left outer")
            .join(hashes, "uid", join_type="left outer")
            .sort_by("uid")
        )
        uids = table["uid"].to_pylist()
        uid_parts.append(np.array(uids, dtype=object))
        shard_parts.append(np.full(len(uids), shard, dtype=object))
        score_parts.append(table["clip_score"].to_numpy(zero_copy_only=False).astype(np.float32))
        sha_parts.append(np.array(table["sha256"].to_pylist(), dtype=object))
        emb_parts.append(embeddings[[row_of[u] for u in uids]] if uids else embeddings[:0])
        if thumbnails:
            thumb_parts.append(shard_thumbnail_features(layout, shard, uids))
    if not uid_parts:
        empty = np.zeros(0, object)
        return DedupInputs(empty, np.zeros(0, np.float32), empty, np.zeros((0, 1), np.float32), shards=empty)
    uids = np.concatenate(uid_parts)
    order = np.argsort(uids, kind="stable")
    embeddings = np.concatenate(emb_parts)[order]
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    embeddings = embeddings / np.where(norms == 0, 1, norms)  # float16 storage: renormalise
    near = np.concatenate(thumb_parts)[order] if thumbnails else None
    return DedupInputs(
        uids[order],
        np.concatenate(score_parts)[order],
        np.concatenate(sha_parts)[order],
        embeddings,
        near,
        np.concatenate(shard_parts)[order],
    )


class DedupOutputs(StageOutputs):
    """Decisions `(uid, reason, kept_uid, similarity)` partitioned by input shard, the summary, and the
    evaluation-set embeddings decontamination compared against."""

    stage = "dedup"

    def decisions_path(self, shard: str) -> Path:
        return self.folder / "decisions" / f"{shard}.parquet"

    def decisions(self, shard: str | None = None) -> pa.Table:
        """One shard's decisions, or (None) the run's, read part by part."""
        if shard is not None:
            return pq.read_table(self.decisions_path(shard), schema=DECISION_SCHEMA)
        parts = sorted((self.folder / "decisions").glob("*.parquet"))
        return pa.concat_tables(
            [DECISION_SCHEMA.empty_table(), *(pq.read_table(p, schema=DECISION_SCHEMA) for p in parts)]
        )

    @property
    def summary_path(self) -> Path:
        return self.folder / "summary.json"

    def eval_paths(self) -> tuple[Path, Path]:
        return self.folder / "eval" / "embeddings.npy", self.folder / "eval" / "ids.json"

    def eval_embeddings(self) -> tuple[np.ndarray, list[str]]:
        embeddings, ids = self.eval_paths()
        return np.load(embeddings), read_json(ids)


class DedupStage(Stage):
    name = "dedup"
    outputs = DedupOutputs

    @property
    def cfg(self) -> DedupConfig:
        return self.config.dedup

    def phases(self) -> list[Phase]:
        phases = [Phase("decide", single_task, self._decide), self.fate_phase()]
        if self.cfg.eval_sets:
            embed = EmbedStage(self.config)  # the run's own model, so similarities are comparable
            phases.insert(0, Phase("eval", single_task, self._embed_eval_sets, resources=embed.resources()))
        return phases

    def _embed_eval_sets(self, ctx: StageContext, _task: str, workdir: Path) -> TaskOutput:
        from curate.stages.dedup.decontaminate import embed_eval_sets

        embeddings, ids = embed_eval_sets(self.cfg.eval_sets, self.config.embed)
        outputs = DedupOutputs(workdir)
        emb_path, ids_path = (workdir / p.relative_to(outputs.folder) for p in outputs.eval_paths())
        emb_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(emb_path, embeddings)
        write_json_atomic(ids_path, ids)
        return TaskOutput(counts={"eval_images": len(ids)})

    def _decide(self, ctx: StageContext, _task: str, workdir: Path) -> TaskOutput:
        upstream = self.upstream_name()
        inputs = gather_inputs(ctx.layout, list(ctx.shards), upstream, self.cfg.near_features == "thumbnail")
        decisions = self.decide(inputs, DedupOutputs(ctx.layout) if self.cfg.eval_sets else None)
        shards = pa.array(inputs.shards.tolist(), pa.string())
        by_shard = pa.table({"uid": pa.array(inputs.uids.tolist(), pa.string()), "shard": shards})
        located = decisions.join(by_shard, "uid", join_type="left outer")
        outputs = DedupOutputs(workdir)
        for shard in ctx.shards:
            part = located.filter(pc.equal(located["shard"], shard)).select(DECISION_SCHEMA.names).sort_by("uid")
            write_parquet_atomic(
                part.cast(DECISION_SCHEMA), workdir / outputs.decisions_path(shard).relative_to(outputs.folder)
            )
        reasons = Counter(r for r in decisions["reason"].to_pylist() if r)
        write_json_atomic(
            workdir / "summary.json",
            {"samples": len(inputs.uids), "dropped": dict(sorted(reasons.items())), "config": self.cfg.model_dump()},
        )
        return TaskOutput(counts={"samples": len(inputs.uids), **reasons})

    def decide(self, inputs: DedupInputs, outputs: DedupOutputs | None = None) -> pa.Table:
        from curate.stages.dedup import run_layers

        if outputs is None:
            return run_layers(inputs, self.cfg)
        eval_embeddings, eval_ids = outputs.eval_embeddings()
        return run_layers(inputs, self.cfg, eval_embeddings, eval_ids)

    def upstream_name(self) -> str:
        from curate.stages import fate_stage_names

        stages = fate_stage_names(self.config.stages)
        return stages[stages.index(self.name) - 1]

    def expected_uids(self, ctx: StageContext, shard: str) -> pa.Array:
        return kept_uids(ctx.layout, self.upstream_name(), shard)

    def process_shard(self, ctx: StageContext, shard: str, workdir: Path) -> pa.Table:
        uids = self.expected_uids(ctx, shard)
        upstream = pq.read_table(ctx.layout.fates_path(self.upstream_name(), shard), schema=FATE_SCHEMA)
        upstream = upstream.filter(pc.is_in(upstream["uid"], uids)).select(["uid", "clip_score"])
        decisions = DedupOutputs(ctx.layout).decisions(shard)
        table = upstream.join(decisions, "uid", join_type="left outer").sort_by("uid")
        reasons = table["reason"].to_pylist()
        status = [Status.DROPPED.value if r else Status.KEPT.value for r in reasons]
        detail = [k if r else None for r, k in zip(reasons, table["kept_uid"].to_pylist(), strict=True)]
        return make_fates(table["uid"], status, reasons, detail, clip_score=table["clip_score"])
