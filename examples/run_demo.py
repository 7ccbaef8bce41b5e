"""`make demo`: generate the demo world, train (or reuse) its scorer, write the held-out eval set, serve
the world on loopback, run the demo pipeline through the CLI (validation included), and compare every
decision with the planted truth.

    python -m examples.run_demo [--out runs/demo] [--world runs/demo-world] [--executor local|dask] [--arms A,B,..]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from curate.config import load_config
from curate.io.fs import read_json
from curate.stages.validate.evalsets import make_demo_eval_set
from curate.stages.validate.stage import evaluate, format_verdicts
from examples.demo_checks import compare_download_fates, dedup_quality, filter_quality, search_precision_at_5
from examples.demo_scorer import ensure_demo_scorer
from examples.demo_world import DemoServer, generate_world, load_world, write_input_table

EVAL_IMAGES = 300
EVAL_WORLD_SEED = 2000  # the crawl uses seed 0, the scorer's training world 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--world", type=Path, default=Path("runs/demo-world"))
    parser.add_argument("--scorer", type=Path, default=Path("runs/demo-scorer"))
    parser.add_argument("--eval-set", type=Path, default=Path("runs/demo-eval"))
    parser.add_argument("--n-base", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pipeline", type=Path, default=Path("pipelines/demo.yaml"))
    parser.add_argument("--executor", choices=["local", "dask"], default="local")
    parser.add_argument(
        "--arms",
        help="validate.arms, comma-separated (`make compare`: no_filter,basic_filters,clip_score,curated); "
        "default: the pipeline's",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()

    if (args.world / "truth.parquet").exists():
        world = load_world(args.world)
    else:
        print(f"generating the demo world in {args.world} ...", flush=True)
        world = generate_world(args.world, n_base=args.n_base, seed=args.seed)
    print(f"demo scorer in {args.scorer} (trained once on a separate clean split, then reused) ...", flush=True)
    scorer = ensure_demo_scorer(args.scorer)
    threshold = round(float(scorer["calibration"]["suggested_threshold"]), 4)
    # fixed before curation, from a world seed neither the crawl nor the scorer uses
    eval_set = make_demo_eval_set(args.eval_set, n=EVAL_IMAGES, seed=EVAL_WORLD_SEED, label="color")

    with DemoServer(world.root) as server:
        table = write_input_table(world, server.base_url, args.world / "input.parquet")
        print(f"serving {len(world.truth)} rows at {server.base_url}", flush=True)
        overrides = {
            "input.path": table,
            "output": args.out,
            "embed.pretrained": scorer["checkpoint"],
            "filter.clip_threshold": threshold,
            "validate.eval_set": eval_set,
        }
        if args.arms:
            overrides["validate.arms"] = f"[{args.arms}]"
        command = [sys.executable, "-m", "curate", "run", str(args.pipeline), "--executor", args.executor]
        for key, value in overrides.items():
            command += ["--set", f"{key}={value}"]
        finished = subprocess.run(command, check=False)
    if finished.returncode != 0:
        return finished.returncode

    downloads = compare_download_fates(args.out, world.truth, table)
    print("\nplanted faults vs ledger (input + download stages):")
    print(downloads.to_string(index=False))
    matched, total = int(downloads["as_expected"].sum()), int(downloads["rows"].sum())
    print(f"{matched}/{total} rows got the fate their planted kind calls for")

    filtering = filter_quality(args.out, world.truth, table)
    dedup = dedup_quality(args.out, world.truth, table)
    print(f"\nfilter (CLIP score >= {threshold}) vs planted mismatched + junk captions:")
    print(
        f"  precision {filtering['mismatch+junk']['precision']:.3f}  recall {filtering['mismatch+junk']['recall']:.3f}"
        f"   (recall: mismatch {filtering['mismatch']['recall']:.3f}, junk {filtering['junk_caption']['recall']:.3f})"
    )
    print("dedup vs planted copies:")
    for kind, quality in dedup.items():
        print(
            f"  {kind:<10} precision {quality['precision']:.3f}  recall {quality['recall']:.3f}"
            f"  ({quality['pairs']} pairs)"
        )
    search = search_precision_at_5(args.out, world.truth, table)
    print("search: precision@5 of `curate search NAME` over the demo's names")
    for column, precision in search.items():
        cells = "  ".join(f"{name} {value:.1f}" for name, value in precision.items())
        print(f"  {column:<6} mean {sum(precision.values()) / len(precision):.2f}   ({cells})")
    # the scorer's own zero-shot accuracy on the held-out set, with the validation's templates
    scorer_eval = evaluate(load_config(args.out / "config.yaml").validate, Path(scorer["checkpoint"]), scorer["model"])
    tasks = "  ".join(f"{task} {scorer_eval[f'zero_shot_acc_{task}']:.3f}" for task in ("color", "shape", "joint"))
    print(f"scorer ({scorer['model']}) zero-shot on the {scorer_eval['n_eval']} held-out eval images: {tasks}")
    summary: dict = {
        "downloads_as_expected": [matched, total],
        "filter": filtering,
        "dedup": dedup,
        "search_precision_at_5": search,
        "scorer_eval": scorer_eval,
    }
    metrics_path = args.out / "validate" / "metrics.json"
    metrics = read_json(metrics_path) if metrics_path.exists() else None
    if metrics is not None:
        summary["validation"] = {"summary": metrics["summary"], "paired": metrics["paired"]}
    (args.out / "demo_checks.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; run written to {args.out.resolve()}")
    print(f"report: {(args.out / 'report' / 'index.html').resolve()}")
    if metrics is not None:  # `curate run` printed the validation table above
        print(format_verdicts(metrics))
    return 0 if matched == total else 1


if __name__ == "__main__":
    raise SystemExit(main())
