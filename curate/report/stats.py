"""The numbers behind the report: funnel, score distribution, sample choices, duplicate groups, validation.

Everything is read from what the stages left in the run directory; any part may be missing (a run with only
input and download, an unfinished run) and its section is then None. Sample choices are deterministic: the
same run gives the same report.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from curate.io.fs import read_json
from curate.stage import RunLayout
from curate.stages import fate_stage_names, stage_names
from curate.stages.dedup.stage import DedupOutputs
from curate.stages.embed import EmbedOutputs
from curate.stages.filters import FilterOutputs
from curate.stages.materialize import CuratedOutputs
from curate.stages.validate.stage import ValidateOutputs

log = logging.getLogger(__name__)

NEAR_THRESHOLD_SAMPLES = 12
SAMPLES_PER_REASON = 8
DETAIL_CHARS = 160
DUP_REASONS = ("dup_exact", "dup_near", "dup_semantic")
LEDGER_BATCH_ROWS = 65_536


@dataclass
class RunData:
    """What the report reads from a run directory (the ledger is streamed, never loaded whole)."""

    layout: RunLayout
    config: dict[str, Any]
    ledger_path: Path | None
    run_stats: dict[str, Any] | None
    filter_summary: dict[str, Any] | None
    duplicate_groups: dict[str, pa.Table] | None  # per duplicate reason, its largest groups
    metrics: dict[str, Any] | None


def load_run(run_dir: Path) -> RunData:
    layout = RunLayout(Path(run_dir))
    if not layout.config_path.exists():
        raise FileNotFoundError(f"{run_dir}: not a curate run (no config.yaml)")
    dedup = DedupOutputs(layout)
    return RunData(
        layout=layout,
        config=_read_yaml(layout.config_path),
        ledger_path=layout.ledger_path if layout.ledger_path.exists() else None,
        run_stats=_read_optional_json(layout.stats_path),
        filter_summary=_read_optional_json(FilterOutputs(layout).summary_path),
        duplicate_groups=_largest_groups(dedup),
        metrics=_read_optional_json(ValidateOutputs(layout).metrics_path),
    )


def _largest_groups(dedup: DedupOutputs) -> dict[str, pa.Table] | None:
    if not dedup.folder.joinpath("decisions").is_dir() or not dedup.plan_path.exists():
        return None
    return {reason: dedup.largest_groups(reason) for reason in DUP_REASONS}


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    loaded = yaml.safe_load(path.read_text())
    return loaded if isinstance(loaded, dict) else {}


def _read_optional_json(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return read_json(path)
    except ValueError as err:
        log.warning("report: ignoring unreadable %s (%s)", path, err)
        return None


def ledger_batches(path: Path, columns: list[str]) -> Iterator[pd.DataFrame]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=LEDGER_BATCH_ROWS, columns=columns):
        yield batch.to_pandas(types_mapper=_NULLABLE.get)


_NULLABLE = {pa.float32(): pd.Float32Dtype()}


# --------------------------------------------------------------------------------------------------
# One pass over the ledger


@dataclass
class LedgerDigest:
    """Everything the report needs from the ledger, gathered in one streaming pass. The kept lists hold at most
    a few rows each, chosen by (score, uid) or uid order, so the result does not depend on the batch size."""

    cutoff: float | None
    edges: np.ndarray | None
    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    reason_uids: dict[tuple[str, str, str], list[str]] = field(default_factory=dict)
    kept_lowest: pd.DataFrame = field(default_factory=lambda: pd.DataFrame({"uid": [], "clip_score": []}))
    dropped_highest: pd.DataFrame = field(default_factory=lambda: pd.DataFrame({"uid": [], "clip_score": []}))
    kept_first: list[str] = field(default_factory=list)
    curated_counts: np.ndarray | None = None

    def add(self, rows: pd.DataFrame) -> None:
        rows = rows.assign(reason=rows["reason"].fillna(""))
        for key, n in rows.groupby(["stage", "status", "reason"]).size().items():
            self.counts[key] += int(n)
        removed = rows[rows["status"] != "kept"]
        for key, group in removed.groupby(["stage", "status", "reason"]):
            self.reason_uids[key] = _smallest([*self.reason_uids.get(key, []), *group["uid"]], SAMPLES_PER_REASON)
        kept = rows[rows["status"] == "kept"]
        self.kept_first = _smallest([*self.kept_first, *kept["uid"]], NEAR_THRESHOLD_SAMPLES)
        scored = kept.dropna(subset=["clip_score"])
        self.kept_lowest = _top(self.kept_lowest, scored[["uid", "clip_score"]], ascending=True)
        below = rows[(rows["reason"] == "clip_score")].dropna(subset=["clip_score"])
        self.dropped_highest = _top(self.dropped_highest, below[["uid", "clip_score"]], ascending=False)
        if self.edges is not None:
            values = np.clip(scored["clip_score"].to_numpy(np.float64), self.edges[0], self.edges[-1])
            counts, _ = np.histogram(values, bins=self.edges)
            self.curated_counts = counts if self.curated_counts is None else self.curated_counts + counts


def _smallest(uids: list[str], n: int) -> list[str]:
    return heapq.nsmallest(n, uids)


def _top(best: pd.DataFrame, new: pd.DataFrame, ascending: bool) -> pd.DataFrame:
    both = pd.concat([best, new.astype({"clip_score": "float64"})], ignore_index=True) if len(new) else best
    ordered = both.sort_values(["clip_score", "uid"], ascending=[ascending, True], kind="stable")
    return ordered.head(NEAR_THRESHOLD_SAMPLES)


def digest_ledger(path: Path, cutoff: float | None, edges: list[float] | None) -> LedgerDigest:
    digest = LedgerDigest(cutoff, np.asarray(edges, dtype=np.float64) if edges and len(edges) > 1 else None)
    for rows in ledger_batches(path, ["uid", "status", "stage", "reason", "clip_score"]):
        digest.add(rows)
    return digest


# --------------------------------------------------------------------------------------------------
# Funnel


def stage_rank(stage: str) -> int:
    order = stage_names()
    return order.index(stage) if stage in order else len(order)


def funnel(data: RunData, digest: LedgerDigest | None) -> list[dict[str, Any]] | None:
    """Per stage in pipeline order: rows in, rows kept, and rows removed per 'status/reason'."""
    if digest is not None:
        return funnel_from_counts(digest.counts, _configured_stages(data))
    if data.run_stats is not None:
        stages = data.run_stats.get("stages", {})
        return [
            {
                "stage": name,
                "rows": int(stages[name]["rows"]),
                "kept": int(stages[name]["kept"]),
                "removed": {k: int(v) for k, v in stages[name]["counts"].items() if k != "kept"},
            }
            for name in sorted(stages, key=stage_rank)
        ]
    return None


def _configured_stages(data: RunData) -> list[str]:
    return fate_stage_names([s for s in data.config.get("stages", []) if s in stage_names()])


def funnel_from_counts(counts: Counter[tuple[str, str, str]], configured: list[str]) -> list[dict[str, Any]]:
    """The ledger's final (stage, status, reason) counts as a funnel: a row decided at a stage went through
    every stage before it."""
    stages = sorted(set(configured) | {stage for stage, _, _ in counts}, key=stage_rank)
    rows = []
    for i, stage in enumerate(stages):
        entered = sum(n for (s, _, _), n in counts.items() if stages.index(s) >= i)
        removed = {f"{status}/{reason or 'unknown'}": n for (s, status, reason), n in counts.items() if s == stage}
        removed.pop("kept/unknown", None)
        ordered = dict(sorted(removed.items(), key=lambda kv: (-kv[1], kv[0])))
        rows.append({"stage": stage, "rows": entered, "kept": entered - sum(ordered.values()), "removed": ordered})
    return rows


# --------------------------------------------------------------------------------------------------
# CLIP scores


def score_stats(data: RunData) -> dict[str, Any] | None:
    """Histogram, kept fraction vs threshold and quantiles of the CLIP scores, plus the cutoff used."""
    from curate.stages.score_sketch import summarize_parts

    summary = data.filter_summary
    if summary is not None and summary.get("clip_score", {}).get("count"):
        return {
            "source": "filter/summary.json",
            "histogram": summary["clip_score_histogram"],
            "summary": summary["clip_score"],
            "cutoff": summary.get("clip_cutoff"),
            "threshold": summary.get("clip_threshold"),
            "top_fraction": summary.get("clip_top_fraction"),
        }
    parts = _embedded_scores(data.layout)
    if not parts or not sum(map(len, parts)):
        return None
    sketch = summarize_parts(parts)
    return {
        "source": "embed/metadata",
        "histogram": sketch["histogram"],
        "summary": sketch["summary"],
        "cutoff": None,
        "threshold": None,
        "top_fraction": None,
    }


def _embedded_scores(layout: RunLayout) -> list[np.ndarray]:
    """Each embedded shard's CLIP scores."""
    embed = EmbedOutputs(layout)
    return [
        embed.metadata(s, columns=["clip_score"])["clip_score"].to_numpy(zero_copy_only=False) for s in embed.shards()
    ]


# --------------------------------------------------------------------------------------------------
# Sample grids


def sample_grids(digest: LedgerDigest | None) -> dict[str, Any] | None:
    """uids to show: kept rows next to the threshold, the dropped rows just below it, and each reason's rows."""
    if digest is None:
        return None
    grids: dict[str, Any] = {"cutoff": digest.cutoff}
    if digest.cutoff is not None and len(digest.kept_lowest):
        grids["kept_near_threshold"] = digest.kept_lowest["uid"].tolist()
        grids["dropped_near_threshold"] = digest.dropped_highest["uid"].tolist()
    elif len(digest.kept_lowest):
        grids["kept_lowest_scores"] = digest.kept_lowest["uid"].tolist()
    else:
        grids["kept_sample"] = list(digest.kept_first)
    groups = []
    for (stage, status, reason), uids in digest.reason_uids.items():
        count = digest.counts[(stage, status, reason)]
        groups.append({"stage": stage, "status": status, "reason": reason or "unknown", "count": count, "uids": uids})
    grids["by_reason"] = sorted(groups, key=lambda g: (stage_rank(g["stage"]), -g["count"], g["reason"]))
    return grids


# --------------------------------------------------------------------------------------------------
# Duplicate groups


def duplicate_groups(data: RunData) -> list[dict[str, Any]] | None:
    """Per duplicate reason, its largest groups: the survivor and the copies dropped in its favour."""
    if data.duplicate_groups is None:
        return None
    groups = []
    for reason in DUP_REASONS:
        largest = data.duplicate_groups[reason].to_pandas()
        for (kept_uid, copies), members in largest.groupby(["kept_uid", "copies"], sort=False):
            groups.append(
                {
                    "reason": reason,
                    "kept_uid": kept_uid,
                    "copies": int(copies),
                    "dropped": [
                        {"uid": uid, "similarity": _finite(sim)}
                        for uid, sim in zip(members["uid"], members["similarity"], strict=True)
                    ],
                }
            )
    return groups


def _finite(value: Any) -> float | None:
    if value is None or pd.isna(value):
        return None
    return round(float(value), 5)


# --------------------------------------------------------------------------------------------------
# Validation


def validation(metrics: Any) -> dict[str, Any] | None:
    """metrics.json as a table (one row per top-level entry, dotted columns) and any loss curves in it.

    The validate stage's own file (arms, a summary per arm and paired per-seed differences) becomes the arms
    table, the pairs' rows and verdicts and the per-seed differences of the metrics each pair is judged on
    (`arms_table`). Any other shape is read generically, any nesting of dicts and lists, so that new metrics
    appear without a change here. A numeric list under a key containing 'loss' is a curve.
    """
    if not isinstance(metrics, dict):
        return None
    if isinstance(metrics.get("summary"), dict) and isinstance(metrics.get("paired"), dict):
        return arms_table(metrics)
    curves: dict[str, list[float]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        flat: dict[str, Any] = {}
        _flatten(value, key, flat, curves)
        name = key if isinstance(value, dict) else "run"
        row = rows.setdefault(name, {})
        row.update({k.removeprefix(f"{key}.") if isinstance(value, dict) else k: v for k, v in flat.items()})
    columns = sorted({c for row in rows.values() for c in row})
    return {"columns": columns, "rows": rows, "loss_curves": curves}


def arms_table(metrics: dict[str, Any]) -> dict[str, Any]:
    """The validate stage's metrics.json: one row per arm (mean ± std over seeds), one per pair of arms (mean ±
    std of the per-seed differences, 95% interval, passes), the verdict lines, the per-seed differences of each
    pair's bar metrics and each arm's loss curve averaged over seeds."""
    from curate.stages.validate.stage import pair_names, pair_verdict, table_columns

    columns = table_columns(metrics)
    data = metrics.get("data") or {}
    arms = [
        {
            "arm": arm,
            "samples": data.get(f"{arm}_samples"),
            "cells": {
                key: [metrics["summary"][arm][key]["mean"], metrics["summary"][arm][key]["std"]] for key, _ in columns
            },
        }
        for arm in metrics["arms"]
    ]
    pairs = []
    for name in pair_names(metrics):
        pair = metrics["paired"][name]
        cells = {key: {k: pair["metrics"][key][k] for k in ("mean", "std", "ci95", "passes")} for key, _ in columns}
        bar = pair["bar_metrics"]
        pairs.append(
            {
                "name": name,
                "passes": pair["passes"],
                "cells": cells,
                "verdicts": [pair["metrics"][key]["verdict"] for key in bar] + [pair_verdict(pair)],
                "per_seed": {key: pair["metrics"][key]["per_seed"] for key in bar},
            }
        )
    curves = {}
    for arm, runs in (metrics.get("runs") or {}).items():
        losses = [run["losses"] for run in runs if run.get("losses")]
        if losses and len({len(curve) for curve in losses}) == 1:
            curves[f"{arm} (mean of {len(losses)} seeds)"] = np.mean(losses, axis=0).round(5).tolist()
    return {
        "format": "arms",
        "columns": [list(column) for column in columns],
        "arms": arms,
        "pairs": pairs,
        "seeds": len(metrics.get("seeds") or []),
        "samples_seen": metrics.get("samples_seen"),
        "eval_images": (metrics.get("eval_set") or {}).get("n"),
        "loss_curves": curves,
    }


def _flatten(value: Any, path: str, flat: dict[str, Any], curves: dict[str, list[float]]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{path}.{key}", flat, curves)
    elif isinstance(value, list):
        numbers = _numeric_list(value)
        if numbers is not None and "loss" in path.rsplit(".", 1)[-1].lower() and len(numbers) > 1:
            curves[path] = numbers
        elif numbers is not None and numbers:
            flat[path] = f"{np.mean(numbers):.4g} ± {np.std(numbers):.2g} (n={len(numbers)})"
        elif all(isinstance(item, dict) for item in value):
            for i, item in enumerate(value):
                _flatten(item, f"{path}[{i}]", flat, curves)
    elif isinstance(value, bool | int | float | str) or value is None:
        flat[path] = value


def _numeric_list(value: list[Any]) -> list[float] | None:
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    if value and all(isinstance(v, list | tuple) and len(v) == 2 for v in value):
        return [float(v[1]) for v in value]  # (step, loss) pairs
    return None


# --------------------------------------------------------------------------------------------------
# Summary and the whole document


def run_summary(data: RunData, funnel_rows: list[dict[str, Any]] | None) -> dict[str, Any]:
    config = data.config
    embed = config.get("embed") or {}
    filt = config.get("filter") or {}
    input_rows = funnel_rows[0]["rows"] if funnel_rows else None
    curated = funnel_rows[-1]["kept"] if funnel_rows else None
    marker = CuratedOutputs(data.layout).marker_path
    return {
        "run": str(data.layout.root.resolve()),
        "name": data.layout.root.resolve().name,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "stages": list(config.get("stages", [])),
        "complete": data.ledger_path is not None,
        "input_rows": input_rows,
        "kept": curated,
        "kept_fraction": (curated / input_rows) if input_rows else None,
        "curated_samples": _read_optional_json(marker).get("samples") if marker.exists() else None,
        "model": embed.get("model") if "embed" in config.get("stages", []) else None,
        "pretrained": Path(embed["pretrained"]).name if embed.get("pretrained") else None,
        "clip_threshold": filt.get("clip_threshold"),
        "clip_top_fraction": filt.get("clip_top_fraction"),
    }


def sample_records(data: RunData, uids: set[str]) -> dict[str, dict[str, Any]]:
    """What a grid cell shows about each uid, from the ledger."""
    if data.ledger_path is None or not uids:
        return {}
    columns = ["uid", "url", "caption", "status", "stage", "reason", "detail", "clip_score"]
    records = {}
    for rows in ledger_batches(data.ledger_path, columns):
        for row in rows[rows["uid"].isin(uids)].itertuples(index=False):
            records[row.uid] = {
                "caption": _text(row.caption),
                "url": _text(row.url),
                "clip_score": _finite(row.clip_score),
                "status": row.status,
                "stage": row.stage,
                "reason": _text(row.reason) or None,
                "detail": _text(row.detail)[:DETAIL_CHARS] or None,
            }
    return dict(sorted(records.items()))


def _text(value: Any) -> str:
    return "" if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)) else str(value)


def shown_uids(grids: dict[str, Any] | None, groups: list[dict[str, Any]] | None) -> set[str]:
    uids: set[str] = set()
    for key, value in (grids or {}).items():
        if key == "by_reason":
            uids.update(u for group in value for u in group["uids"])
        elif isinstance(value, list):
            uids.update(value)
    for group in groups or []:
        uids.add(group["kept_uid"])
        uids.update(d["uid"] for d in group["dropped"])
    return uids


def build_stats(data: RunData) -> dict[str, Any]:
    """The report's numbers as one JSON-able document (written to report/stats.json)."""
    scores = score_stats(data)
    digest = None
    if data.ledger_path is not None:
        edges = scores["histogram"]["edges"] if scores else None
        digest = digest_ledger(data.ledger_path, scores["cutoff"] if scores else None, edges)
    if scores is not None and digest is not None and digest.curated_counts is not None:
        scores["curated_counts"] = digest.curated_counts.astype(int).tolist()
    funnel_rows = funnel(data, digest)
    grids = sample_grids(digest)
    groups = duplicate_groups(data)
    return {
        "summary": run_summary(data, funnel_rows),
        "funnel": funnel_rows,
        "clip_score": scores,
        "samples": grids,
        "duplicate_groups": groups,
        "validation": validation(data.metrics),
        "records": sample_records(data, shown_uids(grids, groups)),
    }
