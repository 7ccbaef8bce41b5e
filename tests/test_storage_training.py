"""A trainer reading a run's curated shards from a bucket: open_clip_train streams them through webdataset
`pipe:curate cat s3://...` URLs, with the endpoint and credentials of the environment, as it would stream them
with `pipe:aws s3 cp s3://... -`."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from curate.stages.materialize import CuratedOutputs
from tests.run_fixtures import CuratedRun
from tests.s3_fixtures import S3Bucket

REPO = Path(__file__).resolve().parents[1]
BATCH = 4
TRAIN = """
import sys
import open_clip
open_clip.add_model_config(sys.argv.pop(1))  # curate's tiny model config; a real run names ViT-B-32 and such
from open_clip_train.main import main
main(sys.argv[1:])
"""
STEP_LINE = re.compile(r"Train Epoch: 0 \[\s*(\d+)/(\d+) .* Loss: (\S+)")


def environment_of(bucket: S3Bucket) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    return env | {"AWS_ENDPOINT_URL": bucket.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "t"}


def test_open_clip_train_trains_from_the_curated_shards_on_s3(
    curated_run: CuratedRun, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    curated = CuratedOutputs(curated_run.root)
    shards = curated.shards()
    for path in [*shards, curated.sizes_path]:
        s3_bucket.upload(path, f"run/curated/{path.name}")
    env = environment_of(s3_bucket)
    cat = [sys.executable, "-m", "curate", "cat"]
    sizes_json = subprocess.run([*cat, s3_bucket.url("run/curated/sizes.json")], env=env, capture_output=True)
    sizes = json.loads(sizes_json.stdout)
    samples = sum(sizes.values())
    assert sorted(sizes) == [path.name for path in shards] and samples >= 2 * BATCH

    urls = s3_bucket.url(f"run/curated/{{00000..{len(shards) - 1:05d}}}.tar")
    arguments = {
        "--train-data": f"pipe:{' '.join(cat)} {urls}",
        "--train-num-samples": str(samples),
        "--dataset-type": "webdataset",
        "--model": "curate-tiny",
        "--batch-size": str(BATCH),
        "--epochs": "1",
        "--workers": "1",
        "--precision": "fp32",
        "--lr": "1e-3",
        "--warmup": "1",
        "--log-every-n-steps": "1",
        "--logs": str(tmp_path / "logs"),
        "--name": "from-s3",
        "--report-to": "",
    }
    trained = subprocess.run(
        [sys.executable, "-c", TRAIN, str(REPO / "curate" / "model_configs"), *itertools.chain(*arguments.items())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    steps = [(int(seen), int(total), float(loss)) for seen, total, loss in STEP_LINE.findall(trained.stderr)]
    batches = math.ceil(samples / BATCH)  # open_clip_train's epoch, its last batch topped up from the stream
    assert len(steps) == batches  # one log line per step: every step had a batch from the bucket
    assert steps[-1][0] == steps[-1][1] == BATCH * batches
    assert all(math.isfinite(loss) and loss > 0 for _, _, loss in steps)

    checkpoint = torch.load(tmp_path / "logs" / "from-s3" / "checkpoints" / "epoch_1.pt", map_location="cpu")
    assert checkpoint["epoch"] == 1 and any(name.endswith("logit_scale") for name in checkpoint["state_dict"])
