"""The run-wide checks at the end of every run, from the markers: one ledger row per input row, per-stage
counts that add up to the input, and a ledger that keeps what the last stage kept. A marker whose counts
disagree makes the run fail with a FateError naming the numbers, not end as complete."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from curate.config import load_config
from curate.io.fs import read_json, write_json_atomic
from curate.ledger import FateError
from curate.pipeline import run_pipeline
from curate.runner import ShardFailed
from curate.stage import RunLayout
from tests.run_fixtures import CuratedRun


def copied_run(run: CuratedRun, tmp_path: Path) -> tuple[RunLayout, list[str]]:
    shutil.copytree(run.root, tmp_path / "run")
    return RunLayout(tmp_path / "run"), [f"output={tmp_path / 'run'}"]


def bump(path: Path, key: str, by: int = 1) -> None:
    marker = read_json(path)
    marker["counts"][key] = marker["counts"].get(key, 0) + by
    write_json_atomic(path, marker)


def test_an_untouched_copy_of_a_finished_run_passes_the_checks(curated_run: CuratedRun, tmp_path: Path) -> None:
    layout, overrides = copied_run(curated_run, tmp_path)
    result = run_pipeline(load_config(layout.config_path, overrides))
    assert result.complete and result.tasks_run == 0


@pytest.mark.parametrize(
    ("stage", "phase", "key", "message"),
    [
        ("filter", None, "dropped/caption_too_short", r"per-stage counts add up to \d+, not to the \d+ input rows"),
        ("ledger", "merge", "kept", r"ledger keeps \d+ rows but the last stage kept \d+"),
        ("ledger", "merge", "rows", r"ledger has \d+ rows for \d+ input rows"),
    ],
)
def test_counts_that_do_not_add_up_fail_the_run(
    curated_run: CuratedRun, tmp_path: Path, stage: str, phase: str | None, key: str, message: str
) -> None:
    layout, overrides = copied_run(curated_run, tmp_path)
    shard = "all" if phase else sorted(p.stem for p in layout.marker_dir(stage).glob("*.json"))[0]
    marker = layout.marker_path(stage, shard, phase) if phase else layout.marker_path(stage, shard)
    bump(marker, key)
    with pytest.raises(FateError, match=message):
        run_pipeline(load_config(layout.config_path, overrides))


def test_curated_shards_that_do_not_hold_what_the_last_stage_kept_fail_the_run(
    curated_run: CuratedRun, tmp_path: Path
) -> None:
    layout, overrides = copied_run(curated_run, tmp_path)
    bump(layout.marker_path("materialize", "00000"), "samples")  # an output shard that claims one sample more
    layout.marker_path("materialize", "all", "index").unlink()  # materialize's last task runs again
    expected = r"'materialize' failed on phase 'index'.*curated/ holds \d+ samples but dedup kept \d+"
    with pytest.raises(ShardFailed, match=expected):
        run_pipeline(load_config(layout.config_path, overrides))
