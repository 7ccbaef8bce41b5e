"""Paired statistics of two validation arms trained with the same seeds.

Both arms of a seed start from the same initial weights (train.py seeds the initialisation with the recipe's
seed) and differ only in their data, so the per-seed differences carry the effect of the data with the seeds'
shared luck taken out. The summary is the mean and standard deviation of those differences, a 95% Student-t
interval for their mean, and a verdict against a bar: the mean must exceed `bar` times the standard deviation
of the differences and the interval must exclude 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEFAULT_BAR = 5.0  # the mean difference must exceed this many standard deviations of the per-seed differences
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedDifference:
    """`arm` minus `against` over seeds, one difference per seed."""

    arm: str
    against: str
    per_seed: list[float]
    mean: float
    std: float  # of the per-seed differences (ddof=1); 0 for one seed
    ci95: tuple[float, float] | None  # None for fewer than two seeds
    bar: float
    ratio: float | None  # mean / std; None when std is 0
    passes: bool

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["ci95"] = list(self.ci95) if self.ci95 is not None else None
        return raw

    @property
    def verdict(self) -> str:
        return verdict(self)


def paired_difference(
    arm: str, values: Sequence[float], against: str, reference: Sequence[float], bar: float = DEFAULT_BAR
) -> PairedDifference:
    """`values[i] - reference[i]` for every seed i, with its t-interval and whether it clears `bar`."""
    from scipy import stats

    if len(values) != len(reference) or not values:
        raise ValueError(f"paired seeds: {arm} has {len(values)} runs, {against} {len(reference)}")
    diffs = np.subtract(np.asarray(values, dtype=float), np.asarray(reference, dtype=float))
    n, mean = len(diffs), float(diffs.mean())
    std = float(diffs.std(ddof=1)) if n > 1 else 0.0
    interval: tuple[float, float] | None = None
    if n > 1:
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
        interval = (mean - half, mean + half)
    ratio = mean / std if std > 0 else None
    excludes_zero = interval is not None and (interval[0] > 0 or interval[1] < 0)
    clears = mean > bar * std if std > 0 else mean > 0
    passes = bool(n > 1 and excludes_zero and clears)
    return PairedDifference(arm, against, [float(d) for d in diffs], mean, std, interval, bar, ratio, passes)


def verdict(diff: PairedDifference, metric: str = "") -> str:
    """One line: the difference, its interval, its size in per-seed stds and whether it clears the bar."""
    what = f"{diff.arm} - {diff.against}" + (f" on {metric}" if metric else "")
    n = len(diff.per_seed)
    if diff.ci95 is None:
        return f"{what}: {diff.mean:+.3f} from one seed; no interval, no verdict"
    low, high = diff.ci95
    size = f"{diff.ratio:.1f}x" if diff.ratio is not None else "inf x"
    outcome = "PASSES" if diff.passes else "does NOT pass"
    return (
        f"{what}: {diff.mean:+.3f} ± {diff.std:.3f} over {n} seeds, 95% CI [{low:+.3f}, {high:+.3f}], "
        f"{size} the per-seed std: {outcome} the bar (> {diff.bar:g}x std, CI excludes 0)"
    )
