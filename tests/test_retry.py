"""`curate retry`: a finished run fetches again only its transiently failed rows, rows that now succeed move
to their new fate in every later stage and the curated set, the ledger's detail keeps each row's attempts,
and only the retried shards are downloaded and embedded again. Server hits are counted to show that nothing
else is fetched."""

from __future__ import annotations

import collections
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from curate.cli import main as curate_main
from curate.config import load_config
from curate.io.wds import index_tar, iter_samples
from curate.ledger import read_ledger
from curate.pipeline import run_pipeline
from curate.stage import RunLayout
from curate.stages.download import DownloadOutputs
from curate.stages.materialize import CuratedOutputs
from tests.world_fixtures import ServedWorld, full_pipeline_overrides


class FlakyServer(ThreadingHTTPServer):
    """Serves `images` by name; `/flaky<k>/<name>` answers 503 to its first k GETs, then the image. Counts GETs."""

    daemon_threads = True

    def __init__(self, images: dict[str, bytes]) -> None:
        self.images = images
        self.hits: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _FlakyHandler)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _FlakyHandler(BaseHTTPRequestHandler):
    server: FlakyServer

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.hits[self.path] += 1
            seen = self.server.hits[self.path]
        prefix, _, name = self.path.lstrip("/").partition("/")
        if name not in self.server.images:
            self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
        elif seen <= int(prefix.removeprefix("flaky")):
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"try later", "text/plain")
        else:
            self._send(HTTPStatus.OK, self.server.images[name], "image/jpeg")

    def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


def noise_jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def flaky_server() -> Iterator[FlakyServer]:
    server = FlakyServer({f"n{i}.jpg": noise_jpeg(i) for i in range(6)})
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def crawl(served_world: ServedWorld, flaky: FlakyServer, path: Path) -> pd.DataFrame:
    """Shard 00000: clean rows, an opt-out and 404s (nothing to retry). 00001: clean rows, two hanging URLs
    (timeouts) and two URLs that fail once. 00002: three that fail once, one that fails twice, and more clean rows."""
    table = pd.read_parquet(served_world.table)
    kinds = served_world.world.truth["kind"].to_numpy()

    def rows(kind: str, n: int, skip: int = 0) -> pd.DataFrame:
        return table[kinds == kind].iloc[skip : skip + n]

    def flaky_rows(names: list[int], failures: int) -> pd.DataFrame:
        urls = [f"{flaky.base_url}/flaky{failures}/n{i}.jpg" for i in names]
        return pd.DataFrame({"url": urls, "caption": [f"a noisy square picture number {i}" for i in names]})

    parts = [
        rows("clean", 5),
        rows("opt_out", 1),
        rows("http_404", 2),
        rows("clean", 4, skip=6),
        rows("timeout", 2),
        flaky_rows([0, 1], 1),
        flaky_rows([2, 3, 4], 1),
        flaky_rows([5], 2),
        rows("clean", 4, skip=10),
    ]
    frame = pd.concat(parts, ignore_index=True)
    frame.to_parquet(path, index=False)
    return frame


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


def curate(capsys: pytest.CaptureFixture[str], *args: str) -> Ran:
    """The command line, in this process (the servers count its requests just the same)."""
    returncode = curate_main(list(args))
    captured = capsys.readouterr()
    return Ran(returncode, captured.out, captured.err)


def image_hits(served_world: ServedWorld, flaky: FlakyServer) -> collections.Counter[str]:
    """GETs per URL path on both servers, robots.txt left out (a new worker asks for it once per host)."""
    hits = collections.Counter({f"world{p}": n for p, n in served_world.server.hits.items()})
    hits.update({f"flaky{p}": n for p, n in flaky.hits.items()})
    return collections.Counter({p: n for p, n in hits.items() if not p.endswith("/robots.txt")})


def marker_times(run_dir: Path, stage: str) -> dict[str, int]:
    return {p.stem: p.stat().st_mtime_ns for p in RunLayout(run_dir).marker_dir(stage).glob("*.json")}


def ledger_by_url(run_dir: Path) -> pd.DataFrame:
    return read_ledger(run_dir).set_index("url")


def test_retry_fetches_only_the_transient_failures_and_redoes_what_they_change(
    served_world: ServedWorld,
    flaky_server: FlakyServer,
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    table = crawl(served_world, flaky_server, tmp_path / "crawl.parquet")
    hosts = [served_world.server.base_url.removeprefix("http://"), flaky_server.base_url.removeprefix("http://")]
    pipeline = served_world.pipeline(tmp_path, output=tmp_path / "run", download={"allow_hosts": hosts})
    settings = [*full_pipeline_overrides(tiny_checkpoint), f"input.path={tmp_path / 'crawl.parquet'}"]
    first = run_pipeline(load_config(pipeline, settings))
    assert first.complete
    run_dir = tmp_path / "run"
    flaky_urls = [url for url in table.url if "/flaky" in url]
    hang_urls = [url for url in table.url if "/hang/" in url]
    before = ledger_by_url(run_dir)
    assert (before.loc[flaky_urls, "reason"] == "http_503").all() and (
        before.loc[hang_urls, "reason"] == "timeout"
    ).all()
    opt_out_urls = [url for url in table.url if "/optout/" in url]
    assert len(opt_out_urls) == 1 and (before.loc[opt_out_urls, "reason"] == "opt_out").all()
    kept_before = int((before.status == "kept").sum())
    hits, embedded, downloaded = (
        image_hits(served_world, flaky_server),
        marker_times(run_dir, "embed"),
        marker_times(run_dir, "download"),
    )
    filtered = marker_times(run_dir, "filter")

    retried = curate(capsys, "retry", str(run_dir), "--no-progress")
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert "retry 1: 5 of 8 rows fetched (2 shards)" in retried.stdout

    # exactly one more GET for each retried URL (the five that now answer, the one that fails twice, the two
    # that hang), and none for anything else: successes, 404s
    again = image_hits(served_world, flaky_server) - hits
    retried_paths = [f"flaky{u.removeprefix(flaky_server.base_url)}" for u in flaky_urls]
    retried_paths += [f"world{u.removeprefix(served_world.server.base_url)}" for u in hang_urls]
    assert again == collections.Counter(dict.fromkeys(retried_paths, 1))

    after = ledger_by_url(run_dir)
    assert len(after) == len(table)
    once = [u for u in flaky_urls if "/flaky1/" in u]
    twice = [u for u in flaky_urls if "/flaky2/" in u]
    assert (after.loc[once, "status"] == "kept").all() and (after.loc[once, "stage"] == "dedup").all()
    for detail in after.loc[once, "detail"]:
        assert detail.startswith("fetched on retry 1 | first run: http_503"), detail
    for url in [*twice, *hang_urls]:
        assert after.loc[url, "status"] == "failed"
    assert after.loc[twice[0], "detail"].startswith("retry 1: http_503 (")
    for detail in after.loc[hang_urls, "detail"]:
        assert detail.startswith("retry 1: timeout") and "| first run: timeout" in detail, detail
    unchanged = [u for u in table.url if u not in flaky_urls and u not in hang_urls]
    assert after.loc[unchanged, ["status", "reason", "detail"]].equals(
        before.loc[unchanged, ["status", "reason", "detail"]]
    )
    assert int((after.status == "kept").sum()) == kept_before + 5
    curated = CuratedOutputs(run_dir)
    assert (
        len(np.load(curated.uids_path)) == kept_before + 5 == sum(json.loads(curated.sizes_path.read_text()).values())
    )

    # the shard without retryable failures was neither downloaded nor embedded again
    assert marker_times(run_dir, "embed")["00000"] == embedded["00000"]
    assert marker_times(run_dir, "download")["00000"] == downloaded["00000"]
    assert all(marker_times(run_dir, "embed")[s] != embedded[s] for s in ("00001", "00002"))
    # the filter and every later stage are redone in full: one new sample can move a run-wide decision
    assert filtered and all(marker_times(run_dir, "filter")[s] != t for s, t in filtered.items())
    # a retried shard's tar: its earlier samples and the new ones, under the keys of img2dataset's first pass
    tar = DownloadOutputs(run_dir).tar_path("00002")
    keys = [sample.key for sample in index_tar(tar).samples]
    assert len(keys) == len(set(keys)) == len(list(iter_samples(tar, read=())))
    results = pd.read_parquet(DownloadOutputs(run_dir).results_path("00002")).set_index("uid")
    assert all(results.loc[s.uid, "key"] == s.key == s.meta["key"] for s in iter_samples(tar, read=()))
    assert [a["shards"] for a in DownloadOutputs(run_dir).retry_attempts()] == [{"00001": 4, "00002": 4}]

    # the family token; timeouts are not asked for this time
    hits = image_hits(served_world, flaky_server)
    second = curate(capsys, "retry", str(run_dir), "--reasons", "http_5xx", "--no-progress")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "retry 2: 1 of 1 rows fetched (1 shards)" in second.stdout
    assert image_hits(served_world, flaky_server) - hits == collections.Counter({retried_paths[5]: 1})
    detail = ledger_by_url(run_dir).loc[twice[0], "detail"]
    assert detail.startswith("fetched on retry 2 | retry 1: http_503 (") and "| first run: http_503" in detail

    hits = image_hits(served_world, flaky_server)
    # a drop is a decision, never a failure to cure: naming it fetches nothing
    nothing = curate(capsys, "retry", str(run_dir), "--reasons", "http_503,opt_out,robots_txt", "--no-progress")
    assert nothing.returncode == 0 and "nothing fetched" in nothing.stdout and "timeout 2" in nothing.stdout
    assert image_hits(served_world, flaky_server) == hits


def test_retry_refuses_a_run_whose_download_is_not_finished(
    served_world: ServedWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = served_world.pipeline(tmp_path, output=tmp_path / "run")  # input and download only
    assert run_pipeline(load_config(pipeline)).complete
    (RunLayout(tmp_path / "run").marker_path("download", "00001")).unlink()
    refused = curate(capsys, "retry", str(tmp_path / "run"), "--no-progress")
    assert refused.returncode == 1
    assert "download is not finished" in refused.stderr and "curate run" in refused.stderr
    bad = curate(capsys, "retry", str(tmp_path / "run"), "--reasons", "http 503")
    assert bad.returncode == 2 and "--reasons" in bad.stderr


def test_an_interrupted_retry_leaves_a_run_that_the_next_curate_run_completes(
    served_world: ServedWorld, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from curate.retry import RetryDownloadStage, retry
    from curate.stages.materialize import uid_array

    flaky = FlakyServer({f"n{i}.jpg": noise_jpeg(i) for i in range(6)})  # its own: GETs are counted per server
    thread = threading.Thread(target=flaky.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        table = crawl(served_world, flaky, tmp_path / "crawl.parquet")
        hosts = [served_world.server.base_url.removeprefix("http://"), flaky.base_url.removeprefix("http://")]
        pipeline = served_world.pipeline(tmp_path, output=tmp_path / "run", download={"allow_hosts": hosts})
        settings = [
            *full_pipeline_overrides(tiny_checkpoint),
            f"input.path={tmp_path / 'crawl.parquet'}",
            "download.processes=1",  # the retry tasks run in this process, where the interruption is planted
        ]
        assert run_pipeline(load_config(pipeline, settings)).complete
        run_dir = tmp_path / "run"
        kept_before = int((read_ledger(run_dir).status == "kept").sum())

        committed: list[str] = []
        real = RetryDownloadStage.process_shard

        def interrupted_after_one_shard(stage: Any, ctx: Any, shard: str, workdir: Path) -> Any:
            if committed:
                raise KeyboardInterrupt  # Ctrl-C during the second retried shard
            committed.append(shard)
            return real(stage, ctx, shard, workdir)

        monkeypatch.setattr(RetryDownloadStage, "process_shard", interrupted_after_one_shard)
        with pytest.raises(KeyboardInterrupt):
            retry(run_dir)
        monkeypatch.undo()
        layout = RunLayout(run_dir)
        assert committed == ["00001"] and layout.marker_path("download", "00001").exists()
        assert not layout.marker_path("download", "00002").exists()  # not committed: downloaded again in full

        resumed = run_pipeline(load_config(pipeline, settings))
        assert resumed.complete
        after = ledger_by_url(run_dir)
        assert len(after) == len(table) and after.uid.is_unique
        # 00001's two rows came back on the retry; 00002's three rows that failed once now answer on its new
        # download, and the one that fails twice fails again
        assert int((after.status == "kept").sum()) == kept_before + 5
        retried = [f"{flaky.base_url}/flaky1/n{i}.jpg" for i in (0, 1)]
        assert all(detail.startswith("fetched on retry 1") for detail in after.loc[retried, "detail"])
        assert after.loc[f"{flaky.base_url}/flaky2/n5.jpg", "status"] == "failed"
        kept = after.loc[after.status == "kept", "uid"].tolist()
        assert np.array_equal(np.load(CuratedOutputs(run_dir).uids_path), np.sort(uid_array(kept)))
    finally:
        flaky.shutdown()
        flaky.server_close()
