"""The training sets validation compares: the run's curated/ set and subsets of its download chosen by rules
re-applied to the scores the run saved (score, then decide: nothing is re-embedded).

    curated        the run's curated/ shards: every filter, then dedup (the full pipeline)
    baseline       a random subset of the download as large as curated/ (`validate.baseline_size`)
    no_filter      every downloaded sample
    basic_filters  downloads that pass the run's caption and image-size filters (caption_min_words,
                   caption_min_chars, min_side, max_aspect_ratio), no CLIP score, no dedup
    clip_score     downloads whose saved CLIP score passes the run's cutoff (its threshold or its top
                   fraction's cutoff, as the filter stage computed it), nothing else

Every arm but curated leaves out the downloads within dedup's contamination threshold of an eval image (curated/
already does when dedup decontaminates). Each is written once to OUTPUT/validate/<arm>-data/*.tar, by download
shard and by uid, so that the training stream does not follow the order img2dataset's fetches finished in.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from curate.io.fs import write_json_atomic
from curate.io.wds import iter_samples
from curate.stage import RunLayout, StageContext, digest
from curate.stages.download import DownloadOutputs
from curate.stages.embed import EmbedOutputs

if TYPE_CHECKING:
    from curate.config import PipelineConfig

log = logging.getLogger(__name__)

ARMS: dict[str, str] = {
    "curated": "the run's curated/ set (full pipeline)",
    "baseline": "random subset of the download, as large as curated/",
    "no_filter": "every downloaded sample",
    "basic_filters": "downloads passing the caption and image-size filters",
    "clip_score": "downloads passing the CLIP-score cutoff only",
}
BASIC_FILTERS = ("caption_min_words", "caption_min_chars", "min_side", "max_aspect_ratio")  # their settings
BASIC_RULES = ("caption_words", "caption_chars", "min_side", "max_aspect_ratio")  # and the filters' names
SUBSET_RULE = 3  # bump when the way a subset is drawn changes: its runs are then retrained
STAGE = "validate"


def data_folder(layout: RunLayout, arm: str) -> Path:
    return layout.stage_dir(STAGE) / f"{arm}-data"


def check_arms(config: PipelineConfig) -> None:
    """ConfigError naming `validate.arms` when an arm needs a rule or a stage the run does not have."""
    from curate.config import ConfigError

    arms, filters = config.validate.arms, config.filter  # type: ignore[attr-defined]
    if "basic_filters" in arms and all(getattr(filters, key) is None for key in BASIC_FILTERS):
        raise ConfigError(
            f"validate.arms: basic_filters needs one of filter.{', filter.'.join(BASIC_FILTERS)} in the run's config"
        )
    if "clip_score" in arms and filters.clip_rules() == (None, None):
        raise ConfigError("validate.arms: clip_score needs filter.clip_threshold or filter.clip_top_fraction")
    needs_filter = sorted({"basic_filters", "clip_score"} & set(arms))
    if needs_filter and "filter" not in config.stages:
        raise ConfigError(f"validate.arms: {', '.join(needs_filter)} re-apply the filter stage's rules; add filter")


@dataclass(frozen=True)
class Subset:
    shards: list[Path]
    samples: int
    pool: int  # the samples the arm chose from
    fingerprint: str


def subset_fingerprint(config: PipelineConfig, arm: str, upstream: str) -> str:
    cfg = config.validate  # type: ignore[attr-defined]
    rules: dict[str, Any] = {"rule": SUBSET_RULE, "arm": arm, "upstream": upstream}
    if arm == "baseline":
        rules.update(size=cfg.baseline_size, seed=cfg.baseline_seed)
    return digest(rules)


def read_subset(layout: RunLayout, arm: str, fingerprint: str) -> Subset | None:
    """The arm's written subset, when its marker holds `fingerprint`."""
    folder = data_folder(layout, arm)
    try:
        done = layout.read_json(folder / "_done.json")
    except FileNotFoundError:
        return None
    if done["fingerprint"] != fingerprint:
        return None
    shards = [layout.fetch(tar) for tar in layout.glob(folder, "*.tar")]
    return Subset(shards, int(done["samples"]), int(done["pool"]), fingerprint)


def ensure_subset(config: PipelineConfig, ctx: StageContext, arm: str, n_curated: int, upstream: str) -> Subset:
    """Write (or reuse) validate/<arm>-data/*.tar for an arm other than curated."""
    if arm not in ARMS or arm == "curated":
        raise ValueError(f"ensure_subset: {arm!r} is not an arm drawn from the download")
    fingerprint = subset_fingerprint(config, arm, upstream)
    existing = read_subset(ctx.layout, arm, fingerprint)
    if existing is not None:
        return existing
    shards = list(ctx.shards)
    pool = choose(config, ctx, arm, shards) - contaminated_uids(config, ctx.layout, shards)
    chosen = pool
    if arm == "baseline":
        size = baseline_size(config, n_curated, len(pool))
        chosen = random_subset(sorted(pool), size, config.validate.baseline_seed)  # type: ignore[attr-defined]
    marker = {"fingerprint": fingerprint, "samples": len(chosen), "pool": len(pool)}
    write_subset(ctx.layout, arm, shards, chosen, marker)
    log.info("validate: %s arm: %d of %d downloaded samples", arm, len(chosen), len(pool))
    return Subset(sorted(data_folder(ctx.layout, arm).glob("*.tar")), len(chosen), len(pool), fingerprint)


def choose(config: PipelineConfig, ctx: StageContext, arm: str, shards: Sequence[str]) -> set[str]:
    """The uids an arm's rule keeps, before the eval set's neighbours are taken out."""
    if arm in ("baseline", "no_filter"):
        return set(baseline_pool(ctx.layout, shards, set()))
    return set().union(*(passing(config, ctx, shard, arm) for shard in shards))


def baseline_pool(layout: RunLayout, shards: Sequence[str], contaminated: set[str]) -> list[str]:
    """Every successfully downloaded uid, minus those close to an eval image: the unfiltered data."""
    pool: set[str] = set()
    for shard in shards:
        pool.update(DownloadOutputs(layout).kept_uids(shard).to_pylist())
    return sorted(pool - contaminated)


def contaminated_uids(config: PipelineConfig, layout: RunLayout, shards: Sequence[str]) -> set[str]:
    """Downloaded uids within dedup's contamination threshold of an eval image. dedup only sees the samples
    that passed the filters; the other arms draw from every download, so the same rule is applied to all,
    with the evaluation embeddings dedup's `eval` phase computed."""
    if not config.dedup.eval_sets or "embed" not in config.stages:
        return set()
    from curate.stages.dedup.decontaminate import contaminated
    from curate.stages.dedup.stage import DedupOutputs

    dedup = DedupOutputs(layout)
    if layout.exists(dedup.eval_paths()[0]):
        eval_emb, _ = dedup.eval_embeddings()
    else:  # dedup ran without these eval sets
        from curate.io.storage import Storage
        from curate.stages.dedup.decontaminate import embed_eval_sets

        eval_emb, _ = embed_eval_sets(config.dedup.eval_sets, config.embed, Storage(config.storage.options))
    found: set[str] = set()
    embed = EmbedOutputs(layout)
    for shard in shards:
        if not embed.has(shard):  # a shard with no downloaded image
            continue
        uids = embed.metadata(shard, columns=["uid"])["uid"]
        mask = contaminated(embed.image_embeddings(shard), eval_emb, config.dedup.contamination_threshold).mask
        found.update(uid for uid, hit in zip(uids.to_pylist(), mask, strict=True) if hit)
    return found


def passing(config: PipelineConfig, ctx: StageContext, shard: str, arm: str) -> set[str]:
    """The shard's embedded samples that the filter stage's rules of `arm` keep, decided from its saved scores."""
    from curate.stages.filters import FilterOutputs, FilterStage, apply_filters, build_filters

    if not EmbedOutputs(ctx.layout).has(shard):  # a shard with no downloaded image
        return set()
    if arm == "basic_filters":
        rules = [rule for rule in build_filters(config.filter, None) if rule.name in BASIC_RULES]
    elif arm == "clip_score":
        cutoff = FilterOutputs(ctx.layout).summary()["clip_cutoff"]
        rules = [rule for rule in build_filters(config.filter, cutoff) if rule.name == "clip_score"]
    else:
        raise ValueError(f"passing: {arm!r} is not a filter arm")
    table = FilterStage(config).filter_inputs(ctx, shard)
    table = table.drop_columns([c for c in table.column_names if c.startswith("__")])
    fates = apply_filters(table, rules)
    kept = np.asarray(fates["status"].to_pylist()) == "kept"
    return {uid for uid, keep in zip(fates["uid"].to_pylist(), kept, strict=True) if keep}


def random_subset(pool: Sequence[str], size: int, seed: int) -> set[str]:
    picked = np.random.default_rng(seed).choice(len(pool), size=min(size, len(pool)), replace=False)
    return {pool[i] for i in picked}


def baseline_size(config: PipelineConfig, n_curated: int, n_pool: int) -> int:
    size = config.validate.baseline_size  # type: ignore[attr-defined]
    if size == "curated":
        return min(n_curated, n_pool)
    if size == "all":
        return n_pool
    return min(int(size), n_pool)


def write_subset(layout: RunLayout, arm: str, shards: Sequence[str], chosen: set[str], marker: dict[str, Any]) -> None:
    """Copy the chosen samples out of the download's tars, download shard by shard, each by uid; marker last."""
    import webdataset as wds

    from curate.stages.materialize import uid_hex

    folder = data_folder(layout, arm)
    scratch = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
    scratch.mkdir(parents=True)
    try:
        with wds.ShardWriter(str(scratch / "%05d.tar"), maxcount=10_000, verbose=0) as writer:
            for shard in shards:
                tar_path = DownloadOutputs(layout).tar_path(shard)
                if not layout.exists(tar_path):  # a shard with no downloaded image
                    continue
                found = {s.uid: s for s in iter_samples(layout.fetch(tar_path), chosen)}
                for uid in sorted(found):
                    writer.write({"__key__": uid_hex(uid), **found[uid].members})  # a key never holds a dot
        write_json_atomic(scratch / "_done.json", marker)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
