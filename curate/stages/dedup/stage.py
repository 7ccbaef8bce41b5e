"""Dedup stage: the layered dedup of `curate.stages.dedup.layers.deduplicate` as phases of tasks, none of
which holds more than one shard, one hash bucket or one partition of the run.

Phases, in order (each reads the ones before through `DedupOutputs`):
- `eval` (with `dedup.eval_sets`): the evaluation images embedded once with the run's model.
- `plan`: the run's size from the upstream stage's markers, and from it the number of partitions.
- `screen`, per input shard: decontamination; each remaining row's (uid, sha256, CLIP score) into a hash
  bucket of its sha256; the rows of the partitions' training sample (chosen by uid hash); thumbnail
  features when `dedup.near_features` is "thumbnail".
- `exact`, per bucket: byte-identical images.
- `train`: the partitions' centroids from the sample (only when the run has more than one partition).
- `assign`, per input shard: every row still alive into its partition, and copies into the
  partitions it borders.
- `near`, per partition: near-duplicate pairs. `groups`: connected components over every partition's
  pairs (pairs, not embeddings), survivors and the cosine of each dropped row to its survivor.
- `semantic`, per partition: SemDeDup over what the near layer kept.
- `shards`: each shard's decisions and fates from the parts above that concern it.
Decisions never depend on shard size or order, worker count or executor; on one partition they are
those of the single-table algorithm.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import DedupConfig
from curate.io.fs import write_json_atomic, write_parquet_atomic
from curate.io.partitioned import (
    column_vectors,
    read_keyed,
    read_partition,
    read_partition_of_all,
    vectors_column,
    write_keyed,
    write_partitions,
)
from curate.ledger import FATE_SCHEMA, Status, make_fates
from curate.stage import (
    Phase,
    Stage,
    StageContext,
    StageOutputs,
    TaskOutput,
    kept_uids,
    run_shards,
    single_task,
)
from curate.stages.dedup.decisions import DECISION_SCHEMA, REASONS
from curate.stages.dedup.largest import largest_groups
from curate.stages.dedup.thumbnails import shard_thumbnail_features
from curate.stages.download import DownloadOutputs
from curate.stages.embed import EmbedOutputs, EmbedStage

if TYPE_CHECKING:
    from curate.stages.dedup.layers import DedupParams

log = logging.getLogger(__name__)

DROP_SCHEMA = pa.schema(
    [("uid", pa.string()), ("kept_uid", pa.string()), ("similarity", pa.float32()), ("shard", pa.string())]
)
KEY_SCHEMA = pa.schema(
    [("uid", pa.string()), ("sha256", pa.string()), ("clip_score", pa.float32()), ("shard", pa.string())]
)
PAIR_COLUMNS = ("uid", "shard", "row", "clip_score", "primary")


@dataclass(frozen=True)
class DedupPlan:
    samples: int
    partitions: int
    buckets: int
    layers: tuple[str, ...] = ()  # the duplicate layers this run decides, as reasons


def normalised(vectors: np.ndarray) -> np.ndarray:
    """float32 rows of unit length (embeddings are stored as float16, so their norms drift)."""
    x = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1, norms)


class DedupOutputs(StageOutputs):
    """Everything the dedup phases write, and the decisions `(uid, reason, kept_uid, similarity)` per input
    shard that the `shards` phase writes with the fates."""

    stage = "dedup"

    def decisions_path(self, shard: str) -> Path:
        return self.folder / "decisions" / f"{shard}.parquet"

    def decisions(self, shard: str | None = None) -> pa.Table:
        """One shard's decisions, or (None) the run's, read part by part."""
        if shard is not None:
            return pq.read_table(self.layout.fetch(self.decisions_path(shard)), schema=DECISION_SCHEMA)
        parts = [self.layout.fetch(self.decisions_path(shard)) for shard in self.fate_shards()]
        tables = [pq.read_table(path, schema=DECISION_SCHEMA) for path in parts]
        return pa.concat_tables([DECISION_SCHEMA.empty_table(), *tables])

    def eval_paths(self) -> tuple[Path, Path]:
        return self.folder / "eval" / "embeddings.npy", self.folder / "eval" / "ids.json"

    def eval_embeddings(self) -> tuple[np.ndarray, list[str]]:
        embeddings, ids = self.eval_paths()
        return np.load(self.layout.fetch(embeddings)), self.layout.read_json(ids)

    @property
    def plan_path(self) -> Path:
        return self.folder / "plan.json"

    def plan(self) -> DedupPlan:
        return DedupPlan(**self.layout.read_json(self.plan_path))

    def contaminated_path(self, shard: str) -> Path:
        return self.folder / "screen" / "contaminated" / f"{shard}.parquet"

    def keys_path(self, shard: str) -> Path:
        return self.folder / "screen" / "keys" / f"{shard}.arrow"

    def sample_path(self, shard: str) -> Path:
        return self.folder / "screen" / "sample" / f"{shard}.parquet"

    def features_path(self, shard: str) -> Path:
        return self.folder / "screen" / "features" / f"{shard}.arrow"

    def exact_path(self, bucket: int) -> Path:
        return self.folder / "exact" / f"{bucket:05d}.arrow"

    @property
    def partitioning_path(self) -> Path:
        return self.folder / "partitioning.npz"

    def rows_path(self, shard: str) -> Path:
        return self.folder / "partitions" / f"{shard}.arrow"

    def pairs_path(self, partition: int) -> Path:
        return self.folder / "near" / "pairs" / f"{partition:05d}.parquet"

    @property
    def near_path(self) -> Path:
        """The near layer's drops, keyed by shard (`write_drops_by_shard`)."""
        return self.folder / "near" / "dropped.arrow"

    @property
    def near_by_partition_path(self) -> Path:
        """The same drops keyed by the dropped row's primary partition (`write_keyed`)."""
        return self.folder / "near" / "dropped_by_partition.arrow"

    @property
    def near_summary_path(self) -> Path:
        return self.folder / "near" / "summary.json"

    def semantic_path(self, partition: int) -> Path:
        return self.folder / "semantic" / f"{partition:05d}.arrow"

    def largest_path(self, reason: str, task: int) -> Path:
        return self.folder / "largest" / reason / f"{task:05d}.parquet"

    def largest_groups(self, reason: str) -> pa.Table:
        """The layer's largest duplicate groups (`largest.largest_groups`), from its tasks' own."""
        from curate.stages.dedup.largest import merge_largest

        plan = self.plan()
        tasks = {"dup_exact": plan.buckets, "dup_near": 1, "dup_semantic": plan.partitions}[reason]
        paths = [self.largest_path(reason, t) for t in range(tasks if reason in plan.layers else 0)]
        return merge_largest(pq.read_table(p) for p in map(self.layout.fetch, paths) if p.exists())


def read_drops(path: Path) -> pa.Table:
    if not path.exists():
        return DROP_SCHEMA.empty_table()
    return pq.read_table(path, schema=DROP_SCHEMA)


def write_drops(table: pa.Table, path: Path) -> None:
    write_parquet_atomic(table.cast(DROP_SCHEMA).sort_by([("shard", "ascending"), ("uid", "ascending")]), path)


def write_drops_by_shard(table: pa.Table, path: Path, shards: list[str]) -> None:
    """Drops of many shards (an exact bucket's, a partition's), keyed by each row's shard's position in
    `shards`, so each shard's reader finds its rows by a binary search whatever the number of shards."""
    position = {shard: k for k, shard in enumerate(shards)}
    table = table.cast(DROP_SCHEMA).sort_by("uid")
    write_keyed(path, table, np.array([position[s] for s in table["shard"].to_pylist()], dtype=np.int64))


def read_drops_of_shard(path: Path, position: int) -> pa.Table:
    """The drops of the shard at `position` in the run's shards from a `write_drops_by_shard` file."""
    if not path.exists():
        return DROP_SCHEMA.empty_table()
    return read_keyed(path, position).cast(DROP_SCHEMA)


class DedupStage(Stage):
    name = "dedup"
    outputs = DedupOutputs

    @property
    def cfg(self) -> DedupConfig:
        return self.config.dedup

    @property
    def params(self) -> DedupParams:
        from curate.stages.dedup.layers import DedupParams

        return DedupParams.from_config(self.cfg)

    @property
    def partitioned(self) -> bool:
        """Whether any layer works on partitions (near or semantic)."""
        return self.cfg.near_threshold is not None or self.cfg.semantic_eps is not None

    def preflight(self) -> None:
        if self.cfg.eval_sets:
            from curate.stages.dedup.decontaminate import check_eval_sets

            check_eval_sets(self.cfg.eval_sets, self.storage)

    def phases(self) -> list[Phase]:
        phases = []
        if self.cfg.eval_sets:
            embed = EmbedStage(self.config)  # the run's own model, so similarities are comparable
            phases.append(Phase("eval", single_task, self._embed_eval_sets, resources=embed.resources()))
        phases += [Phase("plan", single_task, self._plan), Phase("screen", run_shards, self._screen)]
        if self.cfg.exact:
            phases.append(Phase("exact", self._buckets, self._exact))
        if self.partitioned:
            phases += [Phase("train", self._train_tasks, self._train), Phase("assign", run_shards, self._assign)]
        if self.cfg.near_threshold is not None:
            phases += [Phase("near", self._partitions, self._near), Phase("groups", single_task, self._groups)]
        if self.cfg.semantic_eps is not None:
            phases.append(Phase("semantic", self._partitions, self._semantic))
        return [*phases, self.fate_phase()]

    # -- tasks of each phase, from the plan

    def _plan_of(self, ctx: StageContext) -> DedupPlan | None:
        outputs = DedupOutputs(ctx.layout)
        try:
            return outputs.plan()
        except FileNotFoundError:
            return None

    def _buckets(self, ctx: StageContext) -> list[str]:
        plan = self._plan_of(ctx)
        return [f"{b:05d}" for b in range(plan.buckets)] if plan else []

    def _partitions(self, ctx: StageContext) -> list[str]:
        plan = self._plan_of(ctx)
        return [f"{p:05d}" for p in range(plan.partitions)] if plan else []

    def _train_tasks(self, ctx: StageContext) -> list[str]:
        plan = self._plan_of(ctx)
        return ["all"] if plan and plan.partitions > 1 else []

    # -- phases

    def _embed_eval_sets(self, ctx: StageContext, _task: str, workdir: Path) -> TaskOutput:
        from curate.stages.dedup.decontaminate import embed_eval_sets

        embeddings, ids = embed_eval_sets(self.cfg.eval_sets, self.config.embed, self.storage)
        outputs = DedupOutputs(workdir)
        emb_path, ids_path = (workdir / p.relative_to(outputs.folder) for p in outputs.eval_paths())
        emb_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(emb_path, embeddings)
        write_json_atomic(ids_path, ids)
        return TaskOutput(counts={"eval_images": len(ids)})

    def _plan(self, ctx: StageContext, _task: str, workdir: Path) -> TaskOutput:
        from curate.stages.dedup.partitions import partition_count

        upstream = self.upstream_name()
        samples = sum(ctx.layout.marker(upstream, s)["counts"].get("kept", 0) for s in ctx.shards)
        partitions = partition_count(samples, self.cfg.partition_rows)
        layers = {"dup_exact": self.cfg.exact, "dup_near": self.cfg.near_threshold is not None}
        layers["dup_semantic"] = self.cfg.semantic_eps is not None
        plan = DedupPlan(
            samples,
            partitions if self.partitioned else 0,
            partitions if self.cfg.exact else 0,
            tuple(reason for reason, on in layers.items() if on),
        )
        write_json_atomic(_in(workdir, DedupOutputs(ctx.layout).plan_path, ctx), asdict(plan))
        return TaskOutput(counts={"samples": samples, "partitions": plan.partitions})

    def _screen(self, ctx: StageContext, shard: str, workdir: Path) -> TaskOutput:
        from curate.stages.dedup.decontaminate import contamination_decisions
        from curate.stages.dedup.partitions import in_sample

        outputs, plan = DedupOutputs(ctx.layout), DedupOutputs(ctx.layout).plan()
        rows = self._shard_rows(ctx, shard)
        uids = np.array(rows["uid"].to_pylist(), dtype=object)
        alive = np.ones(len(uids), bool)
        counts: Counter[str] = Counter(samples=len(uids))
        if self.cfg.eval_sets:
            eval_embeddings, eval_ids = outputs.eval_embeddings()
            found = contamination_decisions(
                uids, self._embeddings(ctx, shard, rows), eval_embeddings, self.cfg.contamination_threshold, eval_ids
            )
            drops = _drops(uids, found.dropped, found.kept_uid, found.similarity, shard)
            write_drops(drops, _in(workdir, outputs.contaminated_path(shard), ctx))
            alive = ~found.dropped
            counts["contaminated"] = found.n_dropped
        screened = rows.filter(pa.array(alive))
        if self.cfg.exact:
            sha = screened["sha256"].to_pylist()
            keyed = np.array([bool(h) for h in sha], dtype=bool)
            keys = pa.table(
                {
                    "uid": screened["uid"],
                    "sha256": screened["sha256"],
                    "clip_score": screened["clip_score"],
                    "shard": pa.array([shard] * len(screened), pa.string()),
                },
                schema=KEY_SCHEMA,
            ).filter(pa.array(keyed))
            buckets = np.array([int(h[:15], 16) % plan.buckets for h in sha if h], dtype=np.int64)
            write_partitions(_in(workdir, outputs.keys_path(shard), ctx), keys, buckets, plan.buckets)
        if self.cfg.near_features == "thumbnail" and self.cfg.near_threshold is not None:
            features = shard_thumbnail_features(ctx.layout, shard, screened["uid"].to_pylist())
            table = pa.table({"uid": screened["uid"], "vector": vectors_column(features)})
            write_partitions(_in(workdir, outputs.features_path(shard), ctx), table, np.zeros(len(table), int), 1)
        if plan.partitions > 1:
            screened_uids = np.array(screened["uid"].to_pylist(), dtype=object)
            picked = np.flatnonzero(in_sample(screened_uids, plan.samples, plan.partitions, self.cfg.seed))
            vectors = self._near_vectors(ctx, shard, screened, picked, workdir)
            sample = pa.table({"uid": pa.array(screened_uids[picked], pa.string()), "vector": vectors_column(vectors)})
            write_parquet_atomic(sample, _in(workdir, outputs.sample_path(shard), ctx))
            counts["sampled"] = len(picked)
        return TaskOutput(counts=dict(counts))

    def _exact(self, ctx: StageContext, task: str, workdir: Path) -> TaskOutput:
        from curate.stages.dedup.exact import exact_duplicates

        outputs = DedupOutputs(ctx.layout)
        keys = read_partition_of_all(
            [ctx.layout.fetch(outputs.keys_path(s)) for s in ctx.shards], int(task), KEY_SCHEMA
        )
        uids = np.array(keys["uid"].to_pylist(), dtype=object)
        found = exact_duplicates(
            uids, np.array(keys["sha256"].to_pylist(), dtype=object), keys["clip_score"].to_numpy(zero_copy_only=False)
        )
        shards = np.array(keys["shard"].to_pylist(), dtype=object)
        drops = _drops(uids, found.dropped, found.kept_uid, found.similarity, shards)
        write_drops_by_shard(drops, _in(workdir, outputs.exact_path(int(task)), ctx), ctx.shards)
        write_parquet_atomic(largest_groups(drops), _in(workdir, outputs.largest_path("dup_exact", int(task)), ctx))
        return TaskOutput(counts={"samples": len(uids), "dup_exact": found.n_dropped})

    def _train(self, ctx: StageContext, _task: str, workdir: Path) -> TaskOutput:
        from curate.stages.dedup.partitions import Partitioning

        outputs, plan = DedupOutputs(ctx.layout), DedupOutputs(ctx.layout).plan()
        parts = [pq.read_table(ctx.layout.fetch(outputs.sample_path(s))) for s in ctx.shards]
        sample = pa.concat_tables(parts).sort_by("uid")
        vectors = self._vectors(sample, "vector", normalise=self._clip_near)
        partitioning = Partitioning.train(vectors, plan.partitions, spill=self.params.spill, seed=self.cfg.seed)
        path = _in(workdir, outputs.partitioning_path, ctx)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **partitioning.to_arrays())
        return TaskOutput(counts={"sampled": len(sample), "partitions": partitioning.k})

    def _assign(self, ctx: StageContext, shard: str, workdir: Path) -> TaskOutput:
        from curate.stages.dedup.partitions import Partitioning

        outputs, plan = DedupOutputs(ctx.layout), DedupOutputs(ctx.layout).plan()
        rows = self._shard_rows(ctx, shard)
        dropped = set()
        if self.cfg.eval_sets:  # a file left by an earlier run with eval sets does not count
            dropped.update(read_drops(ctx.layout.fetch(outputs.contaminated_path(shard)))["uid"].to_pylist())
        if self.cfg.exact:
            position = ctx.shards.index(shard)
            for bucket in range(plan.buckets):
                exact = read_drops_of_shard(ctx.layout.fetch(outputs.exact_path(bucket)), position)
                dropped.update(exact["uid"].to_pylist())
        uids = rows["uid"].to_pylist()
        rows = rows.filter(pa.array([u not in dropped for u in uids], pa.bool_()))
        if plan.partitions > 1:
            with np.load(ctx.layout.fetch(outputs.partitioning_path)) as arrays:
                partitioning = Partitioning.from_arrays(dict(arrays))
        else:
            partitioning = Partitioning.single()
        every = np.arange(len(rows))
        near = self._near_vectors(ctx, shard, rows, every, None)
        primary, spill_rows, spill_parts = partitioning.assign(normalised(near) if self._clip_near else near)
        placed = np.concatenate([every, spill_rows])
        table = pa.table(
            {
                "uid": rows["uid"].take(pa.array(placed)),
                "shard": pa.array([shard] * len(placed), pa.string()),
                "row": rows["row"].take(pa.array(placed)),
                "clip_score": rows["clip_score"].take(pa.array(placed)),
                "primary": pa.array(primary[placed], pa.int32()),
                "vector": vectors_column(near[placed]),
            }
        )
        if self.cfg.semantic_eps is not None and not self._clip_near:
            table = table.append_column(
                "embedding", vectors_column(self._embeddings(ctx, shard, rows, raw=True)[placed])
            )
        write_partitions(
            _in(workdir, outputs.rows_path(shard), ctx), table, np.concatenate([primary, spill_parts]), plan.partitions
        )
        return TaskOutput(counts={"samples": len(rows), "spilled": len(spill_rows)})

    def _near(self, ctx: StageContext, task: str, workdir: Path) -> TaskOutput:
        from curate.stages.dedup.layers import partition_pairs
        from curate.stages.dedup.near import pair_cosines

        outputs = DedupOutputs(ctx.layout)
        members = self._partition_rows(ctx, int(task))
        x = self._vectors(members, "vector", normalise=self._clip_near)
        uids = np.array(members["uid"].to_pylist(), dtype=object)
        i, j = partition_pairs(uids, x, self.params)
        pairs = {}
        for side, rows in (("a", i), ("b", j)):
            picked = members.select(list(PAIR_COLUMNS)).take(pa.array(rows))
            pairs.update({f"{name}_{side}": picked[name] for name in PAIR_COLUMNS})
        pairs["cosine"] = pa.array(pair_cosines(x, i, j), pa.float32())
        write_parquet_atomic(pa.table(pairs), _in(workdir, outputs.pairs_path(int(task)), ctx))
        return TaskOutput(counts={"samples": len(uids), "pairs": len(i)})

    def _groups(self, ctx: StageContext, _task: str, workdir: Path) -> TaskOutput:
        from curate.stages.dedup.groups import components, survivors

        outputs, plan = DedupOutputs(ctx.layout), DedupOutputs(ctx.layout).plan()
        pairs = pa.concat_tables(
            [pq.read_table(ctx.layout.fetch(outputs.pairs_path(p))) for p in range(plan.partitions)]
        )
        sides = [
            pairs.select([f"{name}_{side}" for name in PAIR_COLUMNS]).rename_columns(list(PAIR_COLUMNS))
            for side in ("a", "b")
        ]
        grouped = (
            pa.concat_tables(sides)
            .group_by("uid", use_threads=False)
            .aggregate([(c, "first") for c in PAIR_COLUMNS[1:]])
        )
        nodes = pa.table({"uid": grouped["uid"], **{c: grouped[f"{c}_first"] for c in PAIR_COLUMNS[1:]}}).sort_by("uid")
        uids = np.array(nodes["uid"].to_pylist(), dtype=object)
        index = {u: k for k, u in enumerate(uids)}
        a = np.array([index[u] for u in pairs["uid_a"].to_pylist()], dtype=np.int64)
        b = np.array([index[u] for u in pairs["uid_b"].to_pylist()], dtype=np.int64)
        scores = nodes["clip_score"].to_numpy(zero_copy_only=False)
        chosen = survivors(components(len(uids), a, b), scores, uids, np.arange(len(uids)))
        rows = np.flatnonzero(~chosen.keep)
        similarity = self._survivor_cosines(ctx, nodes, rows, chosen.survivor[rows], a, b, pairs["cosine"])
        shards = np.array(nodes["shard"].to_pylist(), dtype=object)
        drops = _drops(uids[rows], np.ones(len(rows), bool), chosen.kept_uid[rows], similarity, shards[rows])
        # one file per key space, written whole: no shard or partition can read drops of an earlier run
        write_drops_by_shard(drops, _in(workdir, outputs.near_path, ctx), ctx.shards)
        primary = nodes["primary"].to_numpy(zero_copy_only=False)[rows]
        write_keyed(_in(workdir, outputs.near_by_partition_path, ctx), drops, primary)
        entering = sum(ctx.layout.marker(self.name, s, "assign")["counts"].get("samples", 0) for s in ctx.shards)
        write_json_atomic(_in(workdir, outputs.near_summary_path, ctx), {"samples": entering, "dropped": len(rows)})
        write_parquet_atomic(largest_groups(drops), _in(workdir, outputs.largest_path("dup_near", 0), ctx))
        return TaskOutput(counts={"pairs": len(pairs), "dup_near": len(rows)})

    def _semantic(self, ctx: StageContext, task: str, workdir: Path) -> TaskOutput:
        from curate.stages.dedup.layers import semantic_in_partition

        outputs, partition = DedupOutputs(ctx.layout), int(task)
        members = self._partition_rows(ctx, partition)
        members = members.filter(pc.equal(members["primary"], partition))
        if self.cfg.near_threshold is not None:
            near = read_keyed(ctx.layout.fetch(outputs.near_by_partition_path), partition)["uid"]
            members = members.filter(pc.invert(pc.is_in(members["uid"], near)))
            summary = ctx.layout.read_json(outputs.near_summary_path)
            total = summary["samples"] - summary["dropped"]
        else:
            total = sum(ctx.layout.marker(self.name, s, "assign")["counts"]["samples"] for s in ctx.shards)
        column = "vector" if self._clip_near else "embedding"
        x = self._vectors(members, column, normalise=True)
        uids = np.array(members["uid"].to_pylist(), dtype=object)
        found = semantic_in_partition(uids, x, members["clip_score"].to_numpy(zero_copy_only=False), total, self.params)
        shards = np.array(members["shard"].to_pylist(), dtype=object)
        drops = _drops(uids, found.dropped, found.kept_uid, found.similarity, shards)
        write_drops_by_shard(drops, _in(workdir, outputs.semantic_path(partition), ctx), ctx.shards)
        write_parquet_atomic(largest_groups(drops), _in(workdir, outputs.largest_path("dup_semantic", partition), ctx))
        return TaskOutput(counts={"samples": len(uids), "dup_semantic": found.n_dropped})

    # -- the fate phase

    def upstream_name(self) -> str:
        from curate.stages import fate_stage_names

        stages = fate_stage_names(self.config.stages)
        return stages[stages.index(self.name) - 1]

    def expected_uids(self, ctx: StageContext, shard: str) -> pa.Array:
        return kept_uids(ctx.layout, self.upstream_name(), shard)

    def process_shard(self, ctx: StageContext, shard: str, workdir: Path) -> pa.Table:
        outputs, plan = DedupOutputs(ctx.layout), DedupOutputs(ctx.layout).plan()
        position, near = ctx.shards.index(shard), self.cfg.near_threshold is not None
        layers = {
            "contaminated": [read_drops(ctx.layout.fetch(outputs.contaminated_path(shard)))]
            if self.cfg.eval_sets
            else [],
            "dup_exact": [
                read_drops_of_shard(ctx.layout.fetch(outputs.exact_path(b)), position) for b in range(plan.buckets)
            ],
            "dup_near": [read_drops_of_shard(ctx.layout.fetch(outputs.near_path), position)] if near else [],
            "dup_semantic": [
                read_drops_of_shard(ctx.layout.fetch(outputs.semantic_path(p)), position)
                for p in range(plan.partitions if self.cfg.semantic_eps is not None else 0)
            ],
        }
        assert tuple(layers) == REASONS
        parts = [
            pa.concat_tables([DROP_SCHEMA.empty_table(), *tables]).append_column(
                "reason", pa.array([reason] * sum(map(len, tables)), pa.string())
            )
            for reason, tables in layers.items()
        ]
        dropped = pa.concat_tables(parts).select(["uid", "reason", "kept_uid", "similarity"])
        rows = self._shard_rows(ctx, shard).select(["uid", "clip_score"])
        table = rows.join(dropped, "uid", join_type="left outer").sort_by("uid")
        write_parquet_atomic(
            table.select(DECISION_SCHEMA.names).cast(DECISION_SCHEMA), _in(workdir, outputs.decisions_path(shard), ctx)
        )
        reasons = table["reason"].to_pylist()
        status = [Status.DROPPED.value if r else Status.KEPT.value for r in reasons]
        detail = [k if r else None for r, k in zip(reasons, table["kept_uid"].to_pylist(), strict=True)]
        return make_fates(table["uid"], status, reasons, detail, clip_score=table["clip_score"])

    # -- reading rows and vectors

    @property
    def _clip_near(self) -> bool:
        """Whether the near layer compares CLIP embeddings (not thumbnails)."""
        return self.cfg.near_features == "clip" or self.cfg.near_threshold is None

    def _shard_rows(self, ctx: StageContext, shard: str) -> pa.Table:
        """The shard's samples that reached dedup, sorted by uid: uid, clip_score, sha256 and `row`, their
        row in the embed stage's arrays."""
        upstream = self.upstream_name()
        wanted = kept_uids(ctx.layout, upstream, shard)
        fates = pq.read_table(ctx.layout.fetch(ctx.layout.fates_path(upstream, shard)), schema=FATE_SCHEMA).select(
            ["uid", "clip_score"]
        )
        hashes = DownloadOutputs(ctx.layout).fates(shard, ["uid", "sha256"])
        metadata = EmbedOutputs(ctx.layout).metadata(shard, columns=["uid"])
        positions = pa.table({"uid": metadata["uid"], "row": pa.array(np.arange(len(metadata), dtype=np.int32))})
        return (
            pa.table({"uid": wanted})
            .join(fates, "uid", join_type="left outer")
            .join(hashes, "uid", join_type="left outer")
            .join(positions, "uid", join_type="left outer")
            .sort_by("uid")
        )

    def _embeddings(self, ctx: StageContext, shard: str, rows: pa.Table, raw: bool = False) -> np.ndarray:
        # mapped, so a task wanting a few rows of a shard (the groups task's chains) reads only those
        stored = EmbedOutputs(ctx.layout).image_embeddings(shard, mmap_mode="r")
        stored = np.asarray(stored[rows["row"].to_numpy(zero_copy_only=False)])
        return stored if raw else normalised(stored)

    def _near_vectors(
        self, ctx: StageContext, shard: str, rows: pa.Table, picked: np.ndarray, workdir: Path | None
    ) -> np.ndarray:
        """The near layer's vectors of `rows[picked]`: CLIP embeddings as stored (float16), or the
        thumbnail features the screen phase saved (in `workdir` while it runs)."""
        picked_rows = rows.take(pa.array(picked))
        if self._clip_near:
            return self._embeddings(ctx, shard, picked_rows, raw=True)
        outputs = DedupOutputs(ctx.layout)
        path = (
            _in(workdir, outputs.features_path(shard), ctx)
            if workdir
            else ctx.layout.fetch(outputs.features_path(shard))
        )
        saved = read_partition(path, 0)
        features = column_vectors(saved["vector"], saved.schema.field("vector").type.list_size)
        position = {u: k for k, u in enumerate(saved["uid"].to_pylist())}
        return features[[position[u] for u in picked_rows["uid"].to_pylist()]]

    def _partition_rows(self, ctx: StageContext, partition: int) -> pa.Table:
        outputs = DedupOutputs(ctx.layout)
        paths = [ctx.layout.fetch(outputs.rows_path(s)) for s in ctx.shards]
        schema = pa.ipc.open_file(pa.memory_map(str(paths[0]))).schema if paths else None
        if schema is None:
            raise ValueError("dedup: no shards to read partitions from")
        return read_partition_of_all(paths, partition, schema).sort_by("uid")

    def _vectors(self, table: pa.Table, column: str, normalise: bool) -> np.ndarray:
        vectors = column_vectors(table[column], table.schema.field(column).type.list_size)
        return normalised(vectors) if normalise else np.asarray(vectors, dtype=np.float32)

    def _survivor_cosines(
        self,
        ctx: StageContext,
        nodes: pa.Table,
        rows: np.ndarray,
        survivor: np.ndarray,
        a: np.ndarray,
        b: np.ndarray,
        cosine: pa.ChunkedArray,
    ) -> np.ndarray:
        """Each dropped row's cosine to its survivor: from the pair list when the two were found as a pair,
        otherwise (a chain) computed from the two rows' vectors."""
        from curate.stages.dedup.near import pair_cosines

        n = len(nodes)
        direct = dict(zip((np.minimum(a, b) * n + np.maximum(a, b)).tolist(), cosine.to_pylist(), strict=True))
        codes = (np.minimum(rows, survivor) * n + np.maximum(rows, survivor)).tolist()
        similarity = np.array([direct.get(c, np.nan) for c in codes], dtype=np.float32)
        chained = np.flatnonzero(np.isnan(similarity))
        if len(chained):
            needed = np.unique(np.concatenate([rows[chained], survivor[chained]]))
            vectors = self._node_vectors(ctx, nodes.take(pa.array(needed)))
            local = {int(node): k for k, node in enumerate(needed)}
            left = np.array([local[int(r)] for r in rows[chained]])
            right = np.array([local[int(s)] for s in survivor[chained]])
            similarity[chained] = pair_cosines(vectors, left, right)
        return similarity

    def _node_vectors(self, ctx: StageContext, nodes: pa.Table) -> np.ndarray:
        """Near-layer vectors (float32, as compared) of some rows, read from their shards."""
        out = None
        shards = np.array(nodes["shard"].to_pylist(), dtype=object)
        for shard in sorted(set(shards)):
            picked = np.flatnonzero(shards == shard)
            part = nodes.take(pa.array(picked))
            if self._clip_near:
                vectors = self._embeddings(ctx, shard, part)
            else:
                vectors = self._near_vectors(ctx, shard, part, np.arange(len(part)), None).astype(np.float32)
            if out is None:
                out = np.zeros((len(nodes), vectors.shape[1]), np.float32)
            out[picked] = vectors
        assert out is not None
        return out


def _in(workdir: Path | None, path: Path, ctx: StageContext) -> Path:
    """`path` (under the run directory) at the same place under a task's scratch `workdir`."""
    if workdir is None:
        return path
    return workdir / path.relative_to(ctx.layout.stage_dir("dedup"))


def _drops(
    uids: np.ndarray, dropped: np.ndarray, kept_uid: np.ndarray, similarity: np.ndarray, shard: str | np.ndarray
) -> pa.Table:
    rows = np.flatnonzero(dropped)
    shards = [shard] * len(rows) if isinstance(shard, str) else list(np.asarray(shard, dtype=object)[rows])
    sim = np.asarray(similarity, dtype=np.float32)[rows]
    return pa.table(
        {
            "uid": pa.array(list(np.asarray(uids, dtype=object)[rows]), pa.string()),
            "kept_uid": pa.array(list(np.asarray(kept_uid, dtype=object)[rows]), pa.string()),
            "similarity": pa.array(sim, pa.float32(), mask=np.isnan(sim)),
            "shard": pa.array(shards, pa.string()),
        },
        schema=DROP_SCHEMA,
    )
