"""Decontamination: drop training samples whose image embedding is too close to an evaluation image.

Each sample's nearest evaluation embedding comes from an exact search (blocked inner products; the
evaluation sets are small). It is the same search as a faiss `IndexFlatIP` with k=1, done with numpy's
BLAS because the faiss-cpu wheel's bundled BLAS is several times slower on these machines (see
`curate.stages.dedup.compute`).
"""

from __future__ import annotations

import glob
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from curate.io.local_copy import local_copy
from curate.io.storage import LOCAL, Storage, has_magic, locate, name_of
from curate.io.wds import IMAGE_EXTENSIONS, image_extension_of, iter_members
from curate.stages.dedup.compute import as_matrix, nearest
from curate.stages.dedup.decisions import Decisions, as_uids, canonical_order

log = logging.getLogger(__name__)


class Contamination(NamedTuple):
    mask: np.ndarray  # bool per sample: cosine to its nearest evaluation embedding >= threshold
    nearest_eval_index: np.ndarray  # int64 row of that evaluation embedding (-1 when there are none)
    similarity: np.ndarray  # float32 cosine to it (-inf when there are none)


def contaminated(
    emb: np.ndarray,
    eval_emb: np.ndarray,
    threshold: float,
    *,
    order: np.ndarray | None = None,
    threads: int | None = None,
) -> Contamination:
    """Each sample's nearest evaluation embedding and whether it is within `threshold`. `order` (e.g. by
    uid) fixes the order rows are multiplied in, so no last-bit rounding depends on the row layout."""
    x = as_matrix(emb)
    evals = as_matrix(eval_emb, "eval embeddings")
    if len(evals) and len(x) and x.shape[1] != evals.shape[1]:
        raise ValueError(f"embedding dimensions differ: samples {x.shape[1]}, evaluation set {evals.shape[1]}")
    if len(evals) == 0:
        return Contamination(
            np.zeros(len(x), bool), np.full(len(x), -1, np.int64), np.full(len(x), -np.inf, np.float32)
        )
    order = np.arange(len(x)) if order is None else np.asarray(order)
    index = np.empty(len(x), dtype=np.int64)
    similarity = np.empty(len(x), dtype=np.float32)
    index[order], similarity[order] = nearest(x, evals, threads=threads, rows=order)
    mask = similarity >= threshold
    log.info(
        "decontamination: %d of %d samples within cosine %g of %d eval items", mask.sum(), len(x), threshold, len(evals)
    )
    return Contamination(mask, index, similarity)


def contamination_decisions(
    uids: np.ndarray,
    emb: np.ndarray,
    eval_emb: np.ndarray,
    threshold: float,
    eval_ids: Sequence[str] | None = None,
    *,
    threads: int | None = None,
) -> Decisions:
    """`contaminated` as a dedup layer: a dropped row's `kept_uid` is the matched evaluation item's id
    (when `eval_ids` are given) and `similarity` the cosine to it."""
    uids = as_uids(uids)
    if len(uids) != len(emb):
        raise ValueError(f"uids and emb differ in length: {len(uids)}, {len(emb)}")
    if eval_ids is not None and len(eval_ids) != len(eval_emb):
        raise ValueError(f"eval_ids and eval_emb differ in length: {len(eval_ids)}, {len(eval_emb)}")
    found = contaminated(emb, eval_emb, threshold, order=canonical_order(uids), threads=threads)
    matched = np.full(len(uids), None, dtype=object)
    if eval_ids is not None:
        ids = np.asarray(eval_ids, dtype=object)
        matched[found.mask] = ids[found.nearest_eval_index[found.mask]]
    similarity = np.where(found.mask, found.similarity, np.nan).astype(np.float32)
    return Decisions(uids, found.mask, matched, similarity)


IMAGE_SUFFIXES = tuple(f".{extension}" for extension in IMAGE_EXTENSIONS)


def load_eval_images(paths: Sequence[str], storage: Storage = LOCAL) -> tuple[list[Image.Image], list[str]]:
    """Images of the evaluation sets: folders of image files and/or webdataset tars (globs allowed), local or
    at URLs (read from their local copies)."""
    images: list[Image.Image] = []
    ids: list[str] = []
    for pattern in paths:
        for match in _eval_paths(pattern, storage):
            if match.is_dir():
                for file in sorted(p for p in match.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
                    images.append(_open_rgb(file.read_bytes()))
                    ids.append(f"{match.name}/{file.relative_to(match)}")
            elif match.suffix == ".tar" and match.exists():
                tar_images, tar_ids = _tar_images(match)
                images += tar_images
                ids += tar_ids
            else:
                raise FileNotFoundError(f"dedup.eval_sets: {pattern!r} is not a folder of images or a .tar")
    return images, ids


def check_eval_sets(paths: Sequence[str], storage: Storage = LOCAL) -> None:
    """A ConfigError naming `dedup.eval_sets` and the entry when one names nothing usable (checked before any
    work; a URL is looked up, not fetched)."""
    from curate.config import ConfigError
    from curate.io.local_copy import kind_of

    for pattern in paths:
        location = locate(pattern)
        if isinstance(location, str):
            if has_magic(pattern) and not storage.glob(pattern):
                raise ConfigError(f"dedup.eval_sets: {pattern} matches nothing")
            is_file = not has_magic(pattern) and kind_of(location, storage, "dedup.eval_sets") == "file"
            if is_file and not name_of(location).endswith(".tar"):
                raise ConfigError(f"dedup.eval_sets: {pattern} is not a folder of images or a .tar")
            continue
        matches = [Path(m) for m in sorted(glob.glob(str(location)))] if has_magic(pattern) else [location]
        if not matches:
            raise ConfigError(f"dedup.eval_sets: {pattern!r} matches nothing")
        for match in matches:
            if not (match.is_dir() or (match.suffix == ".tar" and match.is_file())):
                raise ConfigError(f"dedup.eval_sets: {str(match)!r} is not a folder of images or a .tar")


def _eval_paths(pattern: str, storage: Storage) -> list[Path]:
    location = locate(pattern)
    if isinstance(location, Path):
        return [Path(match) for match in sorted(glob.glob(str(location)))] or [location]
    urls = [url for url, _ in storage.glob(pattern)] if has_magic(pattern) else [pattern]
    return [local_copy(url, storage, "dedup.eval_sets") for url in urls] or [Path(pattern)]


def _tar_images(path: Path) -> tuple[list[Image.Image], list[str]]:
    """The image of every sample of a webdataset tar (no .json needed), its id `tar name/key.extension`."""
    images: list[Image.Image] = []
    ids: list[str] = []
    for key, members in iter_members(path):
        extension = image_extension_of(members)
        if extension is not None:
            images.append(_open_rgb(members[extension]))
            ids.append(f"{path.name}/{key}.{extension}")
    return images, ids


def _open_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def embed_eval_sets(paths: Sequence[str], embed_cfg: Any, storage: Storage = LOCAL) -> tuple[np.ndarray, list[str]]:
    """Embed the evaluation images with the run's own model, so similarities are comparable."""
    from curate.clip import embed_images, load_clip
    from curate.stages.embed import clip_spec

    images, ids = load_eval_images(paths, storage)
    if not images:
        return np.zeros((0, 1), np.float32), []
    return embed_images(load_clip(clip_spec(embed_cfg, storage)), images), ids
