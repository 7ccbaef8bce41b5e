"""The whole pipeline on the demo world: scores are computed once, decisions do not depend on sharding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import webdataset as wds

from curate.config import load_config
from curate.ledger import read_ledger
from curate.pipeline import run_pipeline, stage_fingerprints
from curate.stages import plan
from curate.stages.materialize import uid_halves
from examples.demo_world import input_table
from tests.world_fixtures import ServedWorld, full_pipeline_overrides


def file_times(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_a_new_threshold_reruns_filter_and_later_stages_only(
    served_world: ServedWorld, tmp_path: Path, tiny_checkpoint: Path
):
    pipeline = served_world.pipeline(tmp_path)
    overrides = full_pipeline_overrides(tiny_checkpoint)
    assert run_pipeline(load_config(pipeline, overrides)).complete
    run_dir = tmp_path / "run"
    embed_before, download_before = file_times(run_dir / "embed"), file_times(run_dir / "download")
    filter_before = json.loads((run_dir / "filter" / "_done" / "00000.json").read_text())["fingerprint"]
    scores = read_ledger(run_dir)["clip_score"].dropna()
    threshold = float(np.quantile(scores, 0.4))

    assert run_pipeline(load_config(pipeline, [*overrides, f"filter.clip_threshold={threshold}"])).complete

    assert file_times(run_dir / "embed") == embed_before  # no embedding recomputed or rewritten
    assert file_times(run_dir / "download") == download_before
    assert json.loads((run_dir / "filter" / "_done" / "00000.json").read_text())["fingerprint"] != filter_before
    ledger = read_ledger(run_dir)
    dropped = ledger[ledger.reason == "clip_score"]
    assert len(dropped) > 0 and (dropped.clip_score < threshold).all()
    survivors = ledger[ledger.stage.isin(["dedup"]) | (ledger.status == "kept")]
    assert (survivors.clip_score >= threshold).all()

    curated = list(wds.WebDataset(sorted(str(p) for p in (run_dir / "curated").glob("*.tar")), shardshuffle=False))
    kept = ledger[ledger.status == "kept"].set_index("uid")
    assert sorted(s["__key__"] for s in curated) == sorted(kept.index)
    for sample in curated:
        meta = json.loads(sample["json"])
        assert meta["uid"] == sample["__key__"] and sample["txt"].decode() == kept.loc[meta["uid"], "caption"]
        assert meta["url"] == kept.loc[meta["uid"], "url"]
        assert abs(meta["clip_score"] - kept.loc[meta["uid"], "clip_score"]) < 1e-6
        assert sample["jpg"][:2] == b"\xff\xd8"
    uids = np.load(run_dir / "curated" / "uids.npy")
    assert uids.dtype == np.dtype("u8,u8") and (np.sort(uids) == uids).all()
    assert sorted(uids.tolist()) == sorted(uid_halves(u) for u in kept.index)


def test_decisions_do_not_depend_on_shard_order_or_size(
    served_world: ServedWorld, tmp_path: Path, tiny_checkpoint: Path
):
    table = input_table(served_world.world, served_world.server.base_url).assign(
        key=lambda t: t.index.map("k{:05d}".format)
    )
    forward, backward = tmp_path / "forward.parquet", tmp_path / "backward.parquet"
    table.to_parquet(forward, index=False)
    table.iloc[::-1].to_parquet(backward, index=False)
    common = [*full_pipeline_overrides(tiny_checkpoint), "input.uid_col=key", "dedup.near_threshold=0.999"]
    results = []
    for path, shard_size in ((forward, 8), (backward, 13)):
        pipeline = served_world.pipeline(tmp_path / path.stem, output=tmp_path / f"{path.stem}-run")
        config = load_config(pipeline, [*common, f"input.path={path}", f"input.shard_size={shard_size}"])
        assert run_pipeline(config).complete
        ledger = read_ledger(tmp_path / f"{path.stem}-run")
        results.append(ledger[["uid", "status", "stage", "reason", "detail"]].sort_values("uid").reset_index(drop=True))
    first_dup = results[0][results[0].reason == "dup_url_caption"]
    assert len(first_dup) > 0
    # which repeat of a (url, caption) pair counts as "first" depends on row order; everything else must match
    other = ~results[0].uid.isin(
        results[0].loc[results[0].reason == "dup_url_caption", "detail"].tolist() + first_dup.uid.tolist()
    )
    pd.testing.assert_frame_equal(results[0][other], results[1][other])
    assert (results[0].reason.isin(["dup_exact", "dup_near"])).sum() > 0


SPEED_ONLY_CHANGES = {
    "input": ["batch_rows=1000", "task_rows=500", "hash_buckets=3", "workers=2"],
    "download": ["threads=8", "processes=1", "per_host_connections=2"],
    "embed": ["batch_size=7", "decode_workers=1", "workers=2", "device=cpu"],
    "validate": [
        "device=cpu",
        "workers=1",
        "checkpoint_every=7",
        "decode_workers=1",
        "decoded_cache_mb=64",
        "eval_batch_size=9",
    ],
}


def test_settings_that_only_change_speed_keep_every_fingerprint(tmp_path: Path) -> None:
    urls = [f"http://127.0.0.1:9/{i}.jpg" for i in range(8)]
    pd.DataFrame({"url": urls, "caption": [f"a photo {i}" for i in range(8)]}).to_parquet(tmp_path / "urls.parquet")
    pipeline = Path(__file__).resolve().parent.parent / "pipelines" / "demo.yaml"
    base = [f"input.path={tmp_path / 'urls.parquet'}", f"output={tmp_path / 'run'}"]
    config = load_config(pipeline, base)
    stages = plan(config)
    declared = {(stage.name, key) for stage in stages for key in stage.speed_only}
    assert declared == {(section, c.split("=")[0]) for section, cs in SPEED_ONLY_CHANGES.items() for c in cs}

    prints = stage_fingerprints(stages)
    overrides = [f"{section}.{change}" for section, changes in SPEED_ONLY_CHANGES.items() for change in changes]
    faster = load_config(pipeline, base + overrides)
    assert faster != config and stage_fingerprints(plan(faster)) == prints
    resized = stage_fingerprints(plan(load_config(pipeline, [*base, "download.image_size=48"])))
    assert resized["input"] == prints["input"] and all(resized[s] != prints[s] for s in prints if s != "input")
