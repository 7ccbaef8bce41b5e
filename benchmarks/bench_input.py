"""Peak memory and speed of the input stage on a large crawl-like parquet file.

    python -m benchmarks.bench_input [--rows 10000000] [--work /tmp/curate-bench] [--out FILE]

The input file is generated once per row count (row group by row group, never all rows in memory) and
cached under --work. The stage then runs in a fresh child process (`run_pipeline` with `stages: [input]`)
whose peak RSS comes from the kernel (`wait4` rusage), cross-checked by polling with psutil.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.common import emit_result

DEFAULT_ROWS = 10_000_000
DEFAULT_WORK = Path("/tmp/curate-bench")
ROW_GROUP = 100_000
SHARD_SIZE = 10_000
TARGET_MIB = 2048
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


def _child(config_json: str, result_path: str) -> None:
    """Runs in the measured process: `run_pipeline` with the input stage only; its counts and times go
    to `result_path`, with the time and peak RSS at the end of `build_input` (before the ledger merge)."""
    import resource

    from curate import pipeline
    from curate.config import validate_config

    config = validate_config(json.loads(config_json))
    build: dict[str, float] = {}
    real_build_input = pipeline.build_input

    def timed_build_input(*args: Any, **kwargs: Any) -> Any:
        begun = time.perf_counter()
        summary = real_build_input(*args, **kwargs)
        build["build_seconds"] = time.perf_counter() - begun
        build["build_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return summary

    pipeline.build_input = timed_build_input
    started = time.perf_counter()
    result = pipeline.run_pipeline(config)
    seconds = time.perf_counter() - started
    counts = dict(result.stats["input"].counts)
    Path(result_path).write_text(json.dumps({"seconds": seconds, "rows": result.rows, "counts": counts, **build}))


def measure_child(args: list[str], poll_s: float = 0.05) -> tuple[int, float, float, int]:
    """Run `python -m benchmarks.bench_input ARGS`; return (exit code, wall seconds, CPU seconds, peak RSS
    bytes). The kernel's peak (wait4 rusage) is exact; the psutil polls only back it up."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_input", *args], cwd=REPO)
    watched = psutil.Process(proc.pid)
    polled_peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        with contextlib.suppress(psutil.NoSuchProcess):
            polled_peak = max(polled_peak, watched.memory_info().rss)
        time.sleep(poll_s)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    return proc.returncode, wall, usage.ru_utime + usage.ru_stime, max(usage.ru_maxrss * 1024, polled_peak)


def run(rows: int = DEFAULT_ROWS, work: Path = DEFAULT_WORK, shard_size: int = SHARD_SIZE) -> dict[str, Any]:
    work = Path(work)
    data = generate(rows, work / "input" / f"crawl-{rows}.parquet")
    output = work / "input" / f"run-{rows}"
    shutil.rmtree(output, ignore_errors=True)  # an existing run would be reused, not rebuilt
    config = {
        "output": str(output),
        "stages": ["input"],
        "input": {"path": str(data), "shard_size": shard_size},
    }
    result_path = work / "input" / f"result-{rows}.json"
    result_path.unlink(missing_ok=True)
    code, wall, cpu, peak = measure_child(["--child", json.dumps(config), str(result_path)])
    if code != 0 or not result_path.exists():
        raise RuntimeError(f"input stage child exited with {code}")
    child = json.loads(result_path.read_text())
    shutil.rmtree(output, ignore_errors=True)
    peak_mib = peak / 2**20
    return {
        "name": "input_peak_rss",
        "rows": child["rows"],
        "peak_rss_mib": round(peak_mib, 1),
        "seconds": round(child["seconds"], 2),
        "process_seconds": round(wall, 2),
        "process_cpu_seconds": round(cpu, 2),
        "rows_per_s": round(child["rows"] / child["seconds"]),
        "build_input_seconds": round(child["build_seconds"], 2),
        "build_input_peak_rss_mib": round(child["build_peak_rss_mib"], 1),
        "shard_size": shard_size,
        "counts": child["counts"],
        "target": f"< {TARGET_MIB} MiB",
        "passed": peak_mib < TARGET_MIB,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_input", description=__doc__)
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache of generated data and runs")
    parser.add_argument("--shard-size", type=int, default=SHARD_SIZE)
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG_JSON", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    result = run(args.rows, args.work, args.shard_size)
    return emit_result(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
