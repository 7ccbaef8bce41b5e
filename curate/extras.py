"""The installed distribution and its optional parts: each optional dependency is one pip extra,
imported only where it is used, and missing it is a one-line error that names the extra."""

from __future__ import annotations

import importlib
import importlib.metadata
from types import ModuleType

from curate.config import ConfigError

DISTRIBUTION = "curate-pipeline"  # the name on the package index; the import and the command are `curate`


class MissingExtra(ConfigError):
    """A setting (executor: dask) or command (report) whose optional dependency is not installed."""


def require(module: str, extra: str, needed_by: str) -> ModuleType:
    """Import `module`, or raise MissingExtra naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module.partition(".")[0]:
            raise  # the package is there but broken: its own error says more
        raise MissingExtra(f"{needed_by} needs {module}: pip install '{DISTRIBUTION}[{extra}]'") from None


def distribution_version() -> str:
    """The installed distribution's version; the source tree's when curate runs uninstalled."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        from curate import __version__

        return __version__
