"""The download stage against the real img2dataset and a loopback server serving the demo world."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from curate.config import load_config
from curate.ledger import Status, read_ledger
from curate.pipeline import run_pipeline
from curate.stages.download import classify_error
from examples.demo_checks import compare_download_fates, truth_by_uid
from tests.world_fixtures import ServedWorld

REPO = Path(__file__).resolve().parents[1]


def tar_samples(run_dir: Path) -> dict[str, dict]:
    """uid -> {sha of the stored jpg, caption, json} for every sample in the download tars."""
    samples: dict[str, dict] = {}
    for tar_path in sorted((run_dir / "download").glob("*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, files in members.items():
            meta = json.loads(files["json"])
            samples[meta["uid"]] = {
                "key": key,
                "jpg_sha": hashlib.sha256(files["jpg"]).hexdigest(),
                "caption": files["txt"].decode(),
                "meta": meta,
            }
    return samples


def test_error_messages_map_to_reason_codes():
    assert classify_error("HTTP Error 404: Not Found") == (Status.FAILED, "http_404")
    assert classify_error("HTTP Error 503: Service Unavailable") == (Status.FAILED, "http_503")
    assert classify_error("The read operation timed out") == (Status.FAILED, "timeout")
    assert classify_error("<urlopen error timed out>") == (Status.FAILED, "timeout")
    assert classify_error("Use of image disallowed by X-Robots-Tag directive") == (Status.DROPPED, "opt_out")
    assert classify_error("image too small") == (Status.DROPPED, "min_side")
    assert classify_error("Image decoding error") == (Status.FAILED, "decode_error")
    assert classify_error("<urlopen error [Errno 111] Connection refused>") == (Status.FAILED, "connection_error")
    assert classify_error("something nobody expected") == (Status.FAILED, "download_error")


def test_every_planted_fault_lands_in_the_ledger_with_its_reason(served_world: ServedWorld, tmp_path: Path):
    config = load_config(served_world.pipeline(tmp_path, download={"processes": 2}))
    result = run_pipeline(config)

    assert result.complete
    report = compare_download_fates(tmp_path / "run", served_world.world.truth, served_world.table)
    wrong = report[report["as_expected"] != report["rows"]]
    assert wrong.empty, f"rows with an unexpected fate:\n{wrong.to_string()}"
    assert set(report["kind"]) >= {"http_404", "corrupt", "opt_out", "timeout", "tiny", "invalid_url"}

    ledger = read_ledger(tmp_path / "run")
    truth = truth_by_uid(served_world.world.truth, served_world.table).set_index("uid")
    kept = ledger[ledger.status == "kept"].set_index("uid")
    for uid, row in kept.iterrows():
        served = served_world.world.file_path(truth.loc[uid, "row_key"]).read_bytes()
        assert row["sha256"] == hashlib.sha256(served).hexdigest()
        assert (row["width"], row["height"]) == (truth.loc[uid, "width"], truth.loc[uid, "height"])

    samples = tar_samples(tmp_path / "run")
    assert set(samples) == set(kept.index)
    for uid, sample in samples.items():
        assert sample["caption"] == kept.loc[uid, "caption"]
        assert sample["meta"]["sha256"] == kept.loc[uid, "sha256"]
    failed_detail = ledger.loc[ledger.reason == "http_404", "detail"]
    assert failed_detail.str.contains("404").all()


def test_unchanged_config_skips_and_changed_download_setting_redoes(served_world: ServedWorld, tmp_path: Path):
    pipeline = served_world.pipeline(tmp_path)
    run_pipeline(load_config(pipeline))
    markers = sorted((tmp_path / "run" / "download" / "_done").glob("*.json"))
    fingerprint = json.loads(markers[0].read_text())["fingerprint"]
    hits_before = Counter(served_world.server.hits)

    run_pipeline(load_config(pipeline, ["download.threads=4"]))  # scheduling only: same result, nothing redone
    assert served_world.server.hits == hits_before
    assert json.loads(markers[0].read_text())["fingerprint"] == fingerprint

    result = run_pipeline(load_config(pipeline, ["download.encode_quality=70"]))
    assert result.complete
    new_hits = served_world.server.hits - hits_before
    fetchable = read_ledger(tmp_path / "run").query("stage == 'download'")
    assert len(new_hits) >= len(fetchable) - 2  # every fetchable url was requested again
    assert all(json.loads(m.read_text())["fingerprint"] != fingerprint for m in markers)


def wait_for_markers(folder: Path, count: int, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if folder.exists() and len(list(folder.glob("*.json"))) >= count:
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before {count} shards were done")
        time.sleep(0.05)
    pytest.fail(f"{count} shards were not done within {timeout_s} s")


def shard_urls(run_dir: Path, shards: list[str]) -> set[str]:
    paths = [u for s in shards for u in pq.read_table(run_dir / "input" / "shards" / f"{s}.parquet")["url"].to_pylist()]
    return {"/" + u.split("/", 3)[3] for u in paths}


@pytest.mark.slow
def test_killed_run_resumes_without_refetching_and_matches_an_uninterrupted_run(
    served_world: ServedWorld, tmp_path: Path
):
    server = served_world.server
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    settings = {"input": {"shard_size": 10}}
    reference_pipeline = served_world.pipeline(tmp_path / "a", output=reference_dir, **settings)
    resumed_pipeline = served_world.pipeline(tmp_path / "b", output=resumed_dir, **settings)
    command = [sys.executable, "-m", "curate", "run", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    subprocess.run([*command, str(reference_pipeline)], check=True, env=env, capture_output=True)

    hits_before = Counter(server.hits)
    process = subprocess.Popen(
        [*command, str(resumed_pipeline)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_markers(resumed_dir / "download" / "_done", 3, process)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before_kill = sorted(p.stem for p in (resumed_dir / "download" / "_done").glob("*.json"))
    assert not (resumed_dir / "ledger.parquet").exists()

    finished = subprocess.run([*command, str(resumed_pipeline)], env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr

    hits = server.hits - hits_before
    for path in shard_urls(resumed_dir, done_before_kill):
        assert hits[path] <= 1, f"{path} was fetched {hits[path]} times across the killed and the resumed run"
    columns = ["uid", "status", "stage", "reason", "sha256", "width", "height"]
    reference = read_ledger(reference_dir)[columns].sort_values("uid").reset_index(drop=True)
    resumed = read_ledger(resumed_dir)[columns].sort_values("uid").reset_index(drop=True)
    pd.testing.assert_frame_equal(reference, resumed)
    strip = lambda samples: {u: (s["key"], s["jpg_sha"], s["caption"]) for u, s in samples.items()}  # noqa: E731
    assert strip(tar_samples(reference_dir)) == strip(tar_samples(resumed_dir))
    assert not list((resumed_dir / "download").glob("_tmp/*"))
