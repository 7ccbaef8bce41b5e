"""The input stage as tasks: per file (or parquet row-group range), per hash bucket, per shard.

The expected fates are computed here from the generated rows (first occurrence by file order, then row),
and every way of splitting the work (row-group ranges, bucket counts, worker processes, Dask) must give them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config import DaskConfig, PipelineConfig
from curate.ledger import read_fate_parts
from curate.pipeline import run_pipeline
from curate.runner import ShardFailed
from curate.stages.input import InputError, InputStage, inspect_sources, plan_file_tasks, string_hashes
from curate.stages.input.stage import WORK, WORK_PHASES
from tests.test_input import snapshot, table_bytes, uid_of

MakeConfig = Callable[..., PipelineConfig]
SHARD_SIZE = 23


def crawl_rows(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """Rows drawn from a small pool, so pairs repeat within and across files; some urls are not http."""
    rows = []
    for _ in range(n):
        url = f"http://h{rng.randrange(6)}.com/{rng.randrange(12)}.jpg" if rng.random() > 0.08 else "ftp://x.org/a.jpg"
        rows.append((url, f"caption {rng.randrange(5)}"))
    return rows


def write_crawl(folder: Path, seed: int = 0) -> list[tuple[Path, list[tuple[str, str]]]]:
    """Three files, listed in an order that is not their names' order: a parquet file of many row groups,
    a csv and a jsonl file."""
    rng = random.Random(seed)
    files = []
    for name, n in (("c.jsonl", 41), ("a.parquet", 130), ("b.csv", 57)):
        rows = crawl_rows(rng, n)
        path = folder / name
        columns = {"url": [u for u, _ in rows], "caption": [c for _, c in rows]}
        if name.endswith(".parquet"):
            pq.write_table(pa.table(columns), path, row_group_size=13)
        else:
            path.write_bytes(table_bytes(name, columns))
        files.append((path, rows))
    return files


def expected_fates(files: list[tuple[Path, list[tuple[str, str]]]]) -> list[dict[str, Any]]:
    """The fate of every row in input order: a pair seen at an earlier (file, row) is a repeat of that row."""
    first: dict[tuple[str, str], str] = {}
    fates = []
    for path, rows in files:
        for row, pair in enumerate(rows):
            uid = uid_of(path.name, row)
            if not pair[0].startswith("http"):
                fate = ("failed", "invalid_url", "not an http(s) url with a host")
            elif pair in first:
                fate = ("dropped", "dup_url_caption", first[pair])
            else:
                first[pair] = uid
                fate = ("kept", None, None)
            fates.append(
                {
                    "uid": uid,
                    "url": pair[0],
                    "caption": pair[1],
                    **dict(zip(("status", "reason", "detail"), fate, strict=True)),
                }
            )
    return fates


def outputs(output: Path) -> dict[str, Any]:
    """What the input stage leaves for the rest of the run: fates, shard rows, the manifest."""
    folder = output / "input"
    fates = read_fate_parts(sorted((folder / "fates").glob("*.parquet")))
    shards = {p.stem: pq.read_table(p).to_pylist() for p in sorted((folder / "shards").glob("*.parquet"))}
    manifest = json.loads((folder / "manifest.json").read_text())
    return {
        "fates": fates.select(["uid", "url", "caption", "status", "reason", "detail"]).to_pylist(),
        "shards": shards,
        "manifest": manifest,
    }


def working_files(output: Path) -> list[str]:
    """What the phases before the shards leave behind (removed once the stage is done)."""
    folder = output / "input"
    leftovers = [folder / WORK, *(folder / "_done" / phase for phase in WORK_PHASES)]
    return sorted(str(p) for p in leftovers if p.exists())


SPLITS = {
    "one task per file, one bucket": {},
    "row-group ranges, 5 buckets": {"task_rows": 30, "hash_buckets": 5},
    "one task per row group, 2 buckets, 2 processes": {"task_rows": 1, "hash_buckets": 2, "workers": 2},
}


@pytest.mark.parametrize("split", list(SPLITS))
def test_repeats_across_files_keep_the_first_by_file_order_and_row(
    tmp_path: Path, input_config: MakeConfig, split: str
) -> None:
    files = write_crawl(tmp_path)
    config = input_config([p for p, _ in files], shard_size=SHARD_SIZE, **SPLITS[split])
    tasks = plan_file_tasks(config.input, inspect_sources(config.input))
    assert len(tasks) == {"one task per file, one bucket": 3, "row-group ranges, 5 buckets": 6}.get(split, 12)

    result = run_pipeline(config)

    assert result.complete
    got, want = outputs(tmp_path / "run"), expected_fates(files)
    assert got["fates"] == want
    assert sum(f["reason"] == "dup_url_caption" for f in want) > 20  # the data repeats within and across files
    kept = [{k: f[k] for k in ("uid", "url", "caption")} for f in want if f["status"] == "kept"]
    assert [row for shard in got["shards"].values() for row in shard] == kept
    n = len(want)
    assert got["manifest"]["shards"] == [f"{i:05d}" for i in range(-(-n // SHARD_SIZE))]
    assert got["manifest"]["rows"] == n == result.rows
    fate_rows = [
        pq.read_metadata(tmp_path / "run" / "input" / "fates" / f"{s}.parquet").num_rows for s in got["shards"]
    ]
    assert fate_rows == [SHARD_SIZE] * (n // SHARD_SIZE) + [n % SHARD_SIZE]
    assert working_files(tmp_path / "run") == []


def test_the_split_does_not_change_the_run_and_a_rerun_does_nothing(tmp_path: Path, input_config: MakeConfig) -> None:
    files = [p for p, _ in write_crawl(tmp_path, seed=3)]
    whole = outputs_of(run_pipeline(input_config(files, shard_size=SHARD_SIZE, output=tmp_path / "whole")))
    split = input_config(files, shard_size=SHARD_SIZE, task_rows=20, hash_buckets=3, output=tmp_path / "split")
    assert outputs_of(run_pipeline(split)) == whole  # the manifest too: speed-only settings keep the fingerprint
    again = run_pipeline(
        input_config(files, shard_size=SHARD_SIZE, task_rows=7, hash_buckets=4, output=tmp_path / "split")
    )
    assert again.tasks_run == 0  # speed-only settings: the finished stage is not redone


def outputs_of(result: Any) -> dict[str, Any]:
    assert result.complete
    return outputs(result.layout.root)


def test_a_uid_repeated_across_files_is_refused_naming_the_earliest(tmp_path: Path, input_config: MakeConfig) -> None:
    first, second, third = tmp_path / "a.csv", tmp_path / "b.parquet", tmp_path / "c.jsonl"
    first.write_text("id,url,caption\nu0,http://a.com/0.jpg,zero\nearly,http://a.com/1.jpg,one\n")
    pq.write_table(
        pa.table(
            {"id": [f"v{i}" for i in range(5)] + ["late"], "url": ["http://a.com/2.jpg"] * 6, "caption": list("abcdef")}
        ),
        second,
        row_group_size=2,
    )
    third.write_text(
        "".join(
            json.dumps({"id": uid, "url": "http://a.com/3.jpg", "caption": "c"}) + "\n"
            for uid in ("late", "w1", "w2", "early")
        )
    )
    good = tmp_path / "good.csv"
    good.write_text("id,url,caption\nk,http://a.com/k.jpg,k\n")
    output = tmp_path / "run"
    assert run_pipeline(input_config(good, uid_col="id", output=output)).complete
    before = snapshot(output)

    buckets_of = string_hashes(pa.array(["early", "late"])) % 8
    assert buckets_of[1] < buckets_of[0]  # with 8 buckets, 'late' is found in an earlier bucket than 'early'
    for buckets in (1, 8):
        with pytest.raises(InputError) as caught:
            run_pipeline(
                input_config([first, second, third], uid_col="id", hash_buckets=buckets, task_rows=2, output=output)
            )
        assert str(caught.value) == (
            f"{first}: uid 'early' appears 2 times ({first} row 1, {third} row 3); uids must be unique"
        )
        assert snapshot(output) == before


def test_an_unreadable_later_file_leaves_the_previous_run_as_it_was(tmp_path: Path, input_config: MakeConfig) -> None:
    files = [p for p, _ in write_crawl(tmp_path)]
    output = tmp_path / "run"
    assert run_pipeline(input_config(files[:1], output=output, shard_size=SHARD_SIZE)).complete
    before = snapshot(output)
    broken = tmp_path / "z.jsonl"
    broken.write_text('{"url": "http://a.com/1.jpg", "caption": "one"}\n{"url": "http://a.com/2.jpg", "cap\n')

    config = input_config([*files, broken], output=output, shard_size=SHARD_SIZE, task_rows=30, hash_buckets=3)
    with pytest.raises(InputError, match=r"z\.jsonl: line 2 is not valid JSON"):
        run_pipeline(config)

    assert snapshot(output) == before


def test_a_run_stopped_in_the_shard_phase_resumes_where_it_stopped(
    tmp_path: Path, input_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = write_crawl(tmp_path)
    config = input_config([p for p, _ in files], shard_size=SHARD_SIZE, task_rows=30, hash_buckets=3)
    read_files: list[str] = []
    written: list[str] = []
    real_read, real_write = InputStage._read_file, InputStage._write_shard

    def read_file(self: InputStage, ctx: Any, task: str, workdir: Path) -> Any:
        read_files.append(task)
        return real_read(self, ctx, task, workdir)

    def write_shard(self: InputStage, ctx: Any, shard: str, workdir: Path) -> pa.Table:
        if shard == "00004" and stopped:
            raise OSError("[Errno 28] No space left on device")
        written.append(shard)
        return real_write(self, ctx, shard, workdir)

    monkeypatch.setattr(InputStage, "_read_file", read_file)
    monkeypatch.setattr(InputStage, "_write_shard", write_shard)
    stopped = True
    with pytest.raises(ShardFailed, match="shard 00004"):
        run_pipeline(config)
    assert len(read_files) == 6 and written == ["00000", "00001", "00002", "00003"]  # in order, in this process

    stopped = False
    read_files.clear()
    written.clear()
    result = run_pipeline(config)

    assert result.complete
    assert read_files == []  # the files are not read again, the done shards not redone
    assert written == ["00004", "00005", "00006", "00007", "00008", "00009"]
    assert outputs(tmp_path / "run")["fates"] == expected_fates(files)
    assert working_files(tmp_path / "run") == []


def test_a_dask_local_cluster_gives_the_same_input_as_the_local_executor(
    tmp_path: Path, input_config: MakeConfig
) -> None:
    from curate.executors.dask import DaskExecutor

    files = write_crawl(tmp_path, seed=5)
    settings = {"shard_size": SHARD_SIZE, "task_rows": 30, "hash_buckets": 4}
    local = outputs_of(run_pipeline(input_config([p for p, _ in files], output=tmp_path / "local", **settings)))
    executor = DaskExecutor(DaskConfig(n_workers=2, dashboard_address=":0"))
    try:
        dask = outputs_of(
            run_pipeline(input_config([p for p, _ in files], output=tmp_path / "dask", **settings), executor=executor)
        )
    finally:
        executor.close()
    assert dask == local
    assert local["fates"] == expected_fates(files)


def test_kept_columns_take_one_type_over_every_task(tmp_path: Path, input_config: MakeConfig) -> None:
    """A kept column stored as int64 in one file's row groups (one of them all null) and as float in another
    file is float64 in every shard, whichever task read which rows."""
    ints = tmp_path / "a.parquet"
    sizes = [None] * 5 + list(range(10))
    urls = [f"http://a.com/{i}.jpg" for i in range(15)]
    pq.write_table(
        pa.table({"url": urls, "caption": ["c"] * 15, "size": pa.array(sizes, pa.int64())}), ints, row_group_size=5
    )
    floats = tmp_path / "b.jsonl"
    floats.write_text(
        "".join(json.dumps({"url": f"http://b.com/{i}.jpg", "caption": "c", "size": i + 0.5}) + "\n" for i in range(4))
    )
    config = input_config([ints, floats], keep_columns=["size"], shard_size=4, task_rows=5, hash_buckets=2)
    assert len(plan_file_tasks(config.input, inspect_sources(config.input))) == 4

    assert run_pipeline(config).complete

    folder = tmp_path / "run" / "input"
    parts = [pq.read_table(p) for p in sorted((folder / "columns").glob("*.parquet"))]
    assert {str(part.schema.field("size").type) for part in parts} == {"double"}
    assert [v for part in parts for v in part["size"].to_pylist()] == [*sizes, 0.5, 1.5, 2.5, 3.5]
    assert json.loads((folder / "manifest.json").read_text())["keep_columns"] == {"size": "double"}
