"""Embed stage on Dask: scaling from 1 to 2 LocalCluster workers, and the cluster against the local executor.

    python -m benchmarks.bench_dask [--images 96] [--work /tmp/curate-bench]

Same shards, same run: the download is done once, then the embed stage (ViT-B-32, random weights,
CPU) is timed on (a) a 1-worker LocalCluster, (b) a 2-worker LocalCluster (1 thread each), and (c) the
local executor in-process with torch using both cores. Cluster start-up is excluded; model loading
per worker is included (it is part of what a cluster costs). Targets: (b)/(a) speed-up >= 1.7 on 2
cores, and (c)-time / (b)-time >= 0.9. The per-task scheduling overhead is measured with no-op tasks.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.bench_download import make_clean_web, write_table
from curate.config import DaskConfig, load_config
from curate.executors.dask import DaskExecutor
from curate.executors.local import LocalExecutor
from curate.pipeline import run_pipeline
from examples.demo_world import DemoServer

SHARD_SIZE = 12


def prepare_run(work: Path, images: int) -> Path:
    root = make_clean_web(work / "dask-web", images)
    pipeline = work / "bench_dask.yaml"
    with DemoServer(root) as server:
        table = write_table(root, server.base_url, images)
        config = {
            "output": str(work / "dask-run"),
            "stages": ["input", "download", "embed"],
            "input": {"path": str(table), "shard_size": SHARD_SIZE},
            "download": {"image_size": 224, "allow_hosts": ["127.0.0.1"], "processes": 1, "threads": 16},
            "embed": {"model": "ViT-B-32", "device": "cpu", "batch_size": SHARD_SIZE},
        }
        pipeline.write_text(yaml.safe_dump(config))
        for stage in ("input", "download"):
            run_pipeline(load_config(pipeline), only_stage=stage)
    return pipeline


def time_embed(pipeline: Path, executor: Any) -> float:
    config = load_config(pipeline)
    shutil.rmtree(Path(config.output) / "embed", ignore_errors=True)
    started = time.perf_counter()
    result = run_pipeline(config, executor=executor, only_stage="embed")
    assert result.stats["embed"].rows > 0
    return time.perf_counter() - started


def per_task_overhead(executor: DaskExecutor, tasks: int = 300) -> float:
    started = time.perf_counter()
    futures = executor.client.map(abs, range(tasks), pure=False)
    executor.client.gather(futures)
    return (time.perf_counter() - started) / tasks


def run(images: int = 96, work: Path = Path("/tmp/curate-bench")) -> dict[str, Any]:
    pipeline = prepare_run(work, images)
    seconds: dict[str, float] = {}
    for workers in (1, 2):
        executor = DaskExecutor(DaskConfig(n_workers=workers, threads_per_worker=1))
        try:
            seconds[f"dask_{workers}_workers"] = time_embed(pipeline, executor)
            if workers == 2:
                overhead = per_task_overhead(executor)
        finally:
            executor.close()
    seconds["local_executor"] = time_embed(pipeline, LocalExecutor())
    scaling = seconds["dask_1_workers"] / seconds["dask_2_workers"]
    versus_local = seconds["local_executor"] / seconds["dask_2_workers"]
    return {
        "name": "dask_embed_scaling",
        "images": images,
        "shards": -(-images // SHARD_SIZE),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "ratio": round(scaling, 3),
        "scaling_2_vs_1_workers": round(scaling, 3),
        "cluster_vs_local_executor": round(versus_local, 3),
        "per_task_overhead_ms": round(overhead * 1000, 2),
        "target": "scaling >= 1.7, cluster/local >= 0.9",
        "passed": scaling >= 1.7 and versus_local >= 0.9,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--work", type=Path, default=Path("/tmp/curate-bench"))
    args = parser.parse_args()
    print(json.dumps(run(args.images, args.work), indent=2))
