"""`curate report`: OUTPUT/report/index.html (one self-contained page) and OUTPUT/report/stats.json.

from curate.report import write_report
write_report(run_dir)   # -> run_dir/report/index.html
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from curate.io.fs import write_bytes_atomic, write_json_atomic
from curate.report import plots
from curate.report.html import THUMB_PX, render_report
from curate.report.images import locate_images, thumbnail
from curate.report.stats import build_stats, load_run
from curate.stage import RunLayout

log = logging.getLogger(__name__)

__all__ = ["write_report"]


def write_report(run_dir: str | Path) -> Path:
    """Build the report of a run (complete or not) and return the path of its index.html."""
    data = load_run(Path(run_dir))
    stats = build_stats(data)
    thumbs = make_thumbnails(data.layout, stats["records"])
    page = render_report(stats, thumbs, make_plots(stats))
    out = data.layout.root / "report"
    write_json_atomic(out / "stats.json", stats)
    write_bytes_atomic(out / "index.html", page.encode("utf-8"))
    log.info("report: %s (%.1f MB, %d thumbnails)", out / "index.html", len(page) / 1e6, len(thumbs))
    return out / "index.html"


def make_thumbnails(layout: RunLayout, records: dict[str, Any]) -> dict[str, bytes]:
    thumbs = {}
    for uid, ref in locate_images(layout, records).items():
        small = thumbnail(ref.read(), THUMB_PX)
        if small is not None:
            thumbs[uid] = small
    return thumbs


def make_plots(stats: dict[str, Any]) -> dict[str, bytes]:
    figures = {}
    if stats["funnel"]:
        figures["funnel"] = plots.funnel_chart(stats["funnel"])
    if stats["clip_score"]:
        figures["histogram"] = plots.score_histogram(stats["clip_score"])
        if stats["clip_score"]["summary"].get("kept_fraction_at_threshold"):
            figures["kept_fraction"] = plots.kept_fraction_curve(stats["clip_score"])
    if stats["validation"] and stats["validation"]["loss_curves"]:
        figures["loss"] = plots.loss_curves(stats["validation"]["loss_curves"])
    if stats["validation"] and stats["validation"].get("pairs"):
        figures["paired"] = plots.paired_differences(stats["validation"]["pairs"])
    return figures
