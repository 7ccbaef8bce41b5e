"""Fixtures shared by several test files. Keep each one small; file-specific helpers live in their file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from curate.config import PipelineConfig, validate_config
from tests.browser import chromium  # noqa: F401  (session fixture)
from tests.run_fixtures import curated_run  # noqa: F401  (session fixtures)
from tests.s3_fixtures import s3_bucket, s3_endpoint  # noqa: F401  (a moto S3 server on loopback)
from tests.storage_runs import disk_run, env_credentials  # noqa: F401  (bucket-run tests: the run on disk, AWS_* env)
from tests.world_fixtures import served_world, tiny_checkpoint  # noqa: F401


@pytest.fixture
def input_config(tmp_path: Path) -> Callable[..., PipelineConfig]:
    """Factory: a config that runs only the input stage over `path` (a file or a list), writing to
    `output` (default tmp_path/run); keyword arguments are `input.*` settings."""

    def make(path: Path | str | list[Path | str], output: Path | None = None, **settings: Any) -> PipelineConfig:
        paths = [str(p) for p in path] if isinstance(path, list) else str(path)
        raw = {"output": str(output or tmp_path / "run"), "stages": ["input"], "input": {"path": paths, **settings}}
        return validate_config(raw)

    return make
