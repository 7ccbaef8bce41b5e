"""GPU check: is the embed stage (and validation training) fed fast enough for the GPU it runs on?

    python -m benchmarks.gpu_check [--images 8192] [--out benchmarks/results/gpu_check.json]
    python -m benchmarks.gpu_check --smoke          # CPU, tiny model and world: the script's own test

On a machine with a GPU (`benchmarks/gpu_check.sh`, `make bench-gpu`), from one process:

- embed: `EmbedStage.process_shard` over download-style shards of photo-like 256 px JPEGs (tar reading,
  decode, preprocess, tokenising, the model, the float16 outputs) against a raw `encode_image` + `encode_text`
  loop on batches already on the GPU (same model, same precision): images/s of each, their ratio, and the
  GPU's utilisation while the stage ran (nvidia-smi, sampled every 0.2 s).
- training: the validate stage's trainer (`train_clip`: its data loader, augmentation, loss, optimiser) against
  a raw loop of the same training step on one batch already on the GPU: samples/s of each and their ratio.
- placement: the embed stage on cuda through Dask on a cluster of one `GPU=1` worker and one CPU-only worker:
  which worker ran each embed task.

Nothing is downloaded: the models have random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from curate.config import validate_config
from curate.io.fs import write_parquet_atomic
from curate.ledger import make_fates
from curate.stage import RunLayout, StageContext

FULL = {"model": "ViT-B-32", "images": 8192, "shard_size": 2048, "batch_size": 512, "train_model": "ViT-B-32"}
SMOKE = {"model": "curate-tiny", "images": 48, "shard_size": 24, "batch_size": 16, "train_model": "curate-micro"}
TARGETS = {"embed_ratio": 0.8, "train_ratio": 0.85}


def photo_like_jpeg(rng: np.random.Generator, side: int) -> tuple[bytes, str]:
    from PIL import Image

    from examples.demo_world import make_caption, random_scene, render_scene

    scene = random_scene(rng, size=(side, side))
    noise = rng.normal(0, 12, (side, side, 3))  # sensor-like noise: JPEG sizes like photos, not flat drawings
    pixels = (np.asarray(render_scene(rng, scene), np.int16) + noise).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), make_caption(rng, scene.shape, scene.color, scene.count, scene.background)


def build_world(layout: RunLayout, images: int, shard_size: int, seed: int = 0) -> list[str]:
    """Download-stage shards (tar + fates) of photo-like 224-256 px JPEGs; returns the shard names."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    shards = []
    for index, start in enumerate(range(0, images, shard_size)):
        shard = f"{index:05d}"
        tar_path = layout.stage_dir("download") / f"{shard}.tar"
        tar_path.parent.mkdir(parents=True, exist_ok=True)
        uids = []
        with wds.TarWriter(str(tar_path)) as sink:
            for i in range(start, min(images, start + shard_size)):
                jpg, caption = photo_like_jpeg(rng, int(rng.integers(224, 257)))
                uid = f"{i:032x}"
                meta = {"uid": uid, "url": f"http://127.0.0.1/{i}.jpg", "caption": caption}
                sink.write({"__key__": uid, "jpg": jpg, "txt": caption, "json": meta})
                uids.append(uid)
        write_parquet_atomic(make_fates(uids, "kept"), layout.fates_path("download", shard))
        shards.append(shard)
    return shards


class UtilisationSampler:
    """nvidia-smi's GPU utilisation every `interval` seconds while active (empty where there is no nvidia-smi)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> UtilisationSampler:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "--id=0"]
        while not self._stop.wait(self.interval):
            done = subprocess.run(query, capture_output=True, text=True, check=False)
            if done.returncode == 0 and done.stdout.strip().isdigit():
                self.samples.append(int(done.stdout.strip()))

    def summary(self) -> dict[str, Any] | None:
        if not self.samples:
            return None
        return {"mean_pct": round(float(np.mean(self.samples)), 1), "samples": len(self.samples)}


def embed_config(root: Path, settings: dict[str, Any], device: str) -> Any:
    embed = {"model": settings["model"], "device": device, "batch_size": settings["batch_size"]}
    embed["decode_workers"] = max(2, (os.cpu_count() or 2) - 1)
    return validate_config(
        {"output": str(root), "stages": ["input", "download", "embed"], "input": {"path": "-"}, "embed": embed}
    )


def check_embed(root: Path, settings: dict[str, Any], device: str) -> dict[str, Any]:
    import torch

    from curate.stages.embed import EmbedStage
    from curate.stages.embed_input import DecodeSpec, TarFiles, batch_jobs, model_input, prepare

    layout = RunLayout(root)
    shards = build_world(layout, settings["images"], settings["shard_size"])
    config = embed_config(root, settings, device)
    stage = EmbedStage(config)
    stage.setup()
    loaded = stage.loaded
    ctx = StageContext(config, layout, "gpu-check", tuple(shards))

    # raw side: the first shard's batches prepared and moved to the device beforehand, then only the model
    spec, files = DecodeSpec.for_model(loaded, config.embed.decode), TarFiles()
    batches, samples = [], 0
    for job in batch_jobs(layout.stage_dir("download") / f"{shards[0]}.tar", None, settings["batch_size"]):
        prepared = prepare(spec, job, files)
        batches.append((model_input(loaded, prepared), prepared.tokens.to(loaded.device)))
        samples += len(prepared)
    files.close()
    with torch.inference_mode(), loaded.autocast():  # warm-up: kernel selection, allocations
        loaded.model.encode_image(batches[0][0])
        loaded.model.encode_text(batches[0][1])
    synchronize(loaded.device)
    started = time.perf_counter()
    for images, tokens in batches:
        with torch.inference_mode(), loaded.autocast():
            loaded.model.encode_image(images)
            loaded.model.encode_text(tokens)
    synchronize(loaded.device)
    raw_rate = samples / (time.perf_counter() - started)

    workdir = layout.scratch_dir("embed")
    stage.process_shard(ctx, shards[0], workdir / "warmup")  # warm-up of the stage's own path
    with UtilisationSampler() as sampler:
        started = time.perf_counter()
        for shard in shards:
            fates = stage.process_shard(ctx, shard, workdir / shard)
            assert set(fates["status"].to_pylist()) == {"kept"}, f"shard {shard}: not every image embedded"
        stage_rate = settings["images"] / (time.perf_counter() - started)
    return {
        "model": settings["model"],
        "precision": str(getattr(loaded, "precision", config.embed.precision)),
        "images": settings["images"],
        "stage_images_per_s": round(stage_rate, 1),
        "raw_images_per_s": round(raw_rate, 1),
        "ratio": round(stage_rate / raw_rate, 3),
        "target": f">= {TARGETS['embed_ratio']}",
        "gpu_utilisation": sampler.summary(),
    }


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_training(root: Path, settings: dict[str, Any], device: str) -> dict[str, Any]:
    import torch
    from open_clip import ClipLoss

    from curate.clip import load_clip
    from curate.stages.validate.batches import make_batches
    from curate.stages.validate.train import (
        SampleDecoder,
        TrainRecipe,
        TrainState,
        input_side,
        make_optimizer,
        train_clip,
        train_step,
    )

    shards = sorted((root / "download").glob("*.tar"))
    batch = settings["batch_size"]
    steps = max(4, settings["images"] // batch)
    recipe = TrainRecipe(
        model=settings["train_model"],
        batch_size=batch,
        samples_seen=steps * batch,
        lr=1e-4,
        warmup_steps=1,
        seed=0,
        device=device,
        precision="auto",
        checkpoint_every=10**9,
        decode_workers=max(1, (os.cpu_count() or 2) - 1),
        shuffle_buffer=batch * 2,
    )
    out = root / "train"
    shutil.rmtree(out, ignore_errors=True)
    result = train_clip(shards, recipe, out)
    trainer_rate = result.samples_seen / result.seconds

    torch.manual_seed(0)
    loaded = load_clip(recipe.clip_spec, train=True)
    scaler = torch.amp.GradScaler(loaded.device.type, enabled=loaded.precision == "fp16")
    state = TrainState(model=loaded.model, optimizer=make_optimizer(loaded.model, 1e-4, 0.1), scaler=scaler)
    decoder = SampleDecoder(
        transform=loaded.train_preprocess,
        tokenizer=loaded.tokenizer,
        augment=True,
        seed=0,
        input_size=input_side(loaded.model),
    )
    images, texts = next(make_batches(shards, decoder, recipe, 0))
    images, texts = images.to(loaded.device), texts.to(loaded.device)
    loss_fn = ClipLoss()
    train_step(state, loss_fn, images, texts, loaded.precision)  # warm-up
    synchronize(loaded.device)
    started = time.perf_counter()
    for _ in range(steps):
        train_step(state, loss_fn, images, texts, loaded.precision)
    synchronize(loaded.device)
    raw_rate = steps * batch / (time.perf_counter() - started)
    return {
        "model": settings["train_model"],
        "steps": steps,
        "trainer_samples_per_s": round(trainer_rate, 1),
        "raw_samples_per_s": round(raw_rate, 1),
        "ratio": round(trainer_rate / raw_rate, 3),
        "target": f">= {TARGETS['train_ratio']}",
    }


def check_placement(root: Path, settings: dict[str, Any], device: str) -> dict[str, Any]:
    """The embed stage through Dask on one GPU worker and one CPU-only worker: where its tasks ran."""
    from distributed import Client, Nanny, Scheduler, SpecCluster, get_task_stream

    from curate.executors.dask import DaskExecutor
    from curate.pipeline import run_stage
    from curate.stages.embed import EmbedStage

    shutil.rmtree(root / "embed", ignore_errors=True)
    layout = RunLayout(root)
    config = embed_config(root, settings, device)
    shards = tuple(sorted(p.stem for p in (root / "download").glob("*.tar")))
    worker = {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1"}}
    gpu_worker = {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1", "resources": {"GPU": 1}}}
    cluster = SpecCluster(
        scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0", "host": "127.0.0.1"}},
        workers={"cpu-worker": worker, "gpu-worker": gpu_worker},
    )
    executor = DaskExecutor(config.dask, scheduler=cluster.scheduler_address)
    try:
        names = {addr: info["name"] for addr, info in executor.client.scheduler_info()["workers"].items()}
        stage = EmbedStage(config)
        with get_task_stream(executor.client) as stream:
            run_stage(stage, StageContext(config, layout, "gpu-check-placement", shards), executor)
        ran_on = sorted(names[t["worker"]] for t in stream.data if str(t["key"]).startswith("embed-"))
    finally:
        executor.close()
        Client(cluster).close()
        cluster.close()
    asked = EmbedStage(config).resources()
    return {"resources": asked, "tasks_by_worker": {n: ran_on.count(n) for n in sorted(set(ran_on))}}


def run(smoke: bool, images: int | None, work: Path) -> dict[str, Any]:
    import torch

    settings = dict(SMOKE if smoke else FULL)
    if images:
        settings["images"] = images
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device; use --smoke on a machine without one")
    root = work / "gpu-check"
    shutil.rmtree(root, ignore_errors=True)
    result: dict[str, Any] = {
        "mode": "smoke" if smoke else "gpu",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "cpus": os.cpu_count(),
    }
    started = time.perf_counter()
    result["embed"] = check_embed(root, settings, device)
    result["training"] = check_training(root, settings, device)
    result["placement"] = check_placement(root, settings, device)
    result["seconds"] = round(time.perf_counter() - started, 1)
    placed = result["placement"]["tasks_by_worker"]
    result["passed"] = smoke or (
        result["embed"]["ratio"] >= TARGETS["embed_ratio"]
        and result["training"]["ratio"] >= TARGETS["train_ratio"]
        and set(placed) == {"gpu-worker"}
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model and world (the script's own test)")
    parser.add_argument("--images", type=int, help="images in the embed world")
    parser.add_argument("--work", type=Path, default=Path("/tmp/curate-bench"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = run(args.smoke, args.images, args.work)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
