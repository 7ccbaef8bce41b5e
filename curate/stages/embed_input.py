"""The embed stage's input pipeline: tar reading, JPEG decoding, preprocessing and tokenising, ahead of the model.

    reader thread:   the tar's index, .json and .txt members -> batch jobs (uids, image spans, captions)
    decode workers:  read each image's bytes, decode (JPEG draft mode by default), resize and crop to uint8
                     pixels written into a shared-memory buffer the batch brought along, tokenise the captions
    reader thread:   collects the batches in order (pinned on cuda) a few batches ahead of the model
    model thread:    uint8 pixels to the device, normalised there, the model, copies back (`curate.stages.embed`)

The decode workers are spawned processes (PIL's decode runs in parallel, open_clip's Python tokenizer no longer
shares the model's GIL), started once per process that runs the model and kept across shards: starting one
costs a torch import. `decode_workers: 0` decodes in the reader thread instead.

`decode` chooses the pixels: `full` is PIL's full-size decode (open_clip's own preprocess, exactly); `draft`
lets libjpeg decode at the smallest DCT scale (1/2, 1/4, 1/8) whose image still covers the model's input, so
nothing is upsampled that would not have been, at a fraction of the cost for large JPEGs; `gpu` hands JPEG
bytes to `torchvision.io.decode_jpeg` on the model's cuda device and resizes there. Each gives slightly
different pixels, so `decode` is part of the stage's fingerprint.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from curate.config import ConfigError
from curate.io.wds import IMAGE_EXTENSIONS, Sample, Span, TarReadError, iter_samples

if TYPE_CHECKING:
    import torch

    from curate.clip import LoadedClip, PixelSteps

log = logging.getLogger(__name__)

# What Pillow raises on bytes it cannot decode (DecompressionBombError is handled apart: not an OSError).
DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError, EOFError, struct.error)
BATCHES_AHEAD_PER_WORKER = 2
READY_BATCHES = 2  # decoded batches queued for the model
JPEG_MAGIC = b"\xff\xd8\xff"


class DecodeWorkerError(RuntimeError):
    """A decode worker process died (killed, out of memory, a crash in a C library): the shard fails."""


@dataclass(frozen=True)
class DecodeSpec:
    """What a decode worker needs, sent to it once when it starts. Picklable: torchvision transforms and
    open_clip's tokenizer."""

    tokenizer: Callable[[list[str]], torch.Tensor]
    steps: PixelSteps | None
    """open_clip's preprocess split at its ToTensor (PIL steps, then scaling and Normalize per batch); None:
    `preprocess` runs whole, per image."""
    preprocess: Callable[[Any], torch.Tensor] | None
    normalize: bool
    """Scale and normalise in the worker (a model on the cpu: its process then only runs the model) rather than
    hand uint8 pixels to the device."""
    draft_side: int | None
    """Decode JPEGs at the smallest DCT scale whose image is at least this side by this side (None: full)."""
    jpeg_bytes: bool = False
    """Hand JPEGs back undecoded (checked and sized from their header only), for the GPU decoder."""
    max_pixels: int | None = None
    """Pillow's decompression-bomb limit in the model's process, which spawned workers take over."""

    @classmethod
    def for_model(cls, loaded: LoadedClip, decode: str) -> DecodeSpec:
        from PIL import Image

        steps = loaded.pixel_steps
        return cls(
            tokenizer=loaded.tokenizer,
            steps=steps,
            preprocess=None if steps is not None else loaded.preprocess,
            normalize=loaded.device.type == "cpu" and decode != "gpu",
            draft_side=input_side(loaded) if decode == "draft" else None,
            jpeg_bytes=decode == "gpu",
            max_pixels=Image.MAX_IMAGE_PIXELS,
        )

    def key(self) -> tuple[Any, ...]:
        """Equal keys decode alike: a running pool of workers can be reused."""
        tokenizer = (type(self.tokenizer).__name__, getattr(self.tokenizer, "context_length", None))
        steps = (repr(self.steps.pil), self.steps.mean, self.steps.std) if self.steps is not None else None
        settings = (self.draft_side, self.jpeg_bytes, self.max_pixels, self.normalize)
        return (tokenizer, steps, repr(self.preprocess), *settings)


def input_side(loaded: LoadedClip) -> int:
    size = loaded.model.visual.image_size
    return int(min(size)) if isinstance(size, tuple | list) else int(size)


@dataclass(frozen=True)
class BatchJob:
    """One batch of a shard: where each sample's image lies in the tar, and its caption."""

    tar: str
    uids: list[str]
    images: list[Span | None]  # None: the sample has no image member
    captions: list[str]
    urls: list[str | None]
    tar_identity: tuple[int, int, int, int] = (0, 0, 0, 0)
    """(device, inode, size, mtime) when the shard was indexed: a tar replaced under the same name (a retried
    download shard) is another file, so a worker must not read it through a descriptor of the old one."""
    pixels: torch.Tensor | None = None
    """A flat uint8 buffer in shared memory for the batch's pixels (`PixelBuffers`); None: a new tensor."""


@dataclass
class DecodedBatch:
    """The samples of a job that decoded (in job order), as model inputs, plus the failures."""

    uids: list[str]
    urls: list[str | None]
    captions: list[str]
    images: torch.Tensor | None
    """(n, H, W, 3) uint8 after the PIL steps; (n, 3, H, W) float32 model input when normalised in the worker
    or made by a whole `preprocess`. In the job's pixel buffer when it had room (not a whole `preprocess`)."""
    tokens: torch.Tensor | None
    failures: list[tuple[str, str, str]]  # (uid, reason, detail)
    jpeg_rows: list[int] = field(default_factory=list)
    """With `DecodeSpec.jpeg_bytes`: the rows whose JPEG is handed over undecoded; `images` holds the others."""
    jpeg_data: torch.Tensor | None = None
    """Those JPEGs' bytes end to end (one tensor: one shared-memory handle per batch), `jpeg_sizes` long each."""
    jpeg_sizes: list[int] = field(default_factory=list)
    in_buffer: bool = False
    """`images` lie in the job's pixel buffer."""
    recycle: Callable[[], None] | None = field(default=None, repr=False)
    """Hands that buffer back for a later batch (set in the model's process)."""

    def replace_images(self, images: torch.Tensor | None) -> None:
        """Swap `images` for their copy (pinned memory; None once the model's input is made): the pixel buffer
        they lay in goes back, to be written with a later batch."""
        self.images = images
        if self.recycle is not None:
            self.recycle, recycle = None, self.recycle
            recycle()

    def jpegs(self) -> list[torch.Tensor]:
        assert self.jpeg_data is not None
        return list(self.jpeg_data.split(self.jpeg_sizes))

    def __len__(self) -> int:
        return len(self.uids)


# --------------------------------------------------------------------------------------------------
# Decoding one batch (in a decode worker, or in the reader thread)


class TarFiles:
    """Open descriptors of the tars jobs name, the last few kept: a worker reads one shard at a time."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._fds: dict[tuple[str, tuple[int, int, int, int]], int] = {}

    def read(self, tar: str, span: Span, identity: tuple[int, int, int, int] = (0, 0, 0, 0)) -> bytes:
        key = (tar, identity)
        if key not in self._fds:
            if len(self._fds) >= self.keep:
                os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[key] = os.open(tar, os.O_RDONLY)
        data = os.pread(self._fds[key], span.size, span.offset)
        if len(data) != span.size:
            raise TarReadError(f"{tar}: truncated tar (a member ends past the end of the file)")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def decode_image(data: bytes, draft_side: int | None = None) -> Any:
    """RGB PIL image; with `draft_side`, a JPEG decodes at the smallest DCT scale covering that square."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if draft_side is not None and image.format == "JPEG":
            image.draft("RGB", (draft_side, draft_side))
        return image.convert("RGB")  # convert loads the pixels: truncation shows up here


def check_jpeg(data: bytes) -> None:
    """Header checks of a JPEG the GPU will decode: readable, and no decompression bomb."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        Image._decompression_bomb_check(image.size)


def prepare(spec: DecodeSpec, job: BatchJob, files: TarFiles) -> DecodedBatch:
    """Read, decode, preprocess and tokenise one batch; undecodable images are failures, not errors."""
    import torch
    from PIL import Image

    batch = DecodedBatch([], [], [], None, None, [])
    pixels: list[Any] = []
    jpegs: list[bytes] = []
    for uid, span, caption, url in zip(job.uids, job.images, job.captions, job.urls, strict=True):
        # a tar that cannot be read is no image's fault: TarReadError fails the shard
        data = files.read(job.tar, span, job.tar_identity) if span is not None else None
        try:
            if data is None:
                raise OSError("the sample has no image file")
            if spec.jpeg_bytes and data.startswith(JPEG_MAGIC):
                check_jpeg(data)
                batch.jpeg_rows.append(len(batch.uids))
                jpegs.append(data)
            else:
                pixels.append(preprocessed(spec, decode_image(data, spec.draft_side)))
        except Image.DecompressionBombError as err:
            batch.failures.append((uid, "decompression_bomb", str(err)))
            continue
        except DECODE_ERRORS as err:
            batch.failures.append((uid, "decode_error", f"{type(err).__name__}: {err}"))
            continue
        batch.uids.append(uid)
        batch.urls.append(url)
        batch.captions.append(caption)
    if pixels:
        if spec.steps is None:
            batch.images = torch.stack(pixels)
        elif spec.normalize:
            shape = (len(pixels), pixels[0].shape[2], *pixels[0].shape[:2])
            out = buffer_view(job.pixels, shape, torch.float32)
            batch.images = spec.steps.to_model_input(torch.from_numpy(np.stack(pixels)), torch.device("cpu"), out)
        else:
            out = buffer_view(job.pixels, (len(pixels), *pixels[0].shape), torch.uint8)
            batch.images = torch.from_numpy(np.stack(pixels, out=None if out is None else out.numpy()))
        batch.in_buffer = job.pixels is not None and batch.images.untyped_storage().data_ptr() == (
            job.pixels.untyped_storage().data_ptr()
        )
    if jpegs:
        batch.jpeg_data = torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8)
        batch.jpeg_sizes = [len(data) for data in jpegs]
    if batch.uids:
        batch.tokens = spec.tokenizer(batch.captions)
    return batch


def buffer_view(buffer: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """A tensor of `shape` and `dtype` over the start of a flat uint8 buffer; None if there is none or too small."""
    size = int(np.prod(shape)) * dtype.itemsize
    if buffer is None or buffer.numel() < size:
        return None
    return buffer[:size].view(dtype).view(shape)


def preprocessed(spec: DecodeSpec, image: Any) -> Any:
    if spec.steps is None:
        return spec.preprocess(image)  # type: ignore[misc]
    image = spec.steps.pil(image)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


_worker_spec: DecodeSpec | None = None
_worker_files: TarFiles | None = None


def _start_worker(spec: DecodeSpec, parent: int) -> None:
    """A decode worker's initializer: one torch thread (its work is per image), tensors returned via shared memory."""
    global _worker_spec, _worker_files
    import torch
    import torch.multiprocessing  # registers the reductions that pass tensors through shared memory
    from PIL import Image

    from curate.processes import exit_with_parent

    exit_with_parent(parent)
    torch.set_num_threads(1)
    Image.MAX_IMAGE_PIXELS = spec.max_pixels
    _worker_spec, _worker_files = spec, TarFiles()


def _prepare_in_worker(job: BatchJob) -> DecodedBatch:
    assert _worker_spec is not None and _worker_files is not None, "decode worker not started"
    return prepare(_worker_spec, job, _worker_files)


# --------------------------------------------------------------------------------------------------
# The workers


class PixelBuffers:
    """Flat uint8 buffers in shared memory that decode workers write batches' pixels into, each used again once
    its batch's pixels were read. A new shared segment for every batch cost a worker 0.25-0.4 ms per 224 px image
    here for uint8 pixels (9.6 MB of /dev/shm created and filled per 64 images; the float32 a model on the cpu
    takes is four times that), about a sixth of its decoding.

    Sized from the batches that came back (pixels per sample, the most samples per job); the jobs sent before
    the first one returned bring none, and their workers make a new tensor."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._sample_bytes = 0
        self._samples = 0
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, samples: int) -> torch.Tensor | None:
        """A buffer for a job of `samples`: a free one if one has room, else a new one; None until sized."""
        import torch

        with self._lock:
            self._samples = max(self._samples, samples)
            if not self._sample_bytes:
                return None
            size = self._samples * self._sample_bytes
            self._free = [buffer for buffer in self._free if buffer.numel() >= size]
            if self._free:
                return self._free.pop()
        return torch.empty(size, dtype=torch.uint8).share_memory_()

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buffer)

    def learn(self, batch: DecodedBatch) -> None:
        """Size the buffers from a batch made by the PIL steps."""
        images = batch.images
        if images is not None and len(images) and not batch.jpeg_rows:
            with self._lock:
                self._sample_bytes = max(self._sample_bytes, images[0].numel() * images.element_size())


class DecodeWorkers:
    """`workers` spawned decode processes, each set up once with a `DecodeSpec`; 0 workers: decode inline."""

    def __init__(self, spec: DecodeSpec, workers: int) -> None:
        import multiprocessing

        self.spec, self.workers = spec, workers
        self._files = TarFiles()
        # a job's buffer is busy from its submission until the model's input is made: the jobs kept ahead, the
        # batches queued for the model and the one it takes
        self._buffers = PixelBuffers(keep=BATCHES_AHEAD_PER_WORKER * max(1, workers) + READY_BATCHES + 1)
        self._lent: dict[Future[DecodedBatch], torch.Tensor] = {}
        self._pool: ProcessPoolExecutor | None = None
        if workers > 0:
            # spawn: torch and the model's threads are not fork-safe
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(
                workers, mp_context=context, initializer=_start_worker, initargs=(spec, os.getpid())
            )

    def submit(self, job: BatchJob) -> Future[DecodedBatch]:
        if self._pool is None:
            future: Future[DecodedBatch] = Future()
            future.set_result(prepare(self.spec, job, self._files))
            return future
        buffer = self._buffers.take(len(job.uids))
        if buffer is None:
            return self._pool.submit(_prepare_in_worker, job)
        future = self._pool.submit(_prepare_in_worker, replace(job, pixels=buffer))
        self._lent[future] = buffer
        return future

    def result(self, future: Future[DecodedBatch]) -> DecodedBatch:
        """A submitted job's batch (or what its worker raised). Pixels in its buffer keep the buffer until
        `replace_images`; a buffer the worker did not write into is free again at once."""
        buffer = self._lent.pop(future, None)
        try:
            batch = future.result()
        except BaseException:
            if buffer is not None:
                self._buffers.give(buffer)  # the worker is done with the job, or gone
            raise
        if self.spec.steps is not None:
            self._buffers.learn(batch)
        if buffer is not None:
            if batch.in_buffer:
                batch.recycle = partial(self._buffers.give, buffer)
            else:
                self._buffers.give(buffer)
        return batch

    def cancel(self, future: Future[DecodedBatch]) -> None:
        """Drop a job that is no longer wanted; its buffer is free again only if no worker started on it."""
        buffer = self._lent.pop(future, None)
        if future.cancel() and buffer is not None:
            self._buffers.give(buffer)

    def pids(self) -> list[int]:
        """The worker processes started so far (they start as jobs arrive)."""
        return sorted(self._pool._processes) if self._pool is not None else []  # type: ignore[attr-defined]

    @property
    def broken(self) -> bool:
        return self._pool is not None and bool(getattr(self._pool, "_broken", False))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._lent.clear()
        self._buffers = PixelBuffers(self._buffers.keep)
        self._files.close()


_workers: DecodeWorkers | None = None
_workers_lock = threading.Lock()
_warned_daemon = threading.Event()


def decode_workers(spec: DecodeSpec, workers: int) -> DecodeWorkers:
    """This process's decode workers for `spec`: the running ones when they decode alike, else new ones.

    A daemon process may not start children (Dask's workers are daemons unless `distributed.worker.daemon` is
    false): there, batches are decoded in the reader thread instead."""
    global _workers
    import multiprocessing

    if workers > 0 and multiprocessing.current_process().daemon:
        log.log(
            logging.DEBUG if _warned_daemon.is_set() else logging.WARNING,
            "embed: this worker is a daemon process and cannot start decode workers; decoding in one thread "
            "(set the Dask config distributed.worker.daemon: false for embed.decode_workers to apply)",
        )
        _warned_daemon.set()
        workers = 0
    with _workers_lock:
        current = _workers
        if current is not None and (current.broken or current.workers != workers or current.spec.key() != spec.key()):
            current.close()
            current = None
        if current is None:
            current = _workers = DecodeWorkers(spec, workers)
        return current


def close_decode_workers() -> None:
    """Stop this process's decode workers (they also stop when it exits)."""
    global _workers
    with _workers_lock:
        if _workers is not None:
            _workers.close()
            _workers = None


def discard_decode_workers(workers: DecodeWorkers) -> None:
    """Forget workers that failed; the next shard starts new ones."""
    global _workers
    with _workers_lock:
        if _workers is workers:
            _workers = None
    try:
        workers.close()
    except Exception:  # a broken pool may fail to shut down cleanly; it is gone either way
        log.debug("closing broken decode workers", exc_info=True)


# --------------------------------------------------------------------------------------------------
# A shard's batches


def batch_jobs(tar_path: Path, wanted: set[str] | None, batch_size: int) -> Iterator[BatchJob]:
    """The shard's wanted samples (None: all) in tar order, `batch_size` at a time; image bytes stay in the tar."""
    stat = os.stat(tar_path)
    identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    samples = iter_samples(tar_path, wanted, read=("txt",))
    for chunk in chunked(samples, batch_size):
        yield BatchJob(
            tar=str(tar_path),
            uids=[s.uid for s in chunk],
            images=[_image_span(s) for s in chunk],
            captions=[s.caption for s in chunk],
            urls=[s.url for s in chunk],
            tar_identity=identity,
        )


def _image_span(sample: Sample) -> Span | None:
    for extension in IMAGE_EXTENSIONS:
        if extension in sample.spans:
            return sample.spans[extension]
    return None


def chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_DONE = object()


def decoded_batches(
    workers: DecodeWorkers, jobs: Iterator[BatchJob], pin: bool, ahead: int | None = None
) -> Iterator[DecodedBatch]:
    """The jobs' decoded batches in order. A reader thread reads the tar, keeps `ahead` jobs with the workers
    and queues their results (pinned when `pin`), so the calling thread only takes finished batches.

    A worker that dies fails the shard with DecodeWorkerError; the workers are then replaced for the next one.
    """
    ahead = ahead or max(2, BATCHES_AHEAD_PER_WORKER * workers.workers)
    ready: queue.Queue[Any] = queue.Queue(maxsize=READY_BATCHES)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        pending: deque[Future[DecodedBatch]] = deque()
        try:
            for job in jobs:
                pending.append(workers.submit(job))
                if len(pending) >= ahead and not put(_finished(workers, pending.popleft(), pin)):
                    return
            while pending:
                if not put(_finished(workers, pending.popleft(), pin)):
                    return
            put(_DONE)
        except BaseException as err:  # handed to the model thread, which raises it
            put(err)
        finally:
            for future in pending:
                workers.cancel(future)

    reader = threading.Thread(target=read, name="embed-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BrokenProcessPool):
                discard_decode_workers(workers)
                raise DecodeWorkerError(f"embed: a decode worker process died ({item}); the shard fails") from item
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join()


def _finished(workers: DecodeWorkers, future: Future[DecodedBatch], pin: bool) -> DecodedBatch:
    batch = workers.result(future)
    if pin:
        if batch.images is not None:
            batch.replace_images(batch.images.pin_memory())
        if batch.tokens is not None:
            batch.tokens = batch.tokens.pin_memory()
    return batch


# --------------------------------------------------------------------------------------------------
# On the device


def model_input(loaded: LoadedClip, batch: DecodedBatch) -> torch.Tensor:
    """The batch's images as the model takes them: uint8 pixels go over to the device and are normalised there;
    a float batch (normalised by a worker for a model on the cpu, or made by a whole `preprocess`) is taken as
    it is."""
    import torch

    if batch.jpeg_rows:
        assert loaded.pixel_steps is not None
        return loaded.pixel_steps.to_model_input(gpu_pixels(loaded, batch), loaded.device)
    assert batch.images is not None
    if loaded.pixel_steps is None or batch.images.dtype != torch.uint8:
        return batch.images.to(loaded.device, non_blocking=True)
    return loaded.pixel_steps.to_model_input(batch.images, loaded.device)


def gpu_pixels(loaded: LoadedClip, batch: DecodedBatch) -> torch.Tensor:
    """(n, H, W, 3) uint8 on the device: the JPEGs decoded there, resized and cropped as open_clip's steps do,
    with the images the workers decoded (other formats) in their rows. A JPEG the GPU cannot decode fails
    the shard: its header was readable, so this is not the common case of a damaged file."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    steps = gpu_steps(loaded)
    decoded = decode_jpeg(batch.jpegs(), mode=ImageReadMode.RGB, device=loaded.device)
    resized = [steps(image) for image in decoded]
    side = resized[0].shape[-1]
    out = torch.empty((len(batch), side, side, 3), dtype=torch.uint8, device=loaded.device)
    jpeg_rows = torch.tensor(batch.jpeg_rows, device=loaded.device)
    out[jpeg_rows] = torch.stack(resized).permute(0, 2, 3, 1)
    on_gpu = set(batch.jpeg_rows)
    others = [row for row in range(len(batch)) if row not in on_gpu]
    if others:
        assert batch.images is not None
        out[torch.tensor(others, device=loaded.device)] = batch.images.to(loaded.device, non_blocking=True)
    return out


def gpu_steps(loaded: LoadedClip) -> Callable[[torch.Tensor], torch.Tensor]:
    """open_clip's resize and centre crop, applied to a (3, H, W) uint8 tensor on the device."""
    from torchvision.transforms import CenterCrop, Compose, Resize

    steps = loaded.pixel_steps
    transforms = list(getattr(steps.pil, "transforms", [])) if steps is not None else []
    geometric = [t for t in transforms if isinstance(t, Resize | CenterCrop)]
    if steps is None or [type(t) for t in geometric] != [Resize, CenterCrop]:
        raise ConfigError(
            "embed.decode: 'gpu' supports open_clip's resize + centre-crop preprocess only; "
            f"this model's is {transforms}; use draft or full"
        )
    return Compose(geometric)


@dataclass
class HostCopy:
    """A batch's results on their way to host memory; `numpy` waits for them."""

    image: torch.Tensor
    text: torch.Tensor
    scores: torch.Tensor
    event: Any = None

    def numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return self.image.numpy(), self.text.numpy(), self.scores.numpy()


def encode_to_host(loaded: LoadedClip, images: torch.Tensor, tokens: torch.Tensor) -> HostCopy:
    """Both towers on a batch and the copies back started: on cuda into pinned buffers, without waiting, so
    the next batch is queued on the device while these copy. Embeddings as stored (float16), scores float32."""
    import torch

    from curate.clip import encode

    with torch.inference_mode():
        image_emb, text_emb = encode(loaded, images, tokens)
        assert image_emb is not None and text_emb is not None
        scores = (image_emb * text_emb).sum(dim=-1)
        outputs = (image_emb.half(), text_emb.half(), scores)
        if loaded.device.type != "cuda":
            return HostCopy(*outputs)
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in outputs]
        for target, source in zip(host, outputs, strict=True):
            target.copy_(source, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return HostCopy(*host, event=event)


def pipelined(items: Iterable[Any], start: Callable[[Any], HostCopy]) -> Iterator[tuple[Any, HostCopy]]:
    """(item, copy) pairs, each yielded once the next item's work was started: copies overlap the next batch."""
    previous: tuple[Any, HostCopy] | None = None
    for item in items:
        current = (item, start(item))
        if previous is not None:
            yield previous
        previous = current
    if previous is not None:
        yield previous
