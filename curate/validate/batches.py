"""Training batches from webdataset shards, built ahead of the model by DataLoader worker processes.

The stream is a pure function of the seed: shards are shuffled per epoch, samples pass a seeded shuffle
buffer, and batch b holds samples b*B .. (b+1)*B - 1 of that stream, each decoded with its own index.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger(__name__)

PREFETCH_BATCHES = 2  # batches each decode worker builds ahead of the model

Decoder = Callable[[int, bytes, str], tuple[torch.Tensor, torch.Tensor]]
"""(index in the stream, jpg bytes, caption) -> the two tensors of one sample."""


def iter_raw_samples(shards: Sequence[Path], seed: int, shuffle_buffer: int) -> Iterator[tuple[bytes, str]]:
    """(jpg bytes, caption) forever: epoch after epoch, shard order and samples shuffled with the seed."""
    import webdataset as wds

    for epoch in itertools.count():
        order = [str(s) for s in shards]
        random.Random(f"{seed}:{epoch}:shards").shuffle(order)
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(order),
            wds.tarfile_to_samples(),
            wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(f"{seed}:{epoch}:samples")),
        )
        n = 0
        for sample in pipeline:
            if "jpg" not in sample or "txt" not in sample:
                log.debug("skipping %s: no jpg+txt pair", sample.get("__key__"))
                continue
            n += 1
            yield sample["jpg"], sample["txt"].decode("utf-8")
        if n == 0:
            raise ValueError(f"no <key>.jpg + <key>.txt samples in {len(shards)} shard(s): {order[:3]}...")


class BatchStream(IterableDataset):
    """Batches `start_step`, `start_step + 1`, ... of the sample stream, forever.

    With N DataLoader workers, worker k builds batches k, k + N, ... and the DataLoader hands them out in
    that round-robin order, so the batches are the same for any N. Every worker reads all samples (reading
    a tar is cheap next to decoding) and decodes only its own batches.
    """

    def __init__(
        self,
        shards: Sequence[Path],
        decoder: Decoder,
        seed: int,
        batch_size: int,
        shuffle_buffer: int,
        start_step: int = 0,
    ) -> None:
        self.shards, self.decoder, self.seed = list(shards), decoder, seed
        self.batch_size, self.shuffle_buffer, self.start_step = batch_size, shuffle_buffer, start_step

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        worker_id, n_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        samples = iter_raw_samples(self.shards, self.seed, self.shuffle_buffer)
        for _ in range(self.start_step * self.batch_size):
            next(samples)
        for step in itertools.count(self.start_step):
            chunk = list(itertools.islice(samples, self.batch_size))
            if (step - self.start_step) % n_workers != worker_id:
                continue
            first = step * self.batch_size
            decoded = [self.decoder(first + i, jpg, caption) for i, (jpg, caption) in enumerate(chunk)]
            yield torch.stack([d[0] for d in decoded]), torch.stack([d[1] for d in decoded])


def make_batches(
    shards: Sequence[Path],
    decoder: Decoder,
    seed: int,
    batch_size: int,
    shuffle_buffer: int,
    start_step: int = 0,
    workers: int = 2,
    prefetch_batches: int = PREFETCH_BATCHES,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches forever, from step `start_step` on, built ahead by `workers` processes.

    Processes, not threads: decoding in threads of the training process holds the GIL for long stretches
    while the training thread waits to launch its next kernel. Skipping to `start_step` reads (but does
    not decode) the samples before it, so a resumed run sees exactly the batches an uninterrupted one
    would. workers=0 builds each batch in the training process when the model asks for it.
    """
    loader = DataLoader(
        BatchStream(shards, decoder, seed, batch_size, shuffle_buffer, start_step),
        batch_size=None,  # the dataset yields whole batches
        num_workers=workers,
        prefetch_factor=prefetch_batches if workers else None,
    )
    batches = iter(loader)
    try:
        yield from batches
    finally:
        # now, not whenever the iterator is collected: the workers hold decoded batches and open shards
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
