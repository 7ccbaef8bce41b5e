"""CLIP search over a run's curated images: `curate search OUTPUT "a red circle"`.

The index holds the image embeddings the embed stage saved, for the uids the run kept (the ledger's
`kept` rows, i.e. what `curated/` holds). It is built once into OUTPUT/search/ and rebuilt when the run
changes (a new ledger, other embeddings or another curated set):

    search/index.faiss     inner-product faiss index over L2-normalised image embeddings
    search/items.parquet   row i of the index: uid, caption, url, clip_score, and where its image is
                           (tar path relative to OUTPUT, byte offset and size of the image member)
    search/meta.json       fingerprint of the run state it was built from, count, dim, index type

Queries are embedded with the run's own model (the `embed` section of OUTPUT/config.yaml), on the CPU:
one query is a single forward pass.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.io.fs import read_json, write_bytes_atomic, write_json_atomic, write_parquet_atomic
from curate.report.images import ImageRef, locate_images, scan_tar
from curate.stage import RunLayout, kept_uids
from curate.stages.embed import EmbedOutputs
from curate.stages.materialize import CuratedOutputs

log = logging.getLogger(__name__)

SEARCH_DIR = "search"
INDEX_FORMAT = 1
FLAT_LIMIT = 200_000  # above this many images an IVF index (approximate, much faster) replaces exact search
IVF_NPROBE = 32
IVF_TRAIN_SAMPLES = 100_000
METADATA_SCHEMA = pa.schema(
    [("uid", pa.string()), ("caption", pa.string()), ("url", pa.string()), ("clip_score", pa.float32())]
)
ITEM_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("clip_score", pa.float32()),
        ("tar", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
    ]
)


class SearchError(RuntimeError):
    """The run cannot be searched (not embedded, not finished)."""


@dataclass(frozen=True)
class SearchHit:
    uid: str
    score: float
    caption: str
    url: str | None
    clip_score: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Building the index


def search_dir(layout: RunLayout) -> Path:
    return layout.root / SEARCH_DIR


def run_fingerprint(layout: RunLayout) -> str:
    """Changes whenever the curated set or the embeddings may have changed."""
    digest = hashlib.sha256(f"format {INDEX_FORMAT}".encode())
    ledger = layout.ledger_path.stat()
    digest.update(f"ledger {ledger.st_size} {ledger.st_mtime_ns}".encode())
    markers = sorted(layout.marker_dir(EmbedOutputs.stage).glob("*.json"))
    for marker in [CuratedOutputs(layout).marker_path, *markers]:
        if marker.exists():
            digest.update(marker.name.encode() + marker.read_bytes())
    return digest.hexdigest()[:16]


def last_fate_stage(layout: RunLayout) -> str:
    """The stage whose kept rows are the run's kept rows (materialize only copies them)."""
    from curate.config import load_config
    from curate.pipeline import fate_stages

    return fate_stages(load_config(layout.config_path))[-1]


def curated_shards(layout: RunLayout) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Per embed shard, the metadata and image embeddings of the rows the run kept (joined by uid)."""
    last = last_fate_stage(layout)
    embed = EmbedOutputs(layout)
    for shard in embed.shards():
        metadata = embed.metadata(shard, columns=["uid", "caption", "url", "clip_score"])
        mask = pc.is_in(metadata["uid"], kept_uids(layout, last, shard)).to_numpy(zero_copy_only=False)
        embeddings = embed.image_embeddings(shard)
        yield metadata.filter(mask), embeddings[mask].astype(np.float32)


def image_refs(layout: RunLayout, uids: set[str]) -> dict[str, ImageRef]:
    """Where each curated image is: in curated/*.tar when materialize ran, else in the download tars."""
    curated_tars = CuratedOutputs(layout).shards()
    if not curated_tars:
        return locate_images(layout, uids)
    refs: dict[str, ImageRef] = {}
    for tar in curated_tars:
        refs.update(scan_tar(tar, uids))
    return refs


def build_index(layout: RunLayout) -> None:
    import faiss

    if not EmbedOutputs(layout).shards():
        raise SearchError(f"{layout.root}: no embeddings; the run needs the embed stage to be searchable")
    fingerprint = run_fingerprint(layout)
    tables, vectors = [], []
    for metadata, embeddings in curated_shards(layout):
        tables.append(metadata)
        vectors.append(embeddings)
    items = pa.concat_tables(tables) if tables else METADATA_SCHEMA.empty_table()
    dim = vectors[0].shape[1] if vectors else 0
    matrix = normalise(np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32))
    index = make_index(matrix)
    refs = image_refs(layout, set(items["uid"].to_pylist()))
    table = with_image_columns(layout, items, refs)
    out = search_dir(layout)
    write_bytes_atomic(out / "index.faiss", faiss.serialize_index(index).tobytes())
    write_parquet_atomic(table, out / "items.parquet")
    meta = {"fingerprint": fingerprint, "count": len(matrix), "dim": dim, "index": type(index).__name__}
    write_json_atomic(out / "meta.json", meta)
    log.info("search: indexed %d curated images (%s) in %s", len(matrix), meta["index"], out)


def normalise(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.ascontiguousarray(matrix / np.where(norms == 0, 1, norms), dtype=np.float32)  # float16 storage


def make_index(matrix: np.ndarray, flat_limit: int = FLAT_LIMIT) -> Any:
    import faiss

    dim = matrix.shape[1] if matrix.ndim == 2 and matrix.shape[1] else 1
    if len(matrix) <= flat_limit:
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = int(4 * math.sqrt(len(matrix)))
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).permutation(len(matrix))[:IVF_TRAIN_SAMPLES]
        index.train(matrix[np.sort(sample)])
    if len(matrix):
        index.add(matrix)
    return index


def with_image_columns(layout: RunLayout, items: pa.Table, refs: dict[str, ImageRef]) -> pa.Table:
    uids = items["uid"].to_pylist()
    found = [refs.get(uid) for uid in uids]
    columns = {
        "uid": items["uid"],
        "caption": items["caption"],
        "url": items["url"],
        "clip_score": items["clip_score"],
        "tar": [str(r.tar.relative_to(layout.root)) if r else None for r in found],
        "offset": [r.offset if r else None for r in found],
        "size": [r.size if r else None for r in found],
    }
    return pa.table(columns, schema=ITEM_SCHEMA)


def is_fresh(layout: RunLayout) -> bool:
    meta_path = search_dir(layout) / "meta.json"
    if not meta_path.exists() or not (search_dir(layout) / "index.faiss").exists():
        return False
    return read_json(meta_path).get("fingerprint") == run_fingerprint(layout)


def ensure_index(layout: RunLayout) -> None:
    if not layout.ledger_path.exists():
        raise SearchError(f"{layout.root}: no ledger.parquet; finish the run first (`curate run`)")
    if not is_fresh(layout):
        build_index(layout)


# --------------------------------------------------------------------------------------------------
# Searching


class SearchIndex:
    """The saved index and its items, loaded in memory."""

    def __init__(self, layout: RunLayout) -> None:
        import faiss

        folder = search_dir(layout)
        self.layout = layout
        self.index = faiss.deserialize_index(np.frombuffer((folder / "index.faiss").read_bytes(), dtype=np.uint8))
        if hasattr(self.index, "nprobe"):
            self.index.nprobe = IVF_NPROBE
            self.index.make_direct_map()  # so that `vector(uid)` can read a stored embedding back
        self.items = pq.read_table(folder / "items.parquet", schema=ITEM_SCHEMA)
        self.uids: list[str] = self.items["uid"].to_pylist()
        self.row_of = {uid: i for i, uid in enumerate(self.uids)}

    def __len__(self) -> int:
        return len(self.uids)

    def item(self, row: int) -> dict[str, Any]:
        return self.items.slice(row, 1).to_pylist()[0]

    def search(self, query: np.ndarray, k: int) -> list[SearchHit]:
        k = min(k, len(self))
        if k <= 0:
            return []
        scores, rows = self.index.search(normalise(query.reshape(1, -1)), k)
        return [self.hit(int(row), float(score)) for row, score in zip(rows[0], scores[0], strict=True) if row >= 0]

    def hit(self, row: int, score: float) -> SearchHit:
        item = self.item(row)
        return SearchHit(item["uid"], score, item["caption"] or "", item["url"], item["clip_score"])

    def vector(self, uid: str) -> np.ndarray:
        row = self.row_of.get(uid)
        if row is None:
            raise KeyError(uid)
        return self.index.reconstruct(row)

    def image(self, uid: str) -> bytes | None:
        row = self.row_of.get(uid)
        if row is None:
            return None
        item = self.item(row)
        if item["tar"] is None:
            return None
        return ImageRef(self.layout.root / item["tar"], item["offset"], item["size"]).read()


class RunSearch:
    """Search one run by text, image or uid; the run's model loads on the first text or image query."""

    def __init__(self, run_dir: str | Path) -> None:
        self.layout = RunLayout(Path(run_dir))
        if not self.layout.config_path.exists():
            raise SearchError(f"{run_dir}: not a curate run (no config.yaml)")
        ensure_index(self.layout)
        self.index = SearchIndex(self.layout)
        self._model: Any = None
        self._lock = threading.Lock()  # one model, shared by the server's threads

    @property
    def model(self) -> Any:
        with self._lock:
            if self._model is None:
                from curate.clip import ClipSpec, load_clip
                from curate.config import load_config
                from curate.io.storage import Storage

                config = load_config(self.layout.config_path)  # its storage.options without credentials
                embed, storage = config.embed, Storage(config.storage.options)
                self._model = load_clip(
                    ClipSpec(embed.model, embed.pretrained, "cpu", section="embed", storage=storage)
                )
            return self._model

    def text(self, query: str, k: int = 16) -> list[SearchHit]:
        from curate.clip import embed_texts

        model = self.model
        with self._lock:
            vector = embed_texts(model, [query])[0]
        return self.index.search(vector, k)

    def image(self, image: bytes | Path, k: int = 16) -> list[SearchHit]:
        from PIL import Image

        from curate.clip import embed_images

        data = image.read_bytes() if isinstance(image, Path) else image
        model = self.model
        with Image.open(io.BytesIO(data)) as opened, self._lock:
            vector = embed_images(model, [opened.convert("RGB")])[0]
        return self.index.search(vector, k)

    def similar(self, uid: str, k: int = 16) -> list[SearchHit]:
        return self.index.search(self.index.vector(uid), k)


def hits_json(query: str, hits: list[SearchHit]) -> str:
    return json.dumps({"query": query, "results": [hit.to_json() for hit in hits]}, indent=2)


def write_gallery(search: RunSearch, query: str, hits: list[SearchHit], path: Path) -> Path:
    """A self-contained HTML page of the results (thumbnails embedded)."""
    from curate.report.html import THUMB_PX, render_gallery
    from curate.report.images import thumbnail

    items = []
    for hit in hits:
        data = search.index.image(hit.uid)
        items.append({**hit.to_json(), "thumb": thumbnail(data, THUMB_PX * 2) if data else None})
    subtitle = f"{len(hits)} nearest curated images in {search.layout.root.resolve()}"
    write_bytes_atomic(path, render_gallery(f"search: {query}", subtitle, items).encode("utf-8"))
    return path
