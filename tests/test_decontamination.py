"""Decontamination in the dedup stage: a run whose `dedup.eval_sets` (a folder of images and a webdataset tar)
hold some of its own downloaded images drops those samples as `contaminated`, naming the eval item. The run
is a copy of a finished run without eval sets, so dedup runs again over the files that run left behind (a
shard without near drops this time once read the earlier run's, and got two fates per row)."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import load_config, validate_config
from curate.io.wds import iter_samples
from curate.ledger import FATE_SCHEMA
from curate.pipeline import run_pipeline
from curate.stage import RunLayout
from curate.stages.dedup.stage import DedupOutputs
from curate.stages.download import DownloadOutputs
from curate.stages.embed import EmbedOutputs
from tests.run_fixtures import CuratedRun


def distinct_samples(run: CuratedRun, n: int) -> list[tuple[str, str, bytes]]:
    """(uid, extension, image bytes) of `n` samples that reached dedup, each of another (shape, colour)."""
    layout = RunLayout(run.root)
    chosen: dict[tuple[str, str], tuple[str, str, bytes]] = {}
    for shard in EmbedOutputs(layout).shards():
        fates = pq.read_table(layout.fates_path("filter", shard), schema=FATE_SCHEMA)
        kept = set(fates.filter(pc.equal(fates["status"], "kept"))["uid"].to_pylist())
        for sample in iter_samples(DownloadOutputs(layout).tar_path(shard), kept):
            truth = run.truth.loc[sample.uid]
            key = (str(truth["shape"]), str(truth["color"]))
            extension = sample.image_extension
            if key not in chosen and extension is not None:
                chosen[key] = (sample.uid, extension, sample.members[extension])
            if len(chosen) == n:
                return list(chosen.values())
    raise AssertionError(f"the shared run has fewer than {n} distinct (shape, colour) samples")


def test_eval_set_images_in_a_folder_and_a_tar_are_dropped_as_contaminated(
    curated_run: CuratedRun, tmp_path: Path
) -> None:
    samples = distinct_samples(curated_run, 4)
    folder = tmp_path / "heldout"
    folder.mkdir()
    expected = {}
    for k, (uid, extension, data) in enumerate(samples[:2]):
        (folder / f"item{k}.{extension}").write_bytes(data)
        expected[uid] = f"heldout/item{k}.{extension}"
    tar_path = tmp_path / "bench.tar"
    with tarfile.open(tar_path, "w") as tar:
        for k, (uid, extension, data) in enumerate(samples[2:]):
            member = tarfile.TarInfo(f"sample{k}.{extension}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
            expected[uid] = f"bench.tar/sample{k}.{extension}"

    run_dir = tmp_path / "run"
    shutil.copytree(curated_run.root, run_dir)
    raw = load_config(RunLayout(run_dir).config_path).model_dump(mode="json")
    raw["output"] = str(run_dir)
    raw["dedup"]["eval_sets"] = [str(folder), str(tmp_path / "*.tar")]
    # the random tiny model puts most images of one colour within 0.95: only the eval images themselves (and
    # the world's planted copies of them) are this close
    raw["dedup"]["contamination_threshold"] = 0.9999
    result = run_pipeline(validate_config(raw))
    assert result.complete

    decisions = DedupOutputs(result.layout).decisions().to_pandas().set_index("uid")
    contaminated = decisions[decisions["reason"] == "contaminated"]
    assert set(expected) <= set(contaminated.index)
    for uid, eval_id in expected.items():
        assert contaminated.at[uid, "kept_uid"] == eval_id
        assert contaminated.at[uid, "similarity"] >= 0.9999
    assert len(contaminated) < len(decisions) / 4
    ledger = pq.read_table(result.layout.ledger_path).to_pandas().set_index("uid")
    assert (ledger.loc[list(expected), "reason"] == "contaminated").all()
    assert (ledger.loc[list(expected), "stage"] == "dedup").all()


def test_an_eval_set_that_names_nothing_stops_the_run_before_anything_is_written(tmp_path: Path) -> None:
    import pytest

    from curate.config import ConfigError

    table = tmp_path / "crawl.csv"
    table.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a red circle\n")
    folder = tmp_path / "held-out"
    folder.mkdir()
    (tmp_path / "notes.txt").write_text("not an eval set")
    cases = [
        (str(tmp_path / "gone"), f"dedup.eval_sets: {str(tmp_path / 'gone')!r} is not a folder of images or a .tar"),
        (str(tmp_path / "*.tar"), f"dedup.eval_sets: {str(tmp_path / '*.tar')!r} matches nothing"),
        (str(tmp_path / "notes.txt"), f"dedup.eval_sets: {str(tmp_path / 'notes.txt')!r} is not a folder"),
    ]
    for entry, message in cases:
        raw = {
            "output": str(tmp_path / "run"),
            "input": {"path": str(table)},
            "embed": {"model": "curate-tiny"},
            "dedup": {"eval_sets": [str(folder), entry]},
        }
        with pytest.raises(ConfigError) as error:
            run_pipeline(validate_config(raw))
        assert str(error.value).startswith(message) and "\n" not in str(error.value)
        assert not (tmp_path / "run").exists()
