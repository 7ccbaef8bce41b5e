"""Embed stage: an open_clip model embeds each downloaded image and its caption; their cosine is the CLIP score.

Outputs per shard, in clip-retrieval's layout (LAION tooling reads it unchanged), rows sorted by uid and
row-aligned across the three files:

    embed/img_emb/img_emb_{shard}.npy      float16 (n, dim), L2-normalised
    embed/text_emb/text_emb_{shard}.npy    float16 (n, dim), L2-normalised
    embed/metadata/metadata_{shard}.parquet  uid, url, caption, clip_score (float32)

Decode and preprocessing overlap with the model: `decode_threads` threads prepare whole batches a few
batches ahead while the calling thread runs the model. Threads rather than DataLoader worker processes,
because a shard is our unit of work and starting worker processes per shard costs seconds (torch import,
pickling the transform), while PIL's decode and resize release the GIL. The threads run only PIL and numpy
work and hand over uint8 pixels; ToTensor's scaling and Normalize run per batch on the model's device
(`PixelSteps`).

torch and open_clip are imported inside functions: importing this module must stay cheap for the CLI.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import json
import logging
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.config import ConfigError, EmbedConfig
from curate.ledger import Status, make_fates
from curate.stage import StageContext, kept_uids

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent.parent / "model_configs"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
METADATA_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string()),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("clip_score", pa.float32()),
    ]
)
# What Pillow raises on bytes it cannot decode (DecompressionBombError is handled apart: not an OSError).
DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError, EOFError, struct.error)

_registered_paths: set[Path] = set()


# --------------------------------------------------------------------------------------------------
# Model resolution and loading


def register_model_configs(path: Path = MODEL_CONFIG_DIR) -> None:
    """Add curate's model configs (or one JSON file / folder) to open_clip's registry, once per process."""
    path = path.resolve()
    if path in _registered_paths:
        return
    import open_clip

    open_clip.add_model_config(path)
    _registered_paths.add(path)


def resolve_model(cfg: EmbedConfig) -> tuple[str, str | None]:
    """(open_clip registry name, pretrained tag or absolute checkpoint path or None); raise ConfigError.

    Cheap: reads at most a model-config JSON, never model weights.
    """
    register_model_configs()
    name = _resolve_model_name(cfg.model)
    return name, _resolve_pretrained(name, cfg.pretrained)


def _resolve_model_name(model: str) -> str:
    import open_clip

    if model.endswith(".json"):
        return _register_config_file(Path(model).expanduser())
    name = model.replace("/", "-")  # open_clip's own spelling rule: ViT-B/32 is ViT-B-32
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ConfigError(
            f"embed.model: unknown open_clip model {model!r}{hint}; "
            "give a registry name (open_clip.list_models()) or a path to a model-config .json"
        )
    return name


def _register_config_file(path: Path) -> str:
    import open_clip

    if not path.is_file():
        raise ConfigError(f"embed.model: no such model-config file {str(path)!r}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"embed.model: cannot read model-config file {str(path)!r}: {err}") from None
    missing = [
        key for key in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(config, dict) or key not in config
    ]
    if missing:
        raise ConfigError(f"embed.model: {str(path)!r} is not an open_clip model config (missing {missing})")
    name = path.stem
    registered = open_clip.get_model_config(name)
    if registered is None or path.resolve() not in _registered_paths:
        if registered is not None and registered != config:
            # the registry is process-wide: registering would silently change what `name` means elsewhere
            raise ConfigError(
                f"embed.model: {str(path)!r} would replace open_clip's registered model {name!r}; rename the file"
            )
        register_model_configs(path)
    elif registered != config:
        open_clip.add_model_config(path)  # our own file, edited since: re-read it
    return name


def _resolve_pretrained(name: str, pretrained: str | None) -> str | None:
    import open_clip

    if pretrained is None:
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path.resolve())
    if "/" in pretrained or os.sep in pretrained or pretrained.lower().endswith(CHECKPOINT_SUFFIXES):
        raise ConfigError(f"embed.pretrained: no such checkpoint file {pretrained!r}")
    if open_clip.get_pretrained_cfg(name, pretrained):
        return pretrained
    tags = open_clip.list_pretrained_tags_by_model(name)
    if not tags:
        raise ConfigError(
            f"embed.pretrained: {pretrained!r} is neither a file nor a tag: {name!r} has no pretrained tags, "
            "give a checkpoint file"
        )
    close = difflib.get_close_matches(pretrained.lower().replace("-", "_"), tags, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"embed.pretrained: {pretrained!r} is neither a file nor a pretrained tag of {name!r} "
        f"({hint}valid tags: {', '.join(tags)})"
    )


def resolve_device(cfg: EmbedConfig) -> str:
    """'cuda' or 'cpu'. `auto` means what this process's machine has."""
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("embed.device is 'cuda' but torch sees no CUDA device on this machine")
    if device == "cpu" and cfg.precision == "fp16":
        raise ConfigError("embed.precision 'fp16' needs a CUDA device; use 'fp32' (or 'bf16') on cpu")
    return device


@dataclass(frozen=True)
class LoadedClip:
    """A model ready for inference: eval mode, on its device, with its val transform and tokenizer."""

    model: Any
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device
    model_name: str
    embed_dim: int
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = field(default=contextlib.nullcontext)
    pixel_steps: PixelSteps | None = None
    """`preprocess` split for batch work (None when its shape is not the usual one: then it runs per image)."""


@dataclass(frozen=True)
class PixelSteps:
    """open_clip's val transform split at its ToTensor.

    The PIL steps (resize, crop, RGB) run per image in the decode threads and give uint8 pixels; ToTensor's
    scaling and Normalize run once per batch on the model's device. Per-image torch ops in decode threads
    would each start an intra-op parallel region that competes with the model's threads (on a busy 2-core
    machine we measured ~35 ms per 224-px image for ToTensor + Normalize, against ~0.1 ms single-threaded),
    and uint8 is a quarter of the bytes to copy to a GPU. The arithmetic is ToTensor's and Normalize's own
    (x / 255, then (x - mean) / std, in float32), so the result is bit-identical to `preprocess`.
    """

    pil: Callable[[Image.Image], Image.Image]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_preprocess(cls, preprocess: Any) -> PixelSteps | None:
        from torchvision.transforms import Compose, Normalize, ToTensor

        steps = list(getattr(preprocess, "transforms", []))
        if len(steps) < 2 or not isinstance(steps[-2], ToTensor) or not isinstance(steps[-1], Normalize):
            return None
        if any(isinstance(step, (ToTensor, Normalize)) for step in steps[:-2]):
            return None
        normalize = steps[-1]
        return cls(Compose(steps[:-2]), tuple(map(float, normalize.mean)), tuple(map(float, normalize.std)))

    def pixels(self, image: Image.Image) -> np.ndarray:
        """(H, W, 3) uint8 after the PIL steps."""
        image = self.pil(image)
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))

    def to_model_input(self, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(n, H, W, 3) uint8 on any device -> normalised (n, 3, H, W) float32 on `device`."""
        import torch

        x = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        return x.to(torch.float32).div_(255).sub_(mean).div_(std)


def load_clip(cfg: EmbedConfig | None = None, /, **settings: Any) -> LoadedClip:
    """Load the model an EmbedConfig names; keyword settings override it (`load_clip(model="curate-tiny")`)."""
    import open_clip
    import torch

    cfg = _with_settings(cfg, settings)
    name, pretrained = resolve_model(cfg)
    device = torch.device(resolve_device(cfg))
    if pretrained is None:
        log.warning("embed: model %s has random weights (embed.pretrained is not set): its scores mean nothing", name)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    except RuntimeError as err:
        if pretrained is not None and Path(pretrained).is_file():
            raise ConfigError(
                f"embed.pretrained: checkpoint {pretrained!r} does not fit model {name!r}: {err}"
            ) from err
        if pretrained is not None:
            raise RuntimeError(
                f"embed.pretrained: cannot get the weights of tag {pretrained!r} for {name!r} ({err}); "
                "without network access, give the path of a local checkpoint file instead"
            ) from err
        raise
    model.eval()
    return LoadedClip(
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(name),
        device=device,
        model_name=name,
        embed_dim=int(open_clip.get_model_config(name)["embed_dim"]),
        autocast=_autocast_factory(device, cfg.precision),
        pixel_steps=PixelSteps.from_preprocess(preprocess),
    )


def _with_settings(cfg: EmbedConfig | None, settings: dict[str, Any]) -> EmbedConfig:
    base = cfg.model_dump() if cfg is not None else {}
    try:
        return EmbedConfig.model_validate({**base, **settings})
    except ValueError as err:
        raise ConfigError(f"embed: {err}") from None


def _autocast_factory(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    import torch

    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Encoding


def encode_pairs(loaded: LoadedClip, images: torch.Tensor, tokens: torch.Tensor) -> tuple[np.ndarray, ...]:
    """(image embeddings, text embeddings, cosine) for aligned batches; float32, L2-normalised in fp32."""
    import torch

    with torch.inference_mode():
        image_emb, text_emb = _encode(loaded, images, tokens)
        scores = (image_emb * text_emb).sum(dim=-1)
        return image_emb.cpu().numpy(), text_emb.cpu().numpy(), scores.cpu().numpy()


def _encode(
    loaded: LoadedClip, images: torch.Tensor | None, tokens: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    import torch.nn.functional as F

    image_emb = text_emb = None
    with loaded.autocast():
        if images is not None:
            image_emb = loaded.model.encode_image(images.to(loaded.device, non_blocking=True))
        if tokens is not None:
            text_emb = loaded.model.encode_text(tokens.to(loaded.device, non_blocking=True))
    # normalise outside autocast: in fp16 the norm of a wide vector loses digits
    image_emb = F.normalize(image_emb.float(), dim=-1) if image_emb is not None else None
    text_emb = F.normalize(text_emb.float(), dim=-1) if text_emb is not None else None
    return image_emb, text_emb


def embed_images(loaded: LoadedClip, images: Sequence[Image.Image], batch_size: int = 256) -> np.ndarray:
    """L2-normalised float32 (n, dim) embeddings of PIL images (any mode; converted to RGB)."""
    import torch

    parts = [np.zeros((0, loaded.embed_dim), np.float32)]
    for start in range(0, len(images), batch_size):
        batch = torch.stack([loaded.preprocess(im.convert("RGB")) for im in images[start : start + batch_size]])
        with torch.inference_mode():
            parts.append(_encode(loaded, batch, None)[0].cpu().numpy())  # type: ignore[union-attr]
    return np.concatenate(parts)


def embed_texts(loaded: LoadedClip, texts: Sequence[str], batch_size: int = 1024) -> np.ndarray:
    """L2-normalised float32 (n, dim) embeddings of texts."""
    import torch

    parts = [np.zeros((0, loaded.embed_dim), np.float32)]
    for start in range(0, len(texts), batch_size):
        tokens = loaded.tokenizer(list(texts[start : start + batch_size]))
        with torch.inference_mode():
            parts.append(_encode(loaded, None, tokens)[1].cpu().numpy())  # type: ignore[union-attr]
    return np.concatenate(parts)


# --------------------------------------------------------------------------------------------------
# Reading a download shard and preparing batches


@dataclass(frozen=True)
class RawSample:
    uid: str
    url: str | None
    caption: str
    image: bytes | None


@dataclass
class PreparedBatch:
    """Decoded, preprocessed and tokenised samples of one batch, plus the samples that failed to decode."""

    uids: list[str]
    urls: list[str | None]
    captions: list[str]
    images: torch.Tensor | None  # (n, H, W, 3) uint8 with PixelSteps, else preprocessed (n, 3, H, W) float
    tokens: torch.Tensor | None
    failures: list[tuple[str, str, str]]  # (uid, reason, detail)


def read_tar_samples(tar_path: Path, wanted: set[str]) -> Iterator[RawSample]:
    """The samples of an img2dataset webdataset tar whose uid is in `wanted`, in tar order."""
    from webdataset.tariterators import tarfile_samples

    seen: set[str] = set()
    with open(tar_path, "rb") as stream:
        for sample in tarfile_samples([{"url": str(tar_path), "stream": stream}]):
            if "json" not in sample:
                raise ValueError(f"{tar_path}: sample {sample['__key__']!r} has no .json (not an img2dataset shard?)")
            meta = json.loads(sample["json"])
            uid = str(meta["uid"])
            if uid not in wanted:
                continue
            if uid in seen:
                raise ValueError(f"{tar_path}: uid {uid!r} appears in two samples")
            seen.add(uid)
            image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
            caption = sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else meta.get("caption") or ""
            yield RawSample(uid, meta.get("url"), caption, image)


def decode_image(data: bytes) -> Image.Image:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")  # convert loads the pixels: truncation shows up here


def prepare_batch(loaded: LoadedClip, samples: Sequence[RawSample], pin: bool) -> PreparedBatch:
    """Runs in a decode thread: decode, preprocess and tokenise one batch; undecodable images are failures."""
    import torch
    from PIL import Image

    batch = PreparedBatch([], [], [], None, None, [])
    steps = loaded.pixel_steps
    pixels: list[Any] = []
    for sample in samples:
        try:
            if sample.image is None:
                raise OSError("the sample has no image file")
            image = decode_image(sample.image)
        except Image.DecompressionBombError as err:
            batch.failures.append((sample.uid, "decompression_bomb", str(err)))
            continue
        except DECODE_ERRORS as err:
            batch.failures.append((sample.uid, "decode_error", f"{type(err).__name__}: {err}"))
            continue
        pixels.append(steps.pixels(image) if steps else loaded.preprocess(image))
        batch.uids.append(sample.uid)
        batch.urls.append(sample.url)
        batch.captions.append(sample.caption)
    if pixels:
        batch.images = torch.from_numpy(np.stack(pixels)) if steps else torch.stack(pixels)
        batch.tokens = loaded.tokenizer(batch.captions)
        if pin:
            batch.images, batch.tokens = batch.images.pin_memory(), batch.tokens.pin_memory()
    return batch


def model_input(loaded: LoadedClip, images: torch.Tensor) -> torch.Tensor:
    if loaded.pixel_steps is None:
        return images.to(loaded.device, non_blocking=True)
    return loaded.pixel_steps.to_model_input(images, loaded.device)


def chunked(items: Iterable[RawSample], size: int) -> Iterator[list[RawSample]]:
    chunk: list[RawSample] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def prefetch(
    pool: ThreadPoolExecutor, work: Iterable[Callable[[], PreparedBatch]], depth: int
) -> Iterator[PreparedBatch]:
    """Results of `work` in order, keeping up to `depth` items submitted ahead of the consumer."""
    pending: deque[Future[PreparedBatch]] = deque()
    for job in work:
        pending.append(pool.submit(job))
        if len(pending) > depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


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
    def from_prepared(cls, batch: PreparedBatch, image: np.ndarray, text: np.ndarray, scores: np.ndarray):
        return cls(batch.uids, batch.urls, batch.captions, image.astype(np.float16), text.astype(np.float16), scores)


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
    root = Path(run_dir) / "embed"
    if shards is None:
        shards = sorted(p.stem.removeprefix("metadata_") for p in (root / "metadata").glob("metadata_*.parquet"))
    tables, images, texts = [METADATA_SCHEMA.empty_table()], [], []
    for shard in shards:
        img_path, text_path, meta_path = embedding_paths(root, shard)
        table = pq.read_table(meta_path, schema=METADATA_SCHEMA)
        image, text = np.load(img_path), np.load(text_path)
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


class EmbedStage:
    name: ClassVar[str] = "embed"
    upstream: ClassVar[str] = "download"

    def __init__(self, cfg: EmbedConfig) -> None:
        self.cfg = cfg
        self._loaded: LoadedClip | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "_loaded": None}  # models are loaded per worker, never pickled into tasks

    def preflight(self) -> None:
        """Name, file and tag checks in the driver, before anything runs; loads no weights."""
        resolve_model(self.cfg)
        if self.cfg.precision == "fp16" and self.cfg.device in ("cpu", "auto"):
            resolve_device(self.cfg)  # fp16 on a cpu; an explicit 'cuda' is checked on the workers

    def setup(self) -> None:
        import torch

        if self.cfg.workers > 1 and self.cfg.device != "cuda":
            # several spawned workers share the cores: without this, each would start one torch thread per core
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.cfg.workers))
        self._loaded = load_clip(self.cfg)
        log.info("embed: loaded %s on %s", self._loaded.model_name, self._loaded.device)

    @property
    def loaded(self) -> LoadedClip:
        if self._loaded is None:
            self.setup()
        return self._loaded  # type: ignore[return-value]

    def expected_uids(self, ctx: StageContext, shard: str) -> pa.Array:
        return kept_uids(ctx.layout, self.upstream, shard)

    def process_shard(self, ctx: StageContext, shard: str, workdir: Path) -> pa.Table:
        expected = self.expected_uids(ctx, shard).to_pylist()
        loaded = self.loaded
        results: list[EmbeddedBatch] = []
        failures: list[tuple[str, str, str]] = []
        if expected:
            tar_path = ctx.layout.stage_dir(self.upstream) / f"{shard}.tar"
            for batch in self._prepared_batches(loaded, read_tar_samples(tar_path, set(expected))):
                failures.extend(batch.failures)
                if batch.uids:
                    results.append(EmbeddedBatch.from_prepared(batch, *self._encode(loaded, batch)))
        embeddings = ShardEmbeddings.from_batches(results, loaded.embed_dim)
        embeddings.write(workdir, shard)
        return self._fates(expected, embeddings.metadata, failures)

    @staticmethod
    def _encode(loaded: LoadedClip, batch: PreparedBatch) -> tuple[np.ndarray, ...]:
        assert batch.images is not None and batch.tokens is not None
        return encode_pairs(loaded, model_input(loaded, batch.images), batch.tokens)

    def _prepared_batches(self, loaded: LoadedClip, samples: Iterator[RawSample]) -> Iterator[PreparedBatch]:
        pin = loaded.device.type == "cuda"
        jobs = (functools.partial(prepare_batch, loaded, chunk, pin) for chunk in chunked(samples, self.cfg.batch_size))
        pool = ThreadPoolExecutor(self.cfg.decode_threads, thread_name_prefix="embed-decode")
        try:
            yield from prefetch(pool, jobs, depth=self.cfg.decode_threads)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

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
