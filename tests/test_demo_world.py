from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from examples.demo_world import (
    KINDS,
    TRUTH_COLUMNS,
    DemoServer,
    World,
    classes,
    generate_world,
    input_table,
    kind_counts,
    load_world,
    write_input_table,
)

N_BASE = 40
SEED = 7
SLOW_DELAY_S = 0.3
HANG_S = 3.0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return generate_world(tmp_path_factory.mktemp("world"), n_base=N_BASE, seed=SEED)


@pytest.fixture(scope="module")
def server(world: World):
    with DemoServer(world.root, slow_delay_s=SLOW_DELAY_S, hang_s=HANG_S) as running:
        yield running


@pytest.fixture(scope="module")
def by_key(world: World) -> pd.DataFrame:
    return world.truth.set_index("row_key", drop=False)


def first_of_kind(world: World, kind: str) -> pd.Series:
    return world.truth[world.truth["kind"] == kind].iloc[0]


def fetch(url: str, timeout: float = 2.0) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, dict(response.headers), response.read()


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def decode_rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_every_kind_has_at_least_two_rows_at_default_size() -> None:
    counts = kind_counts(600)
    assert set(counts) == set(KINDS)
    assert min(counts.values()) >= 2
    assert counts["clean"] + counts["mismatch"] == 600
    assert counts["mismatch"] == pytest.approx(0.3 * 600, abs=1)


def test_generated_kind_counts_match_plan(world: World) -> None:
    assert world.kind_counts() == kind_counts(N_BASE)
    assert min(world.kind_counts().values()) >= 2
    assert len(world.truth) == sum(kind_counts(N_BASE).values())


def test_truth_schema(world: World) -> None:
    truth = world.truth
    assert list(truth.columns) == list(TRUTH_COLUMNS)
    assert truth["row_key"].is_unique
    assert set(truth["kind"]) == set(KINDS)
    assert set(truth["shape"].dropna()) <= set(classes())
    no_image = truth["kind"].isin(["http_404", "corrupt", "invalid_url"])
    assert truth.loc[no_image, ["shape", "color", "count", "width", "height"]].isna().all().all()
    assert truth.loc[~no_image, ["shape", "color", "count", "width", "height"]].notna().all().all()
    is_dup = truth["kind"].isin(["dup_exact", "dup_near", "dup_url_caption"])
    assert truth.loc[is_dup, "dup_of"].notna().all()
    assert truth.loc[~is_dup, "dup_of"].isna().all()


def test_generation_is_deterministic_and_idempotent(world: World, tmp_path: Path) -> None:
    again = generate_world(tmp_path / "again", n_base=N_BASE, seed=SEED)
    pd.testing.assert_frame_equal(world.truth, again.truth)
    assert file_digests(world.root) == file_digests(again.root)

    before = file_digests(again.root)
    generate_world(again.root, n_base=N_BASE, seed=SEED)
    assert file_digests(again.root) == before


def test_different_seed_gives_different_world(world: World, tmp_path: Path) -> None:
    other = generate_world(tmp_path / "other", n_base=N_BASE, seed=SEED + 1)
    assert world.truth["caption"].tolist() != other.truth["caption"].tolist()


def test_captions_tell_the_truth_except_for_planted_lies(world: World) -> None:
    truth = world.truth
    truthful = truth[~truth["kind"].isin(["mismatch", "junk_caption"])]
    pairs = zip(truthful["caption"], truthful["caption_shape"], truthful["caption_color"], strict=True)
    for caption, shape, color in pairs:
        assert shape in caption.lower() and color in caption.lower()
    has_image = truthful["shape"].notna()
    assert (truthful.loc[has_image, "caption_shape"] == truthful.loc[has_image, "shape"]).all()
    assert (truthful.loc[has_image, "caption_color"] == truthful.loc[has_image, "color"]).all()

    mismatch = truth[truth["kind"] == "mismatch"]
    assert (mismatch["caption_shape"] != mismatch["shape"]).all()
    assert (mismatch["caption_color"] != mismatch["color"]).all()

    junk = truth[truth["kind"] == "junk_caption"]
    assert junk[["caption_shape", "caption_color"]].isna().all().all()


def test_served_files_decode_to_truth_size(world: World) -> None:
    truth = world.truth
    for row in truth[truth["width"].notna()].itertuples():
        with Image.open(world.files_dir / row.url_path) as image:
            assert image.size == (row.width, row.height)
    tiny = truth[truth["kind"] == "tiny"]
    assert (np.minimum(tiny["width"], tiny["height"]) < 64).all()
    others = truth[truth["width"].notna() & (truth["kind"] != "tiny")]
    assert (np.minimum(others["width"], others["height"]) >= 64).all()


def test_corrupt_files_do_not_decode(world: World) -> None:
    for url_path in world.truth.loc[world.truth["kind"] == "corrupt", "url_path"]:
        with pytest.raises(OSError):
            Image.open(world.files_dir / url_path).load()


def test_exact_duplicates_are_byte_identical(world: World, by_key: pd.DataFrame) -> None:
    for row in world.truth[world.truth["kind"] == "dup_exact"].itertuples():
        original = by_key.loc[row.dup_of]
        assert original["kind"] == "clean"
        assert row.url_path != original["url_path"]
        assert (world.files_dir / row.url_path).read_bytes() == (world.files_dir / original["url_path"]).read_bytes()


def test_near_duplicates_differ_in_bytes_but_look_alike(world: World, by_key: pd.DataFrame) -> None:
    for row in world.truth[world.truth["kind"] == "dup_near"].itertuples():
        original_path = world.files_dir / by_key.loc[row.dup_of, "url_path"]
        near_bytes = (world.files_dir / row.url_path).read_bytes()
        assert near_bytes != original_path.read_bytes()
        original = decode_rgb(original_path.read_bytes())
        near = decode_rgb(near_bytes).resize(original.size, Image.Resampling.BILINEAR)
        mean_abs_diff = np.abs(np.asarray(original, float) - np.asarray(near, float)).mean()
        assert mean_abs_diff < 8.0


def test_dup_url_caption_repeats_an_earlier_pair(world: World) -> None:
    truth = world.truth.reset_index(drop=True)
    position = {key: i for i, key in enumerate(truth["row_key"])}
    for i, row in truth[truth["kind"] == "dup_url_caption"].iterrows():
        original = truth.loc[position[row["dup_of"]]]
        assert position[row["dup_of"]] < i
        assert (row["url_path"], row["caption"]) == (original["url_path"], original["caption"])
    others = truth[truth["kind"] != "dup_url_caption"]
    assert not others.duplicated(["url_path", "caption"]).any()


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_write_input_table_round_trips(world: World, tmp_path: Path, fmt: str) -> None:
    base_url = "http://127.0.0.1:9"
    path = write_input_table(world, base_url, tmp_path / f"table.{fmt}", fmt=fmt)
    if fmt == "parquet":
        table = pd.read_parquet(path)
    elif fmt == "jsonl":
        table = pd.DataFrame([json.loads(line) for line in path.read_text().splitlines()])
    else:
        table = pd.read_csv(path, sep="," if fmt == "csv" else "\t", keep_default_na=False, dtype=str)
    assert list(table.columns) == ["url", "caption"]
    pd.testing.assert_frame_equal(table, input_table(world, base_url))
    invalid = world.truth["kind"] == "invalid_url"
    assert (table.loc[invalid, "url"] == world.truth.loc[invalid, "url_path"]).all()
    assert table.loc[~invalid, "url"].str.startswith(base_url + "/").all()


def test_load_world_reads_back_truth(world: World) -> None:
    pd.testing.assert_frame_equal(load_world(world.root).truth, world.truth)


def test_server_serves_clean_image_and_counts_hits(world: World, server: DemoServer) -> None:
    row = first_of_kind(world, "clean")
    url = f"{server.base_url}/{row['url_path']}"
    hits_before = server.hits[f"/{row['url_path']}"]
    status, headers, body = fetch(url)
    fetch(url)
    assert status == 200
    assert headers["Content-Type"] in ("image/jpeg", "image/png")
    assert int(headers["Content-Length"]) == len(body)
    assert decode_rgb(body).size == (row["width"], row["height"])
    assert server.hits[f"/{row['url_path']}"] == hits_before + 2


def test_server_returns_404_for_missing_path(world: World, server: DemoServer) -> None:
    row = first_of_kind(world, "http_404")
    with pytest.raises(urllib.error.HTTPError) as error:
        fetch(f"{server.base_url}/{row['url_path']}")
    assert error.value.code == 404
    assert server.hits[f"/{row['url_path']}"] >= 1
    with pytest.raises(urllib.error.HTTPError):
        fetch(f"{server.base_url}/img/../truth.parquet")


def test_server_marks_opt_out(world: World, server: DemoServer) -> None:
    row = first_of_kind(world, "opt_out")
    status, headers, body = fetch(f"{server.base_url}/{row['url_path']}")
    assert status == 200
    assert headers["X-Robots-Tag"] == "noai"
    assert decode_rgb(body).size == (row["width"], row["height"])
    clean = first_of_kind(world, "clean")
    assert "X-Robots-Tag" not in fetch(f"{server.base_url}/{clean['url_path']}")[1]


def test_server_serves_corrupt_bytes_as_jpeg(world: World, server: DemoServer) -> None:
    row = first_of_kind(world, "corrupt")
    status, headers, body = fetch(f"{server.base_url}/{row['url_path']}")
    assert status == 200
    assert headers["Content-Type"] == "image/jpeg"
    with pytest.raises(OSError):
        Image.open(io.BytesIO(body)).load()


def test_server_slow_path_arrives_late_but_within_timeout(world: World, server: DemoServer) -> None:
    row = first_of_kind(world, "slow")
    started = time.monotonic()
    status, _, body = fetch(f"{server.base_url}/{row['url_path']}", timeout=2.0)
    assert status == 200
    assert time.monotonic() - started >= SLOW_DELAY_S
    assert decode_rgb(body).size == (row["width"], row["height"])


def test_server_hang_path_times_out(world: World, server: DemoServer) -> None:
    row = first_of_kind(world, "timeout")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        fetch(f"{server.base_url}/{row['url_path']}", timeout=0.5)
    assert time.monotonic() - started < HANG_S


def test_server_handles_many_concurrent_requests(world: World, server: DemoServer) -> None:
    rows = world.truth[world.truth["kind"].isin(["clean", "mismatch", "junk_caption"])].head(48)
    urls = [f"{server.base_url}/{path}" for path in rows["url_path"]] * 2
    with ThreadPoolExecutor(max_workers=48) as pool:
        statuses = list(pool.map(lambda url: fetch(url)[0], urls))
    assert statuses == [200] * len(urls)


def test_stop_returns_promptly_with_hanging_request(world: World) -> None:
    row = first_of_kind(world, "timeout")
    server = DemoServer(world.root, hang_s=30.0).start()
    url = f"{server.base_url}/{row['url_path']}"
    client_errors: list[BaseException] = []

    def hang_client() -> None:
        try:
            fetch(url, timeout=10.0)
        except Exception as error:
            client_errors.append(error)

    client = threading.Thread(target=hang_client, daemon=True)
    client.start()
    deadline = time.monotonic() + 2.0
    while server.hits[f"/{row['url_path']}"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.hits[f"/{row['url_path']}"] == 1

    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2.0
    client.join(timeout=2.0)
    assert not client.is_alive()
    assert client_errors


def test_server_requires_generated_world(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        DemoServer(tmp_path).start()
