"""Compare a run's ledger with the demo world's ground truth."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from curate.ledger import read_ledger
from curate.stages.input import generated_uids

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
    # a row that went past download was kept by it, whatever later stages decided
    decided_early = joined["stage"].isin(["input", "download"])
    joined["status"] = joined["status"].where(decided_early, "kept")
    joined["reason"] = joined["reason"].where(decided_early, None)
    rows = []
    for kind, group in joined.groupby("kind"):
        status, reason = EXPECTED_DOWNLOAD_FATES[kind]
        expected = (group["status"] == status) & (group["reason"].fillna("") == (reason or ""))
        seen = (group["status"] + "/" + group["reason"].fillna("-")).value_counts().to_dict()
        rows.append({"kind": kind, "rows": len(group), "as_expected": int(expected.sum()), "seen": seen})
    return pd.DataFrame(rows)


BAD_CAPTION_KINDS = ("mismatch", "junk_caption")
DUP_KINDS = ("dup_exact", "dup_near")


def joined_ledger(run_dir: Path, truth: pd.DataFrame, table_path: Path) -> pd.DataFrame:
    ledger = read_ledger(run_dir)
    return truth_by_uid(truth, table_path).merge(ledger, on="uid", how="left", suffixes=("_truth", ""))


def precision_recall(predicted: pd.Series, actual: pd.Series) -> dict[str, float | int]:
    true_positives = int((predicted & actual).sum())
    return {
        "precision": true_positives / max(int(predicted.sum()), 1),
        "recall": true_positives / max(int(actual.sum()), 1),
        "predicted": int(predicted.sum()),
        "actual": int(actual.sum()),
    }


def filter_quality(run_dir: Path, truth: pd.DataFrame, table_path: Path) -> dict[str, dict[str, float | int]]:
    """Filter drops vs the planted mismatched and junk captions, among rows that reached the filter."""
    rows = joined_ledger(run_dir, truth, table_path)
    reached = rows[rows.stage.isin(["filter", "dedup"])]
    dropped = reached.stage.eq("filter") & reached.status.eq("dropped")
    result = {"mismatch+junk": precision_recall(dropped, reached.kind.isin(BAD_CAPTION_KINDS))}
    for kind in BAD_CAPTION_KINDS:
        result[kind] = precision_recall(dropped, reached.kind.eq(kind))
        result[kind]["precision"] = float("nan")  # per-kind precision is not meaningful (drops mix kinds)
    return result


def dedup_quality(run_dir: Path, truth: pd.DataFrame, table_path: Path) -> dict[str, dict[str, float | int]]:
    """Planted exact and near copies vs dedup's groups, among rows that reached dedup.

    A planted pair (copy, original) is found when dedup put both in one group: one was dropped in
    favour of the other, or both in favour of the same survivor. A dedup drop is correct when the
    dropped row and the row it was dropped for are copies of the same original."""
    rows = joined_ledger(run_dir, truth, table_path)
    uid_of = dict(zip(rows.row_key, rows.uid, strict=True))
    family = {r.uid: (r.dup_of if r.kind in DUP_KINDS else r.row_key) for r in rows.itertuples()}
    reached = set(rows.loc[rows.stage.eq("dedup"), "uid"])
    dup_drops = rows[rows.stage.eq("dedup") & rows.reason.isin(DUP_KINDS)]
    kept_for = dict(zip(dup_drops.uid, dup_drops.detail, strict=True))

    def survivor(uid: str) -> str:
        return kept_for.get(uid, uid)

    result = {}
    for kind in DUP_KINDS:
        pairs = [(r.uid, uid_of[r.dup_of]) for r in rows[rows.kind.eq(kind)].itertuples()]
        pairs = [(a, b) for a, b in pairs if a in reached and b in reached]
        found = sum(survivor(a) == survivor(b) for a, b in pairs)
        drops = dup_drops[dup_drops.reason.eq(kind)]
        correct = sum(family[u] == family[k] for u, k in zip(drops.uid, drops.detail, strict=True))
        result[kind] = {
            "precision": correct / max(len(drops), 1),
            "recall": found / max(len(pairs), 1),
            "pairs": len(pairs),
            "drops": len(drops),
        }
    return result


def search_precision_at_5(run_dir: Path, truth: pd.DataFrame, table_path: Path) -> dict[str, dict[str, float]]:
    """Precision@5 of `curate search` for every shape name and every colour name of the demo world:
    the fraction of the top 5 curated hits whose true shape (colour) is the one searched for."""
    from curate.search import RunSearch
    from examples.demo_world import classes, colors

    by_uid = truth_by_uid(truth, table_path).set_index("uid")
    search = RunSearch(run_dir)
    result = {}
    for column, names in (("shape", classes()), ("color", colors())):
        result[column] = {
            name: sum(by_uid.loc[hit.uid, column] == name for hit in search.text(name, 5)) / 5 for name in names
        }
    return result
