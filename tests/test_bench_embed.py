"""The embed benchmark's helpers that can hang or mislead when a process fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_embed import side_by_side_bare_loops
from curate.stage import RunLayout


def test_side_by_side_bare_loops_fail_fast_when_a_loop_process_dies(tmp_path: Path) -> None:
    # before, the driver waited 600 s for the dead loop's result, then raised queue.Empty
    with pytest.raises(RuntimeError, match="exited with code 1"):
        side_by_side_bare_loops(RunLayout(tmp_path), ["no-such-shard"], images=64, batch_size=8)
