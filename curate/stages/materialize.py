"""Materialize: reshard the kept samples into curated webdataset shards and write the uid list.

This is the one place images are rewritten. It is a run-wide step rather than a per-shard fate stage:
it decides nothing (every row's fate is final after dedup), it only copies kept samples, in input-shard
then uid order, into shards of `materialize.samples_per_shard`, so one sequential pass over the
download tars produces every output shard. The result replaces `curated/` in one rename and carries
a done-marker with the fingerprint of everything upstream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import uuid
from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq

from curate.config import MaterializeConfig
from curate.io.fs import read_json, write_json_atomic
from curate.ledger import FATE_SCHEMA
from curate.stage import RunLayout

log = logging.getLogger(__name__)

CURATED = "curated"
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")


def uid_halves(uid: str) -> tuple[int, int]:
    """A uid as DataComp's two unsigned 64-bit halves; uids that are not 32 hex chars are hashed first."""
    if not _HEX32.match(uid):
        uid = hashlib.blake2b(uid.encode(), digest_size=16).hexdigest()
    return int(uid[:16], 16), int(uid[16:32], 16)


def uid_array(uids: list[str]) -> np.ndarray:
    """Sorted structured array of dtype `u8,u8`: the subset format DataComp's tools read."""
    array = np.array([uid_halves(u) for u in uids], dtype=np.dtype("u8,u8"))
    return np.sort(array)


def is_done(layout: RunLayout, fingerprint: str) -> bool:
    marker = layout.root / CURATED / "_done.json"
    return marker.exists() and read_json(marker).get("fingerprint") == fingerprint


def kept_rows(layout: RunLayout, last_stage: str, shard: str) -> dict[str, dict[str, object]]:
    """uid -> fate row for the samples kept by the last deciding stage in this shard."""
    fates = pq.read_table(layout.fates_path(last_stage, shard), schema=FATE_SCHEMA).to_pylist()
    return {row["uid"]: row for row in fates if row["status"] == "kept"}


def download_samples(layout: RunLayout, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(uid, {extension: bytes}) for every sample in a download tar, grouping members by key."""
    tar_path = layout.stage_dir("download") / f"{shard}.tar"
    if not tar_path.exists():
        return
    current_key, members = None, {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, extension = member.name.partition(".")
            if key != current_key and members:
                yield json.loads(members["json"])["uid"], members
                members = {}
            current_key = key
            members[extension] = tar.extractfile(member).read()  # type: ignore[union-attr]
    if members:
        yield json.loads(members["json"])["uid"], members


def materialize(cfg: MaterializeConfig, layout: RunLayout, shards: list[str], last_stage: str, fingerprint: str) -> int:
    """Write curated/NNNNN.tar and curated/uids.npy for the kept samples; returns the sample count."""
    import webdataset as wds

    final = layout.root / CURATED
    scratch = layout.root / f".{CURATED}.{uuid.uuid4().hex[:8]}.tmp"
    scratch.mkdir(parents=True)
    written: list[str] = []
    try:
        pattern = str(scratch / "%05d.tar")
        with wds.ShardWriter(pattern, maxcount=cfg.samples_per_shard, verbose=0) as writer:
            for shard in shards:
                kept = kept_rows(layout, last_stage, shard)
                found = {}
                for uid, members in download_samples(layout, shard):
                    if uid in kept:
                        found[uid] = members
                missing = sorted(set(kept) - set(found))
                if missing:
                    raise RuntimeError(f"shard {shard}: kept samples missing from download/{shard}.tar: {missing[:3]}")
                for uid in sorted(kept):
                    writer.write(curated_sample(uid, kept[uid], found[uid]))
                    written.append(uid)
        np.save(scratch / "uids.npy", uid_array(written))
        write_json_atomic(scratch / "_done.json", {"fingerprint": fingerprint, "samples": len(written)})
        if final.exists():
            retired = layout.root / f".{CURATED}.{uuid.uuid4().hex[:8]}.old"
            os.replace(final, retired)
            shutil.rmtree(retired)
        os.replace(scratch, final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("materialize: %d samples into %s", len(written), final)
    return len(written)


def curated_sample(uid: str, fate: dict[str, object], members: dict[str, bytes]) -> dict[str, object]:
    meta = json.loads(members["json"])
    record = {
        "uid": uid,
        "url": meta.get("url"),
        "caption": members.get("txt", b"").decode("utf-8"),
        "clip_score": fate.get("clip_score"),
        "sha256": fate.get("sha256") or meta.get("sha256"),
        "width": meta.get("original_width"),
        "height": meta.get("original_height"),
    }
    image_ext = next(ext for ext in ("jpg", "png", "webp") if ext in members)
    return {"__key__": uid, image_ext: members[image_ext], "txt": record["caption"], "json": record}


def count_curated_samples(layout: RunLayout) -> int:
    """Samples actually present in curated/*.tar (read back, not taken from the marker)."""
    total = 0
    for tar_path in sorted((layout.root / CURATED).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            total += sum(1 for m in tar if m.isfile() and m.name.endswith(".json"))
    return total
