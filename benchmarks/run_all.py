"""`make bench`: run every benchmark, write the results as a markdown table plus JSON.

python -m benchmarks.run_all [--out benchmarks/results.md] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from benchmarks import bench_download, bench_embed, bench_input, bench_near_dup


def benchmarks(quick: bool, work: Path) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    return [
        ("input", lambda: bench_input.run(rows=1_000_000 if quick else 10_000_000, work=work)),
        ("download", lambda: bench_download.run(images=1000 if quick else 4000, repeats=3, work=work)),
        ("embed", lambda: bench_embed.run(images=64 if quick else 128, work=work)),
        (
            "near_dup",
            lambda: bench_near_dup.run(
                sizes=(20_000, 200_000) if quick else (100_000, 1_000_000),
                verify_rows=20_000 if quick else 100_000,
                work=work,
            ),
        ),
    ]


def headline(result: dict[str, Any]) -> str:
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
        started = time.perf_counter()
        result = bench()
        result["wall_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(result), flush=True)
        results.append(result)

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
    args.out.write_text("\n".join(lines))
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
