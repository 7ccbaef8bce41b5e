"""The one registry of stages, in pipeline order. Adding a stage is a module and a line here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from curate.stage import Stage
from curate.stages.dedup.stage import DedupStage
from curate.stages.download import DownloadStage
from curate.stages.embed import EmbedStage
from curate.stages.filters import FilterStage
from curate.stages.input import InputStage
from curate.stages.ledger import LedgerStage
from curate.stages.materialize import MaterializeStage
from curate.stages.validate.stage import ValidateStage

if TYPE_CHECKING:
    from curate.config import PipelineConfig

STAGES: tuple[type[Stage], ...] = (
    InputStage,
    DownloadStage,
    EmbedStage,
    FilterStage,
    DedupStage,
    MaterializeStage,
    ValidateStage,
)


def stage_names() -> tuple[str, ...]:
    return tuple(stage.name for stage in STAGES)


def default_stage_names() -> tuple[str, ...]:
    return tuple(stage.name for stage in STAGES if stage.default)


def stage_class(name: str) -> type[Stage]:
    for stage in (*STAGES, LedgerStage):
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage {name!r}")


def fate_stage_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """The stages among `names` that decide row fates, in pipeline order."""
    return [name for name in names if stage_class(name).decides_fates]


def plan(config: PipelineConfig) -> list[Stage]:
    """The configured stages in order, with the ledger right after the last stage that decides fates."""
    stages = [cls(config) for cls in STAGES if cls.name in config.stages]
    last_fate = max(i for i, stage in enumerate(stages) if stage.decides_fates)
    stages.insert(last_fate + 1, LedgerStage(config))
    return stages
