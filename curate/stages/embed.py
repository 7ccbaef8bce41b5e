"""Embed stage: an open_clip model embeds each downloaded image and its caption; their cosine is the CLIP score.

Outputs per shard, in clip-retrieval's layout (LAION tooling reads it unchanged), rows sorted by uid and
row-aligned across the three files:

    embed/img_emb/img_emb_{shard}.npy      float16 (n, dim), L2-normalised
    embed/text_emb/text_emb_{shard}.npy    float16 (n, dim), L2-normalised
    embed/metadata/metadata_{shard}.parquet  uid, url, caption, clip_score (float32), then one float32 column
                                             per `embed.heads` plugin (`curate.plugins`), named after it

Batches are read, decoded, preprocessed and tokenised ahead of the model by decode worker processes kept
across shards (`curate.stages.embed_input`); the model's thread only moves uint8 pixels to the device,
normalises them there and runs the model, and on cuda the results copy back while the next batch runs.

torch and open_clip are imported inside functions: importing this module must stay cheap for the CLI.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate import clip
from curate.clip import MODEL_CONFIG_DIR as MODEL_CONFIG_DIR  # re-exported: tests and fixtures read them here
from curate.clip import ClipSpec, LoadedClip
from curate.clip import PixelSteps as PixelSteps
from curate.clip import embed_images as embed_images
from curate.clip import embed_texts as embed_texts
from curate.clip import register_model_configs as register_model_configs
from curate.config import ConfigError, EmbedConfig
from curate.cores import use_task_share
from curate.ledger import Status, make_fates
from curate.plugins import Plugin, head_scores, resolve_plugins
from curate.stage import Stage, StageContext, StageOutputs
from curate.stages.download import DownloadOutputs
from curate.stages.embed_input import (
    DecodedBatch,
    DecodeSpec,
    DecodeWorkers,
    HostCopy,
    batch_jobs,
    decode_workers,
    decoded_batches,
    encode_to_host,
    gpu_steps,
    model_input,
    pipelined,
)

if TYPE_CHECKING:
    from curate.config import PipelineConfig
    from curate.io.storage import Storage

log = logging.getLogger(__name__)

METADATA_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string()),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("clip_score", pa.float32()),
    ]
)
# Names a head's score column may not take: the metadata's own, and the sizes the filter stage joins to them.
RESERVED_COLUMNS = (*METADATA_SCHEMA.names, "width", "height")


# --------------------------------------------------------------------------------------------------
# The model: curate.clip is the one factory; these adapt an EmbedConfig to it


def clip_spec(cfg: EmbedConfig, storage: Storage | None = None) -> ClipSpec:
    return ClipSpec(cfg.model, cfg.pretrained, cfg.device, cfg.precision, section="embed", storage=storage)


def resolve_model(cfg: EmbedConfig, storage: Storage | None = None) -> tuple[str, str | None]:
    """(open_clip registry name, pretrained tag, absolute checkpoint path, URL or None); raise ConfigError.

    Cheap: reads at most a model-config JSON and looks at the weights cache or the URL, never loads weights.
    """
    return clip.resolve_model(clip_spec(cfg, storage))


def resolve_device(cfg: EmbedConfig) -> str:
    """'cpu', 'cuda' or 'cuda:N'. `auto` means what this process's machine has."""
    return str(clip.resolve_device(cfg.device, cfg.precision, section="embed"))


def load_clip(cfg: EmbedConfig | None = None, /, storage: Storage | None = None, **settings: Any) -> LoadedClip:
    """Load the model an EmbedConfig names; keyword settings override it (`load_clip(model="curate-tiny")`)."""
    return clip.load_clip(clip_spec(_with_settings(cfg, settings), storage))


def _with_settings(cfg: EmbedConfig | None, settings: dict[str, Any]) -> EmbedConfig:
    base = cfg.model_dump() if cfg is not None else {}
    try:
        return EmbedConfig.model_validate({**base, **settings})
    except ValueError as err:
        raise ConfigError(f"embed: {err}") from None


# --------------------------------------------------------------------------------------------------
# Outputs


def embedding_paths(root: Path, shard: str) -> tuple[Path, Path, Path]:
    """(img_emb, text_emb, metadata) paths of `shard` under an embed stage directory (or a workdir)."""
    return (
        root / "img_emb" / f"img_emb_{shard}.npy",
        root / "text_emb" / f"text_emb_{shard}.npy",
        root / "metadata" / f"metadata_{shard}.parquet",
    )


@dataclass(frozen=True)
class EmbeddedBatch:
    """A batch's rows after the model: what the shard keeps of it (not the pixels)."""

    uids: list[str]
    urls: list[str | None]
    captions: list[str]
    image: np.ndarray  # float16, as stored
    text: np.ndarray
    scores: np.ndarray  # float32 cosine of the float32 embeddings

    @classmethod
    def from_decoded(cls, batch: DecodedBatch, copy: HostCopy) -> EmbeddedBatch:
        image, text, scores = copy.numpy()
        return cls(batch.uids, batch.urls, batch.captions, image, text, scores)


@dataclass
class ShardEmbeddings:
    """One shard's results, row-aligned, in uid order."""

    metadata: pa.Table
    image: np.ndarray
    text: np.ndarray

    @classmethod
    def from_batches(cls, batches: list[EmbeddedBatch], dim: int) -> ShardEmbeddings:
        uids = [uid for batch in batches for uid in batch.uids]
        order = np.argsort(np.asarray(uids, dtype=object), kind="stable") if uids else np.zeros(0, np.int64)
        image = np.concatenate([np.zeros((0, dim), np.float16), *(b.image for b in batches)])[order]
        text = np.concatenate([np.zeros((0, dim), np.float16), *(b.text for b in batches)])[order]
        scores = np.concatenate([np.zeros(0, np.float32), *(b.scores for b in batches)])[order]
        columns = {
            "uid": uids,
            "url": [url for batch in batches for url in batch.urls],
            "caption": [caption for batch in batches for caption in batch.captions],
        }
        metadata = pa.table(
            {**{k: pa.array(v, pa.string()).take(order) for k, v in columns.items()}, "clip_score": scores},
            schema=METADATA_SCHEMA,
        )
        return cls(metadata, image, text)

    def with_scores(self, scores: dict[str, np.ndarray]) -> ShardEmbeddings:
        """The same rows with one float32 column per head (in `scores`' order) after the metadata's own."""
        metadata = self.metadata
        for name, values in scores.items():
            metadata = metadata.append_column(pa.field(name, pa.float32()), pa.array(values, pa.float32()))
        return ShardEmbeddings(metadata, self.image, self.text)

    def embeddings(self, need: str) -> np.ndarray:
        """What a plugin asked for: float32 copies of the stored (float16) embeddings."""
        return (self.image if need == "image_embeddings" else self.text).astype(np.float32)

    def write(self, root: Path, shard: str) -> None:
        img_path, text_path, meta_path = embedding_paths(root, shard)
        for path in (img_path, text_path, meta_path):
            path.parent.mkdir(parents=True, exist_ok=True)
        np.save(img_path, self.image)
        np.save(text_path, self.text)
        pq.write_table(self.metadata, meta_path)


def read_embeddings(
    run_dir: str | Path, shards: Sequence[str] | None = None, dtype: type = np.float32
) -> tuple[np.ndarray, np.ndarray, np.ndarray, pa.Table]:
    """(uids, image embeddings, text embeddings, metadata) of the given shards (default: all), row-aligned."""
    outputs = EmbedOutputs(run_dir)
    root = outputs.folder
    shards = outputs.shards() if shards is None else shards
    tables, images, texts = [METADATA_SCHEMA.empty_table()], [], []
    for shard in shards:
        table = outputs.metadata(shard)
        image, text = outputs.image_embeddings(shard), outputs.text_embeddings(shard)
        if not len(image) == len(text) == table.num_rows:
            raise ValueError(f"{root}: shard {shard} has {len(image)} image, {len(text)} text, {table.num_rows} rows")
        tables.append(table)
        images.append(image.astype(dtype, copy=False))
        texts.append(text.astype(dtype, copy=False))
    metadata = pa.concat_tables(tables)
    dim = images[0].shape[1] if images else 0
    image_emb = np.concatenate(images) if images else np.zeros((0, dim), dtype)
    text_emb = np.concatenate(texts) if texts else np.zeros((0, dim), dtype)
    return np.asarray(metadata["uid"].to_pylist(), dtype=object), image_emb, text_emb, metadata


# --------------------------------------------------------------------------------------------------
# The stage


class EmbedOutputs(StageOutputs):
    """Per shard, row-aligned and in uid order: image and text embeddings (float16) and their metadata."""

    stage = "embed"

    def paths(self, shard: str) -> tuple[Path, Path, Path]:
        return embedding_paths(self.folder, shard)

    def metadata(self, shard: str, columns: list[str] | None = None) -> pa.Table:
        """METADATA_SCHEMA's columns (or those named); `metadata_with_scores` adds the heads' scores."""
        path = self.layout.fetch(self.paths(shard)[2])
        return pq.read_table(path, columns=columns, schema=None if columns else METADATA_SCHEMA)

    def metadata_with_scores(self, shard: str) -> pa.Table:
        """Every column: METADATA_SCHEMA's, then one float32 score per `embed.heads` plugin."""
        return pq.read_table(self.layout.fetch(self.paths(shard)[2]))

    def image_embeddings(self, shard: str, mmap_mode: str | None = None) -> np.ndarray:
        return np.load(self.layout.fetch(self.paths(shard)[0]), mmap_mode=mmap_mode)  # type: ignore[call-overload]

    def text_embeddings(self, shard: str) -> np.ndarray:
        return np.load(self.layout.fetch(self.paths(shard)[1]))

    def has(self, shard: str) -> bool:
        return self.layout.exists(self.paths(shard)[0])

    def shards(self) -> list[str]:
        """Every shard whose embeddings are done (for readers of a finished run)."""
        return self.fate_shards()


class EmbedStage(Stage):
    name = "embed"
    speed_only = frozenset({"batch_size", "decode_workers", "workers", "device"})
    outputs = EmbedOutputs
    shard_local = True

    def __init__(self, config: PipelineConfig) -> None:
        super().__init__(config)
        self._loaded: LoadedClip | None = None
        self._heads: list[tuple[Plugin, Callable[..., Any]]] | None = None

    @property
    def cfg(self) -> EmbedConfig:
        return self.config.embed

    def fingerprint_extras(self) -> dict[str, Any]:
        return {"heads": [plugin.identity() for plugin in self.heads()]} if self.cfg.heads else {}

    def heads(self) -> list[Plugin]:
        return resolve_plugins(self.cfg.heads, "embed.heads", reserved=RESERVED_COLUMNS)

    def resources(self) -> dict[str, float]:
        return {"GPU": 1} if clip.wants_gpu(self.cfg.device) else {}

    def workers(self) -> int:
        return self.cfg.workers

    def preflight(self) -> None:
        """Name, file and tag checks in the driver, before anything runs; loads no weights."""
        resolve_model(self.cfg, self.storage)
        self.heads()  # imports each head's module and checks its settings
        on_this_machine = self.config.executor == "local" and (
            self.cfg.device.startswith("cuda") or self.cfg.decode == "gpu"
        )
        if on_this_machine or (self.cfg.precision == "fp16" and self.cfg.device in ("cpu", "auto")):
            self.check_decode_device(resolve_device(self.cfg))  # Dask workers check theirs when they load the model

    def setup(self) -> None:
        device = self.worker_device()
        self._loaded = load_clip(self.cfg, storage=self.storage, device=device)
        self.check_decode_device(str(self._loaded.device))
        if self.cfg.decode == "gpu":
            gpu_steps(self._loaded)  # a preprocess the GPU path cannot follow is a config error, before any shard
        use_task_share(self._loaded.device.type)
        self._heads = [(plugin, plugin.build()) for plugin in self.heads()]
        log.info("embed: loaded %s on %s", self._loaded.model_name, self._loaded.device)

    def check_decode_device(self, device: str) -> None:
        if self.cfg.decode == "gpu" and not device.startswith("cuda"):
            raise ConfigError(
                f"embed.decode: 'gpu' decodes JPEGs on the model's cuda device, but the model runs on {device} "
                "(torch sees no CUDA device here); use draft or full"
            )

    def worker_device(self) -> str:
        """`embed.device`, or for the i-th of the local executor's worker processes on a machine with GPUs,
        cuda:(i mod GPUs): one model per GPU."""
        from curate.executors.local import worker_rank

        return clip.worker_device(self.cfg.device, worker_rank())

    @property
    def loaded(self) -> LoadedClip:
        if self._loaded is None:
            self.setup()
        return self._loaded  # type: ignore[return-value]

    def expected_uids(self, ctx: StageContext, shard: str) -> pa.Array:
        return DownloadOutputs(ctx.layout).kept_uids(shard)

    def process_shard(self, ctx: StageContext, shard: str, workdir: Path) -> pa.Table:
        expected = self.expected_uids(ctx, shard).to_pylist()
        loaded = self.loaded
        results: list[EmbeddedBatch] = []
        failures: list[tuple[str, str, str]] = []
        if expected:
            tar_path = ctx.layout.fetch(DownloadOutputs(ctx.layout).tar_path(shard))
            jobs = batch_jobs(tar_path, set(expected), self.cfg.batch_size)
            batches = decoded_batches(self.decoders(), jobs, pin=loaded.device.type == "cuda")
            for batch, copy in pipelined(self._with_failures(batches, failures), self._start_encoding):
                results.append(EmbeddedBatch.from_decoded(batch, copy))
        embeddings = self._scored(ShardEmbeddings.from_batches(results, loaded.embed_dim))
        embeddings.write(workdir, shard)
        return self._fates(expected, embeddings.metadata, failures)

    def decoders(self) -> DecodeWorkers:
        """This process's decode workers (started by the first shard, kept for the next)."""
        spec = DecodeSpec.for_model(self.loaded, self.cfg.decode)
        return decode_workers(spec, self.cfg.decode_workers)

    @staticmethod
    def _with_failures(batches: Iterator[DecodedBatch], failures: list[tuple[str, str, str]]) -> Iterator[DecodedBatch]:
        for batch in batches:
            failures.extend(batch.failures)
            if len(batch):
                yield batch

    def _start_encoding(self, batch: DecodedBatch) -> HostCopy:
        assert batch.tokens is not None
        images = model_input(self.loaded, batch)
        batch.replace_images(None)  # their buffer may take the next batch's pixels
        return encode_to_host(self.loaded, images, batch.tokens)

    def _scored(self, embeddings: ShardEmbeddings) -> ShardEmbeddings:
        """The heads' scores as extra metadata columns, computed from the embeddings as stored."""
        if not self.cfg.heads:
            return embeddings
        if self._heads is None:
            self._heads = [(plugin, plugin.build()) for plugin in self.heads()]
        table = embeddings.metadata
        scores = {plugin.name: head_scores(plugin, head, table, embeddings.embeddings) for plugin, head in self._heads}
        return embeddings.with_scores(scores)

    @staticmethod
    def _fates(expected: list[str], metadata: pa.Table, failures: list[tuple[str, str, str]]) -> pa.Table:
        kept = metadata.select(["uid", "clip_score"])
        decided = set(kept["uid"].to_pylist()) | {uid for uid, _, _ in failures}
        missing = sorted(set(expected) - decided)
        failed = sorted(failures) + [
            (uid, "missing_sample", "uid kept by download but absent from its tar") for uid in missing
        ]
        kept_fates = make_fates(kept["uid"], Status.KEPT.value, clip_score=kept["clip_score"])
        failed_fates = make_fates(
            [f[0] for f in failed], Status.FAILED.value, [f[1] for f in failed], [f[2] for f in failed]
        )
        return pa.concat_tables([kept_fates, failed_fates]).sort_by("uid")
