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


def test_the_demo_pipeline_embeds_with_the_scorers_model_and_validates_with_the_small_recipe(tmp_path: Path) -> None:
    """README, "What the demo shows": curate-cnn-32, 12,800 samples seen per run (200 steps of 64, lr 5e-3), 5 seeds
    per arm, baseline vs curated, the bar on zero-shot colour and shape, prompt ensembles over the other task's
    words; the run embeds with the scorer's model and finds near copies by thumbnail at cosine 0.984."""
    from examples.demo_scorer import MODEL
    from examples.demo_world import classes, colors

    config = load_config(PIPELINES / "demo.yaml", [f"input.path={tmp_path / 'input.parquet'}", f"output={tmp_path}"])
    assert config.stages[-2:] == ["materialize", "validate"]
    assert config.embed.model == MODEL == "curate-cnn-64"
    assert (config.dedup.near_features, config.dedup.near_threshold) == ("thumbnail", 0.984)
    validate = config.validate
    assert (validate.model, validate.batch_size, validate.lr) == ("curate-cnn-32", 64, 5e-3)
    assert validate.samples_seen == 12_800
    assert validate.samples_seen // validate.batch_size == 200 and validate.seeds == 5
    assert validate.arms == ["baseline", "curated"] and validate.baseline_size == "curated"
    assert validate.bar_metrics == ["zero_shot_acc_color", "zero_shot_acc_shape"] and validate.paired_bar == 5
    assert all(any(t.endswith(f" {shape}") for t in validate.templates) for shape in classes())  # colour prompts
    assert all(any(f" {color} " in t for t in validate.task_templates["shape"]) for color in colors())  # shape prompts
