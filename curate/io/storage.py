"""Paths a user gives: a local path, or an fsspec URL (`s3://`, `gs://`, `hf://`, `memory://`, ...).

A local path (and a `file://` URL) is read with the standard library, exactly as before URLs were accepted. A
URL is read through the filesystem fsspec picks for its protocol, built with the config's `storage.options`;
the protocol's package also reads its usual environment variables (s3fs: `AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ...). A location is a `Path` for a local file and a `str` for a URL.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path, PurePosixPath
from typing import IO, Any

from curate.config import ConfigError
from curate.extras import require
from curate.stage import BLOCK, content_identity

Location = Path | str
"""A local file (Path) or an fsspec URL (str)."""

PROTOCOL_EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3")}
"""Protocols whose package is one of curate's extras: (module, extra)."""
_LOCAL_PROTOCOLS = ("file", "local")


class StorageError(ConfigError):
    """A URL that cannot be used (unknown protocol, its package missing); the message names the URL."""


def protocol_of(path: str) -> str | None:
    """The protocol of a URL (`s3` of `s3://bucket/key`), None for a local path."""
    head, sep, _ = path.partition("://")
    if not sep or not head or "/" in head or "\\" in head:
        return None
    return head.split("::")[-1].lower()  # a chained URL (`simplecache::s3://...`) is read as its last protocol


def locate(path: str | Path) -> Location:
    """A user's path as a location: `~` expanded and `file://` stripped for local files, a URL as given."""
    if isinstance(path, Path):
        return path.expanduser()
    protocol = protocol_of(path)
    if protocol is None:
        return Path(os.path.expanduser(path))
    if protocol in _LOCAL_PROTOCOLS and "::" not in path:
        return Path(path.partition("://")[2])
    return path


def has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def name_of(location: Location) -> str:
    """The file's name: the last part of a path or of a URL's key."""
    return location.name if isinstance(location, Path) else PurePosixPath(location.split("://", 1)[-1]).name


@dataclass(frozen=True)
class Storage:
    """Reads locations; `options` go to the fsspec filesystem of every URL (endpoint, credentials, anon)."""

    options: dict[str, Any] = field(default_factory=dict)

    def filesystem(self, url: str) -> tuple[Any, str]:
        """The fsspec filesystem of a URL and the URL's path within it."""
        protocol = protocol_of(url) or "file"
        if protocol in PROTOCOL_EXTRAS:
            module, extra = PROTOCOL_EXTRAS[protocol]
            require(module, extra, f"{url}: {protocol}://")
        import fsspec

        try:
            return fsspec.core.url_to_fs(url, **self.options)
        except ImportError as err:
            raise StorageError(f"{url}: {protocol}:// needs a package that is not installed ({err})") from None
        except ValueError as err:
            if "not known" in str(err).lower():
                raise StorageError(f"{url}: unknown storage protocol {protocol!r}") from None
            raise StorageError(f"{url}: cannot use storage.options here: {err}") from None
        except TypeError as err:
            raise StorageError(f"{url}: storage.options not accepted by the {protocol}:// filesystem: {err}") from None

    def open(self, location: Location) -> IO[bytes]:
        """The file's bytes as a seekable binary stream."""
        if isinstance(location, Path):
            return open(location, "rb")
        fs, path = self.filesystem(location)
        return fs.open(fresh(fs, path), "rb")

    def copy_to(self, location: Location, out: IO[bytes]) -> None:
        """The file's bytes written to `out`, a block at a time."""
        try:
            with self.open(location) as source:
                shutil.copyfileobj(source, out, BLOCK)
        except FileNotFoundError:
            raise FileNotFoundError(f"{location}: no such file or object") from None

    def info(self, location: Location) -> dict[str, Any] | None:
        """`{"type": "file" | "directory" | ..., "size": bytes}`, or None when nothing is there. Any other
        failure (no permission, no connection) is an OSError."""
        if isinstance(location, Path):
            if not location.exists():
                return None
            return {"type": "file" if location.is_file() else "directory", "size": location.stat().st_size}
        fs, path = self.filesystem(location)
        fs.invalidate_cache(path)  # a listing cached by an earlier call in this process may be stale
        try:
            return fs.info(path)
        except FileNotFoundError:
            return None
        except OSError:
            raise
        except Exception as err:  # each filesystem has its own errors (botocore's EndpointConnectionError, ...)
            raise OSError(f"{type(err).__name__}: {err}") from err

    def size(self, location: Location) -> int:
        if isinstance(location, Path):
            return location.stat().st_size
        info = self.info(location)
        if info is None:
            raise FileNotFoundError(location)
        return int(info["size"])

    def glob(self, pattern: str) -> list[tuple[Location, bool]]:
        """The locations matching a glob, in name order, each with whether it is a file."""
        location = locate(pattern)
        if isinstance(location, Path):
            return [(Path(match), Path(match).is_file()) for match in sorted(glob(str(location)))]
        fs, path = self.filesystem(location)
        fs.invalidate_cache()
        try:
            found = fs.glob(path, detail=True)
        except FileNotFoundError:  # e.g. no such bucket
            return []
        return [(fs.unstrip_protocol(p), found[p].get("type") == "file") for p in sorted(found)]

    def download(self, url: str, local: Path) -> None:
        """Copy the object at `url` to the local file `local`. FileNotFoundError when nothing is there; any
        other failure is an OSError naming the URL."""
        fs, path = self.filesystem(url)
        try:
            fs.get_file(fresh(fs, path), str(local))
        except OSError:
            raise
        except Exception as err:  # each filesystem has its own errors
            raise OSError(f"cannot read {url}: {type(err).__name__}: {err}") from err

    def upload(self, local: Path, url: str) -> None:
        """Copy the local file `local` to `url`; a failure is an OSError naming the URL."""
        fs, path = self.filesystem(url)
        try:
            fs.put_file(str(local), path)
        except OSError:
            raise
        except Exception as err:  # each filesystem has its own errors
            raise OSError(f"cannot write {url}: {type(err).__name__}: {err}") from err

    def content_identity(self, location: Location, name: str | None = None) -> dict[str, Any]:
        """`curate.stage.content_identity` of a location: a URL and a local copy of it are the same."""
        if isinstance(location, Path):
            return content_identity(location, name)
        fs, path = self.filesystem(location)
        size = self.size(location)
        hasher = hashlib.sha256()
        if size:
            hasher.update(fs.cat_file(path, start=0, end=min(BLOCK, size)))
        if size > BLOCK:
            hasher.update(fs.cat_file(path, start=max(BLOCK, size - BLOCK), end=size))
        identity: dict[str, Any] = {"size": size, "sha256_ends": hasher.hexdigest()}
        if name is not None:
            identity["name"] = name
        return identity


def fresh(fs: Any, path: str) -> str:
    """`path`, with the filesystem's cached listings of it and its folder dropped: s3fs answers `open` and
    `cat` from a listing cached earlier in this process, so an object written since by another would be missing."""
    fs.invalidate_cache(path.rsplit("/", 1)[0])
    fs.invalidate_cache(path)
    return path


LOCAL = Storage()
"""Storage without options: local paths, and URLs read with their protocol's defaults and environment."""
