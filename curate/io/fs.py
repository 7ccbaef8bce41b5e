"""Atomic writes: a reader never sees a half-written file."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{SCRATCH_SUFFIX}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def move_tree_into(src: Path, dest: Path) -> list[Path]:
    """Rename every file under `src` to the same relative place under `dest` (same filesystem)."""
    moved = []
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dest / file.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)
        moved.append(target)
    shutil.rmtree(src, ignore_errors=True)
    return moved


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


SCRATCH_SUFFIX = ".tmp"
"""Every scratch name the project writes ends so (and starts with a dot): leftovers are recognisable."""

_SCRATCH_NAME = re.compile(r"\..+\.[0-9a-f]{8}(\.old)?" + re.escape(SCRATCH_SUFFIX))


def is_scratch_name(name: str) -> bool:
    """`.NAME.HEX.tmp` (temp_sibling, a replaced task's workdir) or `.NAME.HEX.old.tmp` (replace_dir)."""
    return _SCRATCH_NAME.fullmatch(name) is not None


def replace_dir(new: Path, dest: Path) -> None:
    """Put the folder `new` where `dest` is: two renames, then the old folder is removed.

    A crash between the renames leaves no `dest` and the old folder under a recognisable `.old.tmp` name;
    the task's marker is written only after this returns, so the next run redoes the task.
    """
    if dest.exists():
        retired = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.old{SCRATCH_SUFFIX}")
        os.replace(dest, retired)
        os.replace(new, dest)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(new, dest)
