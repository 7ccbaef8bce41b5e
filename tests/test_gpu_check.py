"""The GPU check script, in its CPU smoke mode: it builds its world, measures both sides and reports placement."""

from __future__ import annotations

from pathlib import Path

from benchmarks.gpu_check import run


def test_gpu_check_runs_end_to_end_in_smoke_mode(tmp_path: Path) -> None:
    result = run(smoke=True, images=None, work=tmp_path)
    embed, training, placement = result["embed"], result["training"], result["placement"]
    assert embed["images"] == 48 and embed["stage_images_per_s"] > 0 and embed["raw_images_per_s"] > 0
    assert training["trainer_samples_per_s"] > 0 and training["raw_samples_per_s"] > 0
    assert placement["resources"] == {}  # cpu: embed asks for no GPU, so either worker may run it
    assert sum(placement["tasks_by_worker"].values()) == 2  # both shards embedded through the cluster
    assert result["passed"]
