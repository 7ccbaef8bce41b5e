"""The report: its numbers against the ledger, its deterministic sample choices, runs with missing stages, and
the page itself in a real headless Chromium (every image loads, no console errors, a screenshot)."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path

import pytest

from curate.cli import main
from curate.config import load_config
from curate.ledger import read_ledger
from curate.pipeline import run_pipeline
from curate.report import stats as report_stats
from curate.report import write_report
from curate.report.stats import build_stats, load_run, validation
from curate.stages.dedup.stage import DedupOutputs
from tests.browser import BROKEN_IMAGES_JS, Browser
from tests.run_fixtures import CuratedRun
from tests.world_fixtures import ServedWorld

SECTION_IDS = ("funnel", "scores", "threshold", "removed", "duplicates", "validation")
MAX_PAGE_BYTES = 3_000_000


@pytest.fixture(scope="module")
def report(curated_run: CuratedRun) -> Path:
    return write_report(curated_run.root)


@pytest.fixture(scope="module")
def stats(report: Path) -> dict:
    return json.loads((report.parent / "stats.json").read_text())


@pytest.fixture(scope="module")
def download_only_run(served_world: ServedWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("download-only")
    result = run_pipeline(load_config(served_world.pipeline(folder, output=folder / "run")))
    assert result.complete
    return result.layout.root


def sections(page: str) -> dict[str, str]:
    parts = re.split(r'<section id="([a-z]+)">', page)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


# ---- numbers


def test_funnel_adds_up_to_the_ledger(curated_run: CuratedRun, stats: dict):
    ledger = read_ledger(curated_run.root)
    funnel = stats["funnel"]
    assert [s["stage"] for s in funnel] == ["input", "download", "embed", "filter", "dedup"]
    assert funnel[0]["rows"] == len(ledger)
    for before, after in itertools.pairwise(funnel):
        assert after["rows"] == before["kept"]
    assert funnel[-1]["kept"] == (ledger.status == "kept").sum() == stats["summary"]["kept"]
    removed = ledger[ledger.status != "kept"]
    for stage in funnel:
        here = removed[removed.stage == stage["stage"]]
        assert stage["removed"] == (here.status + "/" + here.reason).value_counts().to_dict()
    assert stats["summary"]["curated_samples"] == stats["summary"]["kept"]


def test_score_numbers_come_from_the_filter_summary(curated_run: CuratedRun, stats: dict):
    summary = json.loads((curated_run.root / "filter" / "summary.json").read_text())
    scores = stats["clip_score"]
    assert scores["cutoff"] == summary["clip_cutoff"]
    assert sum(scores["histogram"]["counts"]) == summary["clip_score"]["count"] == stats["funnel"][2]["kept"]
    assert sum(scores["curated_counts"]) == stats["summary"]["kept"]
    assert scores["summary"]["kept_fraction_at_threshold"] == summary["clip_score"]["kept_fraction_at_threshold"]


def test_sample_grids_show_the_right_rows(curated_run: CuratedRun, stats: dict):
    ledger = read_ledger(curated_run.root).set_index("uid")
    grids, cutoff = stats["samples"], stats["clip_score"]["cutoff"]
    kept_near, dropped_near = grids["kept_near_threshold"], grids["dropped_near_threshold"]
    assert kept_near and dropped_near
    assert (ledger.loc[kept_near, "status"] == "kept").all()
    assert (ledger.loc[kept_near, "clip_score"] >= cutoff - 1e-6).all()
    assert (ledger.loc[dropped_near, "reason"] == "clip_score").all()
    # nearest first: the lowest kept scores, and the highest scores dropped for clip_score
    kept_scores = ledger.loc[ledger.status == "kept", "clip_score"].sort_values()
    assert sorted(ledger.loc[kept_near, "clip_score"]) == list(kept_scores[: len(kept_near)])
    below = ledger.loc[ledger.reason == "clip_score", "clip_score"].sort_values(ascending=False)
    assert sorted(ledger.loc[dropped_near, "clip_score"], reverse=True) == list(below[: len(dropped_near)])
    for group in grids["by_reason"]:
        rows = ledger.loc[group["uids"]]
        assert (rows.reason == group["reason"]).all() and (rows.stage == group["stage"]).all()
        assert group["count"] == ((ledger.reason == group["reason"]) & (ledger.stage == group["stage"])).sum()
    reasons = {g["reason"] for g in grids["by_reason"]}
    assert {"http_404", "clip_score", "caption_words", "dup_exact"} <= reasons
    assert set(stats["records"]) >= set(kept_near) | {u for g in grids["by_reason"] for u in g["uids"]}


def test_duplicate_groups_put_the_survivor_first(curated_run: CuratedRun, stats: dict):
    decisions = DedupOutputs(curated_run.root).decisions().to_pandas().set_index("uid")
    groups = stats["duplicate_groups"]
    assert groups and {g["reason"] for g in groups} <= {"dup_exact", "dup_near", "dup_semantic"}
    for group in groups:
        # the survivor outlived this layer (a later layer may still drop it: it is then shown as such)
        assert decisions.loc[group["kept_uid"], "reason"] != group["reason"]
        for copy in group["dropped"]:
            assert decisions.loc[copy["uid"], "kept_uid"] == group["kept_uid"]
            assert decisions.loc[copy["uid"], "reason"] == group["reason"]
        assert group["copies"] >= len(group["dropped"])


def test_choices_are_deterministic(curated_run: CuratedRun, stats: dict, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(report_stats, "LEDGER_BATCH_ROWS", 7)  # the ledger is streamed: batches must not matter
    again = build_stats(load_run(curated_run.root))
    for key in ("funnel", "clip_score", "samples", "duplicate_groups", "records"):
        assert json.loads(json.dumps(again[key])) == stats[key], key


# ---- the page


def test_page_is_self_contained_and_has_every_section(report: Path, stats: dict):
    page = report.read_text()
    assert len(page.encode()) < MAX_PAGE_BYTES
    found = sections(page)
    assert tuple(found) == SECTION_IDS
    assert not re.findall(r'(?:src|href)="(?!data:|#)', page), "the page must not load anything from outside"
    assert "<script" not in page
    n_thumbs = page.count('src="data:image/jpeg;base64,')
    assert n_thumbs >= len(stats["samples"]["kept_near_threshold"]) + len(stats["duplicate_groups"])
    assert found["scores"].count('src="data:image/png;base64,') == 2  # histogram and kept-fraction curve
    assert 'src="data:image/png;base64,' in found["funnel"]
    assert "validate/metrics.json" in found["validation"]  # no validation in this run: said so


def test_report_in_chromium(report: Path, chromium: str, tmp_path: Path):
    with Browser(chromium, width=1280, height=1000) as browser:
        browser.open(report.as_uri())
        n_images = browser.evaluate("document.images.length")
        broken = browser.evaluate(BROKEN_IMAGES_JS)
        heights = browser.evaluate(
            "Object.fromEntries(Array.from(document.querySelectorAll('section'))"
            ".map(s => [s.id, s.getBoundingClientRect().height]))"
        )
        nav_targets = browser.evaluate(
            "Array.from(document.querySelectorAll('nav a')).map(a => !!document.querySelector(a.getAttribute('href')))"
        )
        shot = browser.screenshot(tmp_path / "report.png")
        errors = browser.errors
    assert not errors, errors
    assert n_images > 20 and not broken, broken
    assert list(heights) == list(SECTION_IDS) and all(h > 60 for h in heights.values()), heights
    assert nav_targets == [True] * len(SECTION_IDS)
    assert shot.stat().st_size > 50_000


# ---- other runs: missing stages, no ledger, validation results


def test_download_only_run_gives_a_valid_report(download_only_run: Path, chromium: str, tmp_path: Path):
    page_path = write_report(download_only_run)
    stats = json.loads((page_path.parent / "stats.json").read_text())
    assert stats["clip_score"] is None and stats["duplicate_groups"] is None and stats["validation"] is None
    assert [s["stage"] for s in stats["funnel"]] == ["input", "download"]
    assert stats["samples"]["kept_sample"]
    found = sections(page_path.read_text())
    assert tuple(found) == SECTION_IDS
    assert "embed stage has not run" in found["scores"] and "dedup stage has not run" in found["duplicates"]
    with Browser(chromium) as browser:
        browser.open(page_path.as_uri())
        broken = browser.evaluate(BROKEN_IMAGES_JS)
        n_images = browser.evaluate("document.images.length")
        errors = browser.errors
    assert not errors and not broken and n_images >= len(stats["samples"]["kept_sample"])


def test_report_of_an_unfinished_run(download_only_run: Path, tmp_path: Path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(download_only_run, unfinished, ignore=shutil.ignore_patterns("report"))
    (unfinished / "ledger.parquet").unlink()
    (unfinished / "stats.json").unlink()
    page = write_report(unfinished).read_text()
    assert "run not complete" in page and tuple(sections(page)) == SECTION_IDS


def test_validation_table_and_loss_curve(curated_run: CuratedRun, tmp_path: Path):
    run = tmp_path / "with-validation"
    shutil.copytree(curated_run.root, run, ignore=shutil.ignore_patterns("download", "search", "report"))
    metrics = {
        "samples_seen": 2048,
        "curated": {"zeroshot_top1": 0.41, "retrieval": {"recall@5": 0.5}, "losses": [4.1, 3.2, 2.9, 2.7]},
        "unfiltered": {"zeroshot_top1": 0.33, "retrieval": {"recall@5": 0.4}, "losses": [4.2, 3.6, 3.3, 3.2]},
    }
    (run / "validate").mkdir()
    (run / "validate" / "metrics.json").write_text(json.dumps(metrics))
    page = write_report(run).read_text()
    section = sections(page)["validation"]
    assert "zeroshot_top1" in section and "retrieval.recall@5" in section and "0.41" in section
    assert section.count('src="data:image/png;base64,') == 1
    table = validation(metrics)
    assert table is not None
    assert set(table["loss_curves"]) == {"curated.losses", "unfiltered.losses"}
    assert table["rows"]["run"] == {"samples_seen": 2048}


def test_report_command(curated_run: CuratedRun, capsys):
    assert main(["report", str(curated_run.root)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {curated_run.root / 'report' / 'index.html'}"
    assert main(["report", str(curated_run.root / "missing")]) == 1
    assert "not a curate run" in capsys.readouterr().err
