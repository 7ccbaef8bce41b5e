"""Embed stage on Dask: scaling from 1 to 2 LocalCluster workers, and the cluster against the local executor.

    python -m benchmarks.bench_dask [--shards 16] [--shard-size 24] [--work /tmp/curate-bench] [--out FILE]

Same shards, same run, same weights: the download is done once, then the embed stage (ViT-B-32 with fixed
random weights from a seeded checkpoint file, CPU, one batch per shard) runs on

    (a) a 1-worker LocalCluster (1 thread),
    (b) a 2-worker LocalCluster (1 thread each; torch runs 1 thread per worker),
    (c) the local executor in this process, torch using every core.

What is timed is the same for every arm: `run_pipeline(only_stage="embed")` on an executor that is ready,
i.e. whose processes have imported torch and open_clip; loading the model (once per worker, once for (c))
and every shard are inside. Cluster start-up is reported apart: `cluster_startup_s` (LocalCluster and
client) and `worker_imports_s` (torch and open_clip in every worker, which the driver of (c) did in its
preflight). The arms must write equal outputs: the same rows and metadata, the same float16 embeddings up
to torch's thread-count-dependent rounding (the largest difference is reported; so far it was 0). Per-shard
scheduling overhead: no-op tasks carrying a shard task's arguments (the stage and its context) through the
2-worker cluster. `load_avg_1m` and `cpu_steal_percent` say whether anything else was using the cores.

Targets: (a)-time / (b)-time >= 1.7, and (c)-time / (b)-time >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.bench_download import make_clean_web, write_table
from benchmarks.common import emit_result
from curate.config import DaskConfig, load_config
from curate.executors.dask import DaskExecutor
from curate.executors.local import LocalExecutor
from curate.pipeline import run_pipeline

MODEL = "ViT-B-32"
SCALING_TARGET, VERSUS_LOCAL_TARGET = 1.7, 0.9
EMBED_TOLERANCE = 2e-3  # float16 embeddings of unit vectors; thread counts change the rounding, not the result


def prepare_run(work: Path, shards: int, shard_size: int) -> Path:
    """Download `shards` shards of `shard_size` images once; return the pipeline file the arms embed with."""
    from examples.demo_world import DemoServer

    images = shards * shard_size
    root = make_clean_web(work / "dask-web", images)
    pipeline = work / "bench_dask.yaml"
    with DemoServer(root) as server:
        table = write_table(root, server.base_url, images)
        config = {
            "output": str(work / "dask-run"),
            "stages": ["input", "download", "embed"],
            "input": {"path": str(table), "shard_size": shard_size},
            "download": {"image_size": 224, "allow_hosts": ["127.0.0.1"], "processes": 1, "threads": 16},
            "embed": {
                "model": MODEL,
                "pretrained": str(fixed_weights(work)),
                "device": "cpu",
                "batch_size": shard_size,
            },
        }
        pipeline.write_text(yaml.safe_dump(config))
        for stage in ("input", "download"):
            run_pipeline(load_config(pipeline), only_stage=stage)
    return pipeline


def fixed_weights(work: Path) -> Path:
    """Seeded random ViT-B-32 weights: every worker must load the same model for the outputs to match."""
    path = work / f"{MODEL}-seed0.pt"
    if not path.exists():
        import open_clip
        import torch

        torch.manual_seed(0)
        model = open_clip.create_model(MODEL)
        torch.save({"state_dict": model.state_dict()}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
    return path


def time_embed(pipeline: Path, executor: Any) -> tuple[float, list[float]]:
    """Wall seconds of the embed stage, and each shard's own seconds (from its marker)."""
    config = load_config(pipeline)
    shutil.rmtree(Path(config.output) / "embed", ignore_errors=True)
    started = time.perf_counter()
    result = run_pipeline(config, executor=executor, only_stage="embed")
    seconds = time.perf_counter() - started
    assert result.stats["embed"].rows > 0
    markers = sorted((Path(config.output) / "embed" / "_done").glob("*.json"))
    return seconds, [json.loads(path.read_text())["seconds"] for path in markers]


def read_outputs(pipeline: Path) -> tuple[Any, ...]:
    from curate.embed import read_embeddings

    uids, image, text, metadata = read_embeddings(load_config(pipeline).output)
    return uids, image, text, metadata


def compare_outputs(reference: tuple[Any, ...], other: tuple[Any, ...], arm: str) -> float:
    """Largest absolute difference of the embeddings; raises if the arms' outputs differ beyond rounding."""
    uids, image, text, metadata = reference
    o_uids, o_image, o_text, o_metadata = other
    assert list(uids) == list(o_uids), f"{arm}: other rows"
    columns = ["uid", "url", "caption"]
    assert metadata.select(columns).equals(o_metadata.select(columns)), f"{arm}: other metadata"
    largest = max(
        float(np.abs(image - o_image).max(initial=0)),
        float(np.abs(text - o_text).max(initial=0)),
        float(np.abs(metadata["clip_score"].to_numpy() - o_metadata["clip_score"].to_numpy()).max(initial=0)),
    )
    assert largest <= EMBED_TOLERANCE, f"{arm}: embeddings differ by {largest}"
    return largest


def cpu_times() -> list[int]:
    """The machine's CPU time counters (user, nice, system, idle, iowait, irq, softirq, steal, ...)."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return []


def steal_percent(before: list[int], after: list[int]) -> float | None:
    """Share of CPU time the hypervisor gave to other guests: wall times are only comparable when it is ~0."""
    delta = [b - a for a, b in zip(before, after, strict=False)]
    return round(100 * delta[7] / sum(delta), 1) if len(delta) > 7 and sum(delta) else None


def warm_imports() -> int:
    """Runs on a worker: what the driver imported in its preflight; returns torch's thread count."""
    import open_clip  # noqa: F401
    import torch
    import torchvision  # noqa: F401

    return torch.get_num_threads()


def noop_shard(stage: Any, ctx: Any, shard: str) -> str:
    return shard


def per_task_overhead(executor: DaskExecutor, pipeline: Path, tasks: int = 320) -> float:
    """Seconds per task of no-op tasks with a shard task's arguments, through the cluster (all workers busy)."""
    from curate.pipeline import make_stage
    from curate.stage import RunLayout, StageContext

    config = load_config(pipeline)
    stage, ctx = make_stage("embed", config), StageContext(config, RunLayout(Path(config.output)), "overhead")
    shards = [f"{i:05d}" for i in range(tasks)]
    started = time.perf_counter()
    futures = executor.client.map(noop_shard, [stage] * tasks, [ctx] * tasks, shards, pure=False)
    assert executor.client.gather(futures) == shards
    return (time.perf_counter() - started) / tasks


def run(
    shards: int = 16, shard_size: int = 24, work: Path = Path("/tmp/curate-bench"), workers: tuple[int, ...] = (1, 2)
) -> dict[str, Any]:
    import torch

    from curate.runner import clear_worker_stages

    pipeline = prepare_run(work, shards, shard_size)
    load_before, cpu_before = os.getloadavg()[0], cpu_times()
    seconds: dict[str, float] = {}
    shard_median: dict[str, float] = {}
    startup: dict[str, float] = {}
    imports: dict[str, float] = {}
    outputs: dict[str, tuple[Any, ...]] = {}
    worker_threads: dict[str, list[int]] = {}
    overhead = float("nan")
    for n in workers:
        arm = f"dask_{n}_workers"
        started = time.perf_counter()
        executor = DaskExecutor(DaskConfig(n_workers=n, threads_per_worker=1))
        try:
            startup[arm] = time.perf_counter() - started
            started = time.perf_counter()
            worker_threads[arm] = sorted(executor.client.run(warm_imports).values())
            imports[arm] = time.perf_counter() - started
            seconds[arm], shard_seconds = time_embed(pipeline, executor)
            shard_median[arm] = statistics.median(shard_seconds)
            outputs[arm] = read_outputs(pipeline)
            if n == 2:
                overhead = per_task_overhead(executor, pipeline)
        finally:
            executor.close()

    # the local executor runs the shards in this process: load its model inside the timed region too
    clear_worker_stages()
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        local_threads = torch.get_num_threads()
        seconds["local_executor"], shard_seconds = time_embed(pipeline, LocalExecutor())
        shard_median["local_executor"] = statistics.median(shard_seconds)
        outputs["local_executor"] = read_outputs(pipeline)
    finally:
        torch.set_num_threads(threads)
        clear_worker_stages()
    load_after, steal = os.getloadavg()[0], steal_percent(cpu_before, cpu_times())

    reference = outputs["local_executor"]
    largest_difference = max(compare_outputs(reference, outputs[arm], arm) for arm in outputs)
    scaling = seconds["dask_1_workers"] / seconds["dask_2_workers"]
    versus_local = seconds["local_executor"] / seconds["dask_2_workers"]
    return {
        "name": "dask_embed_scaling",
        "headline": f"scaling {scaling:.3f}, cluster/local {versus_local:.3f}",
        "model": MODEL,
        "shards": shards,
        "shard_size": shard_size,
        "images": len(reference[0]),
        "cores": os.cpu_count(),
        "torch_threads": {"local_executor": local_threads, **worker_threads},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "shard_seconds_median": {k: round(v, 3) for k, v in shard_median.items()},
        "cluster_startup_s": {k: round(v, 2) for k, v in startup.items()},
        "worker_imports_s": {k: round(v, 2) for k, v in imports.items()},
        "scaling_2_vs_1_workers": round(scaling, 3),
        "cluster_vs_local_executor": round(versus_local, 3),
        "per_task_overhead_ms": round(overhead * 1000, 2),
        "outputs_equal": True,
        "largest_embedding_difference": largest_difference,
        "load_avg_1m": [round(load_before, 2), round(load_after, 2)],
        "cpu_steal_percent": steal,
        "target": f"scaling >= {SCALING_TARGET}, cluster/local >= {VERSUS_LOCAL_TARGET}",
        "passed": scaling >= SCALING_TARGET and versus_local >= VERSUS_LOCAL_TARGET,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_dask",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=24, help="images per shard (one batch per shard)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/curate-bench"))
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    return emit_result(run(args.shards, args.shard_size, args.work), args.out)


if __name__ == "__main__":
    sys.exit(main())
