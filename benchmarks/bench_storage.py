"""Download + embed writing the run directory to an S3 server on loopback, against writing it to local disk.

    python -m benchmarks.bench_storage [--images 512] [--shard-size 64] [--repeats 2] [--work DIR] [--out FILE]

Same crawl (a local parquet of clean images served on loopback), same settings, same weights (seeded random
ViT-B-32 at 224 px, CPU), one run directory per arm and repeat: `output: DIR` on local disk, or
`output: s3://bench/run-N` on moto's S3 server (`moto_server`, a subprocess on 127.0.0.1). The input stage runs
first, untimed; then the download and the embed stage are timed apart, each as `run_pipeline(only_stage=...)`
with the local executor. On the bucket every task is committed by uploading its files and then its marker,
and the embed tasks (in other processes than the download's) fetch the downloaded shards from the bucket.
Arms alternate (local, s3, s3, local, ...) so a drift of the machine's speed weighs on both alike.

Target: samples/s of download + embed to s3 over the same to local disk >= 0.8 (ratio of the sums of seconds).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.bench_dask import MODEL, fixed_weights
from benchmarks.bench_download import make_clean_web, write_table
from benchmarks.common import emit_result
from curate.config import load_config
from curate.pipeline import run_pipeline

TARGET = 0.8
BUCKET = "bench"
CREDENTIALS = {"key": "testing", "secret": "testing"}  # moto takes any


def pipeline_file(work: Path, name: str, table: Path, output: str, shard_size: int, storage: dict[str, Any]) -> Path:
    config = {
        "output": output,
        "stages": ["input", "download", "embed"],
        "input": {"path": str(table), "shard_size": shard_size},
        "download": {"image_size": 224, "allow_hosts": ["127.0.0.1"], "processes": 2, "threads": 16},
        "embed": {"model": MODEL, "pretrained": str(fixed_weights(work)), "device": "cpu", "batch_size": 32},
        "storage": {"options": storage},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def time_stages(pipeline: Path) -> tuple[dict[str, float], int]:
    """Seconds of the download and of the embed stage (after an untimed input stage), and the rows embedded."""
    config = load_config(pipeline)
    run_pipeline(config, only_stage="input")
    seconds, rows = {}, 0
    for stage in ("download", "embed"):
        started = time.perf_counter()
        result = run_pipeline(config, only_stage=stage)
        seconds[stage] = time.perf_counter() - started
        rows = result.stats[stage].counts.get("kept", 0)
        assert rows > 0, f"{pipeline}: {stage} kept nothing"
    return seconds, rows


def run(images: int = 512, shard_size: int = 64, repeats: int = 2, work: Path = Path("/tmp/curate-bench")) -> dict:
    import s3fs

    from examples.demo_world import DemoServer
    from tests.s3_fixtures import moto_server

    work.mkdir(parents=True, exist_ok=True)
    root = make_clean_web(work / "storage-web", images)
    seconds: dict[str, list[dict[str, float]]] = {"local": [], "s3": []}
    rows: dict[str, list[int]] = {"local": [], "s3": []}
    with DemoServer(root) as server, moto_server() as endpoint:
        table = write_table(root, server.base_url, images)
        storage = {**CREDENTIALS, "client_kwargs": {"endpoint_url": endpoint}}
        s3fs.S3FileSystem(**storage).mkdir(BUCKET)
        order = [arm for i in range(repeats) for arm in (("local", "s3") if i % 2 == 0 else ("s3", "local"))]
        for n, arm in enumerate(order):
            local = work / f"storage-run-{n}"
            shutil.rmtree(local, ignore_errors=True)
            output = str(local) if arm == "local" else f"s3://{BUCKET}/run-{n}"
            pipeline = pipeline_file(work, f"bench_storage_{n}", table, output, shard_size, storage)
            timed, embedded = time_stages(pipeline)
            seconds[arm].append(timed)
            rows[arm].append(embedded)
            shutil.rmtree(local, ignore_errors=True)
    assert len(set(rows["local"] + rows["s3"])) == 1, f"the arms embedded other rows: {rows}"
    total = {arm: sum(t["download"] + t["embed"] for t in runs) for arm, runs in seconds.items()}
    stage_ratio = {
        stage: round(sum(t[stage] for t in seconds["local"]) / sum(t[stage] for t in seconds["s3"]), 3)
        for stage in ("download", "embed")
    }
    ratio = total["local"] / total["s3"]
    samples = rows["s3"][0]
    return {
        "name": "storage_s3_vs_local",
        "images": images,
        "samples_embedded": samples,
        "shards": -(-images // shard_size),
        "repeats": repeats,
        "model": MODEL,
        "seconds": seconds,
        "samples_per_s": {arm: round(samples * repeats / t, 2) for arm, t in total.items()},
        "stage_ratio_s3_over_local": stage_ratio,
        "ratio": round(ratio, 3),
        "headline": f"ratio {ratio:.3f} (download {stage_ratio['download']}, embed {stage_ratio['embed']})",
        "target": f"s3 / local samples/s >= {TARGET}",
        "passed": ratio >= TARGET,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/curate-bench"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    return emit_result(run(args.images, args.shard_size, args.repeats, args.work), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
