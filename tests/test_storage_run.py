"""A run directory on a bucket (moto's S3 server on loopback): `input.path` and `output` both on s3:// give the
same ledger, fates and curated shards as the run on disk; nothing is renamed in the bucket, every task's
objects are vouched for by its done-marker (uploaded last); a re-run does no work; a task's objects without
their marker are redone."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from curate.config import load_config
from curate.io.run_store import MIRROR_GB_ENV
from curate.ledger import read_ledger
from curate.pipeline import run_pipeline
from curate.stage import RunLayout
from curate.stages.materialize import CuratedOutputs
from tests.s3_fixtures import S3Bucket
from tests.world_fixtures import ServedWorld, full_pipeline_overrides

pytestmark = pytest.mark.timeout(400)

LEDGER_COLUMNS = ["uid", "status", "stage", "reason", "sha256", "width", "height", "clip_score"]


def ledger_of(run: str | Path) -> pd.DataFrame:
    return read_ledger(run)[LEDGER_COLUMNS].sort_values("uid").reset_index(drop=True)


def curated_of(layout: RunLayout) -> dict[str, Any]:
    curated = CuratedOutputs(layout)
    uids = np.load(layout.fetch(curated.uids_path))
    sizes = layout.read_json(curated.sizes_path)
    return {"uids": uids.tolist(), "sizes": sizes, "tars": [p.name for p in curated.shards()]}


@pytest.fixture
def env_credentials(s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a user's shell holds: the reopening commands read the run with the environment's credentials."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint)


def bucket_pipeline(world: ServedWorld, bucket: S3Bucket, tmp_path: Path, checkpoint: Path) -> tuple[str, list[str]]:
    """The world's crawl and the model in the bucket, the run directory in it too."""
    crawl = bucket.upload(world.table, f"crawl/{world.table.name}")  # generated uids hash the file name
    model = bucket.upload(checkpoint, "models/tiny.pt")
    run = bucket.url("runs/demo")
    path = world.pipeline(tmp_path / "bucket", output=tmp_path / "unused")
    overrides = [*full_pipeline_overrides(checkpoint), f"input.path={crawl}", f"output={run}", f"embed.pretrained={model}"]
    overrides += [f"storage.options={json.dumps(bucket.options)}"]
    return str(path), overrides


def test_a_run_in_a_bucket_gives_the_run_on_disk_and_a_rerun_does_no_work(
    served_world: ServedWorld,
    s3_bucket: S3Bucket,
    tiny_checkpoint: Path,
    tmp_path: Path,
    env_credentials: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(MIRROR_GB_ENV, "0")  # every task leaves the mirror empty: nothing is read from local disk
    on_disk = served_world.pipeline(tmp_path / "disk", output=tmp_path / "disk-run")
    local = run_pipeline(load_config(on_disk, full_pipeline_overrides(tiny_checkpoint)))
    pipeline, overrides = bucket_pipeline(served_world, s3_bucket, tmp_path, tiny_checkpoint)
    config = load_config(pipeline, overrides)
    remote = run_pipeline(config)
    assert local.complete and remote.complete
    assert remote.rows == local.rows > 0

    run = config.output
    assert ledger_of(run).equals(ledger_of(tmp_path / "disk-run"))
    bucket_layout = RunLayout.of(run, s3_bucket.options)
    want = curated_of(RunLayout(tmp_path / "disk-run"))
    assert want["uids"] and curated_of(bucket_layout) == want

    objects = [key.removeprefix(f"{s3_bucket.name}/runs/demo/") for key in s3_bucket.fs.find(run)]
    assert "ledger.parquet" in objects and "config.yaml" in objects and "curated/_done.json" in objects
    assert not [key for key in objects if key.endswith(".tmp") or "/_tmp/" in key or "staging/" in key]
    disk = sorted(str(p.relative_to(tmp_path / "disk-run")) for p in (tmp_path / "disk-run").rglob("*") if p.is_file())
    assert sorted(objects) == [name for name in disk if name != ".curate.lock"]

    again = run_pipeline(load_config(pipeline, overrides))
    assert again.complete and again.tasks_run == 0


def test_objects_without_their_marker_are_redone_and_a_reader_never_trusts_them(
    served_world: ServedWorld, s3_bucket: S3Bucket, tiny_checkpoint: Path, tmp_path: Path, env_credentials: None
) -> None:
    pipeline, overrides = bucket_pipeline(served_world, s3_bucket, tmp_path, tiny_checkpoint)
    config = load_config(pipeline, [*overrides[:1], "stages=[input,download,embed]", *overrides[1:]])
    first = run_pipeline(config)
    assert first.complete
    layout = RunLayout.of(config.output, s3_bucket.options)
    shard = "00000"
    marker = layout.marker_path("embed", shard)
    listed = layout.marker("embed", shard)["files"]
    # a task that died after uploading its objects and before its marker: a damaged object, no marker
    s3_bucket.fs.rm(layout.where(marker))
    embeddings = layout.where(layout.stage_dir("embed") / next(name for name in listed if name.endswith(".npy")))
    s3_bucket.fs.pipe(embeddings, b"half an object")
    rerun = run_pipeline(config)
    assert rerun.complete and rerun.tasks_run == 1  # that shard's embed task, nothing else
    redone = layout.marker("embed", shard)
    assert redone["files"] == listed
    stored = np.load(io.BytesIO(s3_bucket.fs.cat(embeddings)))
    assert stored.ndim == 2 and len(stored) > 0
