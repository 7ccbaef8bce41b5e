"""Dedup algorithms as pure functions over one run's arrays (uids, L2-normalised image embeddings,
CLIP scores, sha256): decontamination, exact, near and semantic duplicates, and the layered
combination the dedup stage applies. Every function gives the same answer whatever the row order."""

from __future__ import annotations

from curate.stages.dedup.decisions import DECISION_SCHEMA, REASONS, Decisions, combine
from curate.stages.dedup.decontaminate import Contamination, contaminated, contamination_decisions
from curate.stages.dedup.exact import exact_duplicates
from curate.stages.dedup.groups import Survivors, components, survivors
from curate.stages.dedup.layers import DedupParams, deduplicate
from curate.stages.dedup.near import IVFParams, near_duplicate_pairs, near_duplicates
from curate.stages.dedup.semantic import default_clusters, semantic_duplicates

__all__ = [
    "DECISION_SCHEMA",
    "REASONS",
    "Contamination",
    "Decisions",
    "DedupParams",
    "IVFParams",
    "Survivors",
    "combine",
    "components",
    "contaminated",
    "contamination_decisions",
    "deduplicate",
    "default_clusters",
    "exact_duplicates",
    "near_duplicate_pairs",
    "near_duplicates",
    "semantic_duplicates",
    "survivors",
]
