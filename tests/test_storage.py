"""curate.io.storage against a real S3 API (moto's server on loopback) and fsspec's memory filesystem: the
same bytes read the same and identify the same wherever they lie; unusable URLs are one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from curate.config import ConfigError, validate_config
from curate.io.storage import LOCAL, Storage, StorageError, locate, name_of, protocol_of
from curate.stage import BLOCK, content_identity
from tests.s3_fixtures import S3Bucket


def test_locations_local_paths_stay_paths_and_urls_stay_urls(tmp_path: Path) -> None:
    assert locate(str(tmp_path / "a.csv")) == tmp_path / "a.csv"
    assert locate("~/a.csv") == Path.home() / "a.csv"
    assert locate(f"file://{tmp_path}/a.csv") == tmp_path / "a.csv"
    assert locate("s3://bucket/dir/a.csv") == "s3://bucket/dir/a.csv"
    assert (protocol_of("S3://b/k"), protocol_of("gs://b/k"), protocol_of("/x/y"), protocol_of("a:b")) == (
        "s3",
        "gs",
        None,
        None,
    )
    assert name_of("s3://bucket/dir/part-0.parquet") == name_of(tmp_path / "part-0.parquet") == "part-0.parquet"


def test_the_server_fixture_serves_a_bucket(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    local = tmp_path / "hello.txt"
    local.write_bytes(b"hello")
    url = s3_bucket.upload(local)
    assert url == f"s3://{s3_bucket.name}/hello.txt"
    storage = Storage(s3_bucket.options)
    with storage.open(url) as handle:
        assert handle.read() == b"hello"
    assert storage.size(url) == 5
    assert storage.info(s3_bucket.url("missing.txt")) is None


@pytest.mark.parametrize("size", [0, 10, BLOCK, BLOCK + 1, 3 * BLOCK + 17])
def test_content_identity_of_a_bucket_object_is_its_local_copys(s3_bucket: S3Bucket, tmp_path: Path, size: int) -> None:
    local = tmp_path / "part-0.parquet"
    local.write_bytes(os.urandom(size))
    url = s3_bucket.upload(local, "deep/er/part-0.parquet")
    storage = Storage(s3_bucket.options)
    assert storage.content_identity(url, "part-0.parquet") == content_identity(local, "part-0.parquet")
    assert storage.content_identity(url) == LOCAL.content_identity(local) == content_identity(local)
    if size > BLOCK:  # a change in the middle is not seen (by design); one in the last MiB is
        changed = bytearray(local.read_bytes())
        changed[-1] ^= 0xFF
        local.write_bytes(bytes(changed))
        assert storage.content_identity(s3_bucket.upload(local, "changed.parquet")) != storage.content_identity(url)


def test_glob_lists_objects_in_name_order(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    for name in ("part-1.csv", "part-0.csv", "other.tsv"):
        (tmp_path / name).write_text("url,caption\n")
        s3_bucket.upload(tmp_path / name, f"crawl/{name}")
    storage = Storage(s3_bucket.options)
    assert storage.glob(s3_bucket.url("crawl/part-*.csv")) == [
        (s3_bucket.url("crawl/part-0.csv"), True),
        (s3_bucket.url("crawl/part-1.csv"), True),
    ]
    assert storage.glob(s3_bucket.url("nothing-*.csv")) == []
    assert storage.glob(f"s3://no-such-bucket-{s3_bucket.name}/x-*.csv") == []
    # a new object is seen by the next listing in the same process
    (tmp_path / "part-2.csv").write_text("url,caption\n")
    s3_bucket.upload(tmp_path / "part-2.csv", "crawl/part-2.csv")
    assert len(storage.glob(s3_bucket.url("crawl/part-*.csv"))) == 3


def test_the_environment_alone_can_reach_the_server(
    s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.txt").write_bytes(b"abc")
    url = s3_bucket.upload(tmp_path / "a.txt")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    storage = Storage({"skip_instance_cache": True})  # a filesystem made under this environment
    assert storage.size(url) == 3


def test_memory_urls_go_through_fsspec() -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/curate-test/a.bin", b"x" * (BLOCK + 5))
    try:
        url = "memory://curate-test/a.bin"
        assert LOCAL.size(url) == BLOCK + 5
        assert LOCAL.glob("memory://curate-test/*.bin") == [("memory:///curate-test/a.bin", True)]
        assert LOCAL.content_identity(url)["size"] == BLOCK + 5
    finally:
        fs.rm("/curate-test", recursive=True)


def test_a_protocol_whose_package_is_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` now fails as if it were not installed
    with pytest.raises(ConfigError) as missing:
        LOCAL.size("s3://bucket/part-0.parquet")
    assert str(missing.value) == "s3://bucket/part-0.parquet: s3:// needs s3fs: pip install 'curate-pipeline[s3]'"


def test_another_protocol_whose_package_is_missing_names_that_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if gcsfs were not installed, whether or not it is
    with pytest.raises(StorageError) as missing:
        LOCAL.size("gs://bucket/part-0.parquet")
    message = str(missing.value)
    assert message.startswith("gs://bucket/part-0.parquet: gs:// needs a package that is not installed (")
    assert "gcsfs" in message and "\n" not in message


def test_an_unknown_protocol_is_one_line_naming_the_url() -> None:
    with pytest.raises(StorageError, match=r"^nosuch://b/k: unknown storage protocol 'nosuch'$"):
        LOCAL.size("nosuch://b/k")


def test_storage_options_are_a_config_section(tmp_path: Path) -> None:
    raw = {"output": str(tmp_path), "input": {"path": "s3://b/k.parquet"}}
    assert validate_config(raw).storage.options == {}
    options = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "anon": True}
    assert validate_config({**raw, "storage": {"options": options}}).storage.options == options
    with pytest.raises(ConfigError, match=r"unknown key 'storage.option' \(did you mean 'storage.options'\?\)"):
        validate_config({**raw, "storage": {"option": {}}})


def test_the_saved_config_leaves_out_credentials_at_any_depth(tmp_path: Path) -> None:
    import yaml

    from curate.config import dump_config

    options = {
        "key": "AKIA",
        "secret": "s",
        "token": "t",
        "profile": "crawl-reader",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "aws_session_token": "st"},
        "config_kwargs": {"proxies": [{"password": "p", "host": "proxy"}]},
    }
    raw = {"output": str(tmp_path), "input": {"path": "s3://b/k.parquet"}, "storage": {"options": options}}
    config = validate_config(raw)
    saved = yaml.safe_load(dump_config(config))["storage"]["options"]
    assert saved == {
        "profile": "crawl-reader",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
        "config_kwargs": {"proxies": [{"host": "proxy"}]},
    }
    assert config.storage.options == options  # the run itself still has them


def test_curate_cat_streams_objects_in_order_and_names_a_missing_one(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    first, second = os.urandom(BLOCK + 7), b"second"
    (tmp_path / "a.bin").write_bytes(first)
    (tmp_path / "b.bin").write_bytes(second)
    urls = [s3_bucket.upload(tmp_path / "a.bin"), s3_bucket.upload(tmp_path / "b.bin")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"AWS_ENDPOINT_URL": s3_bucket.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "x"}
    command = [sys.executable, "-m", "curate", "cat"]
    done = subprocess.run([*command, *urls, str(tmp_path / "b.bin")], capture_output=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == first + second + second

    missing = s3_bucket.url("no/such.tar")
    failed = subprocess.run([*command, urls[1], missing], capture_output=True, env=env, text=False)
    lines = failed.stderr.decode().strip().splitlines()
    assert failed.returncode == 1 and failed.stdout == second
    assert lines == [f"curate: error: {missing}: no such file or object"]


def test_curate_cat_takes_the_fsspec_options_the_environment_does_not_give(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    import json

    (tmp_path / "a.bin").write_bytes(b"from the bucket")
    url = s3_bucket.upload(tmp_path / "a.bin")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # no endpoint, no credentials
    command = [sys.executable, "-m", "curate", "cat", "--storage-options", json.dumps(s3_bucket.options), url]
    done = subprocess.run(command, capture_output=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"from the bucket"


def test_curate_cat_stops_quietly_when_its_reader_closes_the_pipe(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(os.urandom(8 * BLOCK))
    cat = subprocess.Popen(
        [sys.executable, "-m", "curate", "cat", str(tmp_path / "big.bin")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert cat.stdout is not None and cat.stderr is not None
    assert len(cat.stdout.read(1000)) == 1000
    cat.stdout.close()  # a trainer that has read enough
    assert cat.wait(timeout=60) == 0
    assert cat.stderr.read() == b""


def test_an_output_in_a_missing_bucket_is_a_config_error_before_any_work(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    from curate.pipeline import run_pipeline

    (tmp_path / "crawl.csv").write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a dog on grass\n")
    missing = f"s3://{s3_bucket.name}-missing/runs/demo"
    raw = {"output": missing, "stages": ["input"], "input": {"path": str(tmp_path / "crawl.csv")}}
    config = validate_config({**raw, "storage": {"options": s3_bucket.options}})
    with pytest.raises(ConfigError) as raised:
        run_pipeline(config)
    assert str(raised.value).splitlines() == [
        f"output: {missing}: cannot write there: FileNotFoundError: The specified bucket does not exist"
    ]
    assert not s3_bucket.fs.exists(f"{s3_bucket.name}-missing")
