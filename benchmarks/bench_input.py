"""Peak memory and speed of the input stage on a large crawl-like parquet file, on Dask and in-process.

    python -m benchmarks.bench_input [--rows 10000000] [--work /tmp/curate-bench] [--out FILE]

The input file is generated once per row count (row group by row group, never all rows in memory) and
cached under --work. The stage then runs twice, each time in a fresh child process that is the driver
(`run_pipeline` with `stages: [input]`): on a 2-worker Dask LocalCluster, where the driver only plans and
the workers run the tasks, and with the local executor, where the one process runs every task itself.
Peak RSS is the kernel's high-water mark (VmHWM) of the driver process alone and of each Dask worker.
The target is the driver's on Dask: it holds the plan (per file task, per bucket, per shard), never a
per-row array.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.common import emit_result

DEFAULT_ROWS = 10_000_000
DEFAULT_WORK = Path("/tmp/curate-bench")
ROW_GROUP = 100_000
SHARD_SIZE = 10_000
TARGET_MIB = 1024
DASK_WORKERS = 2
REPO = Path(__file__).resolve().parent.parent

# Share of rows per kind of problem in the generated crawl.
DUPLICATE_SHARE = 0.03  # exact (url, caption) repeat of an earlier row
SAME_URL_SHARE = 0.01  # earlier url, new caption (not a duplicate)
INVALID_URL_SHARE = 0.01
NULL_CAPTION_SHARE = 0.01
CONTROL_CHAR_SHARE = 0.005
LONG_CAPTION_SHARE = 0.0001
_BAD_URLS = ["", None, "   ", "ftp://files.example.com/a.jpg", "javascript:void(0)", "http://", "data:image/png;base64"]


# ---------------------------------------------------------------- the generated crawl


def _vocabulary(rng: np.random.Generator, size: int) -> pa.Array:
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    lengths = rng.integers(2, 11, size)
    chars = letters[rng.integers(0, 26, int(lengths.sum()))]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.StringArray.from_buffers(size, pa.py_buffer(offsets.tobytes()), pa.py_buffer(chars.tobytes()))


def _join_words(rng: np.random.Generator, vocab: pa.Array, n: int, low: int, high: int, sep: str) -> pa.Array:
    counts = rng.integers(low, high + 1, n)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    words = vocab.take(pa.array(rng.integers(0, len(vocab), int(counts.sum()))))
    return pc.binary_join(pa.ListArray.from_arrays(offsets, words), sep)


def crawl_batch(rng: np.random.Generator, vocab: pa.Array, hosts: pa.Array, n: int) -> pa.Table:
    """`n` LAION-like rows: urls ~80 chars, captions ~60 chars, with duplicates and bad rows mixed in."""
    paths = pa.array(["images", "media/uploads", "wp-content/uploads/2021/07", "photos/large", "i"])
    exts = pa.array([".jpg", ".png", ".jpeg?width=800", ".webp", ".JPG"])
    url = pc.binary_join_element_wise(
        "https://",
        hosts.take(pa.array(rng.integers(0, len(hosts), n))),
        "/",
        paths.take(pa.array(rng.integers(0, len(paths), n))),
        "/",
        pc.cast(pa.array(rng.integers(10**9, 10**12, n)), pa.string()),
        "/",
        _join_words(rng, vocab, n, 2, 4, "-"),
        exts.take(pa.array(rng.integers(0, len(exts), n))),
        "",
    )
    caption = _join_words(rng, vocab, n, 5, 13, " ")

    # Exact repeats and same-url-new-caption rows point at a random earlier row of the batch.
    roll = rng.random(n)
    roll[0] = 1.0
    source = np.arange(n)
    repeat = roll < DUPLICATE_SHARE + SAME_URL_SHARE
    source[repeat] = rng.integers(0, np.flatnonzero(repeat))
    url = url.take(pa.array(source))
    caption_source = np.where(roll < DUPLICATE_SHARE, source, np.arange(n))
    caption = caption.take(pa.array(caption_source))

    def replace(column: pa.Array, share: float, values: list[str | None]) -> pa.Array:
        mask = rng.random(n) < share
        picks = pa.array(values, pa.string()).take(pa.array(rng.integers(0, len(values), int(mask.sum()))))
        return pc.replace_with_mask(column, pa.array(mask), picks)

    url = replace(url, INVALID_URL_SHARE, _BAD_URLS)
    caption = replace(caption, NULL_CAPTION_SHARE, [None])
    caption = replace(caption, CONTROL_CHAR_SHARE, ["tab\there\x00and a bell\x07 in a caption"])
    caption = replace(caption, LONG_CAPTION_SHARE, ["very long " * 500])
    return pa.table({"url": url, "caption": caption})


def generate(rows: int, path: Path, seed: int = 0) -> Path:
    """Write a `rows`-row crawl to `path` one row group at a time (kept if it already exists)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng, 5000)
    hosts = pc.binary_join_element_wise(
        pa.array([f"cdn{i % 7}" for i in range(400)]),
        _join_words(rng, vocab, 400, 1, 2, "-"),
        pa.array([["com", "net", "co.uk", "de", "org"][i % 5] for i in range(400)]),
        ".",
    )
    partial = path.with_name(f".{path.name}.partial")
    with pq.ParquetWriter(partial, pa.schema([("url", pa.string()), ("caption", pa.string())])) as writer:
        for start in range(0, rows, ROW_GROUP):
            writer.write_table(crawl_batch(rng, vocab, hosts, min(ROW_GROUP, rows - start)))
    os.replace(partial, path)
    return path


# ---------------------------------------------------------------- measuring the stage


def peak_rss_mib() -> float:
    """This process's peak RSS since it started its program: VmHWM. (`getrusage`'s ru_maxrss survives exec, so
    in a process forked from a large one and then exec'd, such as a Dask worker, it reports the parent's.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM in /proc/self/status")


def _child(executor: str, config_json: str, result_path: str) -> None:
    """Runs in the measured process (the driver): `run_pipeline` with the input stage only, in this process
    (`local`) or on a 2-worker Dask LocalCluster (`dask`). Writes its counts, time, its own peak RSS and,
    on Dask, each worker's peak RSS to `result_path`."""
    from curate.config import DaskConfig, validate_config
    from curate.pipeline import run_pipeline

    config = validate_config(json.loads(config_json))
    cluster = None
    if executor == "dask":
        from curate.executors.dask import DaskExecutor

        cluster = DaskExecutor(DaskConfig(n_workers=DASK_WORKERS, threads_per_worker=1, dashboard_address=":0"))
    base_mib = peak_rss_mib()  # imports and, on Dask, the running cluster: before any input work
    started = time.perf_counter()
    try:
        result = run_pipeline(config, executor=cluster)
        seconds = time.perf_counter() - started
        workers = []
        if cluster is not None:
            workers = sorted(cluster.client.run(peak_rss_mib).values())
    finally:
        if cluster is not None:
            cluster.close()
    driver_mib = peak_rss_mib()  # this process only, not its children
    report = {
        "seconds": seconds,
        "rows": result.rows,
        "complete": result.complete,
        "counts": dict(result.stats["input"].counts),
        "driver_peak_rss_mib": round(driver_mib, 1),
        "driver_base_rss_mib": base_mib,
        "worker_peak_rss_mib": workers,
    }
    Path(result_path).write_text(json.dumps(report))


def measure_child(args: list[str], poll_s: float = 0.05) -> tuple[int, float, float, int]:
    """Run `python -m benchmarks.bench_input ARGS`; return (exit code, wall seconds, CPU seconds of it and its
    children, peak RSS bytes of the largest of it and its children: wait4's rusage)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_input", *args], cwd=REPO)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(poll_s)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    return proc.returncode, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def measure(executor: str, config: dict[str, Any], work: Path, rows: int) -> dict[str, Any]:
    result_path = work / "input" / f"result-{rows}-{executor}.json"
    result_path.unlink(missing_ok=True)
    shutil.rmtree(config["output"], ignore_errors=True)  # an existing run would be reused, not rebuilt
    code, wall, cpu, _tree_peak = measure_child(["--child", executor, json.dumps(config), str(result_path)])
    if code != 0 or not result_path.exists():
        raise RuntimeError(f"input stage child ({executor}) exited with {code}")
    child = json.loads(result_path.read_text())
    shutil.rmtree(config["output"], ignore_errors=True)
    if not child["complete"]:
        raise RuntimeError(f"input stage ({executor}) did not complete")
    return {**child, "process_seconds": round(wall, 2), "process_cpu_seconds": round(cpu, 2)}


def run(rows: int = DEFAULT_ROWS, work: Path = DEFAULT_WORK, shard_size: int = SHARD_SIZE) -> dict[str, Any]:
    work = Path(work)
    data = generate(rows, work / "input" / f"crawl-{rows}.parquet")
    config = {"stages": ["input"], "input": {"path": str(data), "shard_size": shard_size}}
    runs = {}
    for executor in ("dask", "local"):
        runs[executor] = measure(
            executor, {**config, "output": str(work / "input" / f"run-{rows}-{executor}")}, work, rows
        )
    dask, local = runs["dask"], runs["local"]
    if dask["counts"] != local["counts"]:
        raise RuntimeError(f"the executors disagree: {dask['counts']} != {local['counts']}")
    driver = dask["driver_peak_rss_mib"]
    workers = " / ".join(f"{mib} MiB" for mib in dask["worker_peak_rss_mib"])
    return {
        "name": "input_peak_rss",
        "headline": f"driver {driver} MiB on Dask (workers {workers}), local {local['driver_peak_rss_mib']} MiB",
        "rows": dask["rows"],
        "driver_peak_rss_mib": driver,
        "driver_rss_before_the_stage_mib": dask["driver_base_rss_mib"],
        "worker_peak_rss_mib": dask["worker_peak_rss_mib"],
        "dask_seconds": round(dask["seconds"], 2),
        "dask_rows_per_s": round(dask["rows"] / dask["seconds"]),
        "local_peak_rss_mib": local["driver_peak_rss_mib"],
        "local_seconds": round(local["seconds"], 2),
        "local_rows_per_s": round(local["rows"] / local["seconds"]),
        "local_process_cpu_seconds": local["process_cpu_seconds"],
        "shard_size": shard_size,
        "counts": dask["counts"],
        "target": f"driver < {TARGET_MIB} MiB on Dask",
        "passed": driver < TARGET_MIB,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_input", description=__doc__)
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache of generated data and runs")
    parser.add_argument("--shard-size", type=int, default=SHARD_SIZE)
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    parser.add_argument("--child", nargs=3, metavar=("EXECUTOR", "CONFIG_JSON", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    result = run(args.rows, args.work, args.shard_size)
    return emit_result(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
