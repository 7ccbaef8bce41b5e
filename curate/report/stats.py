"""The numbers behind the report: funnel, score distribution, sample choices, duplicate groups, validation.

Everything is read from what the stages left in the run directory; any part may be missing (a run with only
input and download, an unfinished run) and its section is then None. Sample choices are deterministic: the
same run gives the same report.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import yaml

from curate.config import STAGE_ORDER
from curate.io.fs import read_json
from curate.ledger import read_ledger
from curate.stage import RunLayout

log = logging.getLogger(__name__)

NEAR_THRESHOLD_SAMPLES = 12
SAMPLES_PER_REASON = 8
GROUPS_PER_REASON = 4
COPIES_PER_GROUP = 5
DETAIL_CHARS = 160
DUP_REASONS = ("dup_exact", "dup_near", "dup_semantic")


@dataclass
class RunData:
    """What the report reads from a run directory, loaded once."""

    layout: RunLayout
    config: dict[str, Any]
    ledger: pd.DataFrame | None
    run_stats: dict[str, Any] | None
    filter_summary: dict[str, Any] | None
    decisions: pd.DataFrame | None
    metrics: dict[str, Any] | None


def load_run(run_dir: Path) -> RunData:
    layout = RunLayout(Path(run_dir))
    if not layout.root.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    decisions_path = layout.stage_dir("dedup") / "decisions.parquet"
    return RunData(
        layout=layout,
        config=_read_yaml(layout.config_path),
        ledger=read_ledger(layout.root) if layout.ledger_path.exists() else None,
        run_stats=_read_optional_json(layout.stats_path),
        filter_summary=_read_optional_json(layout.stage_dir("filter") / "summary.json"),
        decisions=pq.read_table(decisions_path).to_pandas() if decisions_path.exists() else None,
        metrics=_read_optional_json(layout.stage_dir("validate") / "metrics.json"),
    )


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


# --------------------------------------------------------------------------------------------------
# Funnel


def stage_rank(stage: str) -> int:
    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


def funnel(data: RunData) -> list[dict[str, Any]] | None:
    """Per stage in pipeline order: rows in, rows kept, and rows removed per 'status/reason'."""
    if data.ledger is not None:
        return funnel_from_ledger(data.ledger, _configured_stages(data))
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
    return [s for s in data.config.get("stages", []) if s != "materialize"]


def funnel_from_ledger(ledger: pd.DataFrame, configured: list[str]) -> list[dict[str, Any]]:
    stages = sorted(set(configured) | set(ledger["stage"].dropna()), key=stage_rank)
    rank = ledger["stage"].map({s: i for i, s in enumerate(stages)})
    removed_rows = ledger[ledger["status"] != "kept"]
    rows = []
    for i, stage in enumerate(stages):
        entered = int((rank >= i).sum())
        here = removed_rows[removed_rows["stage"] == stage]
        removed = (here["status"] + "/" + here["reason"].fillna("unknown")).value_counts()
        removed_counts = {k: int(v) for k, v in sorted(removed.items(), key=lambda kv: (-kv[1], kv[0]))}
        rows.append(
            {"stage": stage, "rows": entered, "kept": entered - sum(removed_counts.values()), "removed": removed_counts}
        )
    return rows


# --------------------------------------------------------------------------------------------------
# CLIP scores


def score_stats(data: RunData) -> dict[str, Any] | None:
    """Histogram, kept fraction vs threshold and quantiles of the CLIP scores, plus the cutoff used."""
    from curate.filters import histogram, score_summary

    summary = data.filter_summary
    if summary is not None and summary.get("clip_score", {}).get("count"):
        result = {
            "source": "filter/summary.json",
            "histogram": summary["clip_score_histogram"],
            "summary": summary["clip_score"],
            "cutoff": summary.get("clip_cutoff"),
            "threshold": summary.get("clip_threshold"),
            "top_fraction": summary.get("clip_top_fraction"),
        }
    else:
        scores = _embedded_scores(data.layout)
        if scores is None or not len(scores):
            return None
        result = {
            "source": "embed/metadata",
            "histogram": histogram(scores),
            "summary": score_summary(scores),
            "cutoff": None,
            "threshold": None,
            "top_fraction": None,
        }
    result["curated_counts"] = _curated_histogram(data.ledger, result["histogram"]["edges"])
    return result


def _embedded_scores(layout: RunLayout) -> np.ndarray | None:
    paths = sorted((layout.stage_dir("embed") / "metadata").glob("metadata_*.parquet"))
    if not paths:
        return None
    parts = [pq.read_table(p, columns=["clip_score"])["clip_score"].to_numpy(zero_copy_only=False) for p in paths]
    return np.concatenate(parts).astype(np.float64)


def _curated_histogram(ledger: pd.DataFrame | None, edges: list[float]) -> list[int] | None:
    """Counts of the finally kept rows over the same bins, so the plot can show what survived."""
    if ledger is None or len(edges) < 2:
        return None
    scores = ledger.loc[ledger["status"] == "kept", "clip_score"].dropna().to_numpy(dtype=np.float64)
    counts, _ = np.histogram(np.clip(scores, edges[0], edges[-1]), bins=np.asarray(edges))
    return counts.astype(int).tolist()


# --------------------------------------------------------------------------------------------------
# Sample grids


def sample_grids(data: RunData, cutoff: float | None) -> dict[str, Any] | None:
    """uids to show: kept rows next to the threshold, the dropped rows just below it, and each reason's rows."""
    ledger = data.ledger
    if ledger is None:
        return None
    kept = ledger[ledger["status"] == "kept"]
    scored = kept.dropna(subset=["clip_score"])
    grids: dict[str, Any] = {"cutoff": cutoff}
    if cutoff is not None and len(scored):
        grids["kept_near_threshold"] = _by_score(scored, ascending=True)
        below = ledger[(ledger["reason"] == "clip_score")].dropna(subset=["clip_score"])
        grids["dropped_near_threshold"] = _by_score(below, ascending=False)
    elif len(scored):
        grids["kept_lowest_scores"] = _by_score(scored, ascending=True)
    else:
        grids["kept_sample"] = sorted(kept["uid"])[:NEAR_THRESHOLD_SAMPLES]
    grids["by_reason"] = _reason_samples(ledger)
    return grids


def _by_score(rows: pd.DataFrame, ascending: bool) -> list[str]:
    ordered = rows.sort_values(["clip_score", "uid"], ascending=[ascending, True], kind="stable")
    return ordered["uid"].head(NEAR_THRESHOLD_SAMPLES).tolist()


def _reason_samples(ledger: pd.DataFrame) -> list[dict[str, Any]]:
    removed = ledger[ledger["status"] != "kept"].copy()
    removed["reason"] = removed["reason"].fillna("unknown")
    groups = []
    for (stage, status, reason), rows in removed.groupby(["stage", "status", "reason"], sort=False):
        uids = sorted(rows["uid"])
        groups.append(
            {"stage": stage, "status": status, "reason": reason, "count": len(uids), "uids": uids[:SAMPLES_PER_REASON]}
        )
    return sorted(groups, key=lambda g: (stage_rank(g["stage"]), -g["count"], g["reason"]))


# --------------------------------------------------------------------------------------------------
# Duplicate groups


def duplicate_groups(data: RunData) -> list[dict[str, Any]] | None:
    """Per duplicate reason, its largest groups: the survivor and the copies dropped in its favour."""
    decisions = data.decisions
    if decisions is None:
        return None
    dups = decisions[decisions["reason"].isin(DUP_REASONS) & decisions["kept_uid"].notna()]
    groups = []
    for reason in DUP_REASONS:
        rows = dups[dups["reason"] == reason]
        sizes = rows.groupby("kept_uid").size().reset_index(name="copies")
        sizes = sizes.sort_values(["copies", "kept_uid"], ascending=[False, True]).head(GROUPS_PER_REASON)
        for kept_uid, copies in zip(sizes["kept_uid"], sizes["copies"], strict=True):
            members = rows[rows["kept_uid"] == kept_uid].assign(sim=lambda t: t["similarity"].fillna(1.0))
            members = members.sort_values(["sim", "uid"], ascending=[False, True]).head(COPIES_PER_GROUP)
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

    The file's exact shape belongs to the validate stage; this reads any nesting of dicts and lists, so that
    new metrics appear without a change here. A numeric list under a key containing 'loss' is a curve.
    """
    if not isinstance(metrics, dict):
        return None
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
    marker = data.layout.root / "curated" / "_done.json"
    return {
        "run": str(data.layout.root.resolve()),
        "name": data.layout.root.resolve().name,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "stages": list(config.get("stages", [])),
        "complete": data.ledger is not None,
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
    if data.ledger is None or not uids:
        return {}
    rows = data.ledger[data.ledger["uid"].isin(uids)]
    records = {}
    for row in rows.itertuples(index=False):
        records[row.uid] = {
            "caption": _text(row.caption),
            "url": _text(row.url),
            "clip_score": _finite(row.clip_score),
            "status": row.status,
            "stage": row.stage,
            "reason": _text(row.reason) or None,
            "detail": (_text(row.detail) or "")[:DETAIL_CHARS] or None,
        }
    return records


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA else str(value)


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
    funnel_rows = funnel(data)
    scores = score_stats(data)
    grids = sample_grids(data, scores["cutoff"] if scores else None)
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
