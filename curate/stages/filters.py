"""Filter stage: score columns, then keep decisions, from a small registry of named filters.

Each filter computes one value per sample and keeps it or not; a sample is dropped by the first
filter (in registry order, cheapest first) that rejects it, with the filter's name as the ledger
reason and the value in `detail`. The CLIP scores were computed once by the embed stage, so changing
a threshold re-runs this stage and later ones only. After the built-in filters come the thresholds on the
scores of `embed.heads` (`min_scores`, `max_scores`: reason = the head's name), then the user's plugin filters
(`filter.custom`, `curate.plugins`: reason = the plugin's name) in the order the config lists them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.config import ConfigError, FilterConfig
from curate.io.fs import write_json_atomic
from curate.ledger import Status, make_fates
from curate.plugins import Plugin, PluginFilter, plugin_inputs, resolve_plugins
from curate.stage import Phase, Stage, StageContext, StageOutputs, TaskOutput, run_shards, single_task
from curate.stages.download import DownloadOutputs
from curate.stages.embed import EmbedOutputs, EmbedStage
from curate.stages.score_sketch import FirstPass, Plan, SecondPass, plan_for, summarize, summarize_parts

if TYPE_CHECKING:
    from curate.config import PipelineConfig


@dataclass(frozen=True)
class Filter:
    """A named rule: `value` computes one number per sample, `keep` decides from it."""

    name: str
    value: Callable[[pa.Table], np.ndarray]
    keep: Callable[[np.ndarray], np.ndarray]
    rule: str  # how the detail explains a drop, e.g. ">= 3 words"

    def decide(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        values = self.value(table)
        return values, np.asarray(self.keep(values), dtype=bool)


class Rule(Protocol):
    """What `apply_filters` takes: a built-in `Filter` or a plugin's `PluginFilter`."""

    @property
    def name(self) -> str: ...

    @property
    def rule(self) -> str: ...

    def decide(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]: ...


BUILTIN_FILTERS = ("caption_words", "caption_chars", "min_side", "max_aspect_ratio", "clip_score")
EMBED_ROW = "__embed_row"
"""A column of `filter_inputs`: each row's position in the shard's embedding arrays."""


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False).astype(np.float64)


def _caption_words(t: pa.Table) -> np.ndarray:
    return pc.list_value_length(pc.utf8_split_whitespace(t["caption"])).to_numpy(zero_copy_only=False).astype(float)


def _caption_chars(t: pa.Table) -> np.ndarray:
    return pc.utf8_length(t["caption"]).to_numpy(zero_copy_only=False).astype(float)


def _min_side(t: pa.Table) -> np.ndarray:
    return np.fmin(_column(t, "width"), _column(t, "height"))


def _aspect_ratio(t: pa.Table) -> np.ndarray:
    width, height = _column(t, "width"), _column(t, "height")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.fmax(width, height) / np.fmin(width, height)


def build_filters(cfg: FilterConfig, clip_cutoff: float | None) -> list[Filter]:
    """The enabled filters in the order they are applied (cheap caption checks first)."""
    filters = []
    if cfg.caption_min_words is not None:
        n = cfg.caption_min_words
        filters.append(Filter("caption_words", _caption_words, lambda v: v >= n, f">= {n} words"))
    if cfg.caption_min_chars is not None:
        n = cfg.caption_min_chars
        filters.append(Filter("caption_chars", _caption_chars, lambda v: v >= n, f">= {n} characters"))
    if cfg.min_side is not None:
        px = cfg.min_side
        filters.append(Filter("min_side", _min_side, lambda v: v >= px, f">= {px} px"))
    if cfg.max_aspect_ratio is not None:
        r = cfg.max_aspect_ratio
        filters.append(Filter("max_aspect_ratio", _aspect_ratio, lambda v: v <= r, f"<= {r:g}"))
    if clip_cutoff is not None:
        cutoff = clip_cutoff
        filters.append(
            Filter("clip_score", lambda t: _column(t, "clip_score"), lambda v: v >= cutoff, f">= {cutoff:.4f}")
        )
    filters += [_score_filter(name, bound, at_least=True) for name, bound in cfg.min_scores.items()]
    filters += [_score_filter(name, bound, at_least=False) for name, bound in cfg.max_scores.items()]
    return filters


def _score_filter(column: str, bound: float, at_least: bool) -> Filter:
    """A threshold on a score column an `embed.heads` plugin wrote; its reason is the column's name."""

    def keep(values: np.ndarray) -> np.ndarray:
        return values >= bound if at_least else values <= bound

    return Filter(column, lambda t: _column(t, column), keep, f"{'>=' if at_least else '<='} {bound:g}")


def apply_filters(table: pa.Table, filters: Sequence[Rule]) -> pa.Table:
    """Fates for `table` (uid, caption, width, height, clip_score): first rejecting filter wins."""
    n = table.num_rows
    status = np.full(n, Status.KEPT.value, dtype=object)
    reason = np.full(n, None, dtype=object)
    detail = np.full(n, None, dtype=object)
    undecided = np.ones(n, dtype=bool)
    for rule in filters:
        # NaN compares False: a missing value (no size, no score) does not pass a filter that needs it
        values, keep = rule.decide(table)
        rejected = undecided & ~keep
        status[rejected] = Status.DROPPED.value
        reason[rejected] = rule.name
        detail[rejected] = [f"{rule.name}={_format(v)} (needs {rule.rule})" for v in values[rejected]]
        undecided &= ~rejected
    return make_fates(table["uid"], list(status), list(reason), list(detail), clip_score=table["clip_score"])


def _format(value: float) -> str:
    if math.isnan(value):
        return "missing"
    return f"{value:.4f}" if not float(value).is_integer() else f"{int(value)}"


def top_fraction_cutoff(scores: np.ndarray, fraction: float) -> float:
    """The score of the last sample inside the top `fraction` (ties at the cutoff are kept too)."""
    return summarize_parts([scores], fraction)["top_fraction_cutoff"]  # type: ignore[return-value]


def score_summary(scores: np.ndarray) -> dict[str, object]:
    """Quantiles and the kept fraction over a grid of thresholds: what a user needs to pick one."""
    return summarize_parts([scores])["summary"]  # type: ignore[return-value]


class FilterOutputs(StageOutputs):
    stage = "filter"

    @property
    def summary_path(self) -> Path:
        return self.folder / "summary.json"

    def sketch_path(self, kind: str, shard: str = "run") -> Path:
        """The score sketch's per-shard passes ("counts", "refine") and the plan between them."""
        return self.folder / "sketch" / kind / f"{shard}.npz"

    def plan_path(self) -> Path:
        return self.folder / "sketch" / "plan.json"

    def summary(self) -> dict[str, Any]:
        return self.layout.read_json(self.summary_path)


class FilterStage(Stage):
    name = "filter"
    outputs = FilterOutputs

    def __init__(self, config: PipelineConfig) -> None:
        super().__init__(config)
        self._custom: list[tuple[Plugin, Callable[..., Any]]] | None = None

    @property
    def cfg(self) -> FilterConfig:
        return self.config.filter

    def custom_plugins(self) -> list[Plugin]:
        reserved = (*BUILTIN_FILTERS, *self.cfg.min_scores, *self.cfg.max_scores)
        return resolve_plugins(self.cfg.custom, "filter.custom", reserved=reserved)

    def fingerprint_extras(self) -> dict[str, Any]:
        return {"custom": [plugin.identity() for plugin in self.custom_plugins()]} if self.cfg.custom else {}

    def preflight(self) -> None:
        """The plugin filters import and take their settings; every thresholded score is a head's column."""
        self.custom_plugins()
        if not (self.cfg.min_scores or self.cfg.max_scores):
            return
        heads = [plugin.name for plugin in EmbedStage(self.config).heads()]
        for key, columns in (("min_scores", self.cfg.min_scores), ("max_scores", self.cfg.max_scores)):
            for column in columns:
                if column not in heads:
                    close = difflib.get_close_matches(column, heads, n=1, cutoff=0.6)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    scored = f"the heads score {', '.join(map(repr, heads))}" if heads else "embed.heads is empty"
                    raise ConfigError(f"filter.{key}.{column}: no embed.heads plugin writes {column!r}{hint}; {scored}")

    def setup(self) -> None:
        self._custom = [(plugin, plugin.build()) for plugin in self.custom_plugins()]

    def phases(self) -> list[Phase]:
        """The run-wide cutoff in two exact passes over per-shard score sketches, then the per-shard decisions."""
        return [
            Phase("counts", run_shards, self._count_scores),
            Phase("plan", single_task, self._plan),
            Phase("refine", run_shards, self._refine_scores),
            Phase("cutoff", single_task, self._cutoff),
            self.fate_phase(),
        ]

    def _count_scores(self, ctx: StageContext, shard: str, workdir: Path) -> TaskOutput:
        first = FirstPass.of(self._shard_scores(ctx, shard))
        save_arrays(workdir, FilterOutputs(ctx.layout).sketch_path("counts", shard), first.to_arrays(), ctx)
        return TaskOutput(counts={"scores": first.n})

    def _plan(self, ctx: StageContext, _task: str, workdir: Path) -> TaskOutput:
        first = self._first_pass(ctx)
        plan = plan_for(first, self.cfg.clip_rules()[1])
        target = workdir / FilterOutputs(ctx.layout).plan_path().relative_to(ctx.layout.stage_dir(self.name))
        write_json_atomic(target, dataclasses.asdict(plan))
        return TaskOutput(counts={"refined_bins": len(plan.refine)})

    def _refine_scores(self, ctx: StageContext, shard: str, workdir: Path) -> TaskOutput:
        second = SecondPass.of(self._shard_scores(ctx, shard), self._read_plan(ctx))
        save_arrays(workdir, FilterOutputs(ctx.layout).sketch_path("refine", shard), second.to_arrays(), ctx)
        return TaskOutput()

    def _first_pass(self, ctx: StageContext) -> FirstPass:
        outputs = FilterOutputs(ctx.layout)
        counts = (load_arrays(ctx.layout.fetch(outputs.sketch_path("counts", s))) for s in ctx.shards)
        return FirstPass.merge(FirstPass.from_arrays(arrays) for arrays in counts)

    def _read_plan(self, ctx: StageContext) -> Plan:
        raw = ctx.layout.read_json(FilterOutputs(ctx.layout).plan_path())
        hist_range = tuple(raw["hist_range"]) if raw["hist_range"] is not None else None
        return Plan(tuple(raw["refine"]), tuple(raw["thresholds"]), raw["hist_bins"], hist_range)  # type: ignore[arg-type]

    def _cutoff(self, ctx: StageContext, _task: str, workdir: Path) -> TaskOutput:
        """Run-wide step: the score distribution, and the cutoff a top fraction implies (merged sketches)."""
        outputs, plan = FilterOutputs(ctx.layout), self._read_plan(ctx)
        first = self._first_pass(ctx)
        refined = (load_arrays(ctx.layout.fetch(outputs.sketch_path("refine", s))) for s in ctx.shards)
        parts = (SecondPass.from_arrays(arrays, plan) for arrays in refined)
        threshold, fraction = self.cfg.clip_rules()  # clip_combine: both (the higher cutoff) or one of them
        sketch = summarize(first, SecondPass.merge(parts, plan), plan, fraction)
        cutoffs = []
        if threshold is not None:
            cutoffs.append(threshold)
        top_cutoff = None
        if fraction is not None:
            top_cutoff = sketch["top_fraction_cutoff"]
            cutoffs.append(top_cutoff)
        summary = {
            "clip_score": sketch["summary"],
            "clip_score_histogram": sketch["histogram"],
            "clip_threshold": threshold,
            "clip_top_fraction": fraction,
            "top_fraction_cutoff": top_cutoff,
            "clip_cutoff": max(cutoffs) if cutoffs else None,
            "filters": [
                *(f.name for f in build_filters(self.cfg, max(cutoffs) if cutoffs else None)),
                *(plugin.name for plugin in self.custom_plugins()),
            ],
        }
        write_json_atomic(workdir / outputs.summary_path.name, summary)
        return TaskOutput(counts={"scores": first.n})

    def _shard_scores(self, ctx: StageContext, shard: str) -> np.ndarray:
        metadata = EmbedOutputs(ctx.layout).metadata(shard, columns=["clip_score"])
        return metadata["clip_score"].to_numpy(zero_copy_only=False)

    def expected_uids(self, ctx: StageContext, shard: str) -> pa.Array:
        return EmbedOutputs(ctx.layout).kept_uids(shard)

    def process_shard(self, ctx: StageContext, shard: str, workdir: Path) -> pa.Table:
        cutoff = FilterOutputs(ctx.layout).summary()["clip_cutoff"]
        table = self.filter_inputs(ctx, shard)
        rows = table[EMBED_ROW].to_numpy()
        table = table.drop_columns([EMBED_ROW])
        return apply_filters(table, [*build_filters(self.cfg, cutoff), *self.custom_filters(ctx, shard, rows)])

    def filter_inputs(self, ctx: StageContext, shard: str) -> pa.Table:
        """The embedded samples' metadata (uid, url, caption, clip_score, the heads' scores) with the original size
        from download, in uid order, and `EMBED_ROW`."""
        layout = ctx.layout
        metadata = EmbedOutputs(layout).metadata_with_scores(shard)
        metadata = metadata.append_column(EMBED_ROW, pa.array(np.arange(metadata.num_rows, dtype=np.int64)))
        metadata = metadata.filter(pc.is_in(metadata["uid"], self.expected_uids(ctx, shard)))
        sizes = DownloadOutputs(layout).fates(shard, ["uid", "width", "height"])
        return metadata.join(sizes, "uid", join_type="left outer").sort_by("uid")

    def custom_filters(self, ctx: StageContext, shard: str, rows: np.ndarray) -> list[PluginFilter]:
        """The plugin filters bound to this shard's embeddings (those they ask for), row-aligned with the table."""
        if not self.cfg.custom:
            return []
        if self._custom is None:
            self.setup()
        embed, loaded = EmbedOutputs(ctx.layout), {}

        def load(need: str) -> np.ndarray:
            if need not in loaded:
                stored = embed.image_embeddings(shard) if need == "image_embeddings" else embed.text_embeddings(shard)
                loaded[need] = stored[rows].astype(np.float32)
            return loaded[need]

        custom = self._custom or []
        return [PluginFilter(plugin, function, plugin_inputs(plugin, load)) for plugin, function in custom]


def save_arrays(workdir: Path, path: Path, arrays: dict[str, np.ndarray], ctx: StageContext) -> None:
    """Write `arrays` to where `path` lies under the stage folder, inside the task's scratch `workdir`."""
    target = workdir / path.relative_to(ctx.layout.stage_dir(FilterOutputs.stage))
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as handle:
        np.savez(handle, **arrays)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return dict(data)
