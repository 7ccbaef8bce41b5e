"""The input stage reading `input.path` from a bucket (moto's S3 server on loopback): the same fates, uids,
shards and fingerprint as the same files read from disk; a missing object or bucket is one line, nothing
written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from curate.config import PipelineConfig, validate_config
from curate.pipeline import run_pipeline
from curate.stages.input import InputError
from tests.s3_fixtures import S3Bucket
from tests.test_input import FORMAT_FILES, STANDARD, write_table
from tests.test_input_tasks import SHARD_SIZE, outputs, write_crawl


def config_of(
    paths: str | list[str], output: Path, options: dict[str, Any] | None = None, **settings: Any
) -> PipelineConfig:
    raw: dict[str, Any] = {"output": str(output), "stages": ["input"], "input": {"path": paths, **settings}}
    if options is not None:
        raw["storage"] = {"options": options}
    return validate_config(raw)


def crawl_in_bucket(folder: Path, bucket: S3Bucket) -> tuple[list[Path], list[str]]:
    """write_crawl's three files (listed out of name order, a parquet file of many row groups), on disk and
    under crawl/ in the bucket."""
    folder.mkdir()
    local = [path for path, _ in write_crawl(folder, seed=5)]
    return local, [bucket.upload(path, f"crawl/{path.name}") for path in local]


SPLITS = {"one task per file": {}, "row-group ranges, 3 buckets": {"task_rows": 30, "hash_buckets": 3}}


@pytest.mark.parametrize("split", list(SPLITS))
def test_a_list_of_objects_reads_as_the_same_files_on_disk(s3_bucket: S3Bucket, tmp_path: Path, split: str) -> None:
    local, urls = crawl_in_bucket(tmp_path / "crawl", s3_bucket)
    settings = {"shard_size": SHARD_SIZE, **SPLITS[split]}
    on_disk = run_pipeline(config_of([str(p) for p in local], tmp_path / "disk", **settings))
    in_bucket = run_pipeline(config_of(urls, tmp_path / "bucket", s3_bucket.options, **settings))
    assert on_disk.complete and in_bucket.complete
    want, got = outputs(tmp_path / "disk"), outputs(tmp_path / "bucket")
    assert len(want["fates"]) == 41 + 130 + 57 and len(want["shards"]) > 1
    assert got == want  # fates, uids, shards, and the manifest with its fingerprint


def test_local_paths_and_urls_mix_in_one_input_path(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    local, urls = crawl_in_bucket(tmp_path / "crawl", s3_bucket)
    settings = {"shard_size": SHARD_SIZE}
    on_disk = run_pipeline(config_of([str(p) for p in local], tmp_path / "disk", **settings))
    mixed = run_pipeline(config_of([str(local[0]), *urls[1:]], tmp_path / "mixed", s3_bucket.options, **settings))
    assert on_disk.complete and mixed.complete
    assert outputs(tmp_path / "mixed") == outputs(tmp_path / "disk")


def test_a_glob_of_objects_and_every_format(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    folder = tmp_path / "formats"
    folder.mkdir()
    for name, header in FORMAT_FILES:
        s3_bucket.upload(write_table(folder, name, STANDARD, header), f"formats/{name}")
    on_disk = run_pipeline(config_of(str(folder / "*"), tmp_path / "disk"))
    in_bucket = run_pipeline(config_of(s3_bucket.url("formats/*"), tmp_path / "bucket", s3_bucket.options))
    assert on_disk.complete and in_bucket.complete
    want, got = outputs(tmp_path / "disk"), outputs(tmp_path / "bucket")
    assert len(want["fates"]) == len(FORMAT_FILES) * len(STANDARD)
    assert got == want


def test_a_crawl_moved_from_disk_to_a_bucket_redoes_nothing(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    local, urls = crawl_in_bucket(tmp_path / "crawl", s3_bucket)
    first = run_pipeline(config_of([str(p) for p in local], tmp_path / "run", shard_size=SHARD_SIZE))
    assert first.complete and first.tasks_run > 0
    moved = run_pipeline(config_of(urls, tmp_path / "run", s3_bucket.options, shard_size=SHARD_SIZE))
    assert moved.complete and moved.tasks_run == 0
    # other bytes under the same name are another input
    changed = write_table(tmp_path, local[2].name, STANDARD)
    s3_bucket.upload(changed, f"crawl/{changed.name}")
    again = run_pipeline(config_of(urls, tmp_path / "run", s3_bucket.options, shard_size=SHARD_SIZE))
    assert again.complete and again.tasks_run > 0


@pytest.mark.parametrize("missing", ["object", "bucket", "glob", "bucket glob"])
def test_a_missing_object_or_bucket_is_one_line_and_writes_nothing(
    s3_bucket: S3Bucket, tmp_path: Path, missing: str
) -> None:
    present = s3_bucket.upload(write_table(tmp_path, "a.csv", STANDARD), "crawl/a.csv")
    other_bucket = f"s3://{s3_bucket.name}-gone/crawl"
    path, message = {
        "object": (s3_bucket.url("crawl/b.csv"), f"{s3_bucket.url('crawl/b.csv')}: no such input file"),
        "bucket": (f"{other_bucket}/a.csv", f"{other_bucket}/a.csv: no such input file"),
        "glob": (s3_bucket.url("crawl/b-*.csv"), f"input.path: no file matches {s3_bucket.url('crawl/b-*.csv')!r}"),
        "bucket glob": (f"{other_bucket}/*.csv", f"input.path: no file matches '{other_bucket}/*.csv'"),
    }[missing]
    with pytest.raises(InputError) as error:
        run_pipeline(config_of([present, path], tmp_path / "run", s3_bucket.options))
    assert str(error.value) == message
    assert not (tmp_path / "run").exists()


def test_an_unreachable_endpoint_is_one_line_naming_the_url(tmp_path: Path) -> None:
    from tests.s3_fixtures import CREDENTIALS, free_port

    pytest.importorskip("s3fs")
    options = {**CREDENTIALS, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"}}
    options["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 2}
    with pytest.raises(InputError) as error:
        run_pipeline(config_of("s3://crawl/a.csv", tmp_path / "run", options))
    assert str(error.value).startswith("s3://crawl/a.csv: cannot read the input file: ")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_curate_run_reads_a_bucket_with_the_configs_storage_options(
    s3_bucket: S3Bucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from curate.cli import main

    url = s3_bucket.upload(write_table(tmp_path, "crawl.csv", STANDARD))
    pipeline = tmp_path / "pipeline.yaml"
    raw = {"output": str(tmp_path / "run"), "stages": ["input"], "input": {"path": url}}
    pipeline.write_text(yaml.safe_dump({**raw, "storage": {"options": s3_bucket.options}}))
    assert main(["run", str(pipeline), "--no-progress"]) == 0
    local = run_pipeline(config_of(str(tmp_path / "crawl.csv"), tmp_path / "local"))
    assert local.complete and outputs(tmp_path / "run") == outputs(tmp_path / "local")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["storage"]["options"]
    assert saved == {"client_kwargs": {"endpoint_url": s3_bucket.endpoint}}  # the key and secret stay out
    capsys.readouterr()
    assert main(["status", str(tmp_path / "run")]) == 0  # the run reopens from what it kept

    capsys.readouterr()
    missing = s3_bucket.url("gone.csv")
    assert main(["run", str(pipeline), "--no-progress", "--set", f"input.path={missing}"]) == 2
    assert capsys.readouterr().err == f"curate: error: {missing}: no such input file\n"


def test_dask_workers_read_the_bucket_with_the_configs_options(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    from curate.config import DaskConfig
    from curate.executors.dask import DaskExecutor

    local, urls = crawl_in_bucket(tmp_path / "crawl", s3_bucket)
    settings = {"shard_size": SHARD_SIZE, "task_rows": 30, "hash_buckets": 2}
    on_disk = run_pipeline(config_of([str(p) for p in local], tmp_path / "disk", **settings))
    executor = DaskExecutor(DaskConfig(n_workers=2, dashboard_address=":0"))
    try:
        on_dask = run_pipeline(config_of(urls, tmp_path / "dask", s3_bucket.options, **settings), executor=executor)
    finally:
        executor.close()
    assert on_disk.complete and on_dask.complete
    assert outputs(tmp_path / "dask") == outputs(tmp_path / "disk")


def test_file_urls_are_local_paths(tmp_path: Path) -> None:
    path = write_table(tmp_path, "crawl.csv", STANDARD)
    assert run_pipeline(config_of(f"file://{path}", tmp_path / "url")).complete
    assert run_pipeline(config_of(str(path), tmp_path / "path")).complete
    assert outputs(tmp_path / "url") == outputs(tmp_path / "path")
