"""Worker-local scratch: the guarded fetch's bodies and the table img2dataset reads lie in the temp directory
of the process running the download task, never in the run directory, and are gone after the task."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from curate.config import load_config
from curate.ledger import read_ledger
from curate.pipeline import run_pipeline
from curate.stages.download import DownloadStage
from tests.world_fixtures import ServedWorld


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_download_scratch_is_in_the_workers_temp_dir(
    served_world: ServedWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import img2dataset.downloader

    worker_tmp = tmp_path / "worker-tmp"
    worker_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(worker_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    run_dir = tmp_path / "run"
    seen: dict[str, list[Any]] = {"bodies": [], "tables": [], "run_scratch": []}

    fetch_rows = DownloadStage.fetch_rows

    def watched_fetch(self: DownloadStage, rows: Any, fetch_dir: Path) -> Any:
        outcomes = fetch_rows(self, rows, fetch_dir)
        seen["bodies"].append(files_under(fetch_dir))
        seen["run_scratch"].append(files_under(run_dir / "download" / "_tmp"))
        return outcomes

    download_shard = img2dataset.downloader.Downloader.download_shard

    def watched_shard(self: Any, row: tuple[int, str]) -> Any:
        seen["tables"].append(Path(row[1]))
        seen["run_scratch"].append(files_under(run_dir / "download" / "_tmp"))
        return download_shard(self, row)

    monkeypatch.setattr(DownloadStage, "fetch_rows", watched_fetch)
    monkeypatch.setattr(img2dataset.downloader.Downloader, "download_shard", watched_shard)

    result = run_pipeline(load_config(served_world.pipeline(tmp_path, output=run_dir)))

    assert result.complete
    kept = int((read_ledger(run_dir).status == "kept").sum())
    shards = len(list((run_dir / "download" / "_done").glob("*.json")))
    assert kept > 0 and shards > 1
    assert len(seen["bodies"]) == len(seen["tables"]) == shards
    bodies = [body for fetched in seen["bodies"] for body in fetched]
    assert len(bodies) >= kept  # every kept image was fetched into scratch first
    assert all(body.is_relative_to(worker_tmp) for body in bodies)
    assert all(table.is_relative_to(worker_tmp) for table in seen["tables"])
    assert seen["run_scratch"] == [[]] * (2 * shards)  # no scratch file in the run while a shard downloads
    assert files_under(run_dir / "download" / "_tmp") == []
    assert not [p for p in run_dir.rglob("*") if p.suffix == ".arrow" or "_fetched" in p.parts]
    assert list(worker_tmp.iterdir()) == []  # and nothing is left in the worker's temp dir either
