"""What a finished run hands other tools: kept input columns (input.keep_columns) in the download and curated
json and in the ledger; curated samples keyed by the 32-hex uid DataComp's tools match against uids.npy;
sizes.json for open_clip_train and a wids shard index; progress in samples and the validation table at the
end of `curate run`. One real run over the served demo world, through the command line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from curate.io.wds import count_samples, iter_samples
from curate.ledger import LEDGER_COLUMNS, read_ledger
from curate.stages.materialize import CuratedOutputs, uid_hex
from curate.stages.validate.evalsets import make_demo_eval_set
from tests.test_validate import MICRO_CONFIG
from tests.world_fixtures import ServedWorld, full_pipeline_overrides

REPO = Path(__file__).resolve().parents[1]
KEEP = ["similarity", "punsafe", "LICENSE", "face_bboxes"]


def curate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "curate", *args], cwd=REPO, capture_output=True, text=True)


def crawl_with_extra_columns(world: ServedWorld, path: Path) -> pd.DataFrame:
    """The demo crawl with LAION/DataComp-style columns and a custom uid column whose ids hold dots."""
    crawl = pd.read_parquet(world.table)
    n = len(crawl)
    extra = pa.table(
        {
            "url": crawl["url"],
            "caption": crawl["caption"],
            "sample_id": [f"row.{i}" for i in range(n)],
            "similarity": np.linspace(0.1, 0.5, n),
            "punsafe": pa.array(np.linspace(0, 1, n), pa.float32()),
            "LICENSE": [None if i % 3 == 0 else f"cc-{i % 4}" for i in range(n)],
            "face_bboxes": [[[0.1, 0.2, 0.3, 0.4]] * (i % 2) for i in range(n)],
        }
    )
    pq.write_table(extra, path)
    return extra.to_pandas().set_index("sample_id")


def kept_values(crawl_path: Path) -> dict[str, dict[str, object]]:
    """uid -> the kept columns' values, as Python (and JSON) has them."""
    table = pq.read_table(crawl_path, columns=["sample_id", *KEEP])
    return {row.pop("sample_id"): row for row in table.to_pylist()}


@dataclass(frozen=True)
class FinishedRun:
    root: Path
    crawl: pd.DataFrame  # the input, indexed by its uid column
    finished: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def finished(served_world: ServedWorld, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    folder = tmp_path_factory.mktemp("curated-outputs")
    crawl = crawl_with_extra_columns(served_world, folder / "crawl.parquet")
    model = folder / "micro.json"
    model.write_text(json.dumps(MICRO_CONFIG))
    eval_set = make_demo_eval_set(folder / "eval", n=24, seed=2024, image_size=64)
    validate = {"model": str(model), "eval_set": str(eval_set), "batch_size": 8, "samples_seen": 24, "seeds": 1}
    validate |= {"warmup_steps": 1, "device": "cpu", "decode_workers": 0, "shuffle_buffer": 16}
    pipeline = served_world.pipeline(folder, output=folder / "run", validate=validate)
    settings = [
        *full_pipeline_overrides(tiny_checkpoint),
        "stages=[input,download,embed,filter,dedup,materialize,validate]",
        f"input.path={folder / 'crawl.parquet'}",
        "input.uid_col=sample_id",
        f"input.keep_columns=[{','.join(KEEP)}]",
    ]
    finished = curate("run", str(pipeline), *(arg for setting in settings for arg in ("--set", setting)))
    assert finished.returncode == 0, finished.stderr[-3000:]
    return FinishedRun(folder / "run", crawl, finished)


def test_kept_columns_reach_the_download_json_the_curated_json_and_the_ledger(finished: FinishedRun) -> None:
    crawl = finished.crawl
    values = kept_values(finished.root.parent / "crawl.parquet")
    downloaded = [s for tar in sorted((finished.root / "download").glob("*.tar")) for s in iter_samples(tar, read=())]
    curated = [s for tar in CuratedOutputs(finished.root).shards() for s in iter_samples(tar, read=())]
    assert downloaded and curated
    for sample in [*downloaded, *curated]:
        assert {column: sample.meta[column] for column in KEEP} == values[sample.uid], sample.uid

    ledger = pq.read_table(finished.root / "ledger.parquet")
    assert ledger.schema.names == [*LEDGER_COLUMNS, *KEEP]  # after the standard columns, typed as the input
    types = {name: ledger.schema.field(name).type for name in KEEP}
    assert types == {
        "similarity": pa.float64(),
        "punsafe": pa.float32(),
        "LICENSE": pa.string(),
        "face_bboxes": pa.list_(pa.list_(pa.float64())),
    }
    rows = read_ledger(finished.root).set_index("uid")
    assert len(rows) == len(crawl) and set(rows.index) == set(crawl.index)  # failed rows carry them too
    assert (rows["status"] == "failed").any()
    assert np.allclose(rows.loc[crawl.index, "similarity"], crawl["similarity"])
    assert rows.loc[crawl.index, "LICENSE"].isna().tolist() == crawl["LICENSE"].isna().tolist()


def test_curated_samples_carry_the_datacomp_uid_beside_the_run_uid_and_keys_without_dots(
    finished: FinishedRun,
) -> None:
    curated = CuratedOutputs(finished.root)
    metas, keys = [], []
    for tar in curated.shards():
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            assert {"jpg", "txt", "json"} <= set(sample)  # webdataset split each name at a dot-free key
            metas.append(json.loads(sample["json"]))
            keys.append(sample["__key__"])
    assert metas and all(meta["source_uid"].startswith("row.") for meta in metas)
    assert keys == [meta["uid"] for meta in metas] == [uid_hex(meta["source_uid"]) for meta in metas]
    # what DataComp's resharder does with each json uid, against what uids.npy holds
    parsed = np.array([divmod(int(meta["uid"], 16), 2**64) for meta in metas], dtype=np.dtype("u8,u8"))
    assert np.array_equal(np.sort(parsed), np.load(curated.uids_path))
    kept = read_ledger(finished.root).query("status == 'kept'")
    assert sorted(meta["source_uid"] for meta in metas) == sorted(kept["uid"])


def test_sizes_json_and_the_wids_index_describe_the_curated_shards(finished: FinishedRun, tmp_path: Path) -> None:
    import wids
    from open_clip_train.data import get_dataset_size

    curated = CuratedOutputs(finished.root)
    shards = curated.shards()
    assert len(shards) >= 2
    sizes = json.loads(curated.sizes_path.read_text())
    assert sizes == {path.name: count_samples(path) for path in shards}
    total = sum(sizes.values())
    brace = str(curated.curated_dir / f"{{00000..{len(shards) - 1:05d}}}.tar")
    assert get_dataset_size(brace) == (total, len(shards))  # what --train-num-samples would otherwise say

    dataset = wids.ShardListDataset(str(curated.wids_index_path), cache_dir=str(tmp_path / "wids-cache"))
    assert len(dataset) == total
    last = dataset[total - 1]
    assert last[".json"]["uid"] == last["__key__"] and last[".jpg"].size[0] > 0  # wids decodes json and jpg


def test_the_run_directory_holds_the_files_the_output_layout_lists(finished: FinishedRun) -> None:
    """README's "Output layout" against a finished run (one partition, exact dedup only, kept columns)."""
    root = finished.root
    manifest = json.loads((root / "input" / "manifest.json").read_text())
    assert {"shards", "rows", "fingerprint"} <= set(manifest) and manifest["rows"] == len(finished.crawl)
    shards = manifest["shards"]
    for name in ("config.yaml", "ledger.parquet", "stats.json", "filter/summary.json", "dedup/plan.json"):
        assert (root / name).is_file(), name
    for name in ("report/index.html", "report/stats.json", "validate/metrics.json"):  # written by `curate run`
        assert (root / name).is_file(), name
    assert not (root / "input" / "staging").exists()  # removed at the end of the input stage
    columns = {
        "input/shards/{}.parquet": ["uid", "url", "caption"],
        "input/columns/{}.parquet": ["uid", *KEEP],
        "embed/metadata/metadata_{}.parquet": ["uid", "url", "caption", "clip_score"],
        "dedup/decisions/{}.parquet": ["uid", "reason", "kept_uid", "similarity"],
        "ledger/parts/{}.parquet": [*LEDGER_COLUMNS, *KEEP],
    }
    for shard in shards:
        for pattern, names in columns.items():
            assert pq.read_schema(root / pattern.format(shard)).names == names, pattern
        files = ["download/{}.tar", "download/{}.parquet", "download/{}_stats.json", "ledger/parts/{}.details.json"]
        for pattern in files:
            assert (root / pattern.format(shard)).is_file(), pattern
        assert np.load(root / "materialize" / f"uids-{shard}.npy").dtype == np.dtype("u8,u8")
        img, txt = (np.load(root / f"embed/{kind}/{kind}_{shard}.npy") for kind in ("img_emb", "text_emb"))
        assert img.dtype == txt.dtype == np.float16 and len(img) == len(txt)
        for stage in ("input", "download", "embed", "filter", "dedup"):
            assert (root / stage / "fates" / f"{shard}.parquet").is_file()
            marker = json.loads((root / stage / "_done" / f"{shard}.json").read_text())
            assert set(marker) == {"fingerprint", "counts", "seconds", "files"}
    phase_markers = list(root.glob("*/_done/*/*.json"))
    assert len(phase_markers) > len(shards)
    assert all(set(json.loads(p.read_text())) == {"fingerprint", "counts", "seconds", "files"} for p in phase_markers)
    assert list((root / "filter" / "sketch").rglob("*.npz")) and list((root / "dedup" / "screen").rglob("*.arrow"))
    assert [p.name for p in (root / "dedup" / "exact").iterdir()] == ["00000.arrow"]  # one bucket
    assert list((root / "dedup" / "largest" / "dup_exact").glob("*.parquet"))

    summary = json.loads((root / "filter" / "summary.json").read_text())
    assert {"quantiles", "kept_fraction_at_threshold"} <= set(summary["clip_score"])
    assert {"counts", "edges"} <= set(summary["clip_score_histogram"]) and "clip_cutoff" in summary
    stats = json.loads((root / "stats.json").read_text())
    assert stats["stages"]["filter"]["summary"] == summary
    assert all("counts" in stats["stages"][stage] for stage in ("input", "download", "embed", "filter", "dedup"))
    details = json.loads((root / "ledger" / "details.json").read_text())
    assert details and all({"rows", "details"} <= set(entry) for entry in details.values())

    curated = CuratedOutputs(root)
    sizes = json.loads(curated.sizes_path.read_text())
    assert json.loads(curated.marker_path.read_text()).keys() == {"fingerprint", "samples"}
    assert json.loads(curated.marker_path.read_text())["samples"] == sum(sizes.values())
    assert all(n == 40 for n in list(sizes.values())[:-1])  # materialize.samples_per_shard, the last one less
    ledger = read_ledger(root).set_index("uid")
    written = []
    for tar in curated.shards():
        for sample in iter_samples(tar, read=()):
            meta = sample.meta
            assert {"uid", "source_uid", "url", "caption", "clip_score", "sha256", "width", "height"} <= set(meta)
            row = ledger.loc[meta["source_uid"]]
            assert (meta["sha256"], meta["width"], meta["height"]) == (row["sha256"], row["width"], row["height"])
            written.append(meta["source_uid"])
    kept = [pq.read_table(root / f"dedup/fates/{s}.parquet").to_pandas().query("status == 'kept'") for s in shards]
    assert written == [uid for fates in kept for uid in sorted(fates["uid"])]  # input-shard, then uid order
    # a duplicate's ledger detail names the uid it was dropped in favour of
    decisions = pd.concat(pq.read_table(root / f"dedup/decisions/{s}.parquet").to_pandas() for s in shards)
    dropped = decisions.dropna(subset=["reason"]).set_index("uid")
    assert len(dropped) > 0 and (ledger.loc[dropped.index, "detail"] == dropped["kept_uid"]).all()


def test_progress_counts_samples_and_the_run_ends_with_the_validation_table_and_its_verdict(
    finished: FinishedRun,
) -> None:
    err, out = finished.finished.stderr, finished.finished.stdout
    for bar in ("download", "embed", "materialize", "materialize:index"):
        assert f"{bar:>10}: 100%" in err, bar
    assert "samples=" in err
    rows = len(finished.crawl)
    assert f"samples={rows}" in err  # the input stage's one task went through every row
    assert "(1 seeds, 24 samples seen per run" in out
    assert "curated - baseline" in out
    assert out.rstrip().splitlines()[-1].startswith("verdict: curated vs baseline: ")


def test_the_run_prints_its_funnel_and_where_the_ledger_and_report_are_and_skips_the_report_without_matplotlib(
    finished: FinishedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from curate.cli import main

    out, root = finished.finished.stdout, finished.root
    assert f"run: {root}  ({len(finished.crawl)} input rows)" in out
    assert all(re.search(rf"^  {stage} +\d+ in -> +\d+ kept", out, re.M) for stage in ("input", "download", "dedup"))
    assert f"\nledger: {root / 'ledger.parquet'}\n" in out
    assert f"\nreport: {root / 'report' / 'index.html'}\n" in out and (root / "report" / "index.html").is_file()

    copy = tmp_path / "run"  # the finished run, moved: nothing to redo
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "report")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails as if not installed
    assert main(["run", str(copy / "config.yaml"), "--set", f"output={copy}", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    skipped = "report: skipped: the report needs matplotlib: pip install 'curate-pipeline[report]'"
    assert f"ledger: {copy / 'ledger.parquet'}" in lines and skipped in lines
    assert not (copy / "report" / "index.html").exists()
    monkeypatch.undo()
    assert main(["report", str(copy)]) == 0  # once matplotlib is there
    assert capsys.readouterr().out.strip() == f"report: {copy / 'report' / 'index.html'}"
    assert (copy / "report" / "index.html").is_file()


def test_kept_values_json_cannot_hold_reach_the_download_as_text() -> None:
    """What the download stage hands img2dataset for each sample's json: timestamps, decimals and bytes as
    text (its writer drops a sample whose json fails), JSON's own types as they are, joined by uid."""
    from datetime import datetime
    from decimal import Decimal

    from curate.stages.download import with_kept_columns

    rows = pa.table({"uid": ["a", "b"], "url": ["http://x.invalid/a", "http://x.invalid/b"], "caption": ["a", "b"]})
    kept = pa.table(
        {
            "uid": ["b", "a"],
            "taken": pa.array([datetime(2024, 1, 2, 3, 4, 5), None], pa.timestamp("s")),
            "price": pa.array([Decimal("1.50"), Decimal("2.25")], pa.decimal128(5, 2)),
            "blob": pa.array([b"ab", b"cd"]),
            "similarity": [0.5, 0.25],
        }
    )
    samples = json.loads(json.dumps(with_kept_columns(rows, kept).to_pylist()))
    assert [{k: s[k] for k in ("uid", "taken", "price", "blob", "similarity")} for s in samples] == [
        {"uid": "a", "taken": None, "price": "2.25", "blob": "cd", "similarity": 0.25},
        {"uid": "b", "taken": "2024-01-02 03:04:05", "price": "1.50", "blob": "ab", "similarity": 0.5},
    ]


def test_a_missing_kept_column_stops_the_run_before_any_fetch(served_world: ServedWorld, tmp_path: Path) -> None:
    pipeline = served_world.pipeline(tmp_path, output=tmp_path / "run", input={"keep_columns": ["similarity"]})
    hits = dict(served_world.server.hits)
    failed = curate("run", str(pipeline), "--no-progress")
    assert failed.returncode == 2
    message = failed.stderr.strip().splitlines()
    assert len(message) == 1 and str(served_world.table) in message[0] and "'similarity'" in message[0]
    assert "input.keep_columns" in message[0]
    assert dict(served_world.server.hits) == hits and not (tmp_path / "run").exists()


def test_a_kept_column_the_files_type_differently_is_json_text_in_the_ledger(tmp_path: Path) -> None:
    first = pa.table({"url": ["http://a.invalid/1.jpg", "bad"], "caption": ["a b", "c d"], "LICENSE": [1, None]})
    second = pa.table({"url": ["http://a.invalid/2.jpg"], "caption": ["e f"], "LICENSE": ["cc-by"]})
    pq.write_table(first, tmp_path / "a.parquet")
    pq.write_table(second, tmp_path / "b.parquet")
    config = {
        "output": str(tmp_path / "run"),
        "stages": ["input"],
        "input": {"path": [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], "keep_columns": ["LICENSE"]},
    }
    (tmp_path / "p.yaml").write_text(json.dumps(config))
    assert curate("run", str(tmp_path / "p.yaml"), "--no-progress").returncode == 0
    ledger = pq.read_table(tmp_path / "run" / "ledger.parquet")
    assert ledger.schema.field("LICENSE").type == pa.string()
    assert ledger.schema.field("LICENSE").metadata == {b"curate": b"json"}
    assert ledger["LICENSE"].to_pylist() == ["1", None, '"cc-by"']
