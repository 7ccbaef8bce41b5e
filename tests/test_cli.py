"""The command line, end to end, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from curate.ledger import read_ledger
from tests.readme import readme_section
from tests.world_fixtures import ServedWorld

REPO = Path(__file__).resolve().parents[1]


def curate(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "curate", *args], cwd=cwd, capture_output=True, text=True)


def test_run_then_status_through_the_cli(served_world: ServedWorld, tmp_path: Path):
    pipeline = served_world.pipeline(tmp_path)
    finished = curate("run", str(pipeline), "--no-progress", "--set", "download.processes=2")
    assert finished.returncode == 0, finished.stderr
    rows = len(served_world.world.truth)
    assert f"({rows} input rows)" in finished.stdout
    assert "download" in finished.stdout and "failed/http_404" in finished.stdout

    run_dir = tmp_path / "run"
    ledger = read_ledger(run_dir)
    assert len(ledger) == rows and ledger.uid.is_unique
    assert set(ledger.columns) >= {
        "uid",
        "url",
        "caption",
        "status",
        "stage",
        "reason",
        "detail",
        "clip_score",
        "sha256",
        "width",
        "height",
    }
    saved = (run_dir / "config.yaml").read_text()
    assert "processes: 2" in saved and str(served_world.table) in saved

    status = curate("status", str(run_dir), "--json")
    assert status.returncode == 0, status.stderr
    document = json.loads(status.stdout)
    assert document["ledger_rows"] == rows
    assert document["stages"]["download"]["shards"] == {"done": document["shards"], "stale": 0, "pending": 0}
    stats = json.loads((run_dir / "stats.json").read_text())
    download_losses = stats["stages"]["download"]["rows"] - stats["stages"]["download"]["kept"]
    input_losses = stats["stages"]["input"]["rows"] - stats["stages"]["input"]["kept"]
    assert input_losses + download_losses + stats["stages"]["download"]["kept"] == rows

    changed = curate("status", str(run_dir))
    assert "done" in changed.stdout and "ledger: " in changed.stdout


def test_bad_config_exits_2_with_one_line_and_writes_nothing(served_world: ServedWorld, tmp_path: Path):
    pipeline = served_world.pipeline(tmp_path)
    finished = curate("run", str(pipeline), "--set", "download.timout=3")
    assert finished.returncode == 2
    assert finished.stderr.strip().count("\n") == 0
    assert "unknown key 'download.timout'" in finished.stderr and "did you mean 'download.timeout'" in finished.stderr
    assert not (tmp_path / "run").exists()


def test_bad_input_file_exits_2_naming_the_file_and_writes_nothing(tmp_path: Path):
    table = tmp_path / "crawl.csv"
    pd.DataFrame({"link": ["http://127.0.0.1:1/a.jpg"], "text": ["a"]}).to_csv(table, index=False)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"output: {tmp_path / 'run'}\nstages: [input, download]\ninput:\n  path: {table}\n")
    finished = curate("run", str(pipeline))
    assert finished.returncode == 2
    assert str(table) in finished.stderr and "missing column 'url'" in finished.stderr
    assert not (tmp_path / "run").exists()


def test_status_of_a_directory_that_is_not_a_run(tmp_path: Path):
    finished = curate("status", str(tmp_path))
    assert finished.returncode == 1 and "not a curate run" in finished.stderr


def test_a_stage_whose_upstream_is_not_done_refuses_and_writes_nothing_for_it(tmp_path: Path):
    table = tmp_path / "crawl.csv"
    pd.DataFrame({"url": ["http://127.0.0.1:1/a.jpg"], "caption": ["a red circle"]}).to_csv(table, index=False)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"output: {tmp_path / 'run'}\nstages: [input, download, embed]\ninput:\n  path: {table}\n")
    assert curate("input", str(pipeline)).returncode == 0
    finished = curate("embed", str(pipeline))
    assert finished.returncode == 1
    assert finished.stderr == "curate: error: stage 'embed' needs 'download', which is not done\n"
    assert not (tmp_path / "run" / "embed").exists() and not (tmp_path / "run" / "download").exists()


def test_the_readme_command_lines_name_real_commands_options_and_defaults() -> None:
    """Every command of the README's synopsis exists, with each option it shows, the choices it lists and the
    defaults it gives (`[-k 16]`, `[--port 8000]`, retry's reasons); `<stage>` stands for every stage."""
    import argparse
    import re

    from curate.cli import build_parser
    from curate.stages import stage_names

    [commands] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    synopsis = readme_section("Commands").strip("\n").split("\n\n")[0]
    lines = [line.strip() for line in synopsis.splitlines()]
    assert len(lines) >= 9 and all(line.startswith("curate ") for line in lines)
    for line in lines:
        usage, _, comment = line.partition("#")
        name = usage.split()[1]
        if name == "<stage>":
            listed = comment.split(":", 1)[1].split("(")[0]
            assert [s.strip() for s in listed.split(",")] == list(stage_names())
            name = "input"
        options = {s: a for a in commands.choices[name]._actions for s in a.option_strings}
        for option, value in re.findall(r"\[(--?[a-z][a-z-]*)(?: ([^\]]+))?\]", usage):
            assert option in options, (name, option)
            action = options[option]
            if "|" in value:
                assert value.split("|") == list(action.choices), (name, option)
            elif value and not value.isupper() and "=" not in value:
                assert str(action.default) == value, (name, option, action.default)


def test_commands_that_read_only_local_runs_refuse_a_url_in_one_line(tmp_path: Path) -> None:
    for command in (["report"], ["search", "", "a dog"], ["serve"], ["retry"], ["train-scorer"]):
        args = [command[0], "s3://bucket/runs/demo", *command[2:]]
        failed = curate(*args)
        lines = failed.stderr.strip().splitlines()
        assert failed.returncode == 2 and len(lines) == 1, (command, failed.stderr)
        assert lines[0].startswith("curate: error: s3://bucket/runs/demo: ") and f"curate {command[0]}" in lines[0]
