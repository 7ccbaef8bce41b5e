"""The run-wide score summary from per-shard sketches equals the one computed on all scores at once."""

from __future__ import annotations

import math

import numpy as np
import pytest

from curate.stages.score_sketch import QUANTILES, from_key, sort_keys, summarize_parts


def whole_run(scores: np.ndarray, fraction: float) -> dict[str, object]:
    ordered = np.sort(scores)[::-1]
    keep = max(1, math.ceil(fraction * len(scores)))
    grid = np.unique(
        np.round(np.concatenate([np.linspace(scores.min(), scores.max(), 41), np.arange(0, 0.5, 0.02)]), 4)
    )
    counts, edges = np.histogram(scores, bins=50)
    return {
        "cutoff": float(ordered[keep - 1]),
        "quantiles": {f"{q:g}": float(np.quantile(scores.astype(np.float64), q)) for q in QUANTILES},
        "kept": [float((scores >= t).mean()) for t in grid],
        "grid": grid.tolist(),
        "histogram": (counts.tolist(), edges.tolist()),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sharded_sketches_give_the_whole_run_numbers_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = np.concatenate(
        [
            rng.normal(0.25, 0.08, 5000),
            np.full(300, 0.3125),  # a block of ties right where cutoffs fall
            -rng.random(200),  # negative cosines
        ]
    ).astype(np.float32)
    rng.shuffle(scores)
    sizes = rng.integers(0, 900, 12)
    parts = np.split(scores, np.cumsum(sizes)[np.cumsum(sizes) < len(scores)])  # empty parts included
    for fraction in (0.3, 0.5, 1e-6, 1.0):
        expected = whole_run(scores, fraction)
        got = summarize_parts(parts, fraction)
        assert got["top_fraction_cutoff"] == expected["cutoff"]  # exact, not approximate
        summary = got["summary"]
        assert summary["count"] == len(scores)
        assert summary["mean"] == pytest.approx(float(scores.astype(np.float64).mean()), abs=1e-9)
        for q, value in expected["quantiles"].items():
            assert summary["quantiles"][q] == pytest.approx(value, abs=1e-7)
        grid = [point["threshold"] for point in summary["kept_fraction_at_threshold"]]
        kept = [point["kept_fraction"] for point in summary["kept_fraction_at_threshold"]]
        assert grid == expected["grid"]
        assert kept == pytest.approx(expected["kept"], abs=1e-6)
        counts, edges = expected["histogram"]
        assert got["histogram"]["counts"] == counts and got["histogram"]["edges"] == pytest.approx(edges)


def test_keys_sort_like_the_floats_and_invert() -> None:
    values = np.array([-1.0, -0.5, -1e-30, -0.0, 0.0, 1e-30, 0.28, 0.2800001, 1.0], dtype=np.float32)
    keys = sort_keys(values)
    assert (np.diff(keys.astype(np.int64)) >= 0).all()
    assert [from_key(int(k)) for k in keys] == [float(v) for v in values]


def test_no_scores_at_all() -> None:
    got = summarize_parts([np.zeros(0, np.float32)], 0.3)
    assert got["summary"] == {"count": 0} and got["top_fraction_cutoff"] == math.inf
