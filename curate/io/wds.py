"""The one reader of webdataset tar shards: webdataset's key rule, a byte-offset index, samples and counts.

A sample is a run of consecutive members whose names share a key, split as webdataset splits them
(`webdataset.tariterators.base_plus_ext`: the key is the path up to the first dot of the basename, the
extension is everything after it, lower-cased here as webdataset does). A sample's image is whichever
member of IMAGE_EXTENSIONS it has, so jpg, png and webp shards read alike everywhere.

Everything starts from `index_tar`: one pass over the tar's headers gives each member's byte span, and
readers fetch a member with one `pread` instead of streaming the whole tar. Only uncompressed tars are
read, because the spans are offsets into the file.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tarfile
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_META_NAME = re.compile(r"__[^/]*__($|/)")  # webdataset's default skip_meta: such members are not samples
_END_BLOCK = bytes(tarfile.BLOCKSIZE)


class TarReadError(ValueError):
    """A tar that cannot be read: truncated, damaged, compressed or not a tar. The message names the file."""


class Span(NamedTuple):
    """Where a member's bytes lie in its tar."""

    offset: int
    size: int


@dataclass(frozen=True)
class IndexedSample:
    key: str
    members: dict[str, Span]  # extension -> span

    @property
    def image_extension(self) -> str | None:
        return image_extension_of(self.members)


@dataclass(frozen=True)
class TarIndex:
    """The samples of one tar, in tar order, with the byte span of every member."""

    path: Path
    samples: tuple[IndexedSample, ...]

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, span: Span) -> bytes:
        """One member's bytes; use a `MemberReader` for many."""
        with MemberReader(self.path) as reader:
            return reader.read(span)


@dataclass(frozen=True)
class Sample:
    """One sample of a curate shard (img2dataset's download tars, curated tars): it has a .json with a uid."""

    key: str
    uid: str
    meta: dict[str, Any]  # the parsed .json
    members: dict[str, bytes]  # extension -> bytes, of the members that were read (all by default)
    spans: dict[str, Span]  # extension -> span, of every member

    @property
    def image_extension(self) -> str | None:
        return image_extension_of(self.spans)

    @property
    def image(self) -> bytes | None:
        extension = self.image_extension
        return self.members.get(extension) if extension is not None else None

    @property
    def caption(self) -> str:
        """The .txt member, else the caption in the .json, else ''."""
        if "txt" in self.members:
            return self.members["txt"].decode("utf-8", errors="replace")
        return str(self.meta.get("caption") or "")

    @property
    def url(self) -> str | None:
        return self.meta.get("url")


def image_extension_of(extensions: Collection[str]) -> str | None:
    """The first of IMAGE_EXTENSIONS among a sample's member extensions."""
    for extension in IMAGE_EXTENSIONS:
        if extension in extensions:
            return extension
    return None


class MemberReader:
    """Member bytes of one tar by span: one open descriptor and a `pread` per member."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)

    def read(self, span: Span) -> bytes:
        data = os.pread(self._fd, span.size, span.offset)
        if len(data) != span.size:
            raise TarReadError(f"{self.path}: truncated tar (a member ends past the end of the file)")
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> MemberReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def index_tar(path: Path | str) -> TarIndex:
    """Every sample of a tar and its members' spans, from one pass over the tar's headers."""
    from webdataset.tariterators import base_plus_ext  # webdataset imports torch: not at module import

    path = Path(path)
    try:
        with tarfile.open(path, "r:") as tar:  # "r:": uncompressed only, so spans are offsets into the file
            named = (
                (split, member) for member in tar if (split := _key_and_extension(member, base_plus_ext)) is not None
            )
            grouped = itertools.groupby(named, key=lambda item: item[0][0])
            samples = tuple(_indexed_sample(path, key, group) for key, group in grouped)
            end = tar.offset
    except tarfile.TarError as err:
        raise TarReadError(f"{path}: not a readable tar ({err})") from err
    _check_end_of_archive(path, end)
    return TarIndex(path, samples)


def _indexed_sample(path: Path, key: str, group: Iterable[tuple[tuple[str, str], tarfile.TarInfo]]) -> IndexedSample:
    members: dict[str, Span] = {}
    for (_, extension), member in group:
        if extension in members:
            raise TarReadError(f"{path}: two {extension!r} members in sample {key!r}")
        members[extension] = Span(member.offset_data, member.size)
    return IndexedSample(key, members)


def _key_and_extension(
    member: tarfile.TarInfo, base_plus_ext: Callable[[str], tuple[str | None, str | None]]
) -> tuple[str, str] | None:
    """webdataset's (key, extension) of a member, or None for what webdataset skips."""
    name = member.name
    if not member.isreg() or (name.startswith("__") and _META_NAME.match(name)):
        return None
    key, extension = base_plus_ext(name)
    return None if key is None else (key, extension.lower())


def _check_end_of_archive(path: Path, end: int) -> None:
    """tarfile stops quietly at a header cut short or missing; a complete tar has its zero end block there."""
    with open(path, "rb") as stream:
        stream.seek(end)
        if stream.read(tarfile.BLOCKSIZE) != _END_BLOCK:
            raise TarReadError(f"{path}: truncated tar (no end-of-archive block after its last complete member)")


def iter_samples(
    path: Path | str, wanted: Collection[str] | None = None, *, read: Collection[str] | None = None
) -> Iterator[Sample]:
    """The samples of a curate shard whose uid is in `wanted` (all when None), in tar order.

    Every sample must have a .json with a uid, and no uid may appear twice in the tar (both checked for
    every sample, wanted or not). `read` limits which members' bytes are read (the .json always is).
    """
    index = index_tar(path)
    seen: dict[str, str] = {}
    with MemberReader(index.path) as reader:
        for entry in index.samples:
            meta = _read_meta(index.path, entry, reader)
            uid = _uid(index.path, entry.key, meta)
            if uid in seen:
                raise ValueError(f"{index.path}: uid {uid!r} appears in two samples ({seen[uid]!r}, {entry.key!r})")
            seen[uid] = entry.key
            if wanted is not None and uid not in wanted:
                continue
            members = {
                extension: reader.read(span)
                for extension, span in entry.members.items()
                if read is None or extension in read or extension == "json"
            }
            yield Sample(entry.key, uid, meta, members, entry.members)


def _read_meta(path: Path, entry: IndexedSample, reader: MemberReader) -> dict[str, Any]:
    if "json" not in entry.members:
        raise ValueError(f"{path}: sample {entry.key!r} has no .json (not an img2dataset shard?)")
    try:
        meta = json.loads(reader.read(entry.members["json"]))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: sample {entry.key!r} has an unreadable .json ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: sample {entry.key!r}: its .json is not an object")
    return meta


def _uid(path: Path, key: str, meta: dict[str, Any]) -> str:
    """The run's uid: curated samples whose json "uid" is the 32-hex form keep the run's own as "source_uid"."""
    if meta.get("uid") is None:
        raise ValueError(f"{path}: sample {key!r} has no uid in its .json")
    return str(meta.get("source_uid") or meta["uid"])


def iter_members(path: Path | str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, extension -> bytes) for every sample of any webdataset tar (no .json needed), in tar order."""
    index = index_tar(path)
    with MemberReader(index.path) as reader:
        for entry in index.samples:
            yield entry.key, {extension: reader.read(span) for extension, span in entry.members.items()}


def count_samples(path: Path | str) -> int:
    """The number of samples with an image member (of any of IMAGE_EXTENSIONS)."""
    return sum(1 for sample in index_tar(path).samples if sample.image_extension is not None)
