"""Bootstrap a better scorer: train a CLIP on a run's curated shards and export it for `embed.pretrained`.

    curate train-scorer runs/x [--out runs/x/scorer/scorer.pt | s3://...] [--seed 0] [--set validate.samples_seen=N]

The recipe is the run's `validate` section (model, batch size, samples seen, lr, ...). The export holds
open_clip-loadable weights; a later pipeline uses it with `embed.model: <validate.model>` and
`embed.pretrained: <the export>`. A sidecar JSON next to it records the model, recipe and source run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from curate.clip import resolve_model_name
from curate.config import PipelineConfig, load_config
from curate.io.fs import write_json_atomic
from curate.io.storage import Storage, locate, name_of
from curate.stage import RunLayout, digest
from curate.stages.validate.stage import count_samples, curated_shards, train_recipe
from curate.stages.validate.train import Progress, export_model, train_clip

SCORER_DIR = "scorer"


def load_run_config(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """The saved config of the run in `run_dir`, with `overrides` applied."""
    layout = RunLayout(Path(run_dir))
    if not layout.config_path.exists():
        raise FileNotFoundError(f"{run_dir}: not a curate run (no config.yaml)")
    return load_config(layout.config_path, overrides)


def local_export(url: str) -> Path:
    """Where a scorer bound for `url` is trained and exported on this machine before its upload."""
    return Path(tempfile.gettempdir()) / f"curate-scorer-{digest(url)}" / name_of(url)


def training_dir(export: Path, seed: int) -> Path:
    """The training's checkpoints (with optimizer state) beside the export, so an interrupted run resumes."""
    return export.with_name(f"{export.stem}.train-seed{seed}")


def train_scorer(
    run_dir: Path,
    config: PipelineConfig,
    dest: Path | str | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train on `run_dir`/curated with `config`'s validate recipe; write `dest` (weights) and `dest`.json.

    `dest` may be a URL (s3://models/scorer.pt, read and written with `storage.options`): the training's
    checkpoints then live in this machine's temp directory (an interrupted run resumes there), and the export
    and its JSON are uploaded, the JSON last."""
    layout = RunLayout(Path(run_dir))
    cfg = config.validate  # type: ignore[attr-defined]
    if cfg.objective != "clip":
        raise ValueError("train-scorer needs validate.objective 'clip': a scorer embeds captions too")
    shards = curated_shards(layout)
    recipe = train_recipe(cfg, seed)
    target = locate(dest) if dest is not None else layout.root / SCORER_DIR / "scorer.pt"
    if isinstance(target, str):
        storage = Storage(config.storage.options)
        storage.filesystem(target)  # a protocol without its package is an error before any training
        local = local_export(target)
    else:
        local = target
    local.parent.mkdir(parents=True, exist_ok=True)
    result = train_clip(shards, recipe, training_dir(local, seed), progress=progress)
    export_model(result.checkpoint, local)
    info = {
        "model": resolve_model_name(cfg.model, section="validate"),
        "model_setting": cfg.model,
        "pretrained": target if isinstance(target, str) else str(local.resolve()),
        "recipe": recipe.to_dict(),
        "source_run": str(layout.root.resolve()),
        "curated_samples": count_samples(shards),
        "steps": result.steps,
        "loss_first": result.losses[0] if result.losses else None,
        "loss_last": result.losses[-1] if result.losses else None,
    }
    write_json_atomic(local.with_suffix(".json"), info)
    if isinstance(target, str):
        storage.upload(local, target)
        storage.upload(local.with_suffix(".json"), target.removesuffix(local.suffix) + ".json")
    return info
