"""A run directory on a bucket (`output: s3://...`, any fsspec URL), seen by each process through a local mirror.

Every process (the driver, each local pool worker, each Dask worker) keeps its own mirror of the run in its
own temp directory (a Dask worker's `local_directory`): stage code reads and writes local files there,
exactly as for a run on disk. What connects the processes is the bucket alone:

- a read fetches the object into the mirror first (`fetch`), again whenever the object in the bucket has
  changed (its size or ETag), so no process needs another's disk;
- a task's outputs are uploaded under their final names once written, and its done-marker (the fingerprint
  and every object with its size) is uploaded last. Nothing is renamed on the bucket: the marker is the only
  truth, so a reader never trusts an object without its marker, and a redone task simply overwrites the
  objects of one that died before its marker;
- the mirror is a cache of at most `$CURATE_MIRROR_GB` (default 8) GiB: once a task ends, the files used
  longest ago leave it (never one a running task of this process has used), so a worker's disk stays bounded
  however many tasks it runs, and a file many tasks read (a plan, a staged input file) is fetched once.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from curate.io.storage import Storage, StorageError, fresh

MIRROR_GB_ENV = "CURATE_MIRROR_GB"
_MIRRORS: dict[tuple[str, str], RunMirror] = {}
_MIRRORS_LOCK = threading.Lock()


def mirror_of(url: str, storage: Storage) -> RunMirror:
    """This process's mirror of the run at `url` (made on first use, removed when the process exits)."""
    from curate.stage import digest

    key = (url.rstrip("/"), digest(storage.options))
    with _MIRRORS_LOCK:
        if key not in _MIRRORS:
            _MIRRORS[key] = RunMirror(key[0], storage)
        return _MIRRORS[key]


MIRROR_PREFIX = "curate-run-"


def remove_mirrors_of_dead_processes(folder: Path) -> None:
    """Mirrors left by processes that were killed (a SIGKILL skips the exit hook that removes them)."""
    for mirror in folder.glob(f"{MIRROR_PREFIX}*-*"):
        pid = mirror.name.removeprefix(MIRROR_PREFIX).split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(mirror, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def worker_scratch() -> str | None:
    """A Dask worker's own local directory when this process is one; None (the system temp dir) otherwise."""
    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import get_worker

        return str(get_worker().local_directory)
    except (ImportError, ValueError):  # ValueError: not inside a worker
        return None


class RunMirror:
    def __init__(self, url: str, storage: Storage) -> None:
        self.url = url
        self.fs, self.base = storage.filesystem(url)
        self.base = self.base.rstrip("/")
        self.root = Path(tempfile.mkdtemp(prefix=f"{MIRROR_PREFIX}{os.getpid()}-", dir=worker_scratch()))
        atexit.register(shutil.rmtree, self.root, True)
        remove_mirrors_of_dead_processes(self.root.parent)
        self._versions: dict[Path, tuple[Any, ...]] = {}
        self._used: dict[Path, tuple[float, int]] = {}
        """Files in the mirror: when last used, and their size."""
        self._lock = threading.Lock()
        self._scopes: dict[int, set[Path]] = {}
        self.capacity = int(float(os.environ.get(MIRROR_GB_ENV) or 8) * (1 << 30))

    # -- where things are ---------------------------------------------------------------------------------

    def key(self, path: Path) -> str:
        """The bucket key (within the filesystem) of a path in the mirror."""
        relative = path.relative_to(self.root).as_posix()
        return self.base if relative == "." else f"{self.base}/{relative}"

    def url_of(self, path: Path) -> str:
        relative = path.relative_to(self.root).as_posix()
        return self.url if relative == "." else f"{self.url}/{relative}"

    def _path_of(self, key: str) -> Path:
        return self.root / key.removeprefix(self.base).lstrip("/")

    # -- reading ------------------------------------------------------------------------------------------

    def _fresh(self, key: str) -> str:
        return fresh(self.fs, key)

    def info(self, path: Path) -> dict[str, Any] | None:
        key = self._fresh(self.key(path))
        try:
            return self.fs.info(key)
        except FileNotFoundError:
            return None
        except OSError:
            raise
        except Exception as err:  # each filesystem has its own errors
            raise OSError(f"cannot read {self.url_of(path)}: {type(err).__name__}: {err}") from err

    def fetch(self, path: Path) -> Path:
        """`path` in the mirror, holding the object's current bytes; when there is no object, no file either
        (so the caller's read fails as it would on disk)."""
        info = self.info(path)
        if info is None or info.get("type") == "directory":
            if info is None:
                self._forget(path)
            return path
        version = version_of(info)
        self._note_use(path, int(info.get("size") or 0))
        if self._versions.get(path) == version and path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.fs.get_file(self._fresh(self.key(path)), str(part))
            os.replace(part, path)
        except FileNotFoundError:
            part.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            return path
        except Exception as err:
            part.unlink(missing_ok=True)
            raise OSError(f"cannot read {self.url_of(path)}: {type(err).__name__}: {err}") from err
        self._versions[path] = version
        return path

    def open(self, path: Path) -> Any:
        """The object as a seekable binary stream read by ranges (a few record batches of a large file)."""
        try:
            return self.fs.open(self._fresh(self.key(path)), "rb")
        except FileNotFoundError:
            raise FileNotFoundError(self.url_of(path)) from None

    def read_bytes(self, path: Path) -> bytes:
        try:
            return self.fs.cat_file(self._fresh(self.key(path)))
        except FileNotFoundError:
            raise FileNotFoundError(self.url_of(path)) from None
        except OSError:
            raise
        except Exception as err:
            raise OSError(f"cannot read {self.url_of(path)}: {type(err).__name__}: {err}") from err

    def glob(self, folder: Path, pattern: str) -> list[Path]:
        """Mirror paths of the objects under `folder` matching `pattern` (nothing is fetched)."""
        prefix = self.key(folder)
        self.fs.invalidate_cache(prefix)
        try:
            found = self.fs.glob(f"{prefix}/{pattern}", detail=True)
        except FileNotFoundError:
            return []
        return sorted(self._path_of(key) for key, info in found.items() if info.get("type") != "directory")

    def sizes(self, folder: Path) -> dict[Path, int]:
        """Every object under `folder`, with its size (one listing)."""
        prefix = self.key(folder)
        self.fs.invalidate_cache(prefix)
        try:
            found = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        return {self._path_of(key): int(info.get("size") or 0) for key, info in found.items()}

    # -- writing ------------------------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Write one empty object under the run and remove it: a missing bucket, or no permission to write,
        is a config error before any work (else the first task would find it, after fetching)."""
        probe = f"{self.base}/.curate-write-check-{os.getpid()}"
        try:
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as err:
            raise StorageError(f"output: {self.url}: cannot write there: {type(err).__name__}: {err}") from None

    def upload(self, path: Path) -> None:
        """Put the mirror file `path` in the bucket under its final name."""
        try:
            self.fs.put_file(str(path), self.key(path))
        except Exception as err:
            raise OSError(f"cannot write {self.url_of(path)}: {type(err).__name__}: {err}") from err
        info = self.info(path)
        if info is not None:  # the local file is the object's current bytes: a read here fetches nothing
            self._versions[path] = version_of(info)
        self._note_use(path, path.stat().st_size)

    def delete(self, paths: list[Path]) -> None:
        keys = [self.key(p) for p in paths]

        for path in paths:
            self._forget(path)
        if keys:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(keys)

    def delete_tree(self, folder: Path) -> None:

        for path in [p for p in self._versions if p.is_relative_to(folder)]:
            self._forget(path)
        shutil.rmtree(folder, ignore_errors=True)
        key = self.key(folder)
        self.fs.invalidate_cache(key)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(key, recursive=True)

    # -- keeping the mirror small -------------------------------------------------------------------------

    def _note_use(self, path: Path, size: int) -> None:
        with self._lock:
            self._used[path] = (time.monotonic(), size)
            scope = self._scopes.get(threading.get_ident())
            if scope is not None:
                scope.add(path)

    def _forget(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        with self._lock:
            self._versions.pop(path, None)
            self._used.pop(path, None)

    @contextmanager
    def task_scope(self) -> Iterator[None]:
        """A task's use of the mirror: when it ends, the mirror is trimmed to its capacity, sparing the files
        a task still running on another thread of this process has used (a Dask worker may run several)."""
        ident = threading.get_ident()
        with self._lock:
            outer = ident in self._scopes
            self._scopes.setdefault(ident, set())
        try:
            yield
        finally:
            if not outer:
                with self._lock:
                    self._scopes.pop(ident)
                self.trim()

    def trim(self) -> None:
        with self._lock:
            busy = set().union(*self._scopes.values()) if self._scopes else set()
            total = sum(size for _, size in self._used.values())
            victims = []
            for path, (_, size) in sorted(self._used.items(), key=lambda item: item[1][0]):
                if total <= self.capacity:
                    break
                if path not in busy:
                    victims.append(path)
                    total -= size
        for path in victims:
            self._forget(path)


def version_of(info: dict[str, Any]) -> tuple[Any, ...]:
    """What tells one version of an object from another: its size and ETag (or modification time)."""
    return (info.get("size"), info.get("ETag") or info.get("etag") or info.get("mtime"))
