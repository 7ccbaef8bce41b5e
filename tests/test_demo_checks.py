"""The demo's own measures of a run against its world's ground truth, on a hand-checked ledger."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from curate.stages.input import generated_uids
from examples.demo_checks import dedup_quality, filter_quality, precision_recall


def test_precision_and_recall_on_hand_checked_masks() -> None:
    predicted = pd.Series([True, True, False, False, True])
    actual = pd.Series([True, False, True, False, True])
    assert precision_recall(predicted, actual) == {"precision": 2 / 3, "recall": 2 / 3, "predicted": 3, "actual": 3}
    nothing = pd.Series([False] * 5)
    assert precision_recall(nothing, nothing) == {"precision": 0.0, "recall": 0.0, "predicted": 0, "actual": 0}


def test_filter_and_dedup_quality_on_a_hand_checked_ledger(tmp_path: Path) -> None:
    # r1 is an exact copy of r0 (found: dropped for r0), r2 a near copy of r0 (missed), r3 a clean row dropped
    # as a near copy of r0 (a wrong drop), r4 a mismatched caption the filter dropped, r5 junk it kept
    table = tmp_path / "crawl.parquet"
    truth = pd.DataFrame(
        {
            "row_key": [f"r{i}" for i in range(6)],
            "kind": ["clean", "dup_exact", "dup_near", "clean", "mismatch", "junk_caption"],
            "dup_of": [None, "r0", "r0", None, None, None],
        }
    )
    u = generated_uids(table.name, 0, len(truth)).to_pylist()
    ledger = pd.DataFrame(
        {
            "uid": u,
            "stage": ["dedup", "dedup", "dedup", "dedup", "filter", "dedup"],
            "status": ["kept", "dropped", "kept", "dropped", "dropped", "kept"],
            "reason": [None, "dup_exact", None, "dup_near", "clip_score", None],
            "detail": [None, u[0], None, u[0], None, None],
        }
    )
    ledger.to_parquet(tmp_path / "ledger.parquet", index=False)

    dedup = dedup_quality(tmp_path, truth, table)
    assert dedup["dup_exact"] == {"precision": 1.0, "recall": 1.0, "pairs": 1, "drops": 1}
    assert dedup["dup_near"] == {"precision": 0.0, "recall": 0.0, "pairs": 1, "drops": 1}
    filters = filter_quality(tmp_path, truth, table)
    assert filters["mismatch+junk"] == {"precision": 1.0, "recall": 0.5, "predicted": 1, "actual": 2}
    assert filters["mismatch"]["recall"] == 1.0 and filters["junk_caption"]["recall"] == 0.0
    assert all(pd.isna(filters[kind]["precision"]) for kind in ("mismatch", "junk_caption"))
