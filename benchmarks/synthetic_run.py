"""A run that has reached dedup without downloading anything: the real input stage over a generated URL
table, then download and embed outputs written in their real layouts (fates with sha256 and sizes,
float16 512-d image embeddings, metadata with CLIP scores) with done-markers carrying the fingerprints
the pipeline computes, so `run_pipeline` picks up at filter.

Planted, across shards: exact copies (same sha256 and embedding as their original), near copies at
cosines spread over `NEAR_COSINES`, chains of two near copies (a~b~c with a and c below 0.95), and
semantic neighbours at `SEMANTIC_COSINES`; half the near copies tie their original's CLIP score. Random
512-d unit vectors sit near cosine 0 ± 0.05 of each other, so the planted pairs are the only pairs above
0.9. With `tars`, each shard also gets a download tar of tiny JPEGs, so materialize can run.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from curate.config import PipelineConfig, load_config
from curate.io.fs import write_json_atomic, write_parquet_atomic
from curate.ledger import Status, make_fates
from curate.pipeline import run_pipeline, stage_fingerprints
from curate.stage import RunLayout
from curate.stages import plan
from curate.stages.embed import embedding_paths
from curate.stages.input import InputOutputs

DIM = 512
NEAR_COSINES = (0.95, 0.995)
CHAIN_COSINES = (0.96, 0.965)  # a~b and b~c; a·c is then about 0.92
SEMANTIC_COSINES = (0.91, 0.94)
EXACT_SHARE = 0.005
NEAR_SHARE = 0.01
CHAIN_SHARE = 0.002
SEMANTIC_SHARE = 0.005


@dataclass(frozen=True)
class Planted:
    """Planted pairs as (original uid, copy uid); `near` includes both links of every chain."""

    exact: list[tuple[str, str]]
    near: list[tuple[str, str]]
    semantic: list[tuple[str, str]]
    chains: list[tuple[str, str, str]]


def write_config(work: Path, n: int, shard_size: int, dedup: dict, stages: list[str]) -> Path:
    path = work / "pipeline.yaml"
    raw = {
        "output": str(work / "run"),
        "input": {"path": str(work / "input.parquet"), "url_col": "url", "caption_col": "caption"},
        "embed": {"model": "curate-tiny", "device": "cpu"},
        "filter": {"clip_top_fraction": 0.9},
        "dedup": dedup,
        "materialize": {"samples_per_shard": shard_size},
        "stages": stages,
    }
    raw["input"]["shard_size"] = shard_size
    path.write_text(yaml.safe_dump(raw))
    return path


def write_input(path: Path, n: int) -> None:
    urls = pa.array([f"http://images.invalid/{i}.jpg" for i in range(n)])
    captions = pa.array([f"a photo of thing number {i}" for i in range(n)])
    pq.write_table(pa.table({"url": urls, "caption": captions}), path, row_group_size=100_000)


def near_copies(rng: np.random.Generator, v: np.ndarray, cosine: np.ndarray) -> np.ndarray:
    """Unit vectors at exactly `cosine` to each row of `v`, in a random direction."""
    u = rng.standard_normal(v.shape, dtype=np.float32)
    u -= np.einsum("ij,ij->i", u, v)[:, None] * v
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return cosine[:, None] * v + np.sqrt(1 - cosine**2)[:, None] * u


def tiny_jpeg(index: int) -> bytes:
    from PIL import Image

    colour = ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="JPEG", quality=50)
    return buffer.getvalue()


def build_run(
    work: Path,
    n: int,
    *,
    shard_size: int = 10_000,
    dedup: dict | None = None,
    stages: list[str] | None = None,
    tars: bool = False,
    seed: int = 0,
    chain_share: float = CHAIN_SHARE,
) -> tuple[PipelineConfig, Planted]:
    """Write the run under `work` (input stage run for real) and return its config and the planted pairs."""
    work.mkdir(parents=True, exist_ok=True)
    stages = stages or ["input", "download", "embed", "filter", "dedup"]
    config_path = write_config(work, n, shard_size, dedup or {}, stages)
    write_input(work / "input.parquet", n)
    config = load_config(config_path)
    run_pipeline(config, only_stage="input")
    layout = RunLayout(Path(config.output))
    outputs = InputOutputs(layout)
    shards = outputs.shards()
    uid_parts = [outputs.rows(s)["uid"].to_pylist() for s in shards]
    uids = np.array([u for part in uid_parts for u in part], dtype=object)

    rng = np.random.default_rng(seed)
    vectors = np.empty((len(uids), DIM), dtype=np.float16)
    for start in range(0, len(uids), 100_000):
        block = rng.standard_normal((min(100_000, len(uids) - start), DIM), dtype=np.float32)
        vectors[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    sha = np.array([f"{v:016x}" * 4 for v in rng.integers(0, 2**63, len(uids))], dtype=object)
    chosen = iter(rng.permutation(len(uids)))

    def take(share: float) -> np.ndarray:
        return np.array([next(chosen) for _ in range(round(len(uids) * share))], dtype=np.int64)

    def plant(originals: np.ndarray, copies: np.ndarray, cosines: tuple[float, float]) -> None:
        at = rng.uniform(*cosines, len(copies)).astype(np.float32)
        vectors[copies] = near_copies(rng, vectors[originals].astype(np.float32), at)

    exact_orig, exact_copy = take(EXACT_SHARE), take(EXACT_SHARE)
    vectors[exact_copy] = vectors[exact_orig]
    sha[exact_copy] = sha[exact_orig]
    near_orig, near_copy = take(NEAR_SHARE), take(NEAR_SHARE)
    plant(near_orig, near_copy, NEAR_COSINES)
    chain_a, chain_b, chain_c = take(chain_share), take(chain_share), take(chain_share)
    plant(chain_a, chain_b, CHAIN_COSINES)
    plant(chain_b, chain_c, CHAIN_COSINES)
    semantic_orig, semantic_copy = take(SEMANTIC_SHARE), take(SEMANTIC_SHARE)
    plant(semantic_orig, semantic_copy, SEMANTIC_COSINES)
    scores = rng.uniform(0.15, 0.35, len(uids)).astype(np.float32)
    tied = near_copy[::2]
    scores[tied] = scores[near_orig[::2]]

    prints = stage_fingerprints(plan(config))
    start = 0
    for shard, part in zip(shards, uid_parts, strict=True):
        rows = slice(start, start + len(part))
        start += len(part)
        write_shard(layout, shard, part, vectors[rows], sha[rows], scores[rows], prints, tars, rows.start)

    def pairs(a: np.ndarray, b: np.ndarray) -> list[tuple[str, str]]:
        return list(zip(uids[a], uids[b], strict=True))

    near = pairs(near_orig, near_copy) + pairs(chain_a, chain_b) + pairs(chain_b, chain_c)
    chains = list(zip(uids[chain_a], uids[chain_b], uids[chain_c], strict=True))
    planted = Planted(pairs(exact_orig, exact_copy), near, pairs(semantic_orig, semantic_copy), chains)
    return config, planted


def write_shard(
    layout: RunLayout,
    shard: str,
    uids: list[str],
    vectors: np.ndarray,
    sha: np.ndarray,
    scores: np.ndarray,
    prints: dict[str, str],
    tars: bool,
    first_index: int,
) -> None:
    n = len(uids)
    inputs = InputOutputs(layout).rows(shard)
    urls, captions = inputs["url"], inputs["caption"]
    sides = np.full(n, 256, np.int32)
    download = make_fates(
        uids, Status.KEPT.value, sha256=list(sha), width=sides, height=sides, url=urls, caption=captions
    )
    write_parquet_atomic(download, layout.fates_path("download", shard))
    files = {f"fates/{shard}.parquet": layout.fates_path("download", shard).stat().st_size}
    if tars:
        tar_path = layout.stage_dir("download") / f"{shard}.tar"
        write_tar(tar_path, uids, urls.to_pylist(), captions.to_pylist(), first_index)
        files[tar_path.name] = tar_path.stat().st_size
    write_marker(layout, "download", shard, prints["download"], n, files)

    embed_dir = layout.stage_dir("embed")
    img, text, meta = embedding_paths(embed_dir, shard)
    for path in (img, text, meta):
        path.parent.mkdir(parents=True, exist_ok=True)
    np.save(img, vectors)
    np.save(text, np.zeros((n, 1), np.float16))
    metadata = pa.table({"uid": uids, "url": urls, "caption": captions, "clip_score": pa.array(scores, pa.float32())})
    write_parquet_atomic(metadata, meta)
    embed_fates = make_fates(uids, Status.KEPT.value, clip_score=pa.array(scores, pa.float32()))
    write_parquet_atomic(embed_fates, layout.fates_path("embed", shard))
    files = {str(p.relative_to(embed_dir)): p.stat().st_size for p in (img, text, meta)}
    write_marker(layout, "embed", shard, prints["embed"], n, files)


def write_marker(layout: RunLayout, stage: str, shard: str, fingerprint: str, kept: int, files: dict) -> None:
    marker = {"fingerprint": fingerprint, "counts": {"kept": kept}, "seconds": 0.0, "files": files}
    write_json_atomic(layout.marker_path(stage, shard), marker)


def write_tar(path: Path, uids: list[str], urls: list[str], captions: list[str], first_index: int) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for k, (uid, url, caption) in enumerate(zip(uids, urls, captions, strict=True)):
            key = f"{first_index + k:09d}"
            members = {
                "jpg": tiny_jpeg(first_index + k),
                "txt": caption.encode(),
                "json": json.dumps({"uid": uid, "url": url, "caption": caption, "key": key}).encode(),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
