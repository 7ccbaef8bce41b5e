"""Find a sample's image by uid in a run's webdataset tars, and make small thumbnails of it.

img2dataset's download tars name samples by its own keys, and the uid is in each sample's .json, so
finding an image means reading a tar's .json members once (`curate.io.wds`); the result is an
`ImageRef` (tar, byte offset, size) that reads the image back with one seek.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.io.wds import iter_samples
from curate.stage import RunLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageRef:
    tar: Path
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.tar, "rb") as stream:
            stream.seek(self.offset)
            return stream.read(self.size)


def scan_tar(tar_path: Path, wanted: set[str] | None = None) -> dict[str, ImageRef]:
    """uid -> ImageRef for the samples with an image of a curate tar (only the `wanted` uids, when given)."""
    refs = {}
    for sample in iter_samples(tar_path, wanted, read=()):
        if sample.image_extension is not None:
            refs[sample.uid] = ImageRef(tar_path, *sample.spans[sample.image_extension])
    return refs


def download_shards_of(layout: RunLayout, uids: Iterable[str]) -> dict[str, list[str]]:
    """download shard -> the given uids it downloaded, from the download stage's fate parts."""
    from curate.stages.download import DownloadOutputs

    download = DownloadOutputs(layout)
    remaining = set(uids)
    shards: dict[str, list[str]] = {}
    for shard in download.fate_shards():
        if not remaining:
            break
        fates = pq.read_table(download.fates_path(shard), columns=["uid", "status"])
        kept = fates.filter(pc.equal(fates["status"], "kept"))["uid"].to_pylist()
        found = remaining.intersection(kept)
        if found:
            shards[shard] = sorted(found)
            remaining -= found
    return shards


def locate_images(layout: RunLayout, uids: Iterable[str]) -> dict[str, ImageRef]:
    """uid -> ImageRef in the download tars, for the given uids that have a downloaded image."""
    from curate.stages.download import DownloadOutputs

    refs: dict[str, ImageRef] = {}
    for shard, shard_uids in download_shards_of(layout, uids).items():
        tar_path = DownloadOutputs(layout).tar_path(shard)
        if tar_path.exists():
            refs.update(scan_tar(tar_path, set(shard_uids)))
    return refs


def thumbnail(data: bytes, max_px: int, quality: int = 82) -> bytes | None:
    """A JPEG no larger than max_px on either side; None when the bytes are not a readable image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            image.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=quality, optimize=True)
            return out.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # the bomb error is not an OSError
        log.debug("cannot thumbnail an image: %s", err)
        return None
