"""Materialize: reshard the kept samples into curated webdataset shards and write the uid list.

This is the one place images are rewritten. It decides nothing (every row's fate is final after dedup); it
copies kept samples, in input-shard then uid order, into shards of `materialize.samples_per_shard`. Output
shard j holds the kept samples numbered [j * size, (j + 1) * size) in that order: the numbering comes from a
prefix sum over the per-shard kept counts in the last deciding stage's markers, so each output shard is its
own task, written and resumed independently of the others. Each input shard's kept uids are written sorted,
buckets of the uids' leading bits merge their ranges of those parts, and a last task writes `uids.npy` (the
buckets one after another, already in order), `sizes.json`
(samples per shard, read by open_clip_train and DataComp's resharder), `shardindex.json` (a wids shard index)
and `curated/_done.json` (the fingerprint of everything upstream and the sample count).

Each sample's key and json "uid" are the 32-hex form of its uid that `uids.npy` encodes, which DataComp's
resharder parses from the json; a uid of another form (a custom `input.uid_col`) is kept as "source_uid".
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from curate.config import MaterializeConfig
from curate.io.fs import write_json_atomic
from curate.io.wds import Sample, count_samples, iter_samples
from curate.ledger import FATE_SCHEMA, FateError
from curate.stage import Phase, RunLayout, Stage, StageContext, StageOutputs, TaskOutput, run_shards, single_task
from curate.stages.download import DownloadOutputs

log = logging.getLogger(__name__)

CURATED = "curated"
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")
UID_DTYPE = np.dtype("u8,u8")
BUCKET_UIDS = 1 << 22  # uids per bucket of the uids.npy merge, about: 64 MiB of halves
MAX_BUCKET_BITS = 12
BUCKET_DIGITS = 3


def uid_halves(uid: str) -> tuple[int, int]:
    """A uid as DataComp's two unsigned 64-bit halves; uids that are not 32 hex chars are hashed first."""
    if not _HEX32.match(uid):
        uid = hashlib.blake2b(uid.encode(), digest_size=16).hexdigest()
    return int(uid[:16], 16), int(uid[16:32], 16)


def uid_hex(uid: str) -> str:
    """The 32-hex form of a uid that uids.npy encodes (lower case)."""
    high, low = uid_halves(uid)
    return f"{high:016x}{low:016x}"


def uid_array(uids: list[str]) -> np.ndarray:
    """Sorted structured array of dtype `u8,u8`: the subset format DataComp's tools read."""
    array = np.array([uid_halves(u) for u in uids], dtype=UID_DTYPE)
    return np.sort(array)


class CuratedOutputs(StageOutputs):
    """curated/NNNNN.tar (webdataset), curated/uids.npy and the completion marker curated/_done.json."""

    stage = "materialize"

    @property
    def curated_dir(self) -> Path:
        return self.layout.root / CURATED

    def shard_path(self, index: int) -> Path:
        return self.curated_dir / f"{index:05d}.tar"

    def shards(self) -> list[Path]:
        """The curated tars: those sizes.json lists once the index is written (it is written after every
        shard is done), else those found."""
        try:
            return [self.curated_dir / name for name in self.layout.read_json(self.sizes_path)]
        except FileNotFoundError:
            return self.layout.glob(self.curated_dir, "*.tar")

    @property
    def uids_path(self) -> Path:
        return self.curated_dir / "uids.npy"

    @property
    def sizes_path(self) -> Path:
        """{"00000.tar": samples, ...}: what open_clip_train reads instead of --train-num-samples."""
        return self.curated_dir / "sizes.json"

    @property
    def wids_index_path(self) -> Path:
        return self.curated_dir / "shardindex.json"

    @property
    def marker_path(self) -> Path:
        return self.curated_dir / "_done.json"

    def marker(self) -> dict[str, Any] | None:
        try:
            return self.layout.read_json(self.marker_path)
        except FileNotFoundError:
            return None

    def is_done(self, fingerprint: str | None = None) -> bool:
        marker = self.marker()
        return marker is not None and (fingerprint is None or marker.get("fingerprint") == fingerprint)

    def fingerprint(self) -> str:
        marker = self.marker()
        if marker is None:
            raise FileNotFoundError(f"{self.layout.label}: curated/ is not materialized; run the pipeline through it")
        return str(marker["fingerprint"])


def kept_rows(layout: RunLayout, last_stage: str, shard: str) -> dict[str, dict[str, object]]:
    """uid -> fate row for the samples kept by the last deciding stage in this shard."""
    import pyarrow.parquet as pq

    fates = pq.read_table(layout.fetch(layout.fates_path(last_stage, shard)), schema=FATE_SCHEMA).to_pylist()
    return {row["uid"]: row for row in fates if row["status"] == "kept"}


class MaterializeStage(Stage):
    name = "materialize"
    decides_fates = False
    outputs = CuratedOutputs

    @property
    def cfg(self) -> MaterializeConfig:
        return self.config.materialize

    def phases(self) -> list[Phase]:
        curated = lambda ctx: CuratedOutputs(ctx.layout).curated_dir  # noqa: E731
        return [
            Phase("shards", self._output_shards, self._write_shard, output_root=curated),
            Phase("uids", run_shards, self._write_uid_part),
            Phase("buckets", self._buckets, self._write_bucket),
            Phase("index", single_task, self._write_index, output_root=curated),
        ]

    def last_stage(self) -> str:
        from curate.stages import fate_stage_names

        return fate_stage_names(self.config.stages)[-1]

    def kept_counts(self, ctx: StageContext) -> np.ndarray:
        """Kept samples per input shard, from the last deciding stage's markers (no row is read)."""
        last = self.last_stage()
        return np.array([ctx.layout.marker(last, s)["counts"].get("kept", 0) for s in ctx.shards])

    def _output_shards(self, ctx: StageContext) -> list[str]:
        total = int(self.kept_counts(ctx).sum())
        return [f"{j:05d}" for j in range(-(-total // self.cfg.samples_per_shard))]

    def _write_shard(self, ctx: StageContext, task: str, workdir: Path) -> TaskOutput:
        import webdataset as wds

        size, last, keep = self.cfg.samples_per_shard, self.last_stage(), self.config.input.keep_columns
        start = int(task) * size
        stop = start + size
        counts = self.kept_counts(ctx)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        path = workdir / f"{task}.tar"
        written = 0
        with wds.TarWriter(str(path)) as writer:
            for i, shard in enumerate(ctx.shards):
                lo, hi = max(start, offsets[i]), min(stop, offsets[i + 1])
                if lo >= hi:
                    continue
                kept = kept_rows(ctx.layout, last, shard)
                chosen = sorted(kept)[lo - offsets[i] : hi - offsets[i]]
                tar_path = ctx.layout.fetch(DownloadOutputs(ctx.layout).tar_path(shard))
                found = {sample.uid: sample for sample in iter_samples(tar_path, set(chosen))}
                missing = [uid for uid in chosen if uid not in found]
                if missing:
                    raise FateError(f"shard {shard}: kept samples missing from its download tar: {missing[:3]}")
                for uid in chosen:
                    writer.write(curated_sample(uid, kept[uid], found[uid], keep))
                    written += 1
        on_disk = count_samples(path)
        if on_disk != written:
            raise FateError(f"curated/{task}.tar holds {on_disk} samples after writing {written}")
        return TaskOutput(counts={"samples": written})

    def _write_uid_part(self, ctx: StageContext, shard: str, workdir: Path) -> TaskOutput:
        """This input shard's kept uids as sorted `u8,u8` halves (the buckets read their ranges of it)."""
        halves = uid_array(list(kept_rows(ctx.layout, self.last_stage(), shard)))
        np.save(workdir / self.uid_part_path(ctx, shard).relative_to(ctx.layout.stage_dir(self.name)), halves)
        return TaskOutput(counts={"samples": len(halves)})

    def uid_part_path(self, ctx: StageContext, shard: str) -> Path:
        return ctx.layout.stage_dir(self.name) / f"uids-{shard}.npy"

    def bucket_path(self, ctx: StageContext, bucket: str) -> Path:
        return ctx.layout.stage_dir(self.name) / f"bucket-{bucket}.npy"

    def _buckets(self, ctx: StageContext) -> list[str]:
        """Ranges of the uids' leading bits, about BUCKET_UIDS each: concatenated in order, they are sorted."""
        total = int(self.kept_counts(ctx).sum())
        bits = min(MAX_BUCKET_BITS, max(0, math.ceil(math.log2(max(1, total) / BUCKET_UIDS))))
        return [f"{b:0{BUCKET_DIGITS}x}" for b in range(1 << bits)]

    def _write_bucket(self, ctx: StageContext, bucket: str, workdir: Path) -> TaskOutput:
        bits = (len(self._buckets(ctx)) - 1).bit_length()
        low, high = bucket_bounds(int(bucket, 16), bits)
        parts = []
        for shard in ctx.shards:
            halves = np.load(ctx.layout.fetch(self.uid_part_path(ctx, shard)), mmap_mode="r")
            first = halves["f0"]
            start = int(np.searchsorted(first, np.uint64(low)))
            stop = len(first) if high >= 1 << 64 else int(np.searchsorted(first, np.uint64(high)))
            parts.append(np.array(halves[start:stop]))
        merged = np.sort(np.concatenate([np.zeros(0, UID_DTYPE), *parts]))
        np.save(workdir / self.bucket_path(ctx, bucket).relative_to(ctx.layout.stage_dir(self.name)), merged)
        return TaskOutput(counts={"samples": len(merged)})

    def _write_index(self, ctx: StageContext, _task: str, workdir: Path) -> TaskOutput:
        last, curated = self.last_stage(), CuratedOutputs(ctx.layout)
        buckets = [np.load(ctx.layout.fetch(self.bucket_path(ctx, b)), mmap_mode="r") for b in self._buckets(ctx)]
        kept = sum(len(b) for b in buckets)
        markers = {s: ctx.layout.marker(self.name, s, "shards") for s in self._output_shards(ctx)}
        sizes = {curated.shard_path(int(s)).name: int(m["counts"]["samples"]) for s, m in markers.items()}
        if sum(sizes.values()) != kept:
            raise FateError(f"curated/ holds {sum(sizes.values())} samples but {last} kept {kept}")
        uids = np.lib.format.open_memmap(workdir / "uids.npy", mode="w+", dtype=UID_DTYPE, shape=(kept,))
        offset = 0
        for bucket in buckets:  # one bucket in memory at a time
            uids[offset : offset + len(bucket)] = bucket
            offset += len(bucket)
        uids.flush()
        del uids
        write_json_atomic(workdir / curated.sizes_path.name, sizes)
        write_json_atomic(workdir / curated.wids_index_path.name, wids_index(curated, sizes))
        write_json_atomic(workdir / "_done.json", {"fingerprint": ctx.fingerprint, "samples": kept})
        log.info("materialize: %d samples in %d shards", kept, len(sizes))
        return TaskOutput(counts={"samples": kept})


def bucket_bounds(bucket: int, bits: int) -> tuple[int, int]:
    """The [low, high) range of a uid's first 64-bit half that bucket `bucket` of 2**bits holds."""
    if bits == 0:
        return 0, 1 << 64
    width = 1 << (64 - bits)
    return bucket * width, (bucket + 1) * width


def wids_index(curated: CuratedOutputs, sizes: dict[str, int]) -> dict[str, object]:
    """A wids shard index (`wids.ShardListDataset("curated/shardindex.json")`); urls are relative to it."""
    shards = [
        {"url": name, "nsamples": n, "filesize": curated.layout.size(curated.curated_dir / name)}
        for name, n in sizes.items()
    ]
    return {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "curated", "shardlist": shards}


def curated_sample(
    uid: str, fate: dict[str, object], sample: Sample, keep: list[str] | tuple[str, ...] = ()
) -> dict[str, object]:
    key = uid_hex(uid)
    record: dict[str, object] = {"uid": key, **({"source_uid": uid} if key != uid else {})}
    record |= {
        "url": sample.url,
        "caption": sample.caption,
        "clip_score": fate.get("clip_score"),
        "sha256": fate.get("sha256") or sample.meta.get("sha256"),
        "width": sample.meta.get("original_width"),
        "height": sample.meta.get("original_height"),
        **{column: sample.meta.get(column) for column in keep},
    }
    assert sample.image_extension is not None and sample.image is not None, "download samples carry an image"
    # the hex key never holds a dot, which webdataset would take for the start of the extension
    return {"__key__": key, sample.image_extension: sample.image, "txt": record["caption"], "json": record}


def count_curated_samples(layout: RunLayout) -> int:
    """Samples actually present in curated/*.tar (read back, not taken from the marker)."""
    return sum(count_samples(layout.fetch(path)) for path in CuratedOutputs(layout).shards())
