"""matplotlib figures for the report, each drawn from the stats document and returned as PNG bytes."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from curate.extras import require
from curate.report.html import PLOT_DPI

KEPT_COLOR = "#2f9e44"
CURATED_COLOR = "#1c7ed6"
CUTOFF_COLOR = "#e8590c"
DROPPED_COLORS = ("#f59f00", "#ffc078", "#e8590c", "#ffe066", "#d9480f", "#fcc2d7", "#a9743a", "#ff8787", "#ced4da")
FAILED_COLORS = ("#c92a2a", "#862e9c", "#e64980", "#5f3dc4", "#a61e4d", "#495057")


STYLE = {
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "legend.frameon": False,
}


@contextmanager
def _figure(width: float, height: float) -> Iterator[tuple[Any, Any]]:
    """A Figure outside pyplot (no global figure registry, no backend switch in the caller's process)."""
    matplotlib = require("matplotlib", "report", "the report")
    from matplotlib.figure import Figure

    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height))
        yield fig, fig.subplots()


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PLOT_DPI, bbox_inches="tight")
    return buffer.getvalue()


def funnel_chart(funnel: list[dict[str, Any]]) -> bytes:
    """One horizontal bar per stage: the rows it kept, then the rows it removed, stacked by reason."""
    reasons = sorted({r for stage in funnel for r in stage["removed"]})
    colors = _reason_colors(reasons)
    y = np.arange(len(funnel))[::-1]
    with _figure(7.5, 0.55 * len(funnel) + 1.4) as (fig, ax):
        ax.barh(y, [s["kept"] for s in funnel], color=KEPT_COLOR, label="kept", height=0.6)
        left = np.array([s["kept"] for s in funnel], dtype=float)
        for reason in reasons:
            widths = np.array([s["removed"].get(reason, 0) for s in funnel], dtype=float)
            if widths.any():
                ax.barh(y, widths, left=left, color=colors[reason], label=reason, height=0.6)
            left += widths
        for yi, stage in zip(y, funnel, strict=True):
            ax.text(stage["rows"], yi, f"  {stage['kept']:,} / {stage['rows']:,}", va="center", fontsize=8)
        ax.set_yticks(y, [s["stage"] for s in funnel])
        ax.set_xlabel("rows")
        ax.set_xlim(0, max(s["rows"] for s in funnel) * 1.2 or 1)
        ax.set_title("Rows into each stage: kept, and removed by reason")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7.5)
        return _png(fig)


def _reason_colors(reasons: list[str]) -> dict[str, str]:
    """Warm colours for dropped rows, reds and purples for failures: never the kept green."""
    dropped = itertools.cycle(DROPPED_COLORS)
    failed = itertools.cycle(FAILED_COLORS)
    return {r: next(failed) if r.startswith("failed/") else next(dropped) for r in reasons}


def score_histogram(scores: dict[str, Any]) -> bytes:
    hist = scores["histogram"]
    edges = np.asarray(hist["edges"], dtype=float)
    widths = np.diff(edges)
    cutoff = scores.get("cutoff")
    with _figure(7.5, 3.0) as (fig, ax):
        ax.bar(edges[:-1], hist["counts"], width=widths, align="edge", color="#ced4da", label="embedded")
        if scores.get("curated_counts") is not None:
            ax.bar(
                edges[:-1], scores["curated_counts"], width=widths, align="edge", color=CURATED_COLOR, label="curated"
            )
        if cutoff is not None and np.isfinite(cutoff):
            ax.axvline(cutoff, color=CUTOFF_COLOR, linewidth=1.6, label=f"cutoff {cutoff:.3f}")
        ax.set_xlabel("CLIP score (image-caption cosine)")
        ax.set_ylabel("samples")
        ax.set_title("CLIP-score distribution")
        ax.legend(loc="upper left")
        return _png(fig)


def kept_fraction_curve(scores: dict[str, Any]) -> bytes:
    from matplotlib.ticker import PercentFormatter

    points = scores["summary"]["kept_fraction_at_threshold"]
    thresholds = np.array([p["threshold"] for p in points])
    kept = np.array([p["kept_fraction"] for p in points])
    cutoff = scores.get("cutoff")
    with _figure(7.5, 2.8) as (fig, ax):
        ax.plot(thresholds, kept, color=CURATED_COLOR, linewidth=1.8)
        if cutoff is not None and np.isfinite(cutoff):
            at_cutoff = float(np.interp(cutoff, thresholds, kept))
            ax.axvline(cutoff, color=CUTOFF_COLOR, linewidth=1.2, linestyle="--")
            ax.plot([cutoff], [at_cutoff], "o", color=CUTOFF_COLOR)
            ax.annotate(f"  {at_cutoff:.0%} kept at {cutoff:.3f}", (cutoff, at_cutoff), fontsize=8, color=CUTOFF_COLOR)
        ax.set_ylim(0, 1.04)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel("threshold")
        ax.set_ylabel("kept")
        ax.set_title("Fraction of embedded samples kept at each threshold")
        ax.grid(alpha=0.3)
        return _png(fig)


def loss_curves(curves: dict[str, list[float]]) -> bytes:
    with _figure(7.5, 3.0) as (fig, ax):
        for label, values in sorted(curves.items()):
            ax.plot(np.arange(1, len(values) + 1), values, linewidth=1.4, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("Training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5)
        return _png(fig)


def paired_differences(pairs: list[dict[str, Any]]) -> bytes:
    """Each pair's per-seed differences on its bar metrics: one dot per seed, the mean with its 95% interval
    (taken from the stats document), and zero."""
    entries = [(pair, metric) for pair in pairs for metric in pair["per_seed"]]
    with _figure(max(4.0, 0.9 * len(entries) + 1.5), 3.2) as (fig, ax):
        for x, (pair, metric) in enumerate(entries):
            values = np.asarray(pair["per_seed"][metric], dtype=float)
            jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
            color = KEPT_COLOR if pair["cells"].get(metric, {}).get("passes") else CUTOFF_COLOR
            ax.scatter(x + jitter, values, s=14, color=color, alpha=0.8, zorder=3)
            interval = pair["cells"].get(metric, {}).get("ci95")
            mean = float(values.mean())
            if interval:
                ax.errorbar(
                    x + 0.28,
                    mean,
                    yerr=[[mean - interval[0]], [interval[1] - mean]],
                    fmt="o",
                    ms=4,
                    color="#343a40",
                    capsize=3,
                    zorder=4,
                )
        ax.axhline(0, color="#868e96", linewidth=1)
        ax.set_xticks(range(len(entries)))
        labels = [f"{pair['name']}\n{metric.removeprefix('zero_shot_acc_')}" for pair, metric in entries]
        ax.set_xticklabels(
            labels, fontsize=7, rotation=30 if len(entries) > 4 else 0, ha="right" if len(entries) > 4 else "center"
        )
        ax.set_ylabel("difference per seed")
        ax.set_title("Per-seed differences (dots), mean and 95% CI")
        ax.grid(alpha=0.3, axis="y")
        return _png(fig)
