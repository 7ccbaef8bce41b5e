"""The pipelines users start from (LAION-400M, DataComp small, CC12M): they load, and their column
mapping reads a small file laid out like the real metadata."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config import PipelineConfig, load_config
from curate.stages.input import inspect_sources, open_table_reader

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
URLS = ["http://example.com/a.jpg", "http://example.com/b.jpg"]
CAPTIONS = ["a red bicycle against a wall", "two dogs on a beach"]


def write_laion(path: Path) -> None:
    table = {"SAMPLE_ID": [17, 18], "URL": URLS, "TEXT": CAPTIONS, "HEIGHT": [480, 512], "WIDTH": [640, 512],
             "LICENSE": ["?", "?"], "NSFW": ["UNLIKELY", "UNLIKELY"], "similarity": [0.31, 0.35]}  # fmt: skip
    pq.write_table(pa.table(table), path)


def write_datacomp(path: Path) -> None:
    table = {"uid": ["0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"], "url": URLS,
             "text": CAPTIONS, "original_width": [640, 512], "original_height": [480, 512]}  # fmt: skip
    pq.write_table(pa.table(table), path)


def write_cc12m(path: Path) -> None:
    path.write_text("".join(f"{url}\t{caption}\n" for url, caption in zip(URLS, CAPTIONS, strict=True)))


@dataclass(frozen=True)
class Shipped:
    name: str
    input_file: str
    write_input: Callable[[Path], None]
    model: str
    pretrained: str
    clip_rules: tuple[float | None, float | None]  # (threshold, top fraction)


SHIPPED = [
    Shipped("laion400m", "part-00000.parquet", write_laion, "ViT-B-32", "openai", (0.3, None)),
    Shipped("datacomp_small", "0000.parquet", write_datacomp, "ViT-L-14", "openai", (None, 0.3)),
    Shipped("cc12m", "cc12m.tsv", write_cc12m, "ViT-B-32", "openai", (0.28, None)),
]


def load_shipped(shipped: Shipped, tmp_path: Path) -> PipelineConfig:
    overrides = [f"input.path={tmp_path / shipped.input_file}", f"output={tmp_path / 'run'}"]
    return load_config(PIPELINES / f"{shipped.name}.yaml", overrides)


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda s: s.name)
def test_shipped_pipeline_loads_with_the_anchor_settings(shipped: Shipped, tmp_path: Path) -> None:
    config = load_shipped(shipped, tmp_path)
    assert config.input.paths() == [str(tmp_path / shipped.input_file)]
    assert config.output == str(tmp_path / "run")
    assert (config.embed.model, config.embed.pretrained) == (shipped.model, shipped.pretrained)
    assert config.filter.clip_rules() == shipped.clip_rules
    assert config.input.shard_size == config.materialize.samples_per_shard == 10_000


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda s: s.name)
def test_shipped_column_mapping_reads_the_dataset_layout(shipped: Shipped, tmp_path: Path) -> None:
    shipped.write_input(tmp_path / shipped.input_file)
    config = load_shipped(shipped, tmp_path)
    [source] = inspect_sources(config.input)
    with open_table_reader(source, config.input) as reader:
        table = pa.concat_tables(reader.batches())
    assert [url.decode() for url in table["url"].to_pylist()] == URLS
    assert [caption.decode() for caption in table["caption"].to_pylist()] == CAPTIONS


def test_datacomp_small_keeps_its_uids_and_trains_with_its_recipe(tmp_path: Path) -> None:
    config = load_shipped(SHIPPED[1], tmp_path)
    assert config.input.uid_col == "uid"
    assert (config.validate.model, config.validate.batch_size, config.validate.samples_seen) == (
        "ViT-B-32",
        4096,
        12_800_000,
    )
