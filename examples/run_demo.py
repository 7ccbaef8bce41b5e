"""`make demo`: generate the demo world, serve it on loopback, run the demo pipeline through the CLI.

python -m examples.run_demo [--out runs/demo] [--world runs/demo-world] [--n-base 600]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from examples.demo_checks import compare_download_fates
from examples.demo_world import DemoServer, generate_world, load_world, write_input_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--world", type=Path, default=Path("runs/demo-world"))
    parser.add_argument("--n-base", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pipeline", type=Path, default=Path("pipelines/demo.yaml"))
    parser.add_argument("--executor", choices=["local", "dask"], default="local")
    args = parser.parse_args(argv)

    if (args.world / "truth.parquet").exists():
        world = load_world(args.world)
    else:
        print(f"generating the demo world in {args.world} ...", flush=True)
        world = generate_world(args.world, n_base=args.n_base, seed=args.seed)
    with DemoServer(world.root) as server:
        table = write_input_table(world, server.base_url, args.world / "input.parquet")
        print(f"serving {len(world.truth)} rows at {server.base_url}", flush=True)
        command = [
            sys.executable,
            "-m",
            "curate",
            "run",
            str(args.pipeline),
            "--set",
            f"input.path={table}",
            "--set",
            f"output={args.out}",
            "--executor",
            args.executor,
        ]
        finished = subprocess.run(command, check=False)
    if finished.returncode != 0:
        return finished.returncode

    report = compare_download_fates(args.out, world.truth, table)
    print("\nplanted faults vs ledger (input + download stages):")
    print(report.to_string(index=False))
    matched, total = int(report["as_expected"].sum()), int(report["rows"].sum())
    print(f"\n{matched}/{total} rows got the fate their planted kind calls for")
    print(f"\nrun written to {args.out.resolve()}")
    return 0 if matched == total else 1


if __name__ == "__main__":
    raise SystemExit(main())
