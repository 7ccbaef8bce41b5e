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

    python -m benchmarks.bench_embed --decode-scaling [--images 4096]
    python -m benchmarks.bench_embed --vs-dataloader [--images 320]

On photo-like JPEGs of 256-400 px a side (scenes plus sensor-like noise; shards of 2048 images after a
warm-up shard for the decode scaling, 4 shards against the DataLoader):

- decode scaling (`run_decode_scaling`): a stand-in model that costs ~nothing (a mean over pixels and
  tokens), so the stage's host side is the whole cost: its images/s with `decode_workers: 2` against 1,
  and its per-core rate (images/s with 2 workers, halved) against a bare loop in one process with one
  torch thread over the same tar members: PIL decode, open_clip's preprocess, torch.stack, the tokenizer.
  Targets: >= 1.7 and >= 0.85. Also reported: two bare loops started together in their own processes
  against one, what the machine's two cores give to work that shares nothing (the targets' ceiling here).
- against a DataLoader (`run_vs_dataloader`): ViT-B-32 (random weights) on the CPU fed by the stage, and
  fed by a plain torch DataLoader loop as clip-retrieval's inference runs one (2 worker processes reading
  the shards with webdataset, PIL decode, open_clip's preprocess and tokenizer, batches of the same
  size). Steady state: the first shard (the stage) or the first batch (the loop) is left out of the
  timing. Target: stage samples/s >= the loop's.
"""

from __future__ import annotations

import argparse
import io
import json
import queue
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
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

    from curate.io.wds import iter_samples
    from curate.stages.embed_input import decode_image

    samples = list(iter_samples(tar_path, uids))
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
    decode_workers: int | None = None,
) -> dict[str, Any]:
    import torch

    root = work / "embed-run"
    shutil.rmtree(root, ignore_errors=True)
    embed_settings: dict[str, Any] = {"model": MODEL, "device": "cpu", "batch_size": batch_size}
    if decode_workers is not None:
        embed_settings["decode_workers"] = decode_workers
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
        "decode_workers": config.embed.decode_workers,
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


# --------------------------------------------------------------------------------------------------
# Photo-like shards, decode scaling with a stand-in model, and the stage against a DataLoader loop

PHOTO_SIDES = (256, 400)
PHOTO_SHARDS = 4
SCALING_TARGET, PER_CORE_TARGET, DATALOADER_TARGET = 1.7, 0.85, 1.0


def make_photo_shards(
    layout: RunLayout, images: int, shards: int = PHOTO_SHARDS, seed: int = 1, first: int = 0
) -> list[str]:
    """Download shards `first`, `first + 1`, ... of JPEGs with sides drawn from PHOTO_SIDES (quality 90, noise
    like a camera's)."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    names = [f"{i:05d}" for i in range(first, first + shards)]
    folder = layout.stage_dir("download")
    folder.mkdir(parents=True, exist_ok=True)
    for s, name in enumerate(names):
        uids = []
        with wds.TarWriter(str(folder / f"{name}.tar")) as sink:
            for i in range(s * images // shards, (s + 1) * images // shards):
                width, height = (int(v) for v in rng.integers(PHOTO_SIDES[0], PHOTO_SIDES[1] + 1, 2))
                scene = random_scene(rng, size=(width, height))
                noise = rng.normal(0, 8, (height, width, 3))
                pixels = (np.asarray(render_scene(rng, scene), np.int16) + noise).clip(0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                caption = make_caption(rng, scene.shape, scene.color, scene.count, scene.background)
                uid = f"{i:032x}"
                meta = {"uid": uid, "url": f"http://127.0.0.1/{i}.jpg", "caption": caption}
                sink.write({"__key__": f"{i:09d}", "jpg": buffer.getvalue(), "txt": caption, "json": meta})
                uids.append(uid)
        write_parquet_atomic(make_fates(uids, "kept"), layout.fates_path("download", name))
    return names


class StandInModel:
    """Costs ~nothing: a mean over each image's pixels and each caption's tokens, as 4-d 'embeddings'."""

    visual = type("Visual", (), {"image_size": IMAGE_SIZE})()

    def encode_image(self, images: Any) -> Any:
        return images.mean(dim=(2, 3)).repeat(1, 2)[:, :4]

    def encode_text(self, tokens: Any) -> Any:
        return tokens[:, :4].float()


def stand_in_stage(config: Any) -> EmbedStage:
    """An EmbedStage whose model is the stand-in, with ViT-B-32's preprocess and tokenizer."""
    import dataclasses

    stage = EmbedStage(config)
    real = stage.loaded
    stage._loaded = dataclasses.replace(real, model=StandInModel(), embed_dim=4)
    return stage


def embed_config(root: Path, **settings: Any) -> Any:
    embed = {"model": MODEL, "device": "cpu", "batch_size": 64, **settings}
    return validate_config(
        {"output": str(root), "stages": ["input", "download", "embed"], "input": {"path": "-"}, "embed": embed}
    )


def time_shards(stage: EmbedStage, ctx: StageContext, shards: list[str]) -> Timing:
    """The stage over `shards` (outputs into scratch folders, removed after); CPU time of this process only."""
    folders = [ctx.layout.scratch_dir("embed") / f"{shard}-{time.monotonic_ns()}" for shard in shards]
    wall, cpu = time.perf_counter(), time.process_time()
    for shard, folder in zip(shards, folders, strict=True):
        folder.mkdir(parents=True)
        fates = stage.process_shard(ctx, shard, folder)
        assert set(fates["status"].to_pylist()) == {"kept"}, f"shard {shard}: not every image embedded"
    timing = Timing(time.perf_counter() - wall, time.process_time() - cpu)
    for folder in folders:
        shutil.rmtree(folder)
    return timing


def worker_cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def bare_decode_loop(
    layout: RunLayout, shards: list[str], batch_size: int, ready: Callable[[], object] | None = None
) -> Timing:
    """One process, one torch thread: decode, open_clip's preprocess, stack and tokenise, batch by batch.
    `ready` is called just before the timed loop."""
    import open_clip
    import torch

    from curate.io.wds import iter_samples

    _, _, preprocess = open_clip.create_model_and_transforms(MODEL)
    tokenizer = open_clip.get_tokenizer(MODEL)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if ready is not None:
        ready()
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        for shard in shards:
            samples = iter_samples(layout.stage_dir("download") / f"{shard}.tar", read=("jpg", "txt"))
            batch: list[Any] = []
            for sample in samples:
                batch.append(sample)
                if len(batch) == batch_size:
                    _bare_batch(batch, preprocess, tokenizer)
                    batch = []
            if batch:
                _bare_batch(batch, preprocess, tokenizer)
        return Timing(time.perf_counter() - wall, time.process_time() - cpu)
    finally:
        torch.set_num_threads(threads)


def side_by_side_bare_loops(
    layout: RunLayout, shards: list[str], images: int, batch_size: int, processes: int = 2
) -> float:
    """Images/s of `processes` bare loops over the same shards, started together in their own processes: what
    this machine's cores give to work that shares nothing (the decode workers' ceiling)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    loops = [
        context.Process(target=_timed_bare_loop, args=(str(layout.root), shards, batch_size, barrier, results))
        for _ in range(processes)
    ]
    for loop in loops:
        loop.start()
    walls: list[float] = []
    while len(walls) < processes:
        try:
            walls.append(results.get(timeout=1))
        except queue.Empty:
            failed = [loop.exitcode for loop in loops if loop.exitcode not in (None, 0)]
            if failed:  # the others would wait at the barrier, or for their share of the cores, for ever
                for loop in loops:
                    loop.terminate()
                raise RuntimeError(f"a bare decode loop process exited with code {failed[0]}") from None
    for loop in loops:
        loop.join()
    return sum(images / wall for wall in walls)


def _timed_bare_loop(root: str, shards: list[str], batch_size: int, barrier: Any, results: Any) -> None:
    results.put(bare_decode_loop(RunLayout(Path(root)), shards, batch_size, ready=barrier.wait).wall)


def _bare_batch(samples: list[Any], preprocess: Any, tokenizer: Any) -> None:
    import torch

    torch.stack([preprocess(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in samples])
    tokenizer([s.caption for s in samples])


def run_decode_scaling(
    images: int = 4096, work: Path = Path("/tmp/curate-bench"), repeats: int = 2, shards_of: int = 2048
) -> dict[str, Any]:
    """The stand-in model's stage with 2 decode workers against 1, and per core against a bare loop, in steady
    state: shards of `shards_of` images (32 batches; a run's default input.shard_size is 10,000 rows), after a
    warm-up shard."""
    import torch

    from curate.stages.embed_input import close_decode_workers

    root = work / "embed-scaling"
    shutil.rmtree(root, ignore_errors=True)
    layout = RunLayout(root)
    shards = make_photo_shards(layout, images, shards=max(1, images // shards_of))
    warm_up = make_photo_shards(layout, 128, shards=1, seed=2, first=len(shards))
    bare: list[Timing] = []
    side_by_side: list[float] = []
    staged: dict[int, list[Timing]] = {1: [], 2: []}
    worker_cpu: dict[int, list[float]] = {1: [], 2: []}
    for repeat in range(repeats):
        for workers in (1, 2) if repeat % 2 == 0 else (2, 1):
            config = embed_config(root, decode_workers=workers)
            stage = stand_in_stage(config)
            ctx = StageContext(config, layout, "bench", (*shards, *warm_up))
            time_shards(stage, ctx, warm_up)  # starts the workers: steady state from here
            pids = stage.decoders().pids()
            before = worker_cpu_seconds(pids)
            staged[workers].append(time_shards(stage, ctx, shards))
            worker_cpu[workers].append(worker_cpu_seconds(pids) - before)
            close_decode_workers()
        bare.append(bare_decode_loop(layout, shards, 64))
        side_by_side.append(side_by_side_bare_loops(layout, shards, images, 64))
    shutil.rmtree(root, ignore_errors=True)
    rate = {w: images / statistics.median(t.wall for t in ts) for w, ts in staged.items()}
    bare_rate = images / statistics.median(t.wall for t in bare)
    two_loops_rate = statistics.median(side_by_side)
    scaling, per_core = rate[2] / rate[1], rate[2] / 2 / bare_rate
    cpu_per_image_ms = {
        w: round(1000 * statistics.median(c + t.cpu for c, t in zip(worker_cpu[w], staged[w], strict=True)) / images, 2)
        for w in staged
    }
    return {
        "name": "embed_decode_scaling",
        "headline": f"2 vs 1 decode workers {scaling:.3f}, per core vs bare loop {per_core:.3f}",
        "model": "stand-in (mean of pixels and tokens), ViT-B-32 preprocess and tokenizer",
        "images": images,
        "shards": len(shards),
        "images_per_shard": images // len(shards),
        "image_sides": list(PHOTO_SIDES),
        "batch_size": 64,
        "decode": "draft",
        "images_per_s": {"decode_workers_1": round(rate[1], 1), "decode_workers_2": round(rate[2], 1)},
        "bare_loop_images_per_s": round(bare_rate, 1),
        # the machine's own ceiling for the scaling and the per-core rate: two bare loops sharing nothing
        "two_bare_loops_side_by_side_images_per_s": round(two_loops_rate, 1),
        "two_bare_loops_vs_one": round(two_loops_rate / bare_rate, 3),
        "decode_workers_2_vs_two_bare_loops": round(rate[2] / two_loops_rate, 3),
        "scaling_2_vs_1": round(scaling, 3),
        "per_core_vs_bare_loop": round(per_core, 3),
        "cpu_ms_per_image": {
            **{f"decode_workers_{w}": v for w, v in cpu_per_image_ms.items()},
            "bare_loop": round(1000 * statistics.median(t.cpu for t in bare) / images, 2),
        },
        "torch_threads_model_process": torch.get_num_threads(),
        "seconds": {
            "decode_workers_1": [round(t.wall, 2) for t in staged[1]],
            "decode_workers_2": [round(t.wall, 2) for t in staged[2]],
            "bare_loop": [round(t.wall, 2) for t in bare],
        },
        "target": f"scaling >= {SCALING_TARGET}, per core >= {PER_CORE_TARGET}",
        "passed": scaling >= SCALING_TARGET and per_core >= PER_CORE_TARGET,
    }


class ClipRetrievalLoop:
    """clip-retrieval's inference loop in miniature: a DataLoader whose workers read webdataset shards,
    decode with PIL and apply open_clip's preprocess and tokenizer, and the model on each batch."""

    def __init__(self, loaded: LoadedClip, tars: list[Path], batch_size: int, workers: int = 2) -> None:
        import webdataset as wds
        from torch.utils.data import DataLoader

        preprocess, tokenizer = loaded.preprocess, loaded.tokenizer
        dataset = (
            wds.WebDataset([str(t) for t in tars], shardshuffle=False)
            .decode("pilrgb")
            .to_tuple("jpg", "txt")
            .map_tuple(preprocess, lambda text: tokenizer([text])[0])
            .batched(batch_size)
        )
        self.loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False)
        self.loaded = loaded

    def run(self) -> tuple[int, float]:
        """(samples after the first batch, seconds from the first batch's arrival to the end)."""
        import torch

        from curate.clip import encode

        samples, started = 0, None
        with torch.inference_mode():
            for images, tokens in self.loader:
                if started is None:
                    started = time.perf_counter()
                else:
                    samples += len(images)
                image_emb, text_emb = encode(self.loaded, images, tokens)
                (image_emb * text_emb).sum(-1).numpy()  # type: ignore[operator]
        assert started is not None
        return samples, time.perf_counter() - started


def run_vs_dataloader(images: int = 320, work: Path = Path("/tmp/curate-bench"), repeats: int = 1) -> dict[str, Any]:
    """ViT-B-32 on the CPU: the stage's steady-state samples/s against a DataLoader loop's."""
    import torch

    root = work / "embed-dataloader"
    shutil.rmtree(root, ignore_errors=True)
    layout = RunLayout(root)
    shards = make_photo_shards(layout, images)
    config = embed_config(root, decode_workers=2)
    stage = EmbedStage(config)
    stage.setup()
    ctx = StageContext(config, layout, "bench", tuple(shards))
    tars = [layout.stage_dir("download") / f"{s}.tar" for s in shards]
    stage_rates, loop_rates = [], []
    steady = images - images // len(shards)
    for repeat in range(repeats):
        for side in ("stage", "loop") if repeat % 2 == 0 else ("loop", "stage"):
            if side == "stage":
                time_shards(stage, ctx, shards[:1])  # warm-up shard: the decode workers start
                stage_rates.append(steady / time_shards(stage, ctx, shards[1:]).wall)
            else:
                samples, seconds = ClipRetrievalLoop(stage.loaded, tars, config.embed.batch_size).run()
                loop_rates.append(samples / seconds)
    shutil.rmtree(root, ignore_errors=True)
    stage_rate, loop_rate = statistics.median(stage_rates), statistics.median(loop_rates)
    ratio = stage_rate / loop_rate
    return {
        "name": "embed_vs_dataloader",
        "model": MODEL,
        "images": images,
        "shards": len(shards),
        "image_sides": list(PHOTO_SIDES),
        "batch_size": config.embed.batch_size,
        "decode_workers": 2,
        "dataloader_workers": 2,
        "torch_threads": torch.get_num_threads(),
        "stage_samples_per_s": [round(r, 2) for r in stage_rates],
        "dataloader_samples_per_s": [round(r, 2) for r in loop_rates],
        "ratio": round(ratio, 3),
        "target": f">= {DATALOADER_TARGET}",
        "passed": ratio >= DATALOADER_TARGET,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--images", type=int, default=None, help="default: 512; 4096 with --decode-scaling, 320 with --vs-dataloader"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-workers", type=int, default=None)
    parser.add_argument("--decode-scaling", action="store_true", help="the stand-in model's decode scaling")
    parser.add_argument("--vs-dataloader", action="store_true", help="ViT-B-32 fed by the stage vs a DataLoader")
    parser.add_argument("--work", type=Path, default=Path("/tmp/curate-bench"))
    args = parser.parse_args()
    if args.decode_scaling:
        result = run_decode_scaling(args.images or 4096, args.work)
    elif args.vs_dataloader:
        result = run_vs_dataloader(args.images or 320, args.work)
    else:
        result = run(args.images or 512, args.batch_size, args.work, args.repeats, args.decode_workers)
    print(json.dumps(result, indent=2))
