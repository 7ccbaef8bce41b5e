"""Embed stage throughput relative to the bare model on the same batches, same process, same torch threads.

    python -m benchmarks.bench_embed [--images 512] [--batch-size 64] [--repeats 3] [--work /tmp/curate-bench]

ViT-B-32 with random weights (nothing is downloaded; the speed does not depend on the weights), on the
CPU, with the same `torch.get_num_threads()` for both sides:

- raw: `model.encode_image` + `model.encode_text` on batches that were decoded, preprocessed and
  tokenised beforehand (nothing but the model is timed). The stage embeds each image AND its caption,
  so the fair baseline runs both towers on the same batch.
- pipeline: `EmbedStage.process_shard` over a webdataset tar of the same 224-px JPEGs and captions, as the
  download stage writes it: tar reading, JPEG decode, open_clip's preprocess, tokenising, the model,
  normalisation, the float16 .npy files and the metadata parquet.

ratio = pipeline images/s / raw images/s; the order alternates between repeats and medians are used.
Target: >= 0.90.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import ratio_fields
from curate.config import validate_config
from curate.io.fs import write_parquet_atomic
from curate.ledger import make_fates
from curate.stage import RunLayout, StageContext
from curate.stages.embed import EmbedStage, LoadedClip
from examples.demo_world import make_caption, random_scene, render_scene

MODEL, IMAGE_SIZE, SHARD = "ViT-B-32", 224, "00000"
TARGET = 0.90


def make_shard(layout: RunLayout, images: int, seed: int = 0) -> set[str]:
    """A download shard of `images` 224-px JPEGs (scenes plus sensor-like noise, so JPEG sizes are photo-like)."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    tar_path = layout.stage_dir("download") / f"{SHARD}.tar"
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    uids = []
    with wds.TarWriter(str(tar_path)) as sink:
        for i in range(images):
            scene = random_scene(rng, size=(IMAGE_SIZE, IMAGE_SIZE))
            pixels = np.asarray(render_scene(rng, scene), np.int16) + rng.normal(0, 12, (IMAGE_SIZE, IMAGE_SIZE, 3))
            buffer = io.BytesIO()
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
            caption = make_caption(rng, scene.shape, scene.color, scene.count, scene.background)
            uid = f"{i:032x}"
            meta = {"uid": uid, "url": f"http://127.0.0.1/{i}.jpg", "caption": caption}
            sink.write({"__key__": f"{i:09d}", "jpg": buffer.getvalue(), "txt": caption, "json": meta})
            uids.append(uid)
    write_parquet_atomic(make_fates(uids, "kept"), layout.fates_path("download", SHARD))
    return set(uids)


def raw_batches(loaded: LoadedClip, tar_path: Path, uids: set[str], batch_size: int) -> list[tuple[Any, Any]]:
    """Decoded, preprocessed and tokenised batches of the shard: the raw side's input, prepared untimed."""
    import torch

    from curate.stages.embed import decode_image, read_tar_samples

    samples = list(read_tar_samples(tar_path, uids))
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images = torch.stack([loaded.preprocess(decode_image(s.image)) for s in chunk])  # type: ignore[arg-type]
        batches.append((images, loaded.tokenizer([s.caption for s in chunk])))
    return batches


@dataclass(frozen=True)
class Timing:
    wall: float
    cpu: float  # this process, all threads: the work done, whatever else the machine runs


@contextmanager
def timed(into: list[Timing]) -> Iterator[None]:
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    into.append(Timing(time.perf_counter() - wall, time.process_time() - cpu))


def time_raw(loaded: LoadedClip, batches: list[tuple[Any, Any]], into: list[Timing]) -> None:
    import torch

    with timed(into), torch.inference_mode():
        for images, tokens in batches:
            loaded.model.encode_image(images)
            loaded.model.encode_text(tokens)


def time_pipeline(stage: EmbedStage, ctx: StageContext, into: list[Timing]) -> None:
    workdir = ctx.layout.scratch_dir("embed") / SHARD
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    with timed(into):
        fates = stage.process_shard(ctx, SHARD, workdir)
    assert set(fates["status"].to_pylist()) == {"kept"}
    shutil.rmtree(workdir)


def run(
    images: int = 512,
    batch_size: int = 64,
    work: Path = Path("/tmp/curate-bench"),
    repeats: int = 3,
    decode_threads: int | None = None,
) -> dict[str, Any]:
    import torch

    root = work / "embed-run"
    shutil.rmtree(root, ignore_errors=True)
    embed_settings: dict[str, Any] = {"model": MODEL, "device": "cpu", "batch_size": batch_size}
    if decode_threads is not None:
        embed_settings["decode_threads"] = decode_threads
    config = validate_config(
        {"output": str(root), "stages": ["input", "download", "embed"], "input": {"path": "-"}, "embed": embed_settings}
    )
    layout = RunLayout(root)
    uids = make_shard(layout, images)
    stage = EmbedStage(config)
    stage.setup()
    loaded = stage.loaded  # one model object for both sides: same weights, same threads
    ctx = StageContext(config, layout, "bench")
    batches = raw_batches(loaded, layout.stage_dir("download") / f"{SHARD}.tar", uids, batch_size)
    time_raw(loaded, batches[:1], [])  # warm-up: first-call allocations and kernel selection
    raw: list[Timing] = []
    ours: list[Timing] = []
    for repeat in range(repeats):
        for side in ("raw", "pipeline") if repeat % 2 == 0 else ("pipeline", "raw"):
            if side == "raw":
                time_raw(loaded, batches, raw)
            else:
                time_pipeline(stage, ctx, ours)
    shutil.rmtree(root, ignore_errors=True)
    raw_wall, our_wall = statistics.median(t.wall for t in raw), statistics.median(t.wall for t in ours)
    return {
        "name": "embed_vs_raw_model",
        "model": MODEL,
        "images": images,
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
        "decode_threads": config.embed.decode_threads,
        "raw_images_per_s": round(images / raw_wall, 2),
        "pipeline_images_per_s": round(images / our_wall, 2),
        **ratio_fields(ours, raw, TARGET),
        "seconds": {
            "raw": [round(t.wall, 2) for t in raw],
            "pipeline": [round(t.wall, 2) for t in ours],
            "raw_cpu": [round(t.cpu, 2) for t in raw],
            "pipeline_cpu": [round(t.cpu, 2) for t in ours],
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/curate-bench"))
    args = parser.parse_args()
    result = run(args.images, args.batch_size, args.work, args.repeats, args.decode_threads)
    print(json.dumps(result, indent=2))
