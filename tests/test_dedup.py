"""Dedup algorithms on generated embeddings with planted copies: what is found (recall and precision
against the plant), who survives, and that the answer does not depend on row order."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pytest

from curate.stages.dedup import (
    REASONS,
    Decisions,
    DedupParams,
    IVFParams,
    combine,
    components,
    contaminated,
    contamination_decisions,
    deduplicate,
    exact_duplicates,
    near_duplicate_pairs,
    near_duplicates,
    semantic_duplicates,
    survivors,
)
from curate.stages.dedup.groups import union_find

THRESHOLD = 0.95


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def turned(v: np.ndarray, cosine: float, direction: np.ndarray) -> np.ndarray:
    """`v` turned towards `direction` so that its cosine to `v` is exactly `cosine`."""
    ortho = direction - (direction @ v) * v
    ortho /= np.linalg.norm(ortho)
    return (cosine * v + np.sqrt(1 - cosine**2) * ortho).astype(np.float32)


@dataclass
class World:
    """Random unit vectors with planted groups of copies; `groups` lists each group's row indices."""

    emb: np.ndarray
    uids: np.ndarray
    clip: np.ndarray
    groups: list[list[int]] = field(default_factory=list)

    def true_pairs(self) -> set[tuple[int, int]]:
        return {(a, b) for g in self.groups for a in g for b in g if a < b}

    def expected_drops(self) -> dict[str, str]:
        """uid -> uid of its group's survivor (best CLIP score, then smallest uid)."""
        drops = {}
        for group in self.groups:
            best = min(group, key=lambda r: (-self.clip[r], self.uids[r]))
            drops.update({self.uids[r]: self.uids[best] for r in group if r != best})
        return drops


def planted_world(n: int = 3000, dim: int = 128, seed: int = 0) -> World:
    """n random rows, then: exact copies, near copies (cosine 0.96-0.995), chains a~b~c with a and c
    below the threshold, and CLIP-score ties inside a group."""
    rng = np.random.default_rng(seed)
    rows = list(unit(rng, n, dim))
    groups: list[list[int]] = []
    originals = iter(rng.permutation(n).tolist())

    def add(vector: np.ndarray) -> int:
        rows.append(vector)
        return len(rows) - 1

    for _ in range(40):  # exact copy
        a = next(originals)
        groups.append([a, add(rows[a].copy())])
    for _ in range(80):  # near copies, one or two
        a = next(originals)
        copies = [add(turned(rows[a], rng.uniform(0.96, 0.995), rng.standard_normal(dim))) for _ in range(1 + _ % 2)]
        groups.append([a, *copies])
    for _ in range(20):  # chain: cos(a,b) = cos(b,c) = 0.96, cos(a,c) = 2*0.96**2 - 1 ≈ 0.84
        a = next(originals)
        direction = rng.standard_normal(dim)
        b = add(turned(rows[a], 0.96, direction))
        c = add(turned(rows[a], 2 * 0.96**2 - 1, direction))
        groups.append([a, b, c])
    emb = np.stack(rows).astype(np.float32)
    clip = rng.uniform(0.1, 0.4, len(emb)).astype(np.float32).round(2)  # rounding makes ties
    for group in groups[:10]:
        clip[group] = 0.3  # whole-group tie: smallest uid wins
    uids = np.array([f"{v:032x}" for v in rng.permutation(10**6)[: len(emb)]], dtype=object)
    return World(emb, uids, clip, groups)


def found_drops(decisions: Decisions) -> dict[str, str]:
    return {u: k for u, k, d in zip(decisions.uid, decisions.kept_uid, decisions.dropped, strict=True) if d}


def by_uid(table: pa.Table) -> dict[str, tuple]:
    rows = table.to_pylist()
    return {r["uid"]: tuple(v for k, v in r.items() if k != "uid") for r in rows}


def recall_precision(found: set, truth: set) -> tuple[float, float]:
    hits = len(found & truth)
    return hits / max(len(truth), 1), hits / max(len(found), 1)


@pytest.fixture(scope="module")
def world() -> World:
    return planted_world()


# ---------------------------------------------------------------- groups


def test_components_are_transitive_and_scipy_agrees_with_union_find():
    rng = np.random.default_rng(1)
    n = 500
    i, j = rng.integers(0, n, 300), rng.integers(0, n, 300)
    with_scipy, without = components(n, i, j), union_find(n, i, j)
    # the same partition: a one-to-one map between the two labellings
    assert len(set(zip(with_scipy.tolist(), without.tolist(), strict=True))) == len(set(with_scipy.tolist()))
    assert len(set(without.tolist())) == len(set(with_scipy.tolist()))
    chain = components(5, np.array([0, 1, 3]), np.array([1, 2, 4]))
    assert chain[0] == chain[1] == chain[2] != chain[3] == chain[4]


def test_components_fall_back_to_union_find_without_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.sparse", None)
    labels = components(4, np.array([0, 2]), np.array([1, 3]))
    assert labels[0] == labels[1] != labels[2] == labels[3]


def test_survivor_is_best_score_then_smallest_uid_and_nan_ranks_last():
    labels = np.array([0, 0, 0, 1, 1, 2, 2])
    clip = np.array([0.2, 0.3, 0.3, np.nan, 0.1, 0.25, 0.25], dtype=np.float32)
    uids = np.array(["c", "b", "a", "d", "e", "g", "f"], dtype=object)
    chosen = survivors(labels, clip, uids)
    assert chosen.keep.tolist() == [False, False, True, False, True, False, True]
    assert chosen.kept_uid.tolist() == ["a", "a", None, "e", None, "f", None]
    assert chosen.survivor.tolist() == [2, 2, 2, 4, 4, 6, 6]


# ---------------------------------------------------------------- exact


def test_exact_duplicates_group_identical_hashes_and_never_match_missing_ones():
    uids = np.array(["u1", "u2", "u3", "u4", "u5", "u6", "u7"], dtype=object)
    sha = np.array(["aa", "bb", "aa", None, None, "", ""], dtype=object)
    clip = np.array([0.1, 0.2, 0.3, 0.9, 0.9, 0.5, 0.5], dtype=np.float32)
    decisions = exact_duplicates(uids, sha, clip)
    assert found_drops(decisions) == {"u1": "u3"}
    assert np.isnan(decisions.similarity).all()


def test_exact_duplicates_of_the_planted_world(world):
    # rows with identical embeddings stand for identical bytes: hash the vectors
    sha = np.array([row.tobytes().hex()[:64] for row in world.emb], dtype=object)
    exact_groups = [g for g in world.groups if np.array_equal(world.emb[g[0]], world.emb[g[1]])]
    decisions = exact_duplicates(world.uids, sha, world.clip)
    assert len(exact_groups) == 40
    assert found_drops(decisions) == World(world.emb, world.uids, world.clip, exact_groups).expected_drops()


# ---------------------------------------------------------------- near


def test_flat_pairs_are_exactly_the_planted_ones(world):
    i, j = near_duplicate_pairs(world.emb, THRESHOLD, "flat")
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    truth = {(a, b) for a, b in world.true_pairs() if world.emb[a] @ world.emb[b] >= THRESHOLD}
    recall, precision = recall_precision(found, truth)
    assert (recall, precision) == (1.0, 1.0)
    assert all(a < b for a, b in found) and list(i) == sorted(i)


def test_near_duplicates_collapse_each_group_to_its_best_member(world):
    decisions = near_duplicates(world.uids, world.emb, world.clip, THRESHOLD, "flat")
    expected = world.expected_drops()
    found = found_drops(decisions)
    recall, precision = recall_precision(set(found.items()), set(expected.items()))
    assert (recall, precision) == (1.0, 1.0)  # right rows dropped, each naming its group's survivor
    row = {u: r for r, u in enumerate(world.uids)}
    for uid, kept in found.items():  # similarity is the cosine to the survivor
        assert decisions.similarity[row[uid]] == pytest.approx(world.emb[row[uid]] @ world.emb[row[kept]], abs=1e-5)
    assert np.isnan(decisions.similarity[~decisions.dropped]).all()


def test_chains_join_through_the_middle_member(world):
    decisions = near_duplicates(world.uids, world.emb, world.clip, THRESHOLD, "flat")
    kept = dict(zip(world.uids, decisions.kept_uid, strict=True))
    for a, b, c in [g for g in world.groups if len(g) == 3 and world.emb[g[0]] @ world.emb[g[2]] < 0.9]:
        survivor = {kept[world.uids[r]] or world.uids[r] for r in (a, b, c)}
        assert len(survivor) == 1


def test_near_duplicates_do_not_depend_on_row_order(world):
    perm = np.random.default_rng(5).permutation(len(world.uids))
    for method in ("flat", "ivf"):
        first = near_duplicates(world.uids, world.emb, world.clip, THRESHOLD, method, threads=1)
        second = near_duplicates(world.uids[perm], world.emb[perm], world.clip[perm], THRESHOLD, method, threads=2)
        assert by_uid(first.to_table()) == by_uid(second.to_table())


def test_ivf_agrees_with_flat_on_a_medium_case():
    world = planted_world(n=30_000, dim=96, seed=3)
    flat = set(zip(*[a.tolist() for a in near_duplicate_pairs(world.emb, THRESHOLD, "flat")], strict=True))
    i, j = near_duplicate_pairs(world.emb, THRESHOLD, "ivf", ivf=IVFParams(list_size=128, tables=6))
    recall, precision = recall_precision(set(zip(i.tolist(), j.tolist(), strict=True)), flat)
    assert recall >= 0.98, recall
    assert precision == 1.0  # every candidate is checked exactly


def test_auto_uses_flat_for_small_runs_and_ivf_beyond(caplog):
    world = planted_world(n=500, dim=32, seed=4)
    with caplog.at_level("INFO", logger="curate.stages.dedup.near"):
        near_duplicate_pairs(world.emb, THRESHOLD)
        near_duplicate_pairs(world.emb, THRESHOLD, flat_max_n=100)
    assert "(flat," in caplog.messages[0] and "(ivf," in caplog.messages[1]
    with pytest.raises(ValueError, match="unknown near-duplicate method 'hnsw'"):
        near_duplicate_pairs(world.emb, THRESHOLD, "hnsw")  # type: ignore[arg-type]


def test_a_huge_group_of_copies_is_thinned_but_stays_one_group():
    rng = np.random.default_rng(6)
    base = unit(rng, 1, 64)[0]
    emb = np.stack([turned(base, 0.999, rng.standard_normal(64)) for _ in range(3000)] + list(unit(rng, 200, 64)))
    i, j = near_duplicate_pairs(emb, THRESHOLD, "flat", spanning=True)
    assert len(i) < 3000 * 2999 / 2 / 10
    labels = components(len(emb), i, j)
    assert len(set(labels[:3000].tolist())) == 1 and len(set(labels[3000:].tolist())) == 200
    uids = np.array([f"u{k:05d}" for k in range(len(emb))], dtype=object)
    assert near_duplicates(uids, emb, np.zeros(len(emb)), THRESHOLD).n_dropped == 2999


# ---------------------------------------------------------------- semantic


def clustered_world(seed: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, str]]:
    """4 well-separated clusters of 60 points each (pairwise cosine ~0.6-0.8, far below 1 - eps), plus
    near-identical copies (cosine 0.995) of 10 points per cluster, with lower CLIP scores than theirs,
    and in one cluster a chain a -> b -> c where only b is close to a."""
    rng = np.random.default_rng(seed)
    dim = 64
    centres = unit(rng, 4, dim) * 3
    points, clip, copies = [], [], {}
    for centre in centres:
        members = centre + rng.standard_normal((60, dim)).astype(np.float32) * 0.25
        members /= np.linalg.norm(members, axis=1, keepdims=True)
        for k, m in enumerate(members):
            points.append(m)
            clip.append(0.5 + 0.001 * k)
            if k < 10:
                points.append(turned(m, 0.995, rng.standard_normal(dim)))
                clip.append(0.2)
                copies[len(points) - 1] = len(points) - 2
    emb = np.stack(points).astype(np.float32)
    uids = np.array([f"s{k:04d}" for k in range(len(emb))], dtype=object)
    return emb, uids, np.array(clip, dtype=np.float32), {uids[c]: uids[o] for c, o in copies.items()}


def test_semantic_dedup_drops_near_identical_points_and_keeps_distant_ones():
    emb, uids, clip, expected = clustered_world()
    decisions = semantic_duplicates(uids, emb, clip, eps=0.02, n_clusters=4, seed=0)
    recall, precision = recall_precision(set(found_drops(decisions).items()), set(expected.items()))
    assert (recall, precision) == (1.0, 1.0)
    assert (decisions.similarity[decisions.dropped] > 0.98).all()


def test_semantic_dedup_compares_with_kept_points_only():
    rng = np.random.default_rng(8)
    a = unit(rng, 1, 32)[0]
    direction = rng.standard_normal(32)
    b, c = turned(a, 0.985, direction), turned(a, 2 * 0.985**2 - 1, direction)  # a~b, b~c, a !~ c at eps 0.02
    emb = np.stack([a, b, c]).astype(np.float32)
    uids = np.array(["a", "b", "c"], dtype=object)
    decisions = semantic_duplicates(uids, emb, np.array([0.9, 0.8, 0.7]), eps=0.02, n_clusters=1)
    assert found_drops(decisions) == {"b": "a"}  # c is only close to b, which was dropped


def test_semantic_dedup_is_blocked_the_same_as_one_pass(monkeypatch):
    import curate.stages.dedup.semantic as semantic

    rng = np.random.default_rng(9)
    base = unit(rng, 50, 32)
    emb = np.concatenate([base] + [np.stack([turned(v, 0.99, rng.standard_normal(32)) for v in base])] * 3)
    uids = np.array([f"x{k:04d}" for k in range(len(emb))], dtype=object)
    clip = rng.uniform(0, 1, len(emb)).astype(np.float32)
    whole = semantic_duplicates(uids, emb, clip, eps=0.02, n_clusters=2)
    monkeypatch.setattr(semantic, "ROW_BLOCK", 7)
    monkeypatch.setattr(semantic, "COL_BLOCK", 5)
    blocked = semantic_duplicates(uids, emb, clip, eps=0.02, n_clusters=2)
    assert found_drops(whole) == found_drops(blocked)
    # other block shapes may round the last bit of a product differently
    np.testing.assert_allclose(whole.similarity, blocked.similarity, atol=1e-6)
    assert whole.n_dropped >= 100


def test_semantic_dedup_does_not_depend_on_row_order():
    emb, uids, clip, _ = clustered_world(seed=10)
    perm = np.random.default_rng(11).permutation(len(uids))
    first = semantic_duplicates(uids, emb, clip, eps=0.05, seed=3)
    second = semantic_duplicates(uids[perm], emb[perm], clip[perm], eps=0.05, seed=3, threads=1)
    assert by_uid(first.to_table()) == by_uid(second.to_table())


# ---------------------------------------------------------------- decontamination


def test_decontamination_drops_exactly_the_planted_leaks():
    rng = np.random.default_rng(12)
    evals = unit(rng, 50, 64)
    train = unit(rng, 2000, 64)
    leaks = {int(r): int(e) for r, e in zip(rng.choice(2000, 15, replace=False), rng.integers(0, 50, 15), strict=True)}
    for r, e in leaks.items():
        train[r] = turned(evals[e], rng.uniform(0.96, 1.0), rng.standard_normal(64))
    found = contaminated(train, evals, THRESHOLD)
    assert set(np.flatnonzero(found.mask).tolist()) == set(leaks)
    assert {r: int(found.nearest_eval_index[r]) for r in leaks} == leaks
    assert (found.similarity[found.mask] >= THRESHOLD).all()

    uids = np.array([f"t{k}" for k in range(2000)], dtype=object)
    decisions = contamination_decisions(uids, train, evals, THRESHOLD, eval_ids=[f"eval/{e}" for e in range(50)])
    assert found_drops(decisions) == {f"t{r}": f"eval/{e}" for r, e in leaks.items()}
    assert not contaminated(train, evals[:0], THRESHOLD).mask.any()


# ---------------------------------------------------------------- layers


def test_combine_applies_layers_in_order_on_survivors_only():
    uids = np.array(["a", "b", "c", "d"], dtype=object)
    nan = np.float32("nan")
    contam = Decisions(
        uids,
        np.array([True, False, False, False]),
        np.array(["e1", None, None, None]),
        np.array([0.97, nan, nan, nan], np.float32),
    )
    exact = Decisions(
        uids[1:], np.array([False, True, False]), np.array([None, "b", None]), np.full(3, nan, np.float32)
    )
    table = combine(uids, [("contaminated", contam), ("dup_exact", exact)])
    assert table.schema.names == ["uid", "reason", "kept_uid", "similarity"]
    assert table["reason"].to_pylist() == ["contaminated", None, "dup_exact", None]
    assert table["kept_uid"].to_pylist() == ["e1", None, "b", None]
    with pytest.raises(ValueError, match="must decide exactly"):
        combine(uids, [("contaminated", contam), ("dup_exact", Decisions.keep_all(uids))])
    with pytest.raises(ValueError, match="out of order"):
        combine(uids, [("dup_near", Decisions.keep_all(uids)), ("dup_exact", Decisions.keep_all(uids))])


def test_deduplicate_accounts_for_every_row_once_whatever_the_order(world):
    rng = np.random.default_rng(13)
    sha = np.array([f"h{r}" for r in range(len(world.uids))], dtype=object)
    exact_pair = world.groups[50]  # same bytes, although the embeddings differ a little
    sha[exact_pair[1]] = sha[exact_pair[0]]
    evals = np.stack([turned(world.emb[r], 0.99, rng.standard_normal(world.emb.shape[1])) for r in (7, 8)])
    params = DedupParams(near_threshold=THRESHOLD, near_method="flat", semantic_eps=0.3, semantic_clusters=8)
    table = deduplicate(world.uids, world.emb, world.clip, sha, eval_emb=evals, params=params)
    assert table["uid"].to_pylist() == list(world.uids)
    reasons = set(table["reason"].to_pylist()) - {None}
    assert reasons <= set(REASONS) and {"contaminated", "dup_exact", "dup_near"} <= reasons
    rows = by_uid(table)
    assert rows[world.uids[7]][0] == rows[world.uids[8]][0] == "contaminated"
    perm = rng.permutation(len(world.uids))
    again = deduplicate(world.uids[perm], world.emb[perm], world.clip[perm], sha[perm], eval_emb=evals, params=params)
    assert by_uid(again) == rows
