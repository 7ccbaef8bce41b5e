"""Exact order statistics of a run's CLIP scores without holding them in one place.

Every float32 maps to a 32-bit key that sorts like the float. A first pass per shard counts the keys' high 16
bits (at most 65,536 bins, stored sparse); merged, those counts say in which high bin the k-th score lies. A
second pass per shard counts, for just those bins, the low 16 bits: merged, they give the k-th score exactly.
The same passes give the exact count above any threshold and a fixed-range histogram. Memory per task is a
shard's scores plus the bins, whatever the run's size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

HIGH = 1 << 16
SIGN = np.uint32(0x80000000)


def sort_keys(scores: np.ndarray) -> np.ndarray:
    """uint32 keys in the order of the float32 scores (negative floats have their bits flipped)."""
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32)
    return np.where(bits & SIGN, ~bits, bits | SIGN)


def from_key(key: int) -> float:
    key = np.uint32(key)
    bits = key & ~SIGN if key & SIGN else ~key
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


@dataclass
class FirstPass:
    """One shard's (or, merged, the run's) count, sum, range and high-bit histogram."""

    n: int
    total: float
    low: float
    high: float
    bins: np.ndarray  # int64 (HIGH,)

    @classmethod
    def of(cls, scores: np.ndarray) -> FirstPass:
        scores = np.asarray(scores, dtype=np.float32)
        bins = np.bincount(sort_keys(scores) >> 16, minlength=HIGH).astype(np.int64)
        if not len(scores):
            return cls(0, 0.0, math.inf, -math.inf, bins)
        return cls(len(scores), float(scores.sum(dtype=np.float64)), float(scores.min()), float(scores.max()), bins)

    def to_arrays(self) -> dict[str, np.ndarray]:
        nonzero = np.flatnonzero(self.bins)
        return {
            "stats": np.array([self.n, self.total, self.low, self.high], dtype=np.float64),
            "bin": nonzero.astype(np.uint16),
            "count": self.bins[nonzero],
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> FirstPass:
        n, total, low, high = arrays["stats"].tolist()
        bins = np.zeros(HIGH, dtype=np.int64)
        bins[arrays["bin"].astype(np.int64)] = arrays["count"]
        return cls(int(n), total, low, high, bins)

    @classmethod
    def merge(cls, parts: Iterable[FirstPass]) -> FirstPass:
        merged = cls(0, 0.0, math.inf, -math.inf, np.zeros(HIGH, dtype=np.int64))
        for part in parts:
            merged.n += part.n
            merged.total += part.total
            merged.low, merged.high = min(merged.low, part.low), max(merged.high, part.high)
            merged.bins += part.bins
        return merged

    def bin_of_rank(self, rank: int) -> tuple[int, int]:
        """(high bin, rank within that bin) of the `rank`-th smallest score (0-based)."""
        cumulative = np.cumsum(self.bins)
        high = int(np.searchsorted(cumulative, rank, side="right"))
        before = int(cumulative[high - 1]) if high else 0
        return high, rank - before


@dataclass(frozen=True)
class Plan:
    """What the second pass counts: the low bits inside some high bins, scores at or above some thresholds,
    and a histogram over a fixed range."""

    refine: tuple[int, ...]
    thresholds: tuple[float, ...]
    hist_bins: int
    hist_range: tuple[float, float] | None


@dataclass
class SecondPass:
    low_bits: dict[int, np.ndarray]  # high bin -> int64 (HIGH,) counts of the low 16 bits
    at_or_above: np.ndarray  # int64 per plan threshold
    histogram: np.ndarray  # int64 (hist_bins,)

    @classmethod
    def of(cls, scores: np.ndarray, plan: Plan) -> SecondPass:
        scores = np.asarray(scores, dtype=np.float32)
        keys = sort_keys(scores)
        high = keys >> 16
        low_bits = {
            b: np.bincount((keys[high == b] & 0xFFFF).astype(np.int64), minlength=HIGH).astype(np.int64)
            for b in plan.refine
        }
        ordered = np.sort(scores)
        thresholds = np.asarray(plan.thresholds, dtype=np.float64)
        at_or_above = len(ordered) - np.searchsorted(ordered, thresholds, side="left")
        if plan.hist_range is None or not len(scores):
            histogram = np.zeros(plan.hist_bins, dtype=np.int64)
        else:
            histogram = np.histogram(scores, bins=plan.hist_bins, range=float32_range(plan))[0].astype(np.int64)
        return cls(low_bits, at_or_above.astype(np.int64), histogram)

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"at_or_above": self.at_or_above, "histogram": self.histogram}
        for b, counts in self.low_bits.items():
            nonzero = np.flatnonzero(counts)
            arrays[f"low_{b}_bin"], arrays[f"low_{b}_count"] = nonzero.astype(np.uint16), counts[nonzero]
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], plan: Plan) -> SecondPass:
        low_bits = {}
        for b in plan.refine:
            counts = np.zeros(HIGH, dtype=np.int64)
            counts[arrays[f"low_{b}_bin"].astype(np.int64)] = arrays[f"low_{b}_count"]
            low_bits[b] = counts
        return cls(low_bits, arrays["at_or_above"], arrays["histogram"])

    @classmethod
    def merge(cls, parts: Iterable[SecondPass], plan: Plan) -> SecondPass:
        merged = cls(
            {b: np.zeros(HIGH, dtype=np.int64) for b in plan.refine},
            np.zeros(len(plan.thresholds), dtype=np.int64),
            np.zeros(plan.hist_bins, dtype=np.int64),
        )
        for part in parts:
            for b in plan.refine:
                merged.low_bits[b] += part.low_bits[b]
            merged.at_or_above += part.at_or_above
            merged.histogram += part.histogram
        return merged


def float32_range(plan: Plan) -> tuple[np.float32, np.float32]:
    """The histogram range as numpy takes it from float32 scores (its edges are then computed in float32)."""
    assert plan.hist_range is not None
    return np.float32(plan.hist_range[0]), np.float32(plan.hist_range[1])


def value_at_rank(first: FirstPass, second: SecondPass, rank: int) -> float:
    """The exact `rank`-th smallest score (0-based)."""
    high, within = first.bin_of_rank(rank)
    low = int(np.searchsorted(np.cumsum(second.low_bits[high]), within, side="right"))
    return from_key((high << 16) | low)


QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
HIST_BINS = 50
GRID_POINTS = 41


def plan_for(first: FirstPass, top_fraction: float | None) -> Plan:
    """The second pass the summary needs: the bins of every quantile's (and the top fraction's) ranks,
    the threshold grid between the run's lowest and highest score, and the histogram's range."""
    if not first.n:
        return Plan((), (), HIST_BINS, None)
    ranks = [rank for q in QUANTILES for rank in quantile_ranks(first.n, q)]
    if top_fraction is not None:
        ranks.append(top_fraction_rank(first.n, top_fraction))
    refine = tuple(sorted({first.bin_of_rank(rank)[0] for rank in ranks}))
    grid = np.linspace(first.low, first.high, GRID_POINTS)
    thresholds = np.unique(np.round(np.concatenate([grid, np.arange(0.0, 0.5, 0.02)]), 4))
    return Plan(refine, tuple(float(t) for t in thresholds), HIST_BINS, (first.low, first.high))


def quantile_ranks(n: int, q: float) -> tuple[int, int]:
    """The two ranks numpy's linear quantile interpolates between."""
    position = q * (n - 1)
    return math.floor(position), min(math.floor(position) + 1, n - 1)


def top_fraction_rank(n: int, fraction: float) -> int:
    """The ascending rank of the last score inside the top `fraction` (ties at it are kept too)."""
    return n - max(1, math.ceil(fraction * n))


def summarize(first: FirstPass, second: SecondPass, plan: Plan, top_fraction: float | None) -> dict[str, object]:
    """clip_score summary, histogram and top-fraction cutoff of the whole run, as if computed on all scores."""
    if not first.n:
        empty = {"counts": [], "edges": []}
        return {"summary": {"count": 0}, "histogram": empty, "top_fraction_cutoff": math.inf if top_fraction else None}
    quantiles = {}
    for q in QUANTILES:
        lo, hi = quantile_ranks(first.n, q)
        low_value, high_value = value_at_rank(first, second, lo), value_at_rank(first, second, hi)
        quantiles[f"{q:g}"] = low_value + (high_value - low_value) * (q * (first.n - 1) - lo)
    kept = second.at_or_above / first.n
    summary = {
        "count": first.n,
        "mean": first.total / first.n,
        "quantiles": quantiles,
        "kept_fraction_at_threshold": [
            {"threshold": t, "kept_fraction": round(float(f), 6)} for t, f in zip(plan.thresholds, kept, strict=True)
        ],
    }
    edges = np.histogram_bin_edges(np.zeros(0, np.float32), bins=plan.hist_bins, range=float32_range(plan))
    histogram = {"counts": second.histogram.tolist(), "edges": [float(e) for e in edges]}
    cutoff = None
    if top_fraction is not None:
        cutoff = value_at_rank(first, second, top_fraction_rank(first.n, top_fraction))
    return {"summary": summary, "histogram": histogram, "top_fraction_cutoff": cutoff}


def summarize_parts(parts: list[np.ndarray], top_fraction: float | None = None) -> dict[str, object]:
    """`summarize` over scores held in memory (both passes over each part)."""
    first = FirstPass.merge(FirstPass.of(part) for part in parts)
    plan = plan_for(first, top_fraction)
    second = SecondPass.merge((SecondPass.of(part, plan) for part in parts), plan)
    return summarize(first, second, plan, top_fraction)
