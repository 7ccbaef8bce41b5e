"""`make bench`: run every benchmark, write the results as a markdown table plus JSON.

python -m benchmarks.run_all [--out benchmarks/results.md] [--quick] [--only NAME ...]

With --only, the named benchmarks' results replace theirs in an existing results file; the others' results,
and any notes after the JSON, are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from benchmarks import (
    bench_dask,
    bench_download,
    bench_embed,
    bench_input,
    bench_near_dup,
    bench_scale,
    bench_storage,
    bench_train,
)


def benchmarks(quick: bool, work: Path) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    return [
        ("input", lambda: bench_input.run(rows=1_000_000 if quick else 10_000_000, work=work)),
        ("download", lambda: bench_download.run(images=1000 if quick else 4000, repeats=3, work=work)),
        ("embed", lambda: bench_embed.run(images=64 if quick else 128, work=work)),
        ("embed_decode", lambda: bench_embed.run_decode_scaling(images=2048 if quick else 4096, work=work, repeats=3)),
        ("embed_dataloader", lambda: bench_embed.run_vs_dataloader(images=160 if quick else 320, work=work, repeats=2)),
        (
            "near_dup",
            lambda: bench_near_dup.run(
                sizes=(20_000, 200_000) if quick else (100_000, 1_000_000),
                verify_rows=20_000 if quick else 100_000,
                work=work,
            ),
        ),
        (
            "scale",
            lambda: bench_scale.run(sizes=(100_000, 400_000) if quick else (1_000_000, 4_000_000), work=work),
        ),
        ("storage", lambda: bench_storage.run(images=256 if quick else 512, repeats=2, work=work)),
        ("train", lambda: bench_train.run(steps=3 if quick else 8, repeats=3, n_base=300 if quick else 600, work=work)),
        # last: its workers are extra processes, and it compares wall times that other load would skew
        ("dask", lambda: bench_dask.run(shards=8, shard_size=8 if quick else 24, work=work)),
    ]


def headline(result: dict[str, Any]) -> str:
    if "headline" in result:
        return str(result["headline"])
    if "ratio" in result:
        return f"ratio {result['ratio']}"
    if "peak_rss_mib" in result:
        return f"peak RSS {result['peak_rss_mib']} MiB"
    return "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results.md"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/curate-bench"))
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--only", nargs="*", help="names of benchmarks to run")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)

    results = []
    for name, bench in benchmarks(args.quick, args.work):
        if args.only and name not in args.only:
            continue
        print(f"running {name} ...", flush=True)
        load = os.getloadavg()[0]
        started = time.perf_counter()
        result = bench()
        result["wall_s"] = round(time.perf_counter() - started, 1)
        result.setdefault("load_avg_1m", round(load, 2))  # another job on the machine skews wall times
        result.setdefault("date", time.strftime("%Y-%m-%d"))
        print(json.dumps(result), flush=True)
        results.append(result)

    notes = ""
    if args.only and args.out.exists():
        kept, notes = read_results(args.out.read_text())
        fresh = {r["name"]: r for r in results}
        results = [fresh.pop(r["name"], r) for r in kept] + list(fresh.values())

    machine = f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    lines = [
        f"# Benchmark results ({time.strftime('%Y-%m-%d')}, {machine})",
        "",
        "| benchmark | result | target | passed |",
        "|---|---|---|---|",
        *[f"| {r['name']} | {headline(r)} | {r['target']} | {'yes' if r['passed'] else 'NO'} |" for r in results],
        "",
        "```json",
        json.dumps(results, indent=2),
        "```",
        "",
    ]
    args.out.write_text("\n".join(lines) + notes)
    print(f"results written to {args.out}")
    return 0


def read_results(text: str) -> tuple[list[dict[str, Any]], str]:
    """The results in a results file's first JSON block, and the text after that block."""
    start = text.find("```json\n")
    if start < 0:
        return [], ""
    end = text.find("\n```", start)
    notes = text[end + len("\n```") :].lstrip("\n")
    return json.loads(text[start + len("```json\n") : end]), ("\n" + notes if notes else "")


if __name__ == "__main__":
    raise SystemExit(main())
