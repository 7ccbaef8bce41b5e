"""One small complete run (every stage through materialize) over the served demo world, shared by the report
and search tests: a module's fixture returns `shared_curated_run(...)`, which builds it once per session.

With the demo scorer trained (`python -m examples.demo_scorer`, it writes runs/demo-scorer/; or set
CURATE_DEMO_SCORER to its folder) the run embeds with it and filters at its suggested threshold, so scores
and search rankings mean something; without it the tiny model has random weights and the class-precision
tests skip.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from curate.config import load_config
from curate.io.fs import read_json
from curate.pipeline import run_pipeline
from examples.demo_checks import truth_by_uid
from tests.world_fixtures import ServedWorld

REPO = Path(__file__).resolve().parent.parent
ALL_STAGES = "stages=[input,download,embed,filter,dedup,materialize]"
_built: dict[Path, CuratedRun] = {}


@dataclass(frozen=True)
class CuratedRun:
    root: Path
    truth: pd.DataFrame  # demo-world ground truth indexed by uid: kind, shape, color, ...
    scorer: Path | None  # the demo scorer checkpoint the run embedded with; None: random weights


def demo_scorer() -> tuple[Path, float, str] | None:
    """(checkpoint, suggested threshold, model) of an already trained demo scorer of the current recipe's model, or
    None. Never trains one."""
    from examples.demo_scorer import MODEL

    folder = Path(os.environ.get("CURATE_DEMO_SCORER", REPO / "runs" / "demo-scorer"))
    info_path, checkpoint = folder / "scorer.json", folder / "scorer.pt"
    if not (info_path.exists() and checkpoint.exists()):
        return None
    info = read_json(info_path)
    if info.get("model") != MODEL:
        return None
    return checkpoint, float(info["calibration"]["suggested_threshold"]), MODEL


def fixed_random_checkpoint(path: Path) -> Path:
    import open_clip
    import torch

    from curate.stages.embed import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.create_model("curate-tiny").state_dict()}, path)
    return path


def build_curated_run(world: ServedWorld, folder: Path) -> CuratedRun:
    scorer = demo_scorer()
    overrides = [
        ALL_STAGES,
        f"embed.model={scorer[2] if scorer else 'curate-tiny'}",
        "embed.device=cpu",
        "embed.batch_size=64",
        "filter.caption_min_words=2",
        # the tiny scorer's image embeddings are close for any two images of one colour on one background,
        # so the default 0.95 would merge most of the run into a few groups
        "dedup.near_threshold=0.995",
    ]
    if scorer is not None:
        overrides += [f"embed.pretrained={scorer[0]}", f"filter.clip_threshold={scorer[1]:.4f}"]
    else:  # fixed random weights: the search must load the very model the run embedded with
        overrides += [f"embed.pretrained={fixed_random_checkpoint(folder / 'tiny.pt')}", "filter.clip_top_fraction=0.7"]
    # the scorer was trained on images resized like the demo pipeline's download (224 px)
    pipeline = world.pipeline(folder, output=folder / "run", download={"image_size": 224})
    result = run_pipeline(load_config(pipeline, overrides))
    assert result.complete, "the shared test run did not complete"
    truth = truth_by_uid(world.world.truth, world.table).set_index("uid")
    return CuratedRun(result.layout.root, truth, scorer[0] if scorer else None)


def shared_curated_run(served_world: ServedWorld, tmp_path_factory: pytest.TempPathFactory) -> CuratedRun:
    key = tmp_path_factory.getbasetemp()
    if key not in _built:
        _built[key] = build_curated_run(served_world, tmp_path_factory.mktemp("curated-run"))
    return _built[key]


@pytest.fixture(scope="session")
def curated_run(served_world: ServedWorld, tmp_path_factory: pytest.TempPathFactory) -> CuratedRun:
    """One complete demo-world run through every stage, shared by the report and search tests."""
    return shared_curated_run(served_world, tmp_path_factory)
