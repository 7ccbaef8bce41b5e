"""Embed stage on Dask: scaling from 1 to 2 LocalCluster workers, and the cluster against the local executor.

    python -m benchmarks.bench_dask [--shards 8] [--shard-size 24] [--rounds 2] [--work DIR] [--out FILE]

Same shards, same run, same weights: the download is done once, then the embed stage (ViT-B-32 with fixed
random weights from a seeded checkpoint file, CPU, one batch per shard) runs on

    (a) a 1-worker LocalCluster (1 thread),
    (b) a 2-worker LocalCluster (1 thread each; torch runs 1 thread per worker),
    (c) the local executor in this process, torch using every core.

What is timed is the same for every arm: `run_pipeline(only_stage="embed")` on an executor that is ready,
i.e. whose processes have imported torch and open_clip and hold the model. Every arm first runs one
untimed warm-up round, in which each worker (or this process, for (c)) loads the model once, as it would
once per run however many shards follow; its seconds are reported as `warmup_round_s`. The timed rounds
then go (a) (b) (c), (c) (b) (a), ..., and an arm's time is the sum of its rounds, so that a drift in the
machine's speed (on this 2-vCPU VM the same single-thread work varies by ~10% from one minute to the
next) weighs on every arm alike. Cluster start-up is reported apart too: `cluster_startup_s` (LocalCluster
and client) and `worker_imports_s` (torch and open_clip in every worker, which the driver of (c) did in its
preflight). Every run must write the same outputs: the same rows and metadata, the same float16 embeddings
up to torch's thread-count-dependent rounding (the largest difference is reported; so far it was 0).
Per-shard scheduling overhead: no-op tasks carrying a shard task's arguments (the stage and its context)
through the 2-worker cluster. `load_avg_1m` and `cpu_steal_percent` say whether anything else was using
the cores.

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
    from curate.stages.embed import read_embeddings

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


def one_thread_workers(n: int) -> DaskExecutor:
    """A LocalCluster of `n` workers whose tasks each use one thread: the arms differ only in worker count (left
    to itself, curate would give a lone worker's embed task both cores)."""
    from curate.cores import TASK_THREADS_ENV

    before = os.environ.get(TASK_THREADS_ENV)
    os.environ[TASK_THREADS_ENV] = "1"  # the workers inherit it when they start
    try:
        return DaskExecutor(DaskConfig(n_workers=n, threads_per_worker=1))
    finally:
        if before is None:
            os.environ.pop(TASK_THREADS_ENV)
        else:
            os.environ[TASK_THREADS_ENV] = before


def per_task_overhead(executor: DaskExecutor, pipeline: Path, tasks: int = 320) -> float:
    """Seconds per task of no-op tasks with a shard task's arguments, through the cluster (all workers busy)."""
    from curate.stage import RunLayout, StageContext
    from curate.stages import EmbedStage

    config = load_config(pipeline)
    stage, ctx = EmbedStage(config), StageContext(config, RunLayout(Path(config.output)), "overhead")
    shards = [f"{i:05d}" for i in range(tasks)]
    started = time.perf_counter()
    futures = executor.client.map(noop_shard, [stage] * tasks, [ctx] * tasks, shards, pure=False)
    assert executor.client.gather(futures) == shards
    return (time.perf_counter() - started) / tasks


def run(
    shards: int = 8, shard_size: int = 24, rounds: int = 2, work: Path = Path("/tmp/curate-bench")
) -> dict[str, Any]:
    import torch

    from curate.runner import clear_worker_stages

    pipeline = prepare_run(work, shards, shard_size)
    load_before, cpu_before = os.getloadavg()[0], cpu_times()
    arms = ["dask_1_workers", "dask_2_workers", "local_executor"]
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    shard_seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    startup: dict[str, float] = {}
    warmup: dict[str, float] = {}
    imports: dict[str, float] = {}
    worker_threads: dict[str, list[int]] = {}
    executors: dict[str, Any] = {}
    outputs: list[tuple[str, tuple[Any, ...]]] = []  # every run's embeddings, in run order
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            arm = f"dask_{n}_workers"
            started = time.perf_counter()
            executors[arm] = one_thread_workers(n)
            startup[arm] = time.perf_counter() - started
            started = time.perf_counter()
            worker_threads[arm] = sorted(executors[arm].client.run(warm_imports).values())
            imports[arm] = time.perf_counter() - started
        # the local executor runs the shards in this process: its model loads inside the timed region too
        executors["local_executor"] = LocalExecutor()
        clear_worker_stages()
        torch.set_num_threads(os.cpu_count() or 1)
        local_threads = torch.get_num_threads()
        for arm in arms:  # the model loads once per worker (once in this process for the local executor)
            warmup[arm], _ = time_embed(pipeline, executors[arm])
            outputs.append((arm, read_outputs(pipeline)))
        for round_ in range(rounds):
            # A B C, then C B A: a drift in the machine's speed during the run weighs on every arm alike
            for arm in arms if round_ % 2 == 0 else arms[::-1]:
                wall, per_shard = time_embed(pipeline, executors[arm])
                seconds[arm].append(wall)
                shard_seconds[arm] += per_shard
                outputs.append((arm, read_outputs(pipeline)))
        overhead = per_task_overhead(executors["dask_2_workers"], pipeline)
    finally:
        for executor in executors.values():
            executor.close()
        torch.set_num_threads(threads)
        clear_worker_stages()
    load_after, steal = os.getloadavg()[0], steal_percent(cpu_before, cpu_times())

    total = {arm: sum(seconds[arm]) for arm in arms}
    median = {arm: statistics.median(shard_seconds[arm]) for arm in arms}
    parallel = {"dask_1_workers": 1, "dask_2_workers": 2, "local_executor": 1}
    # what an arm spent outside the shards themselves: scheduling, the driver's own work, a tail
    outside = {arm: total[arm] - sum(shard_seconds[arm]) / parallel[arm] for arm in arms}
    scaling = total["dask_1_workers"] / total["dask_2_workers"]
    versus_local = total["local_executor"] / total["dask_2_workers"]
    reference = outputs[0][1]
    largest_difference = max(compare_outputs(reference, other, arm) for arm, other in outputs)
    return {
        "name": "dask_embed_scaling",
        "headline": f"scaling {scaling:.3f}, cluster/local {versus_local:.3f}",
        "model": MODEL,
        "shards": shards,
        "shard_size": shard_size,
        "rounds": rounds,
        "images": len(reference[0]),
        "cores": os.cpu_count(),
        "torch_threads": {"local_executor": local_threads, **worker_threads},
        "seconds": {arm: round(v, 2) for arm, v in total.items()},
        "seconds_per_round": {arm: [round(v, 2) for v in seconds[arm]] for arm in arms},
        "warmup_round_s": {arm: round(v, 2) for arm, v in warmup.items()},
        "shard_seconds_median": {arm: round(median[arm], 3) for arm in arms},
        # > 1: a shard takes longer while both cores work than while one does; scaling cannot beat 2 / this
        "shard_seconds_2_vs_1_workers": round(median["dask_2_workers"] / median["dask_1_workers"], 3),
        "seconds_outside_shards": {arm: round(v, 2) for arm, v in outside.items()},
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
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=24, help="images per shard (one batch per shard)")
    parser.add_argument("--rounds", type=int, default=2, help="each arm embeds the shards this many times")
    parser.add_argument("--work", type=Path, default=Path("/tmp/curate-bench"))
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    return emit_result(run(args.shards, args.shard_size, args.rounds, args.work), args.out)


if __name__ == "__main__":
    sys.exit(main())
