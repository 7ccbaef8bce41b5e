"""The dedup stage's phases (screen, exact buckets, partitions, pairs, groups, semantic) against the in-memory
layers on the same rows, on a generated run with planted copies, chains and ties."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from benchmarks.synthetic_run import Planted, build_run
from curate.config import DaskConfig, PipelineConfig
from curate.executors.dask import DaskExecutor
from curate.ledger import FATE_SCHEMA
from curate.pipeline import run_pipeline
from curate.stage import RunLayout
from curate.stages.dedup import DedupParams, deduplicate
from curate.stages.dedup.partitions import Partitioning
from curate.stages.dedup.stage import DedupOutputs, normalised
from curate.stages.download import DownloadOutputs
from curate.stages.embed import EmbedOutputs

pytestmark = pytest.mark.timeout(600)

ROWS = 3000
CHAINS = 0.02  # of the rows: enough chains that some cross partitions
DEDUP = {"near_threshold": 0.95, "semantic_eps": 0.1, "partition_rows": 700}


def stage_decisions(config: PipelineConfig) -> pd.DataFrame:
    table = DedupOutputs(RunLayout(Path(config.output))).decisions()
    return table.to_pandas().sort_values("uid").reset_index(drop=True)


def in_memory_decisions(config: PipelineConfig, thumbnails: bool = False) -> pd.DataFrame:
    """`deduplicate` over every row that reached dedup, read whole from the run's files (with `thumbnails`,
    the near layer on the download tars' thumbnail features)."""
    from curate.stages.dedup.thumbnails import shard_thumbnail_features

    layout = RunLayout(Path(config.output))
    uids, scores, sha, vectors, features = [], [], [], [], []
    embed, download = EmbedOutputs(layout), DownloadOutputs(layout)
    for shard in embed.shards():
        fates = pq.read_table(layout.fates_path("filter", shard), schema=FATE_SCHEMA)
        kept = fates.filter(pc.equal(fates["status"], "kept"))
        row = {u: k for k, u in enumerate(embed.metadata(shard, ["uid"])["uid"].to_pylist())}
        hashes = dict(zip(*download.fates(shard, ["uid", "sha256"]).to_pydict().values(), strict=True))
        stored = embed.image_embeddings(shard)
        for uid, score in zip(kept["uid"].to_pylist(), kept["clip_score"].to_pylist(), strict=True):
            uids.append(uid)
            scores.append(score)
            sha.append(hashes[uid])
            vectors.append(stored[row[uid]])
        if thumbnails:
            features.append(shard_thumbnail_features(layout, shard, kept["uid"].to_pylist()))
    table = deduplicate(
        np.array(uids, dtype=object),
        normalised(np.stack(vectors)),
        np.array(scores, np.float32),
        np.array(sha, dtype=object),
        params=DedupParams.from_config(config.dedup),
        near_emb=np.concatenate(features) if thumbnails else None,
    )
    return table.to_pandas().sort_values("uid").reset_index(drop=True)


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineConfig, Planted]:
    config, planted = build_run(
        tmp_path_factory.mktemp("partitioned"), ROWS, shard_size=500, dedup=DEDUP, chain_share=CHAINS
    )
    assert run_pipeline(config).complete
    return config, planted


def test_the_phases_decide_as_the_in_memory_layers_over_several_partitions(partitioned) -> None:
    config, _ = partitioned
    outputs = DedupOutputs(RunLayout(Path(config.output)))
    assert outputs.plan().partitions == 4  # 2700 rows past the filter, 700 per partition
    phased, whole = stage_decisions(config), in_memory_decisions(config)
    assert set(phased["reason"].dropna()) == {"dup_exact", "dup_near", "dup_semantic"}
    pd.testing.assert_frame_equal(phased, whole)


def test_planted_copies_are_found_chains_join_across_partitions_and_ties_go_to_the_smaller_uid(partitioned) -> None:
    config, planted = partitioned
    decisions = stage_decisions(config).set_index("uid")
    reached = set(decisions.index)

    def survivor(uid: str) -> str:
        while decisions.at[uid, "kept_uid"] is not None and decisions.at[uid, "reason"] in {"dup_near", "dup_exact"}:
            uid = decisions.at[uid, "kept_uid"]
        return uid

    for reason, pairs in (("dup_exact", planted.exact), ("dup_near", planted.near)):
        both = [(a, b) for a, b in pairs if a in reached and b in reached]
        assert both and all(survivor(a) == survivor(b) for a, b in both), reason

    with np.load(DedupOutputs(RunLayout(Path(config.output))).partitioning_path) as arrays:
        partitioning = Partitioning.from_arrays(dict(arrays))
    embed = EmbedOutputs(RunLayout(Path(config.output)))
    vectors = {}
    for shard in embed.shards():
        uids = embed.metadata(shard, ["uid"])["uid"].to_pylist()
        vectors.update(zip(uids, normalised(embed.image_embeddings(shard)), strict=True))
    chains = [(a, c) for a, b, c in planted.chains if {a, b, c} <= reached]
    assert chains
    ends = partitioning.assign(np.stack([vectors[u] for a, c in chains for u in (a, c)]))[0].reshape(-1, 2)
    across = [pair for pair, (pa_, pc_) in zip(chains, ends, strict=True) if pa_ != pc_]
    assert across, "no planted chain crosses partitions; the check below would not test the join"
    assert all(survivor(a) == survivor(c) for a, c in across)

    scores = stage_decisions(config).set_index("uid")
    fates = {}
    for shard in embed.shards():
        table = pq.read_table(RunLayout(Path(config.output)).fates_path("filter", shard), schema=FATE_SCHEMA)
        fates.update(zip(table["uid"].to_pylist(), table["clip_score"].to_pylist(), strict=True))
    ties = [(a, b) for a, b in planted.near[::2] if a in reached and b in reached and fates[a] == fates[b]]
    ties = [(a, b) for a, b in ties if {survivor(a)} == {survivor(b)} and survivor(a) in (a, b)]
    assert ties
    assert all(survivor(a) == min(a, b) for a, b in ties)
    assert scores.loc[[max(a, b) for a, b in ties], "reason"].eq("dup_near").all()


def test_one_partition_is_the_single_table_algorithm_and_agrees_on_this_data(partitioned, tmp_path: Path) -> None:
    config, _ = partitioned
    single, _ = build_run(
        tmp_path / "one", ROWS, shard_size=500, dedup={**DEDUP, "partition_rows": 10_000}, chain_share=CHAINS
    )
    assert run_pipeline(single).complete
    assert DedupOutputs(RunLayout(Path(single.output))).plan().partitions == 1
    pd.testing.assert_frame_equal(stage_decisions(single), in_memory_decisions(single))
    # every planted pair is found either way, so one partition and four give the same exact and near
    # decisions; the semantic layer's clusters nest in the partitions, so its pairs may differ at a boundary
    duplicates = lambda d: d[d["reason"].isin(["dup_exact", "dup_near"])].reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(duplicates(stage_decisions(single)), duplicates(stage_decisions(config)))


def kill_a_worker_once_dedup_has_started(executor: DaskExecutor, run_dir: Path, killed: list[int]) -> None:
    """SIGKILLs one worker process as soon as the first dedup screen task has committed."""
    pids = executor.client.run(os.getpid)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if any((run_dir / "dedup" / "_done" / "screen").glob("*.json")):
            victim = sorted(pids.values())[0]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
            return
        time.sleep(0.01)


def test_other_shard_sizes_and_a_dask_cluster_losing_a_worker_give_the_same_decisions(partitioned, tmp_path: Path):
    config, _ = partitioned
    resharded, _ = build_run(tmp_path / "resharded", ROWS, shard_size=300, dedup=DEDUP, chain_share=CHAINS)
    run_dir = Path(resharded.output)
    executor = DaskExecutor(DaskConfig(n_workers=2, dashboard_address=":0", shard_retries=3))
    killed: list[int] = []
    killer = threading.Thread(target=kill_a_worker_once_dedup_has_started, args=(executor, run_dir, killed))
    killer.start()
    try:
        assert run_pipeline(resharded, executor=executor).complete
    finally:
        killer.join()
        executor.close()
    assert killed, "no worker was killed: dedup's first phase finished before its first marker was seen"
    assert len(EmbedOutputs(RunLayout(run_dir)).shards()) == 10
    pd.testing.assert_frame_equal(stage_decisions(resharded), stage_decisions(config))


def test_each_shard_reads_only_its_own_decisions_and_a_second_run_does_nothing(partitioned) -> None:
    config, _ = partitioned
    outputs = DedupOutputs(RunLayout(Path(config.output)))
    for shard in EmbedOutputs(RunLayout(Path(config.output))).shards():
        part = outputs.decisions(shard)
        fates = pq.read_table(RunLayout(Path(config.output)).fates_path("dedup", shard))
        assert part["uid"].to_pylist() == sorted(fates["uid"].to_pylist())
    assert outputs.decisions().num_rows == 2700
    assert run_pipeline(config).tasks_run == 0


def test_the_largest_groups_from_each_task_are_the_largest_of_the_whole_run(partitioned) -> None:
    config, _ = partitioned
    outputs = DedupOutputs(RunLayout(Path(config.output)))
    decisions = outputs.decisions().to_pandas()
    for reason in ("dup_exact", "dup_near", "dup_semantic"):
        rows = decisions[(decisions["reason"] == reason) & decisions["kept_uid"].notna()]
        sizes = rows.groupby("kept_uid").size().rename("copies").reset_index()
        top = sizes.sort_values(["copies", "kept_uid"], ascending=[False, True]).head(4)
        largest = outputs.largest_groups(reason).to_pandas()
        assert len(top) == 4, reason  # the planted data has groups in every layer
        assert list(dict.fromkeys(largest["kept_uid"])) == list(top["kept_uid"]), reason
        for kept_uid, copies in zip(top["kept_uid"], top["copies"], strict=True):
            members = rows[rows["kept_uid"] == kept_uid].assign(sim=lambda t: t["similarity"].fillna(1.0))
            expected = members.sort_values(["sim", "uid"], ascending=[False, True])["uid"].head(5).tolist()
            mine = largest[largest["kept_uid"] == kept_uid]
            assert mine["uid"].tolist() == expected and set(mine["copies"]) == {copies}, (reason, kept_uid)


def test_thumbnail_near_features_decide_as_the_in_memory_layers(tmp_path: Path) -> None:
    dedup = {**DEDUP, "near_features": "thumbnail", "semantic_eps": None}
    config, _ = build_run(tmp_path, ROWS, shard_size=500, dedup=dedup, chain_share=CHAINS, tars=True)
    assert run_pipeline(config).complete
    assert DedupOutputs(RunLayout(Path(config.output))).plan().partitions == 4
    phased = stage_decisions(config)
    assert (phased["reason"] == "dup_near").sum() > 0
    pd.testing.assert_frame_equal(phased, in_memory_decisions(config, thumbnails=True))
