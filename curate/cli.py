"""Command line: parse, load the config, call the library, print a short summary."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from curate.config import ConfigError, load_config
from curate.extras import MissingExtra, distribution_version, require
from curate.io.lock import RunLocked
from curate.io.wds import TarReadError
from curate.ledger import FateError, StageStats
from curate.pipeline import IncompleteRun, RunResult, run_pipeline, run_status
from curate.runner import ShardFailed
from curate.stages import stage_names
from curate.stages.input import InputError

log = logging.getLogger("curate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curate", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {distribution_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_pipeline_command(name: str, help_text: str) -> None:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("pipeline", type=Path, help="pipeline YAML")
        command.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set download.timeout=5",
        )
        command.add_argument("--executor", choices=["local", "dask"], help="overrides the config's executor")
        command.add_argument("--scheduler", help="address of a running Dask scheduler (tcp://host:8786)")
        command.add_argument("--no-progress", action="store_true", help="no progress bars")

    add_pipeline_command("run", "run every stage of a pipeline (resumes where it stopped)")
    for stage in stage_names():
        add_pipeline_command(stage, f"run only the {stage} stage (its upstream must be done)")
    status = commands.add_parser("status", help="per-stage progress and counts of a run")
    status.add_argument("output", help="the run directory: a path or a URL (s3://...)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    add_retry_command(commands)
    add_view_commands(commands)
    cat = commands.add_parser(
        "cat",
        help="write files or objects to stdout, one after another (a trainer's `pipe:curate cat s3://...` URL)",
    )
    cat.add_argument("locations", nargs="+", metavar="LOCATION", help="a path or a URL (s3://...)")
    cat.add_argument(
        "--storage-options",
        type=json_object,
        default={},
        metavar="JSON",
        help="fsspec options of the URLs' filesystem, as storage.options in a pipeline (default: from the environment)",
    )
    return parser


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("not a JSON object")
    return value


def add_retry_command(commands: Any) -> None:
    from curate.retry import DEFAULT_REASONS

    retry = commands.add_parser(
        "retry",
        help="fetch again the rows of a finished download that failed for these reasons, then redo what changed",
    )
    retry.add_argument("output", help="the run directory")
    retry.add_argument(
        "--reasons",
        default=",".join(DEFAULT_REASONS),
        help="comma-separated reason codes of failed rows to fetch again; http_5xx stands for every 5xx "
        "(default: %(default)s)",
    )
    retry.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "status":
            return print_status(args.output, as_json=args.json)
        if args.command in LOCAL_RUN_COMMANDS:
            args.output = local_run_dir(args.output, args.command)
        if args.command in VIEW_COMMANDS:
            return VIEW_COMMANDS[args.command](args)
        if args.command == "retry":
            return retry_command(args)
        if args.command == "cat":
            return cat_command(args)
        return run_command(args)
    except (ConfigError, InputError) as err:
        print(f"curate: error: {err}", file=sys.stderr)
        return 2
    except (ShardFailed, FateError, IncompleteRun, RunLocked, TarReadError, OSError) as err:
        print(f"curate: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # every commit is atomic and marked last: the same command resumes
        forget_unhandled_keyboard_interrupt()
        print("curate: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


LOCAL_RUN_COMMANDS = ("retry", "report", "search", "serve", "train-scorer")
"""Commands that read a run directory on local disk only (not yet one on a bucket)."""


def local_run_dir(text: str, command: str) -> Path:
    from curate.io.storage import locate

    location = locate(text)
    if not isinstance(location, Path):
        raise ConfigError(
            f"{text}: `curate {command}` reads a run directory on local disk only; "
            "a run on a bucket is read by `curate status` and `curate.ledger.read_ledger`"
        )
    return location


def forget_unhandled_keyboard_interrupt() -> None:
    """CPython flags a KeyboardInterrupt that ended a string exec (dataclasses make their methods so) as
    unhandled even once caught, and `python -m curate` then dies by SIGINT instead of exiting 130. Every
    string exec clears the flag when it starts."""
    exec("pass", {})


def run_command(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.executor:
        overrides.append(f"executor={args.executor}")
    if args.scheduler:
        overrides.append(f"scheduler={args.scheduler}")
    config = load_config(args.pipeline, overrides)
    executor = make_executor(config)
    progress = None if args.no_progress else tqdm_progress
    try:
        only = None if args.command == "run" else args.command
        result = run_pipeline(config, executor=executor, only_stage=only, progress=progress)
    finally:
        executor.close()
    return finish_run(result, config, whole_run=args.command == "run")


def finish_run(result: RunResult, config: Any, whole_run: bool = True) -> int:
    """The funnel, then (for a complete run) the ledger, the report and the validation table."""
    print_funnel(result)
    if not result.complete:
        print(f"curate: run in {result.layout.root} is not complete; see `curate status {result.layout.root}`")
        return 1 if whole_run else 0
    print(f"ledger: {result.layout.ledger_path}")
    if "embed" in config.stages:
        from curate.report import write_report

        try:
            print(f"report: {write_report(result.layout.root)}")
        except MissingExtra as err:  # the run is complete; `curate report` builds it once installed
            print(f"report: skipped: {err}")
    if "validate" in config.stages:
        from curate.stages.validate.stage import ValidateOutputs, format_validation_table

        print("validation: a small CLIP trained on each arm's data, same recipe and samples seen, paired by seed")
        print(format_validation_table(ValidateOutputs(result.layout).metrics()))
    return 0


def retry_command(args: argparse.Namespace) -> int:
    from curate.retry import retry

    config_path = args.output / "config.yaml"
    if not config_path.exists():
        raise FileNotFoundError(f"{args.output}: not a curate run (no config.yaml)")
    config = load_config(config_path)
    executor = make_executor(config)
    progress = None if args.no_progress else tqdm_progress
    try:
        outcome = retry(args.output, args.reasons, executor=executor, progress=progress)
    finally:
        executor.close()
    if outcome.run is None:
        seen = ", ".join(f"{reason} {n}" for reason, n in sorted(outcome.failed_reasons.items(), key=lambda kv: -kv[1]))
        print(f"retry: no failed download matches --reasons {args.reasons}; nothing fetched")
        print(f"  failures in {args.output}: {seen or 'none'}")
        return 0
    retried = sum(outcome.rows.values())
    print(f"retry {outcome.attempt}: {outcome.fetched} of {retried} rows fetched ({len(outcome.rows)} shards)")
    return finish_run(outcome.run, config)


def cat_command(args: argparse.Namespace) -> int:
    from curate.io.storage import Storage, locate

    storage, out = Storage(args.storage_options), sys.stdout.buffer
    try:
        for location in args.locations:
            storage.copy_to(locate(location), out)
        out.flush()
    except BrokenPipeError:  # the reader stopped early (a trainer at the end of its steps): not an error here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the flush at exit raises it again
    return 0


def make_executor(config: Any) -> Any:
    if config.executor == "dask":
        require("distributed", "dask", "the dask executor")
        from curate.executors.dask import DaskExecutor

        executor = DaskExecutor(config.dask, scheduler=config.scheduler)
        print(f"dask dashboard: {executor.dashboard_link}", flush=True)
        return executor
    from curate.executors.local import LocalExecutor

    return LocalExecutor()


def tqdm_progress(description: str, total: int, unit: str = "shard") -> tqdm:
    return tqdm(total=total, desc=f"{description:>10}", unit=unit, unit_scale=unit != "shard", file=sys.stderr)


def print_funnel(result: RunResult) -> None:
    print(f"run: {result.layout.root}  ({result.rows} input rows)")
    for name, stats in result.stats.items():
        print(format_stage_line(name, stats))


def format_stage_line(name: str, stats: StageStats | dict[str, Any]) -> str:
    counts = stats.counts if isinstance(stats, StageStats) else stats["counts"]
    rows = sum(counts.values())
    kept = counts.get("kept", 0)
    losses = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]) if k != "kept")
    return f"  {name:<10} {rows:>8} in -> {kept:>8} kept" + (f"   ({losses})" if losses else "")


def print_status(run_dir: Path | str, as_json: bool) -> int:
    status = run_status(run_dir)
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"run: {status['run']}  ({status['input_rows']} input rows, {status['shards']} shards)")
    for name, stage in status["stages"].items():
        states = stage["shards"]
        damaged = f"  damaged {states['damaged']:>4}" if states.get("damaged") else ""
        print(
            f"  {name:<10} done {states['done']:>4}  stale {states['stale']:>4}  pending {states['pending']:>4}"
            + damaged
        )
        print("  " + format_stage_line("", stage).strip())
    ledger = status["ledger_rows"]
    print(f"  ledger: {'not written yet' if ledger is None else f'{ledger} rows'}")
    if status["top_failures"]:
        print("top reasons rows were dropped or failed:")
        for item in status["top_failures"]:
            detail = f"   e.g. {item['common_detail']}" if item.get("common_detail") else ""
            print(f"  {item['rows']:>8}  {item['stage']:<10} {item['outcome']}{detail}")
    return 0


# ---- report, search, serve: commands that read a finished run


def add_view_commands(commands: Any) -> None:
    report = commands.add_parser("report", help="(re)build OUTPUT/report/index.html and report/stats.json")
    report.add_argument("output", help="the run directory")
    search = commands.add_parser("search", help="CLIP search over the curated images of a run")
    search.add_argument("output", help="the run directory")
    search.add_argument("query", nargs="?", help="text to search for (or --image)")
    search.add_argument("-k", type=int, default=16, help="results (default 16)")
    search.add_argument("--image", type=Path, help="search by this image instead of text")
    search.add_argument("--html", type=Path, help="also write the results as an HTML gallery to this file")
    search.add_argument("--json", action="store_true", help="machine-readable output")
    scorer = commands.add_parser(
        "train-scorer", help="train a CLIP on a run's curated shards and export it for embed.pretrained"
    )
    scorer.add_argument("output", help="a finished run (its curated/ and validate recipe are used)")
    scorer.add_argument("--out", help="where to write the weights: a path or a URL (default OUTPUT/scorer/scorer.pt)")
    scorer.add_argument("--seed", type=int, default=0)
    scorer.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the run's config, e.g. --set validate.samples_seen=51200",
    )
    scorer.add_argument("--no-progress", action="store_true", help="no progress bar")
    serve = commands.add_parser("serve", help="a search page for a run's curated images on localhost")
    serve.add_argument("output", help="the run directory")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1")


def report_command(args: argparse.Namespace) -> int:
    from curate.report import write_report

    print(f"report: {write_report(args.output)}")
    return 0


def search_command(args: argparse.Namespace) -> int:
    from curate.search import RunSearch, SearchError, hits_json, write_gallery

    if (args.query is None) == (args.image is None):
        print("curate: error: give either a text query or --image PATH", file=sys.stderr)
        return 2
    if args.k < 1:
        print("curate: error: -k must be at least 1", file=sys.stderr)
        return 2
    if args.image is not None and not args.image.is_file():
        print(f"curate: error: no such image file {str(args.image)!r}", file=sys.stderr)
        return 2
    try:
        search = RunSearch(args.output)
        hits = search.image(args.image, args.k) if args.image else search.text(args.query, args.k)
    except SearchError as err:
        print(f"curate: error: {err}", file=sys.stderr)
        return 1
    label = args.query if args.query is not None else str(args.image)
    if args.json:
        print(hits_json(label, hits))
    else:
        for rank, hit in enumerate(hits, 1):
            print(f"{rank:>3}  {hit.score:.4f}  {hit.uid}  {hit.caption[:60]:<60}  {hit.url or ''}")
    if args.html:
        print(f"gallery: {write_gallery(search, label, hits, args.html)}", file=sys.stderr if args.json else sys.stdout)
    return 0


def serve_command(args: argparse.Namespace) -> int:
    from curate.search import SearchError
    from curate.serve import make_server

    try:
        server = make_server(args.output, args.host, args.port)
    except SearchError as err:
        print(f"curate: error: {err}", file=sys.stderr)
        return 1
    print(f"serving {args.output} at {server.url}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def train_scorer_command(args: argparse.Namespace) -> int:
    from curate.stages.validate.bootstrap import load_run_config, train_scorer

    config = load_run_config(args.output, args.overrides)
    total = config.validate.samples_seen  # type: ignore[attr-defined]
    with tqdm(total=total, desc="train-scorer", unit="sample", unit_scale=True, disable=args.no_progress) as bar:

        def update(samples: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(samples)

        try:
            info = train_scorer(args.output, config, args.out, args.seed, update)
        except ValueError as err:
            print(f"curate: error: {err}", file=sys.stderr)
            return 2
    steps, first, last = info["steps"], info["loss_first"], info["loss_last"]
    print(f"scorer: {info['pretrained']} ({steps} steps, loss {first:.3f} -> {last:.3f})")
    print(f"use it with: --set embed.model={info['model_setting']} --set embed.pretrained={info['pretrained']}")
    return 0


VIEW_COMMANDS = {
    "report": report_command,
    "search": search_command,
    "serve": serve_command,
    "train-scorer": train_scorer_command,
}


if __name__ == "__main__":
    raise SystemExit(main())
