"""Filters keep and drop exactly what their thresholds say; the top fraction is run-wide."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from curate.config import FilterConfig, validate_config
from curate.io.fs import write_parquet_atomic
from curate.ledger import make_fates, read_fate_parts
from curate.runner import run_shard
from curate.stage import RunLayout, StageContext
from curate.stages.filters import FilterStage, apply_filters, build_filters, score_summary, top_fraction_cutoff


def samples(captions, widths, heights, scores) -> pa.Table:  # type: ignore[no-untyped-def]
    n = len(captions)
    return pa.table(
        {
            "uid": [f"u{i:03d}" for i in range(n)],
            "caption": captions,
            "width": pa.array(widths, pa.int32()),
            "height": pa.array(heights, pa.int32()),
            "clip_score": pa.array(scores, pa.float32()),
        }
    )


def decisions(fates: pa.Table) -> list[tuple[str, str | None]]:
    return list(zip(fates["status"].to_pylist(), fates["reason"].to_pylist(), strict=True))


def test_each_filter_keeps_at_its_threshold_and_drops_below():
    table = samples(
        ["two words", "three small words", "x", "a long enough caption", "a long enough caption", "fine caption here"],
        [300, 300, 300, 199, 900, 300],
        [300, 300, 300, 400, 200, 300],
        [0.9, 0.9, 0.9, 0.9, 0.9, 0.2799],
    )
    cfg = FilterConfig(caption_min_words=3, min_side=200, max_aspect_ratio=3.0, clip_threshold=0.28)
    fates = apply_filters(table, build_filters(cfg, cfg.clip_threshold))
    assert decisions(fates) == [
        ("dropped", "caption_words"),
        ("kept", None),
        ("dropped", "caption_words"),
        ("dropped", "min_side"),
        ("dropped", "max_aspect_ratio"),
        ("dropped", "clip_score"),
    ]
    details = fates["detail"].to_pylist()
    assert details[0] == "caption_words=2 (needs >= 3 words)"
    assert details[3] == "min_side=199 (needs >= 200 px)"
    assert details[4] == "max_aspect_ratio=4.5000 (needs <= 3)"
    assert details[5] == "clip_score=0.2799 (needs >= 0.2800)"
    assert fates["clip_score"].to_pylist()[1] == pytest.approx(0.9)


def test_boundary_values_are_kept():
    table = samples(["abcde", "abcd"], [200, 200], [600, 600], [0.28, 0.28])
    cfg = FilterConfig(caption_min_chars=5, min_side=200, max_aspect_ratio=3.0, clip_threshold=0.28)
    fates = apply_filters(table, build_filters(cfg, np.float32(0.28).item()))
    assert decisions(fates) == [("kept", None), ("dropped", "caption_chars")]


def test_missing_size_fails_a_size_filter_but_not_a_caption_filter():
    table = samples(["three words here"], [None], [None], [0.5])
    assert decisions(apply_filters(table, build_filters(FilterConfig(caption_min_words=3), None))) == [("kept", None)]
    fates = apply_filters(table, build_filters(FilterConfig(min_side=10), None))
    assert decisions(fates) == [("dropped", "min_side")]
    assert fates["detail"][0].as_py() == "min_side=missing (needs >= 10 px)"


def test_presets_fill_in_values_and_explicit_keys_win():
    laion = FilterConfig(preset="laion")
    assert (laion.clip_threshold, laion.caption_min_chars, laion.min_side) == (0.28, 5, None)
    basic = FilterConfig(preset="datacomp_basic", min_side=100)
    assert (basic.caption_min_words, basic.caption_min_chars, basic.min_side, basic.max_aspect_ratio) == (
        3,
        6,
        100,
        3.0,
    )
    assert (
        validate_config({"output": "o", "input": {"path": "p"}, "filter": {"preset": "laion"}}).filter.clip_threshold
        == 0.28
    )


def test_top_fraction_cutoff_keeps_that_fraction():
    scores = np.arange(100, dtype=np.float32) / 100
    cutoff = top_fraction_cutoff(scores, 0.3)
    assert (scores >= cutoff).sum() == 30
    assert top_fraction_cutoff(scores, 1.0) == pytest.approx(0.0)
    assert (scores >= top_fraction_cutoff(scores, 0.001)).sum() == 1
    assert top_fraction_cutoff(np.zeros(0), 0.3) == math.inf


def test_score_summary_kept_fraction_matches_a_direct_count():
    scores = np.random.default_rng(0).normal(0.25, 0.05, 1000)
    summary = score_summary(scores)
    for point in summary["kept_fraction_at_threshold"]:
        assert point["kept_fraction"] == pytest.approx((scores >= point["threshold"]).mean(), abs=1e-6)
    fractions = [p["kept_fraction"] for p in summary["kept_fraction_at_threshold"]]
    assert fractions == sorted(fractions, reverse=True)
    assert summary["quantiles"]["0.5"] == pytest.approx(np.median(scores))


def run_stage(stage: FilterStage, ctx: StageContext) -> None:
    """Every phase of the filter stage, as the pipeline runs them."""
    from curate.executors.local import LocalExecutor
    from curate.pipeline import run_stage as run_phases

    run_phases(stage, ctx, LocalExecutor())


def write_fake_embed_run(root: Path, shard_scores: dict[str, list[float]]) -> RunLayout:
    """Download and embed outputs for shards of samples with the given CLIP scores."""
    layout = RunLayout(root)
    for shard, scores in shard_scores.items():
        uids = [f"{shard}-{i:03d}" for i in range(len(scores))]
        write_parquet_atomic(make_fates(uids, "kept", width=[256] * len(uids), height=[256] * len(uids)),
                             layout.fates_path("download", shard))  # fmt: skip
        write_parquet_atomic(make_fates(uids, "kept", clip_score=scores), layout.fates_path("embed", shard))
        metadata = pa.table({"uid": uids, "url": ["http://x/"] * len(uids), "caption": ["a caption"] * len(uids),
                             "clip_score": pa.array(scores, pa.float32())})  # fmt: skip
        write_parquet_atomic(metadata, layout.stage_dir("embed") / "metadata" / f"metadata_{shard}.parquet")
    return layout


def test_top_fraction_is_ranked_over_the_whole_run_not_per_shard(tmp_path: Path):
    # shard 00000 holds the 10 best scores: a per-shard top 50% would keep 5 from each shard
    layout = write_fake_embed_run(tmp_path, {"00000": [0.9 - i / 100 for i in range(10)],
                                             "00001": [0.1 + i / 100 for i in range(10)]})  # fmt: skip
    config = validate_config({"output": str(tmp_path), "input": {"path": "x"}, "filter": {"clip_top_fraction": 0.5}})
    stage = FilterStage(config)
    ctx = StageContext(config, layout, "fp", ("00000", "00001"))
    run_stage(stage, ctx)
    for shard in ("00000", "00001"):
        run_shard(stage, ctx, shard)
    fates = read_fate_parts([layout.fates_path("filter", s) for s in ("00000", "00001")])
    kept = {u for u, s in zip(fates["uid"].to_pylist(), fates["status"].to_pylist(), strict=True) if s == "kept"}
    assert kept == {f"00000-{i:03d}" for i in range(10)}
    summary = json.loads((tmp_path / "filter" / "summary.json").read_text())
    assert summary["clip_cutoff"] == pytest.approx(0.81, abs=1e-6)
    assert summary["clip_score"]["count"] == 20
    assert summary["filters"] == ["clip_score"]


@pytest.mark.parametrize(
    ("combine", "cutoff", "rule"),
    [("max", 0.6, (0.6, 0.5)), ("threshold_only", 0.6, (0.6, None)), ("top_fraction_only", 0.5, (None, 0.5))],
)
def test_clip_combine_chooses_the_cutoff(tmp_path: Path, combine: str, cutoff: float, rule: tuple) -> None:
    layout = write_fake_embed_run(tmp_path, {"00000": [i / 10 for i in range(10)]})  # top 50%: >= 0.5
    filter_cfg = {"clip_threshold": 0.6, "clip_top_fraction": 0.5, "clip_combine": combine}
    config = validate_config({"output": str(tmp_path), "input": {"path": "x"}, "filter": filter_cfg})
    run_stage(FilterStage(config), StageContext(config, layout, "fp", ("00000",)))
    summary = json.loads((tmp_path / "filter" / "summary.json").read_text())
    assert summary["clip_cutoff"] == pytest.approx(cutoff)  # top 50% of 0.0 .. 0.9: 0.5
    assert (summary["clip_threshold"], summary["clip_top_fraction"]) == rule


def test_score_bounds_keep_at_the_bound_and_a_sample_failing_several_filters_gets_the_first():
    table = samples(
        ["one", "three small words", "three small words", "three small words"], *[[300] * 4] * 2, [0.01, 0.1, 0.1, 0.1]
    )
    table = table.append_column("aesthetic", pa.array([9.0, 4.0, 4.5, 4.6], pa.float32()))
    table = table.append_column("punsafe", pa.array([0.9, 0.9, 0.5, 0.2], pa.float32()))
    cfg = FilterConfig(
        caption_min_words=3, clip_threshold=0.05, min_scores={"aesthetic": 4.5}, max_scores={"punsafe": 0.5}
    )
    fates = apply_filters(table, build_filters(cfg, cfg.clip_threshold))
    # row 0 fails the caption, clip_score and punsafe filters; row 1 both bounds: the first in order is the reason
    assert decisions(fates) == [("dropped", "caption_words"), ("dropped", "aesthetic"), ("kept", None), ("kept", None)]
    assert fates["detail"][1].as_py() == "aesthetic=4 (needs >= 4.5)"

    cfg = FilterConfig(max_scores={"punsafe": 0.3})
    fates = apply_filters(table, build_filters(cfg, None))
    assert decisions(fates)[2:] == [("dropped", "punsafe"), ("kept", None)]
    assert fates["detail"][2].as_py() == "punsafe=0.5000 (needs <= 0.3)"
