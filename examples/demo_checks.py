"""Compare a run's ledger with the demo world's ground truth."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from curate.input import generated_uids
from curate.ledger import read_ledger

# What the input and download stages must decide for each planted kind: (status, reason).
EXPECTED_DOWNLOAD_FATES: dict[str, tuple[str, str | None]] = {
    "clean": ("kept", None),
    "mismatch": ("kept", None),
    "junk_caption": ("kept", None),
    "dup_exact": ("kept", None),
    "dup_near": ("kept", None),
    "slow": ("kept", None),
    "tiny": ("dropped", "min_side"),
    "http_404": ("failed", "http_404"),
    "corrupt": ("failed", "decode_error"),
    "opt_out": ("dropped", "opt_out"),
    "timeout": ("failed", "timeout"),
    "invalid_url": ("failed", "invalid_url"),
    "dup_url_caption": ("dropped", "dup_url_caption"),
}


def truth_by_uid(truth: pd.DataFrame, table_path: Path) -> pd.DataFrame:
    """The truth rows with the uid curate generates for each row of the table written from them."""
    uids = generated_uids(Path(table_path).name, 0, len(truth)).to_pylist()
    return truth.assign(uid=uids)


def compare_download_fates(run_dir: Path, truth: pd.DataFrame, table_path: Path) -> pd.DataFrame:
    """One row per kind: rows, how many got the expected fate, and the fates actually seen."""
    ledger = read_ledger(run_dir)
    joined = truth_by_uid(truth, table_path).merge(ledger, on="uid", how="left", suffixes=("_truth", ""))
    rows = []
    for kind, group in joined.groupby("kind"):
        status, reason = EXPECTED_DOWNLOAD_FATES[kind]
        expected = (group["status"] == status) & (group["reason"].fillna("") == (reason or ""))
        seen = (group["status"] + "/" + group["reason"].fillna("-")).value_counts().to_dict()
        rows.append({"kind": kind, "rows": len(group), "as_expected": int(expected.sum()), "seen": seen})
    return pd.DataFrame(rows)
