"""CLIP search over the curated set: the saved index, text/image/uid queries, the CLI, the HTTP API, and the
search page in a real headless Chromium."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import yaml
from PIL import Image

from curate.cli import main
from curate.ledger import read_ledger
from curate.search import RunSearch, SearchError, make_index, search_dir
from curate.serve import SearchServer, make_server
from curate.stage import RunLayout
from curate.stages.materialize import uid_array
from examples.demo_world import classes, colors
from tests.browser import BROKEN_IMAGES_JS, Browser
from tests.run_fixtures import CuratedRun

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def search(curated_run: CuratedRun) -> RunSearch:
    return RunSearch(curated_run.root)


@pytest.fixture(scope="module")
def server(curated_run: CuratedRun) -> Iterator[SearchServer]:
    server = make_server(curated_run.root, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def kept_uids(run: CuratedRun) -> set[str]:
    ledger = read_ledger(run.root)
    return set(ledger.loc[ledger.status == "kept", "uid"])


def curated_image(run: CuratedRun, uid: str) -> bytes:
    for tar_path in sorted((run.root / "curated").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
            if f"{uid}.jpg" in names:
                return tar.extractfile(f"{uid}.jpg").read()  # type: ignore[union-attr]
    raise KeyError(uid)


def get(server: SearchServer, path: str) -> tuple[int, bytes, str]:
    try:
        with NO_PROXY.open(server.url.rstrip("/") + path, timeout=30) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers["Content-Type"]


# ---- the index


def test_index_holds_exactly_the_curated_images(search: RunSearch, curated_run: CuratedRun):
    folder = search_dir(search.layout)
    assert {p.name for p in folder.iterdir()} >= {"index.faiss", "items.parquet", "meta.json"}
    uids = search.index.uids
    assert len(uids) == len(set(uids)) == search.index.index.ntotal
    assert set(uids) == kept_uids(curated_run)
    np.testing.assert_array_equal(uid_array(uids), np.load(curated_run.root / "curated" / "uids.npy"))
    assert all(tar.startswith("curated/") for tar in search.index.items["tar"].to_pylist())


def test_index_is_reused_and_rebuilt_when_the_run_changes(search: RunSearch, curated_run: CuratedRun):
    index_file = search_dir(search.layout) / "index.faiss"
    built = index_file.stat().st_mtime_ns
    RunSearch(curated_run.root)
    assert index_file.stat().st_mtime_ns == built, "a fresh index was rebuilt"
    ledger = curated_run.root / "ledger.parquet"
    stat = ledger.stat()
    os.utime(ledger, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # as if `curate run` rewrote it
    try:
        rebuilt = RunSearch(curated_run.root)
        assert index_file.stat().st_mtime_ns != built
        assert len(rebuilt.index) == len(search.index)
    finally:
        os.utime(ledger, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_ivf_index_for_large_sets_finds_the_same_vector():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(600, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = make_index(vectors, flat_limit=100)
    assert type(index).__name__ == "IndexIVFFlat"
    index.nprobe = 8
    _, rows = index.search(vectors[:20], 1)
    assert (rows[:, 0] == np.arange(20)).mean() >= 0.9


def test_search_needs_a_finished_embedded_run(curated_run: CuratedRun, tmp_path: Path):
    shutil.copy(curated_run.root / "config.yaml", tmp_path / "config.yaml")
    with pytest.raises(SearchError, match="finish the run first"):
        RunSearch(tmp_path)
    shutil.copy(curated_run.root / "ledger.parquet", tmp_path / "ledger.parquet")
    with pytest.raises(SearchError, match="no embeddings"):
        RunSearch(tmp_path)


# ---- queries


def test_image_query_finds_that_image_first(search: RunSearch, curated_run: CuratedRun):
    uid = sorted(kept_uids(curated_run))[0]
    hits = search.image(curated_image(curated_run, uid), k=5)
    # the tiny demo model can give other images of the same scene the same embedding: ties are allowed
    assert hits[0].score == pytest.approx(1.0, abs=5e-3)  # embeddings are stored as float16
    assert uid in [h.uid for h in hits if h.score >= hits[0].score - 1e-3]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    similar = search.similar(uid, k=3)
    assert uid in [h.uid for h in similar if h.score >= similar[0].score - 1e-3]


def test_text_query_returns_k_ranked_curated_hits(search: RunSearch, curated_run: CuratedRun):
    hits = search.text("a red circle on a blue background", k=8)
    assert len(hits) == 8
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert {h.uid for h in hits} <= kept_uids(curated_run)
    assert all(-1.0001 <= h.score <= 1.0001 and h.caption for h in hits)
    assert len(search.text("a star", k=10_000)) == len(search.index)


def precision_at_5(search: RunSearch, run: CuratedRun, column: str, names: list[str]) -> dict[str, float]:
    precision = {}
    for name in names:
        hits = search.text(name, k=5)
        precision[name] = float(np.mean([run.truth.loc[h.uid, column] == name for h in hits]))
    return precision


def test_colour_names_find_images_of_that_colour(search: RunSearch, curated_run: CuratedRun):
    if curated_run.scorer is None:
        pytest.skip("no trained demo scorer (runs/demo-scorer): with random weights rankings mean nothing")
    curated = curated_run.truth.loc[search.index.uids]
    present = [c for c in colors() if (curated["color"] == c).sum() >= 5]  # P@5 needs five to find
    precision = precision_at_5(search, curated_run, "color", present)
    assert np.mean(list(precision.values())) >= 0.8, precision


def test_shape_names_find_images_of_that_shape(search: RunSearch, curated_run: CuratedRun):
    if curated_run.scorer is None:
        pytest.skip("no trained demo scorer (runs/demo-scorer): with random weights rankings mean nothing")
    curated = curated_run.truth.loc[search.index.uids]
    present = [s for s in classes() if (curated["shape"] == s).sum() >= 5]
    precision = precision_at_5(search, curated_run, "shape", present)
    assert np.mean(list(precision.values())) >= 0.8, precision


# ---- command line


def test_search_cli_prints_hits_and_writes_a_gallery(curated_run: CuratedRun, tmp_path: Path, capsys):
    gallery = tmp_path / "gallery.html"
    assert main(["search", str(curated_run.root), "a red circle", "-k", "4", "--html", str(gallery)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    hit_lines = [line for line in lines if not line.startswith("gallery:")]
    assert len(hit_lines) == 4
    kept = kept_uids(curated_run)
    assert all(line.split()[2] in kept for line in hit_lines)
    assert all("http://127.0.0.1" in line for line in hit_lines)  # url column
    page = gallery.read_text()
    assert page.count('src="data:image/jpeg;base64,') == 4

    assert main(["search", str(curated_run.root), "red", "-k", "2", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [set(hit) for hit in document["results"]] == [{"uid", "score", "caption", "url", "clip_score"}] * 2


def test_search_cli_by_image_and_errors(curated_run: CuratedRun, tmp_path: Path, capsys):
    uid = sorted(kept_uids(curated_run))[1]
    query = tmp_path / "query.png"
    Image.open(io.BytesIO(curated_image(curated_run, uid))).save(query)
    assert main(["search", str(curated_run.root), "--image", str(query), "-k", "5", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert results[0]["score"] == pytest.approx(1.0, abs=5e-3)
    assert uid in [r["uid"] for r in results if r["score"] >= results[0]["score"] - 1e-3]
    assert main(["search", str(curated_run.root)]) == 2
    assert main(["search", str(curated_run.root), "--image", str(tmp_path / "missing.jpg")]) == 2
    assert main(["search", str(tmp_path), "red"]) == 1
    assert "not a curate run" in capsys.readouterr().err


# ---- HTTP API


def test_api_search_and_images(server: SearchServer, curated_run: CuratedRun):
    status, body, content_type = get(server, "/api/search?q=a+red+circle&k=5")
    assert status == 200 and content_type == "application/json"
    results = json.loads(body)["results"]
    assert len(results) == 5 and {r["uid"] for r in results} <= kept_uids(curated_run)
    status, image, content_type = get(server, results[0]["image"])
    assert status == 200 and content_type == "image/jpeg"
    assert image == curated_image(curated_run, results[0]["uid"])
    status, body, _ = get(server, f"/api/similar?uid={results[0]['uid']}&k=2")
    assert json.loads(body)["results"][0]["uid"] == results[0]["uid"]

    assert get(server, "/api/search?q=red&k=0")[0] == 400
    assert get(server, "/api/search?k=3")[0] == 400
    assert get(server, "/api/similar?uid=nope")[0] == 400
    assert get(server, "/image/nope")[0] == 404
    assert get(server, "/nothing-here")[0] == 404


# ---- the page, in a real browser


def test_search_page_in_chromium(server: SearchServer, curated_run: CuratedRun, chromium: str, tmp_path: Path):
    query = "red" if curated_run.scorer is not None else "a red circle"
    with Browser(chromium) as browser:
        browser.open(server.url)
        browser.evaluate(
            f"document.getElementById('query').value = {json.dumps(query)};"
            "document.getElementById('k').value = '8';"
            "document.getElementById('q').requestSubmit();"
        )
        browser.wait_until("document.body.dataset.done === '1'")
        browser.wait_until("Array.from(document.images).every(img => img.complete)")
        shown = browser.evaluate("Array.from(document.querySelectorAll('#results figure')).map(f => f.dataset.uid)")
        broken = browser.evaluate(BROKEN_IMAGES_JS)
        status = browser.evaluate("document.getElementById('status').textContent")
        browser.screenshot(tmp_path / "search.png")
        errors = browser.errors
    assert not errors, errors
    assert not broken, broken
    assert len(shown) == 8 and "8 results" in status
    expected = [r["uid"] for r in json.loads(get(server, f"/api/search?q={quote(query)}&k=8")[1])["results"]]
    assert shown == expected
    if curated_run.scorer is not None:
        top = [curated_run.truth.loc[uid, "color"] for uid in shown[:5]]
        assert top.count("red") >= 4, top


def test_a_run_with_validation_searches_the_rows_its_last_fate_stage_kept(curated_run: CuratedRun, tmp_path: Path):
    from curate.search import last_fate_stage

    config = yaml.safe_load((curated_run.root / "config.yaml").read_text())
    assert last_fate_stage(RunLayout(curated_run.root)) == "dedup"
    config["stages"] = [*config["stages"], "validate"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert last_fate_stage(RunLayout(tmp_path)) == last_fate_stage(RunLayout(curated_run.root))
