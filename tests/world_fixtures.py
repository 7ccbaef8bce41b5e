"""Shared fixtures: a small demo world, served on loopback for the whole test session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from examples.demo_world import DemoServer, World, generate_world, write_input_table

SMALL_WORLD_BASE_ROWS = 80


@dataclass(frozen=True)
class ServedWorld:
    world: World
    server: DemoServer
    table: Path

    def pipeline(self, tmp_path: Path, output: Path | None = None, **sections: dict) -> Path:
        """Write a pipeline YAML over this world; `sections` update the default settings."""
        config = {
            "output": str(output or tmp_path / "run"),
            "stages": ["input", "download"],
            "input": {"path": str(self.table), "shard_size": 25},
            "download": {
                "image_size": 64,
                "min_image_size": 64,
                "timeout": 1,
                "threads": 16,
                "processes": 1,
                "allow_hosts": [self.server.base_url.removeprefix("http://")],  # the loopback server only
            },
        }
        for key, values in sections.items():
            config[key] = {**config.get(key, {}), **values}
        tmp_path.mkdir(parents=True, exist_ok=True)
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump(config))
        return path


@pytest.fixture(scope="session")
def served_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedWorld]:
    root = tmp_path_factory.mktemp("world")
    world = generate_world(root, n_base=SMALL_WORLD_BASE_ROWS, seed=3)
    with DemoServer(world.root, slow_delay_s=0.3, hang_s=3.0) as server:
        table = write_input_table(world, server.base_url, root / "crawl.parquet")
        yield ServedWorld(world, server, table)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fixed tiny-model weights: every process (and every worker) must load the same model."""
    import open_clip
    import torch

    from curate.stages.embed import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("curate-tiny")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def full_pipeline_overrides(checkpoint: Path) -> list[str]:
    """Every stage up to materialize, small shards, the tiny model with fixed weights."""
    return [
        "stages=[input,download,embed,filter,dedup,materialize]",
        "input.shard_size=8",
        "embed.model=curate-tiny",
        f"embed.pretrained={checkpoint}",
        "embed.batch_size=16",
        "filter.caption_min_words=2",
        "dedup.near_threshold=null",
        "materialize.samples_per_shard=40",
    ]
