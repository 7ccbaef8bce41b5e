"""Crawl scale: the run-wide phases (filter's top-fraction cutoff, dedup exact + near + semantic, ledger, and
materialize at the smallest size) on a 2-worker Dask LocalCluster, at N and 4N samples.

    python -m benchmarks.bench_scale [--sizes 1000000 4000000] [--work /tmp/curate-bench] [--out FILE]

For each size a child process builds a synthetic run that has reached filter
(`benchmarks.synthetic_run`: the real input stage, then download and embed outputs in their real layouts
with planted exact copies, near copies at cosines 0.95-0.995, chains and semantic neighbours), and a
second child runs the pipeline from there on the cluster. It reports the driver's peak RSS (its own
`getrusage`, taken before anything reads the results), each worker's peak RSS (asked of the workers),
wall time per phase, the near-duplicate phase's time, planted-pair recall and precision, and the peak RSS
of `curate status` on the finished run (from `wait4`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import emit_result

DEFAULT_WORK = Path("/tmp/curate-bench")
DEFAULT_SIZES = (1_000_000, 4_000_000)
SHARD_SIZE = 10_000
DEDUP = {"near_threshold": 0.95, "semantic_eps": 0.1}
TARGETS = {
    "driver_peak_mib_at_largest": 1536,
    "driver_growth": 1.3,
    "worker_peak_mib": 4096,
    "time_growth_per_4x": 4.8,
    "recall": 0.98,
    "precision": 0.99,
    "near_seconds_per_million": 60.0,
    "status_peak_mib": 300,
}
REPO = Path(__file__).resolve().parent.parent


def build(work: Path, n: int, tars: bool) -> None:
    from benchmarks.synthetic_run import build_run

    stages = ["input", "download", "embed", "filter", "dedup", *(["materialize"] if tars else [])]
    _, planted = build_run(work, n, shard_size=SHARD_SIZE, dedup=DEDUP, stages=stages, tars=tars)
    (work / "planted.json").write_text(json.dumps({"near": planted.near, "chains": planted.chains}))


class PhaseClock:
    """A progress factory for `run_pipeline` that records each phase's wall time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, label: str, total: int, unit: str = "shard"):
        started = time.perf_counter()

        class Bar:
            def update(self, n: int = 1) -> None: ...
            def set_postfix(self, *args: Any, **kwargs: Any) -> None: ...

        try:
            yield Bar()
        finally:
            self.seconds[label] = round(time.perf_counter() - started, 2)


def measure(work: Path) -> dict[str, Any]:
    from curate.config import load_config
    from curate.executors.dask import DaskExecutor
    from curate.pipeline import run_pipeline

    config = load_config(work / "pipeline.yaml", ["executor=dask", "dask.n_workers=2"])
    clock = PhaseClock()
    executor = DaskExecutor(config.dask)
    started = time.perf_counter()
    try:
        result = run_pipeline(config, executor=executor, progress=clock)
        wall = time.perf_counter() - started
        driver_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        workers = executor.client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    finally:
        executor.close()
    return {
        "complete": result.complete,
        "seconds": round(wall, 1),
        "phase_seconds": clock.seconds,
        "driver_peak_mib": round(driver_mib, 1),
        "worker_peak_mib": sorted(round(v, 1) for v in workers.values()),
        **planted_quality(work, config),
    }


def planted_quality(work: Path, config: Any) -> dict[str, Any]:
    """Recall: planted near pairs (both rows reaching the near layer) that end in one group. Precision: near
    drops whose survivor is in the same planted group."""
    import pandas as pd

    from curate.stage import RunLayout
    from curate.stages.dedup.stage import DedupOutputs

    decisions = DedupOutputs(RunLayout(Path(config.output))).decisions().to_pandas().set_index("uid")
    planted = json.loads((work / "planted.json").read_text())
    group: dict[str, int] = {}
    for k, (a, b) in enumerate(planted["near"]):  # planted groups: pairs, chains of three
        label = group.get(a, group.get(b, k))
        group[a] = group[b] = label
    for a, b, c in planted["chains"]:
        group[a] = group[b] = group[c] = group[a]
    reason, kept = decisions["reason"], decisions["kept_uid"]

    def survivor(uid: str) -> str:
        while reason.get(uid) in ("dup_near", "dup_exact"):
            uid = kept[uid]
        return uid

    reached = (None, "dup_near", "dup_semantic")  # not dropped by the filter or as an exact copy
    eligible = [(a, b) for a, b in planted["near"] if reason.get(a, "") in reached and reason.get(b, "") in reached]
    found = sum(survivor(a) == survivor(b) for a, b in eligible)
    near = decisions[reason == "dup_near"]
    right = sum(group.get(u, -1) == group.get(k, -2) for u, k in zip(near.index, near["kept_uid"], strict=True))
    counts = pd.Series(reason).value_counts().to_dict()
    return {
        "recall": round(found / max(len(eligible), 1), 4),
        "precision": round(right / max(len(near), 1), 4),
        "planted_pairs": len(eligible),
        "dropped": {str(k): int(v) for k, v in counts.items()},
    }


def status_peak(work: Path) -> dict[str, Any]:
    """Peak RSS of `curate status` on the run, and its exit status (0: complete)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "curate", "status", str(work / "run")], cwd=REPO, stdout=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(proc.pid, 0)
    return {"status_peak_mib": round(usage.ru_maxrss / 1024, 1), "status_exit": os.waitstatus_to_exitcode(status)}


def child(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_scale", *args], cwd=REPO, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench_scale {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def run(sizes: tuple[int, ...] = DEFAULT_SIZES, work: Path = DEFAULT_WORK) -> dict[str, Any]:
    import shutil

    rows = []
    for index, n in enumerate(sizes):
        folder = work / f"scale-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        child("build", str(folder), str(n), *(["--tars"] if index == 0 else []))
        built = time.perf_counter() - started
        measured = json.loads(child("measure", str(folder)))
        measured.update(n=n, build_seconds=round(built, 1), **status_peak(folder))
        near_seconds = measured["phase_seconds"].get("dedup:near", 0.0)
        measured["near_seconds_per_million"] = round(near_seconds / (n / 1e6), 1)
        measured["driver_bytes_per_row"] = round(measured["driver_peak_mib"] * 2**20 / n, 1)
        rows.append(measured)
        (work / f"scale-{n}.json").write_text(json.dumps(measured, indent=2))  # kept if a later size fails
        shutil.rmtree(folder, ignore_errors=True)
    return summarise(rows)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    small, large = rows[0], rows[-1]
    growth = large["n"] / small["n"]
    for row in rows:  # materialize runs at the smallest size only, so growth compares the other phases
        row["seconds_without_materialize"] = round(
            sum(t for phase, t in row["phase_seconds"].items() if not phase.startswith("materialize")), 1
        )
    per_4x = growth / 4
    time_growth = (large["seconds_without_materialize"] / small["seconds_without_materialize"]) / per_4x
    driver_growth = large["driver_peak_mib"] / small["driver_peak_mib"]
    checks = {
        "driver_peak_mib_at_largest": large["driver_peak_mib"] < TARGETS["driver_peak_mib_at_largest"],
        "driver_growth": driver_growth < TARGETS["driver_growth"],
        "worker_peak_mib": all(max(r["worker_peak_mib"]) < TARGETS["worker_peak_mib"] for r in rows),
        "time_growth_per_4x": time_growth <= TARGETS["time_growth_per_4x"],
        "recall": all(r["recall"] >= TARGETS["recall"] for r in rows),
        "precision": all(r["precision"] >= TARGETS["precision"] for r in rows),
        "near_seconds_per_million": all(
            r["near_seconds_per_million"] < TARGETS["near_seconds_per_million"] for r in rows
        ),
        "status_peak_mib": all(r["status_peak_mib"] < TARGETS["status_peak_mib"] for r in rows),
        "complete": all(r["complete"] and r["status_exit"] == 0 for r in rows),
    }
    return {
        "name": "crawl_scale",
        "headline": (
            f"driver {large['driver_peak_mib']} MiB at {large['n']:,} (x{driver_growth:.2f} from {small['n']:,}), "
            f"time x{time_growth:.2f} per 4x rows, recall {min(r['recall'] for r in rows)}"
        ),
        "sizes": rows,
        "driver_growth": round(driver_growth, 3),
        "time_growth_per_4x": round(time_growth, 3),
        "checks": checks,
        "targets": TARGETS,
        "target": (
            "driver < 1.5 GiB at 4M and x < 1.3, workers < 4 GiB, time x <= 4.8 per 4x, recall >= 0.98, "
            "precision >= 0.99, near < 60 s per 1M, status < 300 MiB"
        ),
        "passed": all(checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    build_cmd = sub.add_parser("build")
    build_cmd.add_argument("work", type=Path)
    build_cmd.add_argument("n", type=int)
    build_cmd.add_argument("--tars", action="store_true")
    measure_cmd = sub.add_parser("measure")
    measure_cmd.add_argument("work", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--summarise", action="store_true", help="only summarise the sizes' saved results in --work")
    args = parser.parse_args(argv)
    if args.summarise:
        rows = [json.loads((args.work / f"scale-{n}.json").read_text()) for n in args.sizes]
        return emit_result(summarise(rows), args.out)
    if args.command == "build":
        build(args.work, args.n, args.tars)
        return 0
    if args.command == "measure":
        print(json.dumps(measure(args.work)))
        return 0
    return emit_result(run(tuple(args.sizes), args.work), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
