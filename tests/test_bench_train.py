"""A smoke run of the training benchmark with a micro model, so `make bench` does not find it broken."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import bench_train

MICRO_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.mark.slow
def test_bench_train_smoke(tmp_path: Path) -> None:
    config = tmp_path / "bench-micro.json"
    config.write_text(json.dumps(MICRO_CONFIG))
    result = bench_train.run(
        batch_size=8, warmup=1, steps=2, repeats=2, n_base=40, work=tmp_path / "work", model=str(config)
    )
    assert result["name"] == "train_vs_raw_loop" and result["target"] == ">= 0.85"
    assert result["pipeline_samples_per_s"] > 0 and result["raw_samples_per_s"] > 0
    assert math.isfinite(result["ratio"]) and result["passed"] == (result["ratio"] >= 0.85)
    assert len(result["seconds"]["pipeline"]) == len(result["seconds"]["raw"]) == 2
    # train_clip's "waiting for data" log line was found (its format is what the benchmark parses)
    assert all(math.isfinite(w) and w >= 0 for w in result["waited_for_data_s"])
    assert result["decode_cpu_ms_per_sample"] > 0
    assert not (tmp_path / "work" / "train-run").exists()  # cleaned up
