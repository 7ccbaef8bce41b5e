"""What the bucket-run tests share: the pipeline with its crawl, model and run directory in a bucket, the same
run on local disk to compare with, and the environment a user's shell would give the reopening commands."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from curate.config import load_config
from curate.ledger import read_ledger
from curate.pipeline import run_pipeline
from curate.stage import RunLayout
from curate.stages.embed import EmbedOutputs
from curate.stages.materialize import CuratedOutputs
from tests.s3_fixtures import S3Bucket
from tests.world_fixtures import ServedWorld, full_pipeline_overrides

REPO = Path(__file__).resolve().parent.parent

DECISIONS = ["uid", "status", "stage", "reason", "sha256", "width", "height"]
# The model's outputs on the cpu are not reproducible to the last bit: two runs in one process, same threads,
# gave CLIP scores up to 3e-8 apart and float16 embeddings one rounding step apart, on a few shards each time.
SCORE_ATOL, EMBEDDING_ATOL = 1e-5, 1e-3


def ledger_of(run: str | Path) -> pd.DataFrame:
    return read_ledger(run)[[*DECISIONS, "clip_score"]].sort_values("uid").reset_index(drop=True)


def assert_same_ledger(run: str | Path, reference: str | Path) -> None:
    """Every row's fate the same; CLIP scores equal up to the model's rounding."""
    ours, theirs = ledger_of(run), ledger_of(reference)
    assert ours[DECISIONS].equals(theirs[DECISIONS])
    np.testing.assert_allclose(ours["clip_score"], theirs["clip_score"], atol=SCORE_ATOL)


def assert_same_embeddings(outputs: EmbedOutputs, reference: EmbedOutputs, shard: str) -> None:
    """A shard's embed fates the same, its scores and embeddings up to the model's rounding."""
    ours, theirs = outputs.fates(shard), reference.fates(shard)
    assert ours.drop_columns(["clip_score"]).equals(theirs.drop_columns(["clip_score"]))
    np.testing.assert_allclose(ours["clip_score"].to_numpy(), theirs["clip_score"].to_numpy(), atol=SCORE_ATOL)
    for embeddings in (EmbedOutputs.image_embeddings, EmbedOutputs.text_embeddings):
        np.testing.assert_allclose(embeddings(outputs, shard), embeddings(reference, shard), atol=EMBEDDING_ATOL)


def curated_of(layout: RunLayout) -> dict[str, Any]:
    curated = CuratedOutputs(layout)
    uids = np.load(layout.fetch(curated.uids_path))
    sizes = layout.read_json(curated.sizes_path)
    return {"uids": uids.tolist(), "sizes": sizes, "tars": [p.name for p in curated.shards()]}


@pytest.fixture
def env_credentials(s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What a user's shell holds: the reopening commands read the run with the environment's credentials."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint)
    # A filesystem cached by an earlier test in this process resolved its credentials without these.
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def bucket_pipeline(world: ServedWorld, bucket: S3Bucket, tmp_path: Path, checkpoint: Path) -> tuple[str, list[str]]:
    """The world's crawl and the model in the bucket, the run directory in it too."""
    crawl = bucket.upload(world.table, f"crawl/{world.table.name}")  # generated uids hash the file name
    model = bucket.upload(checkpoint, "models/tiny.pt")
    run = bucket.url("runs/demo")
    path = world.pipeline(tmp_path / "bucket", output=tmp_path / "unused")
    overrides = [
        *full_pipeline_overrides(checkpoint),
        f"input.path={crawl}",
        f"output={run}",
        f"embed.pretrained={model}",
    ]
    overrides += [f"storage.options={json.dumps(bucket.options)}"]
    return str(path), overrides


@pytest.fixture(scope="module")
def disk_run(served_world: ServedWorld, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same pipeline with its crawl, model and run directory on local disk."""
    folder = tmp_path_factory.mktemp("disk")
    result = run_pipeline(
        load_config(served_world.pipeline(folder, output=folder / "run"), full_pipeline_overrides(tiny_checkpoint))
    )
    assert result.complete and result.rows > 0
    return folder / "run"
