"""The input stage: formats, uids, file-level errors that write nothing, row-level fates, shards, rebuilds."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config import PipelineConfig
from curate.ledger import read_fate_parts, read_ledger
from curate.pipeline import run_pipeline
from curate.stages.input import (
    InputError,
    decode_utf8,
    input_fingerprint,
    inspect_sources,
    read_manifest,
)

MakeConfig = Callable[..., PipelineConfig]

# The standard table every format must read the same way: (url, caption) -> (status, reason).
STANDARD = [
    ("http://example.com/a.jpg", "a red apple"),
    ("https://example.org/b.png?x=1", 'a cat, "sitting" on a mat'),
    ("http://example.com/a.jpg", "a red apple"),  # repeats row 0
    ("http://example.com/a.jpg", "a green apple"),  # same url, other caption: not a repeat
    ("ftp://example.com/c.jpg", "an ftp file"),
    ("https://例え.jp/ü.jpg", "ünïcödé 猫"),
    ("https://example.net/d.jpg", ""),
]
STANDARD_FATES = [
    ("kept", None),
    ("kept", None),
    ("dropped", "dup_url_caption"),
    ("kept", None),
    ("failed", "invalid_url"),
    ("kept", None),
    ("kept", None),
]


def uid_of(file_name: str, row: int) -> str:
    return hashlib.blake2b(f"{file_name}\x1f{row}".encode(), digest_size=16).hexdigest()


# ---------------------------------------------------------------- writing tables in every format


def table_bytes(name: str, columns: dict[str, list[Any]], header: bool = True) -> bytes:
    """`columns` encoded as the format `name` ends with (.parquet, .csv, .tsv, .jsonl, each maybe .gz)."""
    base = name.lower().removesuffix(".gz")
    if base.endswith(".parquet"):
        buffer = io.BytesIO()
        pq.write_table(pa.table(columns), buffer)
        data = buffer.getvalue()
    elif base.endswith(".csv"):
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        if header:
            writer.writerow(list(columns))
        writer.writerows(zip(*columns.values(), strict=True))
        data = text.getvalue().encode()
    elif base.endswith(".tsv"):
        lines = ["\t".join(columns)] if header else []
        lines += ["\t".join(map(str, row)) for row in zip(*columns.values(), strict=True)]
        data = ("\n".join(lines) + "\n").encode()
    elif base.endswith((".jsonl", ".json")):
        records = [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]
        data = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode()
    else:
        raise ValueError(name)
    return gzip.compress(data) if name.endswith(".gz") else data


def write_table(folder: Path, name: str, rows: list[tuple[Any, Any]], header: bool = True) -> Path:
    path = folder / name
    path.write_bytes(table_bytes(name, {"url": [r[0] for r in rows], "caption": [r[1] for r in rows]}, header))
    return path


def fates_of(output: Path) -> pa.Table:
    return read_fate_parts(sorted((output / "input" / "fates").glob("*.parquet")))


def shard_rows_of(output: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((output / "input" / "shards").glob("*.parquet")))


def run_input(config: PipelineConfig) -> pa.Table:
    result = run_pipeline(config)
    assert result.complete
    return fates_of(Path(config.output))


def decided(fates: pa.Table) -> list[tuple[str, str | None]]:
    return list(zip(fates["status"].to_pylist(), fates["reason"].to_pylist(), strict=True))


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` (hidden ones too) with the bytes of each file."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


# ---------------------------------------------------------------- formats


FORMAT_FILES = [
    ("crawl.parquet", True),
    ("crawl.csv", True),
    ("crawl.tsv", True),
    ("cc12m.tsv", False),  # CC12M: url<TAB>caption without a header, detected with input.header=auto
    ("crawl.jsonl", True),
    ("crawl.parquet.gz", True),
    ("crawl.csv.gz", True),
    ("crawl.tsv.gz", True),
    ("cc12m.tsv.gz", False),
    ("crawl.jsonl.gz", True),
]


@pytest.mark.parametrize(("name", "header"), FORMAT_FILES, ids=[n for n, _ in FORMAT_FILES])
def test_every_format_reads_the_same_rows(tmp_path: Path, input_config: MakeConfig, name: str, header: bool) -> None:
    path = write_table(tmp_path, name, STANDARD, header=header)
    fates = run_input(input_config(path, shard_size=3))

    assert fates["url"].to_pylist() == [url for url, _ in STANDARD]
    assert fates["caption"].to_pylist() == [caption for _, caption in STANDARD]
    assert decided(fates) == STANDARD_FATES
    uids = [uid_of(name, row) for row in range(len(STANDARD))]
    assert fates["uid"].to_pylist() == uids
    assert fates["detail"].to_pylist()[2] == uids[0]
    kept = shard_rows_of(tmp_path / "run")
    assert kept["uid"].to_pylist() == [uids[i] for i in (0, 1, 3, 5, 6)]
    assert kept["caption"].to_pylist() == [STANDARD[i][1] for i in (0, 1, 3, 5, 6)]


def test_inspect_sources_tells_formats_from_names(tmp_path: Path, input_config: MakeConfig) -> None:
    paths = [write_table(tmp_path, name, STANDARD) for name in ("a.parquet", "b.CSV", "c.tsv.gz", "d.json")]
    sources = inspect_sources(input_config(paths).input)
    assert [(s.path, s.format, s.gzipped) for s in sources] == [
        (paths[0], "parquet", False),
        (paths[1], "csv", False),
        (paths[2], "tsv", True),
        (paths[3], "jsonl", False),
    ]


def test_glob_reads_matching_files_in_name_order(tmp_path: Path, input_config: MakeConfig) -> None:
    write_table(tmp_path, "part-1.csv", STANDARD[3:])
    write_table(tmp_path, "part-0.csv", STANDARD[:3])
    fates = run_input(input_config(tmp_path / "part-*.csv"))
    assert fates["uid"].to_pylist() == [uid_of("part-0.csv", r) for r in range(3)] + [
        uid_of("part-1.csv", r) for r in range(len(STANDARD) - 3)
    ]


def test_declared_format_reads_an_unusual_extension(tmp_path: Path, input_config: MakeConfig) -> None:
    path = tmp_path / "crawl.txt"
    path.write_bytes(table_bytes("x.tsv", {"url": ["http://a.com/1.jpg"], "caption": ["one"]}))
    with pytest.raises(InputError, match=r"crawl\.txt: cannot tell the format from the name; set input\.format"):
        run_pipeline(input_config(path))
    assert decided(run_input(input_config(path, format="tsv"))) == [("kept", None)]


def test_header_settings(tmp_path: Path, input_config: MakeConfig) -> None:
    headerless = write_table(tmp_path, "cc.tsv", STANDARD[:2], header=False)
    fates = run_input(input_config(headerless, header="no", output=tmp_path / "explicit"))
    assert fates["url"].to_pylist() == [STANDARD[0][0], STANDARD[1][0]]
    renamed = run_input(
        input_config(
            headerless, header="no", columns=["link", "text"], url_col="link", caption_col="text", output=tmp_path / "r"
        )
    )
    assert renamed["caption"].to_pylist() == [STANDARD[0][1], STANDARD[1][1]]


def test_column_mapping_and_unused_columns(tmp_path: Path, input_config: MakeConfig) -> None:
    """Only the mapped columns are read: an unused column whose values change type far into the file
    (after the first 4 MB block the csv reader infers types from) must not break the read."""
    rows = 150_000
    path = tmp_path / "laion.csv"
    with open(path, "w") as handle:
        handle.write("URL,TEXT,WIDTH\n")
        handle.writelines(f"http://example.com/{i}.jpg,caption number {i},{i}\n" for i in range(rows))
        handle.write("http://example.com/last.jpg,the last one,unknown\n")
    assert path.stat().st_size > 5 * 2**20
    fates = run_input(input_config(path, url_col="URL", caption_col="TEXT", shard_size=50_000))
    assert fates.num_rows == rows + 1
    assert fates["caption"][rows].as_py() == "the last one"
    assert set(fates["status"].to_pylist()) == {"kept"}


def test_csv_quoted_newlines_and_tsv_literal_quotes(tmp_path: Path, input_config: MakeConfig) -> None:
    path = tmp_path / "quoted.csv"
    path.write_text('url,caption\nhttp://a.com/1.jpg,"line one\nline two"\nhttp://a.com/2.jpg,"say ""hi"""\n')
    fates = run_input(input_config(path, output=tmp_path / "csv"))
    assert fates["caption"].to_pylist() == ["line one line two", 'say "hi"']
    assert fates["detail"].to_pylist() == [None, None]  # a newline is whitespace, not a control character

    path = tmp_path / "quoted.tsv"
    path.write_text('url\tcaption\nhttp://a.com/1.jpg\t"quoted" as is\n')
    assert run_input(input_config(path, output=tmp_path / "tsv"))["caption"].to_pylist() == ['"quoted" as is']


def test_jsonl_details(tmp_path: Path, input_config: MakeConfig) -> None:
    """Blank lines are skipped and not counted as rows; a missing caption key is an empty caption;
    other keys are ignored."""
    path = tmp_path / "crawl.jsonl"
    path.write_text(
        '{"url": "http://a.com/1.jpg", "caption": "one", "extra": [1, 2]}\n'
        "\n"
        '{"url": "http://a.com/2.jpg"}\n'
        '{"url": "http://a.com/3.jpg", "caption": null}\n'
    )
    fates = run_input(input_config(path))
    assert fates["uid"].to_pylist() == [uid_of("crawl.jsonl", r) for r in range(3)]
    assert fates["caption"].to_pylist() == ["one", "", ""]
    assert decided(fates) == [("kept", None)] * 3


# ---------------------------------------------------------------- uids


def test_generated_uids_are_stable_blake2b_of_file_name_and_row(tmp_path: Path, input_config: MakeConfig) -> None:
    path = write_table(tmp_path, "crawl.parquet", STANDARD)
    first = run_input(input_config(path, output=tmp_path / "one"))["uid"].to_pylist()
    second = run_input(input_config(path, output=tmp_path / "two", shard_size=2))["uid"].to_pylist()
    assert first == second
    assert all(len(uid) == 32 and int(uid, 16) >= 0 and uid == uid.lower() for uid in first)
    assert first == [
        hashlib.blake2b(f"crawl.parquet\x1f{row}".encode(), digest_size=16).hexdigest() for row in range(7)
    ]
    assert len(set(first)) == len(first)


def test_uid_column_is_used_when_configured(tmp_path: Path, input_config: MakeConfig) -> None:
    path = tmp_path / "keyed.parquet"
    pq.write_table(
        pa.table(
            {
                "key": ["k0", " k1 ", "k2"],
                "url": ["http://a.com/1.jpg", "http://a.com/2.jpg", "http://a.com/1.jpg"],
                "caption": ["same", "other", "same"],
            }
        ),
        path,
    )
    fates = run_input(input_config(path, uid_col="key"))
    assert fates["uid"].to_pylist() == ["k0", "k1", "k2"]
    assert decided(fates)[2] == ("dropped", "dup_url_caption")
    assert fates["detail"][2].as_py() == "k0"
    assert shard_rows_of(tmp_path / "run")["uid"].to_pylist() == ["k0", "k1"]


def test_integer_uid_column_becomes_text(tmp_path: Path, input_config: MakeConfig) -> None:
    path = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"SAMPLE_ID": [10, 11], "url": ["http://a.com/1.jpg"] * 2, "caption": ["a", "b"]}), path)
    assert run_input(input_config(path, uid_col="SAMPLE_ID"))["uid"].to_pylist() == ["10", "11"]

    path = tmp_path / "ids.jsonl"
    path.write_text(
        '{"id": 7, "url": "http://a.com/1.jpg", "caption": "a"}\n{"id": "x8", "url": "http://a.com/2.jpg"}\n'
    )
    fates = run_input(input_config(path, uid_col="id", output=tmp_path / "jsonl"))
    assert fates["uid"].to_pylist() == ["7", "x8"]


# ---------------------------------------------------------------- file-level errors: InputError, nothing written


def parquet_bytes(columns: dict[str, Any], schema: pa.Schema | None = None) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns, schema=schema), buffer)
    return buffer.getvalue()


GOOD = {"url": ["http://a.com/1.jpg", "http://a.com/2.jpg"], "caption": ["one", "two"]}
BIG_CSV = table_bytes(
    "big.csv", {"url": [f"http://a.com/{i}.jpg" for i in range(20_000)], "caption": [f"c {i}" for i in range(20_000)]}
)
BIG_PARQUET = parquet_bytes(
    {"url": [f"http://a.com/{i}.jpg" for i in range(5_000)], "caption": [f"c {i}" for i in range(5_000)]}
)


def corrupt_gzip() -> bytes:
    data = bytearray(gzip.compress(BIG_CSV))
    data[200:260] = b"\x00" * 60
    return bytes(data)


# name -> (file name, file bytes, extra input settings, what the message must say)
FILE_ERRORS: dict[str, tuple[str, bytes, dict[str, Any], str]] = {
    "missing url column": (
        "links.parquet",
        parquet_bytes({"link": GOOD["url"], "caption": GOOD["caption"]}),
        {},
        "missing column 'url' (input.url_col); columns are ['link', 'caption']",
    ),
    "missing mapped caption column": (
        "crawl.csv",
        table_bytes("x.csv", GOOD),
        {"caption_col": "TEXT"},
        "missing column 'TEXT' (input.caption_col)",
    ),
    "int url column": (
        "ints.parquet",
        parquet_bytes({"url": [1, 2], "caption": ["one", "two"]}),
        {},
        "column 'url' has type int64, expected a string",
    ),
    "int url in jsonl": (
        "ints.jsonl",
        b'{"url": 5, "caption": "one"}\n',
        {},
        "column 'url' has type int64, expected a string",
    ),
    "int url on a later jsonl line": (
        "late.jsonl",
        b'{"url": "http://a.com/1.jpg", "caption": "one"}\n{"url": "http://a.com/2.jpg", "caption": "two"}\n'
        b'{"url": 7, "caption": "three"}\n',
        {},
        "line 3: column 'url' is int, expected a string",
    ),
    "empty csv": ("empty.csv", b"", {}, "file is empty"),
    "empty parquet": ("empty.parquet", b"", {}, "file is empty"),
    "empty jsonl.gz": ("empty.jsonl.gz", gzip.compress(b""), {}, "file is empty"),
    "parquet with no rows": (
        "none.parquet",
        parquet_bytes({"url": [], "caption": []}, pa.schema([("url", pa.string()), ("caption", pa.string())])),
        {},
        "parquet file has no rows",
    ),
    "csv header only": ("header.csv", b"url,caption\n", {}, "file has no rows"),
    "jsonl with only blank lines": ("blank.jsonl", b"\n\n  \n", {}, "file has no rows"),
    "csv bytes named parquet": ("fake.parquet", table_bytes("x.csv", GOOD), {}, "not a parquet file (no PAR1"),
    "parquet bytes named csv": ("fake.csv", parquet_bytes(GOOD), {}, "named csv but holds parquet data"),
    "binary bytes named jsonl": ("fake.jsonl", b"\x00\x01\x02binary", {}, "named jsonl but holds binary data"),
    "gz that is not gzip": ("plain.csv.gz", table_bytes("x.csv", GOOD), {}, "named .gz but is not gzip-compressed"),
    "gzip not named gz": ("zipped.csv", gzip.compress(table_bytes("x.csv", GOOD)), {}, "gzip-compressed data in a"),
    "truncated parquet": ("cut.parquet", BIG_PARQUET[: len(BIG_PARQUET) // 2], {}, "truncated or corrupt"),
    "truncated parquet.gz": (
        "cut.parquet.gz",
        gzip.compress(BIG_PARQUET[: len(BIG_PARQUET) // 2]),
        {},
        "truncated or corrupt",
    ),
    "truncated csv.gz": ("cut.csv.gz", gzip.compress(BIG_CSV)[: len(gzip.compress(BIG_CSV)) // 2], {}, "truncated"),
    "corrupt csv.gz": ("bad.csv.gz", corrupt_gzip(), {}, "corrupt"),
    "duplicate uid values": (
        "ids.parquet",
        parquet_bytes({"id": ["a", "b", "dupe", "c", "dupe"], "url": ["http://a.com/x"] * 5, "caption": list("vwxyz")}),
        {"uid_col": "id"},
        "uid 'dupe' appears 2 times",
    ),
    "empty uid value": (
        "ids.csv",
        b"id,url,caption\nx,http://a.com/1.jpg,one\n,http://a.com/2.jpg,two\n",
        {"uid_col": "id"},
        "row 1: empty or non-UTF-8 uid in the uid column",
    ),
    "malformed jsonl line": (
        "bad.jsonl",
        b'{"url": "http://a.com/1.jpg", "caption": "one"}\n\n{"url": "http://a.com/2.jpg", "caption": "two"}\n'
        b'{"url": "http://a.com/3.jpg", "caption": "thr\n',
        {},
        "line 4 is not valid JSON",
    ),
    "jsonl line not an object": ("list.jsonl", b"[1, 2]\n", {}, "line 1 is not a JSON object"),
    "cc12m row with three fields": (
        "cc.tsv",
        b"http://a.com/1.jpg\tone\nhttp://a.com/2.jpg\ttwo\textra\n",
        {},
        "Expected 2 columns, got 3",
    ),
}


def write_error_case(folder: Path, case: str) -> tuple[Path, dict[str, Any], str]:
    name, data, settings, expected = FILE_ERRORS[case]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path, settings, expected


@pytest.mark.parametrize("case", list(FILE_ERRORS))
def test_file_error_writes_nothing(
    tmp_path: Path, input_config: MakeConfig, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where .parquet.gz is decompressed
    path, settings, expected = write_error_case(tmp_path / "data", case)
    before = snapshot(tmp_path / "data")
    output = tmp_path / "run"

    with pytest.raises(InputError) as caught:
        run_pipeline(input_config(path, output=output, shard_size=2, **settings))

    message = str(caught.value)
    assert str(path) in message
    assert expected in message
    assert not output.exists()
    assert sorted(os.listdir(tmp_path)) == ["data", "tmpdir"]  # no scratch folders left either
    assert snapshot(tmp_path / "data") == before  # nothing left beside the input either
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("case", list(FILE_ERRORS))
def test_file_error_leaves_a_previous_run_untouched(tmp_path: Path, input_config: MakeConfig, case: str) -> None:
    good = write_table(tmp_path, "good.csv", STANDARD)
    output = tmp_path / "run"
    run_input(input_config(good, output=output, shard_size=2))
    before = snapshot(output)
    assert any(name.startswith("input/shards/") for name in before)
    path, settings, expected = write_error_case(tmp_path / "data", case)

    with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        run_pipeline(input_config(path, output=output, shard_size=2, **settings))

    assert snapshot(output) == before


def test_duplicate_uid_message_names_every_place(tmp_path: Path, input_config: MakeConfig) -> None:
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text("id,url,caption\nx,http://a.com/1.jpg,one\nshared,http://a.com/2.jpg,two\n")
    second.write_text("id,url,caption\nshared,http://a.com/3.jpg,three\n")
    with pytest.raises(InputError) as caught:
        run_pipeline(input_config([first, second], uid_col="id"))
    assert str(caught.value) == (
        f"{first}: uid 'shared' appears 2 times ({first} row 1, {second} row 0); uids must be unique"
    )


def test_uid_hash_collision_is_not_a_duplicate(
    tmp_path: Path, input_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Duplicate uids are found by 64-bit hashes; equal hashes of different uids must not fail the run."""
    import curate.stages.input.stage

    monkeypatch.setattr(
        curate.stages.input.stage, "string_hashes", lambda column: np.zeros(len(column), dtype=np.uint64)
    )
    path = tmp_path / "ids.csv"
    path.write_text("id,url,caption\na,http://a.com/1.jpg,one\nb,http://a.com/2.jpg,two\n")
    assert run_input(input_config(path, uid_col="id"))["uid"].to_pylist() == ["a", "b"]


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        (["missing.csv"], "missing.csv: no such input file"),
        (["nothing-*.csv"], "input.path: no file matches"),
        (["good.csv", "good.csv"], "good.csv: listed more than once in input.path"),
        (["good.csv", "sub/good.csv"], "sub/good.csv: has the same file name as"),
    ],
)
def test_bad_file_lists(tmp_path: Path, input_config: MakeConfig, paths: list[str], expected: str) -> None:
    write_table(tmp_path, "good.csv", STANDARD)
    (tmp_path / "sub").mkdir()
    write_table(tmp_path / "sub", "good.csv", STANDARD)
    with pytest.raises(InputError, match=expected):
        run_pipeline(input_config([tmp_path / p for p in paths], output=tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_same_file_names_are_fine_with_a_uid_column(tmp_path: Path, input_config: MakeConfig) -> None:
    for folder, uid in (("x", "u1"), ("y", "u2")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "part.csv").write_text(f"id,url,caption\n{uid},http://a.com/{uid}.jpg,c\n")
    fates = run_input(input_config([tmp_path / "x" / "part.csv", tmp_path / "y" / "part.csv"], uid_col="id"))
    assert fates["uid"].to_pylist() == ["u1", "u2"]


# ---------------------------------------------------------------- row-level problems become fates


ROW_CASES = [
    # url, caption, status, reason, detail, caption in the fates
    (None, "null url", "failed", "invalid_url", "empty url", "null url"),
    ("", "empty url", "failed", "invalid_url", "empty url", "empty url"),
    (" \t ", "blank url", "failed", "invalid_url", "empty url", "blank url"),
    ("http://example.com/" + "x" * 82, "long url", "failed", "invalid_url", "url longer than 100 characters", None),
    ("ftp://example.com/a.jpg", "ftp", "failed", "invalid_url", "not an http(s) url with a host", "ftp"),
    ("javascript:alert(1)", "js", "failed", "invalid_url", "not an http(s) url with a host", "js"),
    ("http://", "no host", "failed", "invalid_url", "not an http(s) url with a host", "no host"),
    ("https:///path.jpg", "no host 2", "failed", "invalid_url", "not an http(s) url with a host", "no host 2"),
    ("http://exa mple.com/a.jpg", "space", "failed", "invalid_url", "not an http(s) url with a host", "space"),
    ("  https://example.com/pad.jpg\t", "padded url", "kept", None, None, "padded url"),
    ("HTTPS://EXAMPLE.COM/UP.JPG", "upper", "kept", None, None, "upper"),
    (
        "http://example.com/c.jpg",
        "tab\there\x00and\x07bell\x85",
        "kept",
        None,
        "control characters removed from caption",
        "tab here and bell",
    ),
    ("http://example.com/w.jpg", "  spaced \n  out ", "kept", None, None, "spaced out"),
    ("http://example.com/l.jpg", "y" * 51, "dropped", "caption_too_long", "caption has 51 characters > 50", "y" * 50),
    ("http://example.com/n.jpg", None, "kept", None, None, ""),
]


def test_row_problems_become_fates(tmp_path: Path, input_config: MakeConfig) -> None:
    path = write_table(tmp_path, "rows.parquet", [(url, caption) for url, caption, *_ in ROW_CASES])
    fates = run_input(input_config(path, max_url_chars=100, max_caption_chars=50, shard_size=4))

    assert fates.num_rows == len(ROW_CASES)
    for i, (url, caption, status, reason, detail, cleaned) in enumerate(ROW_CASES):
        got = fates.slice(i, 1).to_pylist()[0]
        assert (got["status"], got["reason"], got["detail"]) == (status, reason, detail), (url, caption)
        if cleaned is not None:
            assert got["caption"] == cleaned, (url, caption)
    assert fates["url"][9].as_py() == "https://example.com/pad.jpg"
    kept = shard_rows_of(tmp_path / "run")
    assert kept["caption"].to_pylist() == ["padded url", "upper", "tab here and bell", "spaced out", ""]


def test_invalid_utf8_caption_in_parquet_binary_column(tmp_path: Path, input_config: MakeConfig) -> None:
    """Bad bytes spread over a larger batch: exactly those rows fail, the rest are read as text."""
    captions = [f"caption {i}".encode() for i in range(300)]
    bad = {3, 150, 151, 299}
    for i in bad:
        captions[i] = b"bad \xff\xfe bytes " + str(i).encode()
    captions[7] = "ünïcode".encode()
    path = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"url": [f"http://a.com/{i}.jpg" for i in range(300)], "caption": captions}), path)
    fates = run_input(input_config(path, shard_size=64))

    failed = [i for i, status in enumerate(fates["status"].to_pylist()) if status == "failed"]
    assert failed == sorted(bad)
    assert {fates["reason"][i].as_py() for i in bad} == {"invalid_caption"}
    assert {fates["detail"][i].as_py() for i in bad} == {"caption is not valid UTF-8"}
    assert fates["caption"][7].as_py() == "ünïcode"
    assert fates["caption"][8].as_py() == "caption 8"


def test_invalid_utf8_in_csv_and_jsonl(tmp_path: Path, input_config: MakeConfig) -> None:
    path = tmp_path / "raw.csv"
    path.write_bytes(
        b"url,caption\nhttp://a.com/1.jpg,fine\nhttp://a.com/2.jpg,caf\xe9 latin-1\nhttp://a.com/\xff.jpg,bad url\n"
    )
    fates = run_input(input_config(path, output=tmp_path / "csv"))
    assert decided(fates) == [("kept", None), ("failed", "invalid_caption"), ("failed", "invalid_url")]
    assert fates["detail"].to_pylist()[1:] == ["caption is not valid UTF-8", "url is not valid UTF-8"]

    path = tmp_path / "raw.jsonl"
    path.write_bytes(
        b'{"url": "http://a.com/1.jpg", "caption": "caf\xe9"}\n'
        b'{"url": "http://a.com/2.jpg", "caption": "lone \\ud800 surrogate"}\n'
        b'{"url": "http://a.com/3.jpg", "caption": "pair \\ud83d\\ude00 ok"}\n'
    )
    fates = run_input(input_config(path, output=tmp_path / "jsonl"))
    assert decided(fates) == [("failed", "invalid_caption"), ("failed", "invalid_caption"), ("kept", None)]
    assert fates["caption"][2].as_py() == "pair 😀 ok"


def test_decode_utf8_flags_exactly_the_bad_rows() -> None:
    values = [f"row {i}".encode() for i in range(1000)]
    for i in (0, 17, 500, 999):
        values[i] = b"\xc3\x28"
    values[40] = None
    text, invalid = decode_utf8(pa.array(values, pa.binary()))
    assert np.flatnonzero(invalid).tolist() == [0, 17, 500, 999]
    assert text.null_count == 5
    assert text[1].as_py() == "row 1" and text[40].as_py() is None


# ---------------------------------------------------------------- repeats of (url, caption)


def test_repeats_point_at_the_first_occurrence_across_shards(tmp_path: Path, input_config: MakeConfig) -> None:
    rows = [
        ("http://a.com/1.jpg", "apple"),  # 0: first
        ("http://a.com/2.jpg", "pear"),
        ("http://a.com/3.jpg", "plum"),
        ("http://a.com/1.jpg", "apple"),  # 3: repeat of 0, next shard
        ("http://a.com/1.jpg", "an apple"),  # same url, other caption: kept
        ("http://a.com/1.jpg", " apple  "),  # 5: the same pair once cleaned: repeat of 0, not of 3
        ("http://a.com/2.jpg", "pear"),  # 6: repeat of 1
        ("http://a.com/9.jpg", "apple"),  # same caption, other url: kept
    ]
    path = write_table(tmp_path, "dups.csv", rows)
    fates = run_input(input_config(path, shard_size=2))
    uids = [uid_of("dups.csv", i) for i in range(len(rows))]

    assert [s for s, _ in decided(fates)] == ["kept", "kept", "kept", "dropped", "kept", "dropped", "dropped", "kept"]
    dropped = {i: fates["detail"][i].as_py() for i in (3, 5, 6)}
    assert dropped == {3: uids[0], 5: uids[0], 6: uids[1]}
    assert {fates["reason"][i].as_py() for i in (3, 5, 6)} == {"dup_url_caption"}


def test_repeats_across_files(tmp_path: Path, input_config: MakeConfig) -> None:
    first = write_table(tmp_path, "a.parquet", [("http://a.com/1.jpg", "apple"), ("http://a.com/2.jpg", "pear")])
    second = write_table(tmp_path, "b.jsonl", [("http://a.com/3.jpg", "plum"), ("http://a.com/2.jpg", "pear")])
    fates = run_input(input_config([first, second], shard_size=3))
    assert decided(fates) == [("kept", None)] * 3 + [("dropped", "dup_url_caption")]
    assert fates["detail"][3].as_py() == uid_of("a.parquet", 1)


def test_a_failed_row_is_not_a_first_occurrence(tmp_path: Path, input_config: MakeConfig) -> None:
    rows = [("http://a.com/1.jpg", b"bad \xff"), ("http://a.com/1.jpg", b"")]
    path = tmp_path / "f.parquet"
    pq.write_table(
        pa.table({"url": [r[0] for r in rows], "caption": pa.array([r[1] for r in rows], pa.binary())}), path
    )
    assert decided(run_input(input_config(path))) == [("failed", "invalid_caption"), ("kept", None)]


# ---------------------------------------------------------------- shards, fates and the ledger


def test_one_fate_per_row_and_exact_shards(tmp_path: Path, input_config: MakeConfig) -> None:
    first = write_table(tmp_path, "a.csv", STANDARD)
    second = write_table(tmp_path, "b.parquet", [*STANDARD[::-1], ("http://z.com/new.jpg", "new")])
    config = input_config([first, second], shard_size=3)
    result = run_pipeline(config)
    output, total = tmp_path / "run", 2 * len(STANDARD) + 1

    fates = fates_of(output)
    expected_uids = [uid_of("a.csv", r) for r in range(len(STANDARD))] + [
        uid_of("b.parquet", r) for r in range(len(STANDARD) + 1)
    ]
    assert fates["uid"].to_pylist() == expected_uids

    fate_files = sorted((output / "input" / "fates").glob("*.parquet"))
    assert [pq.read_metadata(p).num_rows for p in fate_files] == [3, 3, 3, 3, 3]
    manifest = read_manifest(output / "input")
    assert manifest is not None
    assert manifest["shards"] == ["00000", "00001", "00002", "00003", "00004"]
    assert (manifest["rows"], manifest["shard_size"]) == (total, 3)
    assert [p.stem for p in fate_files] == manifest["shards"]

    kept = fates.filter(pa.compute.equal(fates["status"], "kept")).select(["uid", "url", "caption"])
    assert shard_rows_of(output).to_pylist() == kept.to_pylist()
    for shard in manifest["shards"]:
        shard_kept = pq.read_table(output / "input" / "shards" / f"{shard}.parquet")
        shard_fates = pq.read_table(output / "input" / "fates" / f"{shard}.parquet")
        assert set(shard_kept["uid"].to_pylist()) <= set(shard_fates["uid"].to_pylist())
        marker = json.loads((output / "input" / "_done" / f"{shard}.json").read_text())
        assert sum(marker["counts"].values()) == shard_fates.num_rows

    # b.parquet repeats every (url, caption) of a.csv that was kept
    b_rows = {row: fates.slice(len(STANDARD) + row, 1).to_pylist()[0] for row in range(len(STANDARD))}
    first_uid = {pair: uid_of("a.csv", i) for i, pair in reversed(list(enumerate(STANDARD)))}
    for row, got in b_rows.items():
        pair = STANDARD[len(STANDARD) - 1 - row]
        if pair[0].startswith("ftp"):
            assert (got["status"], got["reason"]) == ("failed", "invalid_url")
        else:
            assert (got["status"], got["reason"], got["detail"]) == ("dropped", "dup_url_caption", first_uid[pair])

    assert result.complete and result.rows == total
    assert dict(result.stats["input"].counts) == {
        "kept": 6,
        "dropped/dup_url_caption": 7,
        "failed/invalid_url": 2,
    }
    ledger = read_ledger(output)
    assert ledger["uid"].tolist() == expected_uids
    assert ledger["status"].tolist() == fates["status"].to_pylist()
    assert (ledger["stage"] == "input").all()


# ---------------------------------------------------------------- rebuild only when something changed


def manifest_identity(output: Path) -> tuple[int, int, str]:
    path = output / "input" / "manifest.json"
    return path.stat().st_ino, path.stat().st_mtime_ns, json.loads(path.read_text())["fingerprint"]


def test_unchanged_config_does_not_rebuild(tmp_path: Path, input_config: MakeConfig) -> None:
    path = write_table(tmp_path, "crawl.csv", STANDARD)
    output = tmp_path / "run"
    run_input(input_config(path, shard_size=3))
    before, fates_before = manifest_identity(output), snapshot(output / "input")

    run_input(input_config(path, shard_size=3))
    run_input(input_config(path, shard_size=3, batch_rows=2))  # how the file is read, not what comes out
    assert manifest_identity(output) == before
    assert snapshot(output / "input") == fates_before


def test_the_same_bytes_touched_or_copied_elsewhere_do_not_rebuild(tmp_path: Path, input_config: MakeConfig) -> None:
    path = write_table(tmp_path, "crawl.csv", STANDARD)
    output = tmp_path / "run"
    run_input(input_config(path, shard_size=3))
    before = manifest_identity(output)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    run_input(input_config(path, shard_size=3))
    assert manifest_identity(output) == before

    copy = tmp_path / "elsewhere" / "crawl.csv"  # same name (generated uids hash it), same bytes, new mtime
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    run_input(input_config(copy, shard_size=3))
    assert manifest_identity(output) == before


@pytest.mark.parametrize(
    "change",
    ["content with the same mtime", "shard_size", "max_caption_chars", "uid_col"],
)
def test_changes_rebuild(tmp_path: Path, input_config: MakeConfig, change: str) -> None:
    path = tmp_path / "crawl.csv"
    path.write_text("id,url,caption\nk0,http://a.com/1.jpg,one\nk1,http://a.com/2.jpg,two\nk2,http://a.com/3.jpg,3\n")
    output = tmp_path / "run"
    run_input(input_config(path, shard_size=2))
    before = manifest_identity(output)
    settings: dict[str, Any] = {"shard_size": 2}
    if change == "content with the same mtime":
        stat = path.stat()
        with open(path, "a") as handle:
            handle.write("k3,http://a.com/4.jpg,four\n")
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    elif change == "shard_size":
        settings["shard_size"] = 1
    elif change == "max_caption_chars":
        settings["max_caption_chars"] = 2
    else:
        settings["uid_col"] = "id"

    fates = run_input(input_config(path, **settings))

    after = manifest_identity(output)
    assert after[0] != before[0] and after[2] != before[2]
    manifest = read_manifest(output / "input")
    assert manifest is not None
    if change == "content with the same mtime":
        assert manifest["rows"] == fates.num_rows == 4
    if change == "shard_size":
        assert (manifest["shard_size"], len(manifest["shards"])) == (1, 3)
    if change == "max_caption_chars":
        assert decided(fates) == [("dropped", "caption_too_long")] * 2 + [("kept", None)]
    if change == "uid_col":
        assert fates["uid"].to_pylist() == ["k0", "k1", "k2"]


def test_fingerprint_covers_files_and_output_settings(tmp_path: Path, input_config: MakeConfig) -> None:
    path = write_table(tmp_path, "crawl.csv", STANDARD)
    config = input_config(path).input
    sources = inspect_sources(config)
    base = input_fingerprint(config, sources)
    assert input_fingerprint(input_config(path, batch_rows=7).input, sources) == base
    assert input_fingerprint(input_config(path, max_url_chars=99).input, sources) != base
    path.write_text(path.read_text() + "http://a.com/new.jpg,new\n")
    assert input_fingerprint(config, sources) != base
