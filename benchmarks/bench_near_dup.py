"""How near-duplicate search scales: N random 512-d unit vectors with ~1% planted near copies.

    python -m benchmarks.bench_near_dup [--sizes 100000 1000000] [--verify-rows 100000] [--out FILE]

For each N, a fresh child process generates the vectors (chunk by chunk, float32, seeded per chunk so
that the first rows are the same at every N), plants near copies (cosine 0.97-0.99 to their original,
threshold 0.95; random 512-d pairs sit near cosine 0 ± 0.05, so the planted pairs are the ground
truth) and times `near_duplicates` with method `auto`. Its peak RSS comes from the kernel (`wait4`).
The child for the largest N also runs the exact flat search on its first `--verify-rows` rows, to check
that the planted pairs really are all the pairs there and to measure recall against exact search.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import emit_result

DEFAULT_WORK = Path("/tmp/curate-bench")
THRESHOLD = 0.95
PLANTED_SHARE = 0.01  # planted pairs per row
COSINE_RANGE = (0.97, 0.99)
CHUNK = 100_000
TARGET_RATIO = 12.0
TARGET_RECALL = 0.98
TARGET_SECONDS_1M = 120.0
TARGET_PEAK_MIB = 4096
REPO = Path(__file__).resolve().parent.parent


def generate(n: int, dim: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 unit vectors and the (k, 2) planted pairs (original, copy); pairs lie within one
    chunk, and chunk c depends only on (seed, c)."""
    emb = np.empty((n, dim), dtype=np.float32)
    pairs = []
    for start in range(0, n, CHUNK):
        rows = min(CHUNK, n - start)
        rng = np.random.default_rng([seed, start // CHUNK])
        block = emb[start : start + rows]
        block[:] = rng.standard_normal((rows, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        k = round(rows * PLANTED_SHARE)
        chosen = rng.permutation(rows)[: 2 * k]
        originals, copies = chosen[:k], chosen[k:]
        block[copies] = near_copies(rng, block[originals], rng.uniform(*COSINE_RANGE, k).astype(np.float32))
        pairs.append(np.stack([originals, copies], axis=1) + start)
    return emb, np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)


def near_copies(rng: np.random.Generator, v: np.ndarray, cosine: np.ndarray) -> np.ndarray:
    """Unit vectors at exactly `cosine` to each row of `v`, in a random direction."""
    u = rng.standard_normal(v.shape, dtype=np.float32)
    u -= np.einsum("ij,ij->i", u, v)[:, None] * v
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return cosine[:, None] * v + np.sqrt(1 - cosine**2)[:, None] * u


def uid_strings(n: int) -> np.ndarray:
    return np.array([f"{i:032x}" for i in range(n)], dtype=object)


def pair_recall(decisions: Any, pairs: np.ndarray, uids: np.ndarray) -> tuple[float, float]:
    """(recall, precision) of `pairs` among the near-duplicate decisions: a pair is found when one of
    its rows is dropped in favour of the other; a drop is right when it is such a pair."""
    a, b = pairs[:, 0], pairs[:, 1]
    kept = decisions.kept_uid
    found = (decisions.dropped[a] & (kept[a] == uids[b])) | (decisions.dropped[b] & (kept[b] == uids[a]))
    dropped = int(decisions.dropped.sum())
    return float(found.mean()) if len(pairs) else 1.0, float(found.sum() / dropped) if dropped else 1.0


def _child(n: int, dim: int, verify_rows: int, result_path: str) -> None:
    from curate.stages.dedup import near_duplicate_pairs, near_duplicates
    from curate.stages.dedup.near import FLAT_MAX_N, choose_method

    started = time.perf_counter()
    emb, planted = generate(n, dim)
    uids = uid_strings(n)
    clip = np.random.default_rng(1).uniform(0.1, 0.4, n).astype(np.float32)
    generate_seconds = time.perf_counter() - started

    started = time.perf_counter()
    decisions = near_duplicates(uids, emb, clip, THRESHOLD, "auto")
    seconds = time.perf_counter() - started
    recall, precision = pair_recall(decisions, planted, uids)
    result: dict[str, Any] = {
        "n": n,
        "method": choose_method("auto", n, FLAT_MAX_N),
        "seconds": round(seconds, 2),
        "recall": round(recall, 4),
        "precision": round(precision, 4),
        "planted_pairs": len(planted),
        "dropped": int(decisions.dropped.sum()),
        "generate_seconds": round(generate_seconds, 1),
    }
    if verify_rows:
        rows = min(verify_rows, n)
        started = time.perf_counter()
        i, j = near_duplicate_pairs(emb[:rows], THRESHOLD, "flat")
        exact = set(zip(i.tolist(), j.tolist(), strict=True))
        inside = planted[(planted < rows).all(axis=1)]
        truth = {(min(a, b), max(a, b)) for a, b in inside.tolist()}
        subset_recall, _ = pair_recall(decisions, np.array(sorted(exact)).reshape(-1, 2), uids)
        result["exact_check"] = {
            "rows": rows,
            "flat_pairs": len(exact),
            "planted_pairs": len(truth),
            "planted_are_all_pairs": exact == truth,
            "recall_vs_flat": round(subset_recall, 4),
            "flat_seconds": round(time.perf_counter() - started, 1),
        }
    Path(result_path).write_text(json.dumps(result))


def measure_child(args: list[str]) -> tuple[int, float, int]:
    """Run `python -m benchmarks.bench_near_dup ARGS`; (exit code, wall seconds, peak RSS bytes)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_near_dup", *args], cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - started, usage.ru_maxrss * 1024


def run(
    sizes: tuple[int, ...] = (100_000, 1_000_000),
    dim: int = 512,
    work: Path = DEFAULT_WORK,
    verify_rows: int = 100_000,
) -> dict[str, Any]:
    work = Path(work) / "near_dup"
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in sorted(sizes):
        result_path = work / f"result-{n}.json"
        result_path.unlink(missing_ok=True)
        verify = verify_rows if n == max(sizes) else 0
        code, wall, peak = measure_child(["--child", str(n), str(dim), str(verify), str(result_path)])
        if code != 0 or not result_path.exists():
            raise RuntimeError(f"near-dup benchmark child for n={n} exited with {code}")
        result = json.loads(result_path.read_text())
        result.update(peak_rss_mib=round(peak / 2**20, 1), process_seconds=round(wall, 1))
        results.append(result)

    small, large = results[0], results[-1]
    ratio = large["seconds"] / small["seconds"] if len(results) > 1 else 1.0
    exact = large.get("exact_check", {})
    checks = {
        "growth_ratio": ratio <= TARGET_RATIO,
        "recall": all(r["recall"] >= TARGET_RECALL for r in results)
        and exact.get("recall_vs_flat", 1.0) >= TARGET_RECALL,
        "planted_are_all_pairs": exact.get("planted_are_all_pairs", True),
        "seconds_largest": large["n"] < 1_000_000 or large["seconds"] < TARGET_SECONDS_1M,
        "peak_rss": all(r["peak_rss_mib"] < TARGET_PEAK_MIB for r in results),
    }
    return {
        "name": "near_dup_scaling",
        "dim": dim,
        "threshold": THRESHOLD,
        "threads": len(os.sched_getaffinity(0)),
        "sizes": results,
        "ratio": round(ratio, 2),
        "targets": {
            "growth_ratio": f"t({large['n']})/t({small['n']}) <= {TARGET_RATIO:g}",
            "recall": f">= {TARGET_RECALL} of planted pairs and of exact pairs",
            "seconds_largest": f"1M rows < {TARGET_SECONDS_1M:g} s",
            "peak_rss": f"< {TARGET_PEAK_MIB} MiB",
        },
        "checks": checks,
        "target": f"ratio <= {TARGET_RATIO:g}, recall >= {TARGET_RECALL}, 1M < {TARGET_SECONDS_1M:g} s",
        "passed": all(checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_near_dup", description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--verify-rows", type=int, default=100_000, help="exact check on this many rows (0: none)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    parser.add_argument("--child", nargs=4, metavar=("N", "DIM", "VERIFY", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        n, dim, verify, result = args.child
        _child(int(n), int(dim), int(verify), result)
        return 0
    result = run(tuple(args.sizes), args.dim, args.work, args.verify_rows)
    return emit_result(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
