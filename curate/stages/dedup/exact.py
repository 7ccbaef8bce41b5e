"""Exact duplicates: byte-identical images (same sha256); the copy with the best CLIP score stays."""

from __future__ import annotations

import numpy as np
import pandas as pd

from curate.stages.dedup.decisions import Decisions, as_uids
from curate.stages.dedup.groups import survivors


def sha256_groups(sha256: np.ndarray) -> np.ndarray:
    """A group label per row: equal hashes share one; a missing hash (None, NaN, "") is a group of its own."""
    hashes = np.asarray(sha256, dtype=object)
    labels, _ = pd.factorize(np.where(hashes == "", None, hashes), use_na_sentinel=True)
    missing = labels < 0
    labels[missing] = labels.max(initial=-1) + 1 + np.arange(missing.sum())
    return labels.astype(np.int64)


def exact_duplicates(uids: np.ndarray, sha256: np.ndarray, clip_score: np.ndarray) -> Decisions:
    uids = as_uids(uids)
    if not (len(sha256) == len(clip_score) == len(uids)):
        raise ValueError(f"uids, sha256 and clip_score differ in length: {len(uids)}, {len(sha256)}, {len(clip_score)}")
    chosen = survivors(sha256_groups(sha256), clip_score, uids)
    return Decisions(uids, ~chosen.keep, chosen.kept_uid, np.full(len(uids), np.nan, dtype=np.float32))
