"""Local copies of what a run reads whole from a URL (a checkpoint, an evaluation set): each machine fetches
an object once into a cache keyed by what the object is, so an object that changes in the bucket is fetched
again and an unchanged one never twice.

The cache is `$CURATE_CACHE_DIR` (default `~/.cache/curate`)/objects. A file is keyed by its content
identity (size and a hash of its first and last MiB, two ranged reads); a folder by its listing (every
object's relative name, size and ETag or modification time). A copy is written under a temporary name and
renamed into place, so a reader never sees a part-written one and processes on one machine may race.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from curate.io.storage import Location, Storage, StorageError, locate, name_of
from curate.stage import digest

CACHE_ENV = "CURATE_CACHE_DIR"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/curate").expanduser() / "objects"


def is_remote(value: str) -> bool:
    """A URL read through fsspec (not a local path, not a `file://` URL)."""
    return isinstance(locate(value), str)


def kind_of(location: Location, storage: Storage, key: str) -> str:
    """ "file" or "directory"; a ConfigError naming `key` and the URL when nothing is there or it is unreachable."""
    try:
        info = storage.info(location)
    except OSError as err:
        raise StorageError(f"{key}: cannot read {location}: {err}") from None
    if info is None:
        raise StorageError(f"{key}: nothing at {location}")
    return "directory" if info.get("type") == "directory" else "file"


def local_copy(location: Location, storage: Storage, key: str) -> Path:
    """A local path with the bytes of `location` (itself when local): the cached copy, fetched if needed."""
    if isinstance(location, Path):
        return location
    if kind_of(location, storage, key) == "directory":
        return _local_folder(location, storage, key)
    return _local_file(location, storage, key)


def _local_file(url: str, storage: Storage, key: str) -> Path:
    identity = storage.content_identity(url)
    target = cache_root() / digest(identity) / name_of(url)
    if target.is_file() and target.stat().st_size == identity["size"]:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(dir=target.parent, prefix=".fetching-")
    try:
        fetched = Path(scratch) / target.name
        _fetch(storage, url, fetched, key)
        os.replace(fetched, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _local_folder(url: str, storage: Storage, key: str) -> Path:
    fs, root = storage.filesystem(url)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    listing = fs.find(root, detail=True)
    files = {
        name[len(root) + 1 :]: info for name, info in sorted(listing.items()) if info.get("type", "file") == "file"
    }
    identity = [[relative, info.get("size"), _version(info)] for relative, info in files.items()]
    target = cache_root() / digest({"folder": identity}) / (name_of(url.rstrip("/")) or "folder")
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".fetching-"))
    try:
        for relative in files:
            destination = scratch / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            _fetch(storage, f"{url.rstrip('/')}/{relative}", destination, key)
        try:
            os.rename(scratch, target)
        except OSError:
            if not target.is_dir():  # another process's finished copy is as good as this one
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _version(info: dict[str, Any]) -> Any:
    for field in ("ETag", "etag", "md5Hash", "crc32c", "LastModified", "mtime", "last_modified"):
        if info.get(field) is not None:
            return str(info[field])
    return None


def _fetch(storage: Storage, url: str, destination: Path, key: str) -> None:
    try:
        storage.download(url, destination)
    except FileNotFoundError:
        raise StorageError(f"{key}: {url} disappeared while it was being fetched") from None
