"""Training batches from webdataset shards, built ahead of the model by DataLoader worker processes.

The stream is a pure function of the seed: shards are shuffled per epoch, samples pass a seeded shuffle
buffer, and batch b holds samples b*B .. (b+1)*B - 1 of that stream, each decoded with its own index.
Shards are indexed once (`curate.io.wds.index_tar`: the byte spans of every member, from one pass over
the tar headers, kept here as each training sample's image and txt spans); the shuffle then moves (shard,
sample) references, and a sample's bytes are read only by the worker that decodes it.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from curate.io.wds import IMAGE_EXTENSIONS, index_tar

if TYPE_CHECKING:
    from curate.stages.validate.train import TrainRecipe

log = logging.getLogger(__name__)

PREFETCH_BATCHES = 2  # batches each decode worker builds ahead of the model
OPEN_SHARDS = 32  # per reader: the shuffle buffer spans a few shards at a time; thousands would exhaust fds

Decoder = Callable[[int, bytes, str], tuple[torch.Tensor, torch.Tensor]]
"""(index in the stream, image bytes, caption) -> the two tensors of one sample. A decoder that also has
`prepare(image bytes, caption)` (the part that does not depend on the index: decoding, tokenising; a tuple of
PIL images and tensors) and `finish(index, prepared)` gets its prepared samples kept across epochs
(`PreparedCache`)."""
Prepared = tuple[object, ...]


def training_spans(path: Path) -> np.ndarray:
    """(samples, 4) int64: image offset, image size, txt offset, txt size of each sample of the shard that
    has an image (any of IMAGE_EXTENSIONS) and a .txt, in tar order. A compact array rather than the
    TarIndex itself, because every decode worker holds one per shard for the whole run."""
    spans: list[tuple[int, int, int, int]] = []
    for sample in index_tar(path).samples:
        image = sample.image_extension
        if image is not None and "txt" in sample.members:
            spans.append((*sample.members[image], *sample.members["txt"]))
        else:
            log.debug("%s: skipping %s, no image+txt pair", path, sample.key)
    return np.asarray(spans, dtype=np.int64).reshape(-1, 4)


class SampleReader:
    """The shards' indexes (built once, when the stream first reaches a shard) and their bytes."""

    def __init__(self, shards: Sequence[Path]) -> None:
        self.shards = [Path(s) for s in shards]
        self._indexes: dict[int, np.ndarray] = {}
        self._files: OrderedDict[int, int] = OrderedDict()

    def index(self, shard: int) -> np.ndarray:
        """The shard's `training_spans`."""
        if shard not in self._indexes:
            self._indexes[shard] = training_spans(self.shards[shard])
        return self._indexes[shard]

    def refs(self, seed: int, shuffle_buffer: int) -> Iterator[tuple[int, int]]:
        """(shard, sample) forever: epoch after epoch, shard order and samples shuffled with the seed."""
        import webdataset as wds

        for epoch in itertools.count():
            order = list(range(len(self.shards)))
            random.Random(f"{seed}:{epoch}:shards").shuffle(order)
            in_order = ((shard, i) for shard in order for i in range(len(self.index(shard))))
            shuffle = wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(f"{seed}:{epoch}:samples"))
            n = 0
            for ref in shuffle(in_order):
                n += 1
                yield ref
            if n == 0:
                names = [str(s) for s in self.shards[:3]]
                images = "/".join(IMAGE_EXTENSIONS)
                raise ValueError(f"no <key>.{images} + <key>.txt samples in {len(self.shards)} shard(s): {names}...")

    def read(self, shard: int, sample: int) -> tuple[bytes, str]:
        fd = self._file(shard)
        image_offset, image_size, txt_offset, txt_size = (int(v) for v in self.index(shard)[sample])
        return os.pread(fd, image_size, image_offset), os.pread(fd, txt_size, txt_offset).decode("utf-8")

    def _file(self, shard: int) -> int:
        """An open descriptor of the shard; only the most recently read OPEN_SHARDS stay open."""
        if shard in self._files:
            self._files.move_to_end(shard)
        else:
            if len(self._files) >= OPEN_SHARDS:
                os.close(self._files.popitem(last=False)[1])
            self._files[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return self._files[shard]

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


def iter_raw_samples(shards: Sequence[Path], seed: int, shuffle_buffer: int) -> Iterator[tuple[bytes, str]]:
    """(image bytes, caption) forever, in the order training sees them."""
    reader = SampleReader(shards)
    try:
        for ref in reader.refs(seed, shuffle_buffer):
            yield reader.read(*ref)
    finally:
        reader.close()


class PreparedCache:
    """Prepared samples (a decoder's `prepare`: e.g. the decoded image and the tokens) by (shard, sample), filled
    until `budget` bytes and then kept as they are.

    A validation set of a few thousand samples is seen for tens of epochs, and decoding its JPEGs again every
    epoch costs more CPU than the augmentation that follows. Filling once and never evicting: when the data
    does not fit, a random order through it would miss an LRU cache almost always, while a fixed part of it
    is still hit in proportion to its size.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._items: dict[tuple[int, int], Prepared] = {}

    def get(self, ref: tuple[int, int]) -> Prepared | None:
        return self._items.get(ref)

    def add(self, ref: tuple[int, int], prepared: Prepared) -> None:
        size = prepared_bytes(prepared)
        if self.used + size <= self.budget:
            self._items[ref] = prepared
            self.used += size


def prepared_bytes(prepared: Prepared) -> int:
    """The memory a prepared sample holds: its PIL images' pixels and its tensors' elements."""
    return sum(_item_bytes(item) for item in prepared)


def _item_bytes(item: object) -> int:
    if isinstance(item, Image.Image):
        width, height = item.size
        return width * height * len(item.getbands())
    if isinstance(item, torch.Tensor):
        return item.element_size() * item.nelement()
    return int(np.asarray(item).nbytes)


@dataclass
class BatchStream(IterableDataset):
    """Batches `start_step`, `start_step + 1`, ... of the sample stream, forever.

    With N DataLoader workers, worker k builds batches k, k + N, ... and the DataLoader hands them out in
    that round-robin order, so the batches are the same for any N. Every worker runs the same shuffle over
    (shard, sample) references, which costs no reading, and reads and decodes only its own batches.
    """

    shards: list[Path]
    decoder: Decoder
    seed: int
    batch_size: int
    shuffle_buffer: int
    start_step: int = 0
    cache_bytes: int = 0
    """Per process, for a decoder with `prepare` and `finish` (0: no cache)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        worker_id, n_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        reader = SampleReader(self.shards)
        decode = self._decode_with(reader)
        refs = itertools.islice(reader.refs(self.seed, self.shuffle_buffer), self.start_step * self.batch_size, None)
        try:
            for step in itertools.count(self.start_step):
                chunk = list(itertools.islice(refs, self.batch_size))
                if (step - self.start_step) % n_workers != worker_id:
                    continue
                first = step * self.batch_size
                decoded = [decode(first + i, ref) for i, ref in enumerate(chunk)]
                yield torch.stack([d[0] for d in decoded]), torch.stack([d[1] for d in decoded])
        finally:
            reader.close()

    def _decode_with(self, reader: SampleReader) -> Callable[[int, tuple[int, int]], tuple[torch.Tensor, torch.Tensor]]:
        """(index in the stream, (shard, sample)) -> the sample's tensors, its prepared form cached when it can be."""
        prepare, finish = getattr(self.decoder, "prepare", None), getattr(self.decoder, "finish", None)
        if self.cache_bytes <= 0 or prepare is None or finish is None:
            return lambda index, ref: self.decoder(index, *reader.read(*ref))
        cache = PreparedCache(self.cache_bytes)

        def decode(index: int, ref: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
            prepared = cache.get(ref)
            if prepared is None:
                prepared = prepare(*reader.read(*ref))
                cache.add(ref, prepared)
            return finish(index, prepared)

        return decode


def make_batches(
    shards: Sequence[Path],
    decoder: Decoder,
    recipe: TrainRecipe,
    start_step: int = 0,
    prefetch_batches: int = PREFETCH_BATCHES,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The recipe's batches forever, from step `start_step` on, built ahead by `recipe.decode_workers` processes.

    Processes, not threads: decoding in threads of the training process holds the GIL for long stretches
    while the training thread waits to launch its next kernel. The stream is one endless pass, so the same
    worker processes serve the whole run (there is no epoch end at which a DataLoader would restart them).
    Skipping to `start_step` moves past the references before it without reading them, so a resumed run sees
    exactly the batches an uninterrupted one would. decode_workers=0 builds each batch in the training
    process when the model asks for it. `pin_memory` (for a model on cuda) puts batches in page-locked memory,
    so their copies to the GPU run asynchronously.
    """
    stream = BatchStream(
        list(shards),
        decoder,
        recipe.seed,
        recipe.batch_size,
        recipe.shuffle_buffer,
        start_step,
        cache_bytes=recipe.decoded_cache_mb * 2**20,
    )
    loader = DataLoader(
        stream,
        batch_size=None,  # the dataset yields whole batches
        num_workers=recipe.decode_workers,
        prefetch_factor=prefetch_batches if recipe.decode_workers else None,
        pin_memory=pin_memory,
    )
    batches = iter(loader)
    try:
        yield from batches
    finally:
        # now, not whenever the iterator is collected: the workers hold decoded batches and open shards
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
