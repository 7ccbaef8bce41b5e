"""Thumbnail features for near-duplicate search: what a re-encode, resize or small crop preserves.

A CLIP embedding says what an image shows, so two different photos of the same thing can be as close
as two copies of one photo (small models especially). A tiny colour thumbnail, mean-removed and
L2-normalised, is close only for copies of the same picture. `dedup.near_features: thumbnail` uses it
for the near-duplicate layer; the semantic layer and decontamination keep the CLIP embedding.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from curate.io.wds import iter_samples
from curate.stage import RunLayout

THUMBNAIL_SIDE = 16


def thumbnail_feature(image_bytes: bytes, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    with Image.open(io.BytesIO(image_bytes)) as image:
        pixels = np.asarray(image.convert("RGB").resize((side, side), Image.BILINEAR), dtype=np.float32).ravel()
    pixels -= pixels.mean()
    norm = np.linalg.norm(pixels)
    return pixels / norm if norm > 0 else pixels


def shard_thumbnail_features(layout: RunLayout, shard: str, uids: list[str]) -> np.ndarray:
    """One feature row per uid (in the given order), read from the shard's download tar."""
    if not uids:
        return np.zeros((0, 3 * THUMBNAIL_SIDE**2), np.float32)
    from curate.stages.download import DownloadOutputs

    tar_path = layout.fetch(DownloadOutputs(layout).tar_path(shard))
    features: dict[str, np.ndarray] = {}
    for sample in iter_samples(tar_path, set(uids)):
        if sample.image is None:
            raise ValueError(f"{tar_path}: sample {sample.key!r} (uid {sample.uid!r}) has no image")
        features[sample.uid] = thumbnail_feature(sample.image)
    missing = [uid for uid in uids if uid not in features]
    if missing:
        raise ValueError(f"{tar_path}: no sample for uid(s) {missing[:3]}")
    return np.stack([features[u] for u in uids])
