"""The embed stage's input pipeline: decode worker processes kept across shards, the same embeddings as decoding
in one thread, JPEG draft decoding as a fingerprinted setting, a dying decode worker failing its shard, and
GPU decoding refused where there is no GPU."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from curate.config import ConfigError
from curate.runner import run_shard
from curate.stage import RunLayout, StageContext
from curate.stages.embed import EmbedStage, embedding_paths
from curate.stages.embed_input import DecodeWorkerError, close_decode_workers, decode_image
from tests.test_embed import good_samples, jpeg, run_config, uid_of, write_download_shard
from tests.world_fixtures import ServedWorld

TINY_SIDE = 64  # curate-tiny's input side


@pytest.fixture(autouse=True, scope="module")
def _stop_decode_workers_after_the_module():
    yield
    close_decode_workers()


def run_shards(config: Any, shards: list[str]) -> tuple[EmbedStage, StageContext]:
    """The shards through the runner, with the same random weights every time."""
    torch.manual_seed(0)
    stage = EmbedStage(config)
    ctx = StageContext(config, RunLayout(Path(config.output)), stage.fingerprint("upstream"), tuple(shards))
    for shard in shards:
        assert run_shard(stage, ctx, shard).stats.kept > 0
    return stage, ctx


def outputs(run_dir: Path, shard: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    img, txt, meta = embedding_paths(run_dir / "embed", shard)
    return np.load(img), np.load(txt), pq.read_table(meta)["clip_score"].to_numpy()


def big_samples(start: int, n: int) -> list[dict[str, Any]]:
    """JPEGs 8x the tiny model's input: draft decoding reads them at 1/8 scale."""
    side = 8 * TINY_SIDE
    return [
        {"uid": uid_of(i), "caption": f"a large picture {i}", "jpg": jpeg(i, size=(side + 16, side))}
        for i in range(start, start + n)
    ]


def test_decode_workers_are_processes_kept_across_shards(tmp_path: Path):
    config = run_config(tmp_path / "run", decode_workers=2, batch_size=2)
    layout = RunLayout(tmp_path / "run")
    for shard, start in (("00000", 0), ("00001", 10), ("00002", 20)):
        write_download_shard(layout, shard, good_samples(start, 7))
    stage = EmbedStage(config)
    ctx = StageContext(config, layout, stage.fingerprint("upstream"), ("00000", "00001", "00002"))

    run_shard(stage, ctx, "00000")
    from curate.runner import worker_stage

    first = worker_stage(stage, ctx).decoders().pids()
    run_shard(stage, ctx, "00001")
    run_shard(stage, ctx, "00002")
    later = worker_stage(stage, ctx).decoders().pids()

    assert len(first) == 2 and os.getpid() not in first
    assert later == first  # the same processes decoded all three shards
    assert all(os.path.exists(f"/proc/{pid}") for pid in later)


def test_a_daemon_process_decodes_in_one_thread_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    import multiprocessing
    import threading

    from curate.stages import embed_input
    from curate.stages.embed_input import DecodeSpec, close_decode_workers, decode_workers

    spec = DecodeSpec(tokenizer=len, steps=None, preprocess=None, normalize=False, draft_side=None)
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True)  # as a Dask worker process is
    monkeypatch.setattr(embed_input, "_warned_daemon", threading.Event())  # warned once per process
    try:
        with caplog.at_level("WARNING", logger="curate.stages.embed_input"):
            workers = decode_workers(spec, 2)
        assert workers.workers == 0 and workers.pids() == []
        assert "daemon process and cannot start decode workers" in caplog.text
    finally:
        close_decode_workers()


def test_worker_processes_give_the_embeddings_of_decoding_in_one_thread(tmp_path: Path):
    samples = good_samples(0, 9) + big_samples(100, 4)
    runs = {}
    for workers in (0, 2):
        run_dir = tmp_path / f"workers{workers}"
        write_download_shard(RunLayout(run_dir), "00000", samples)
        run_shards(run_config(run_dir, decode_workers=workers, batch_size=4), ["00000"])
        runs[workers] = outputs(run_dir, "00000")

    for threaded, processes in zip(runs[0], runs[2], strict=True):
        assert threaded.shape[0] == 13
        np.testing.assert_array_equal(threaded, processes)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalised-by-workers", "uint8-pixels"])
def test_pixel_buffers_are_reused_only_once_their_pixels_were_read(tmp_path: Path, normalize: bool):
    import dataclasses

    from curate.stages.embed_input import (
        DecodeSpec,
        DecodeWorkers,
        TarFiles,
        batch_jobs,
        decoded_batches,
        prepare,
    )

    layout = RunLayout(tmp_path / "run")
    write_download_shard(layout, "00000", good_samples(0, 30))
    tar = layout.stage_dir("download") / "00000.tar"
    loaded = EmbedStage(run_config(tmp_path / "run")).loaded
    spec = dataclasses.replace(DecodeSpec.for_model(loaded, "draft"), normalize=normalize)
    files = TarFiles()
    expected = [prepare(spec, job, files).images for job in batch_jobs(tar, None, 2)]  # 15 batches, inline
    workers = DecodeWorkers(spec, 2)
    try:
        held = list(decoded_batches(workers, batch_jobs(tar, None, 2), pin=False))  # none read: none given back
        for batch, want in zip(held, expected, strict=True):
            assert torch.equal(batch.images, want)
        in_buffers = [batch for batch in held if batch.in_buffer]
        assert len(in_buffers) >= 10  # all but the jobs sent before the first batch came back
        assert len({batch.images.data_ptr() for batch in in_buffers}) == len(in_buffers)

        for batch in held:
            batch.replace_images(None)
        seen: set[int] = set()
        for batch, want in zip(decoded_batches(workers, batch_jobs(tar, None, 2), pin=False), expected, strict=True):
            assert batch.in_buffer and torch.equal(batch.images, want)
            seen.add(batch.images.data_ptr())
            batch.replace_images(None)  # read: the buffer takes a later batch
        assert len(seen) <= workers._buffers.keep  # the buffers given back were written again
        assert workers._buffers.keep == 2 * 2 + 3  # at most 2 x decode_workers + 3 in /dev/shm
    finally:
        workers.close()
        files.close()


def test_draft_decoding_changes_pixels_and_the_fingerprint_but_not_much_else(tmp_path: Path):
    data = big_samples(0, 1)[0]["jpg"]
    assert decode_image(data).size == (8 * TINY_SIDE + 16, 8 * TINY_SIDE)
    assert decode_image(data, TINY_SIDE).size == (TINY_SIDE + 2, TINY_SIDE)  # libjpeg's 1/8 scale

    fingerprints = {}
    scores = {}
    for decode in ("draft", "full"):
        run_dir = tmp_path / decode
        write_download_shard(RunLayout(run_dir), "00000", big_samples(0, 6))
        stage, _ = run_shards(run_config(run_dir, decode=decode, batch_size=3), ["00000"])
        fingerprints[decode] = stage.fingerprint("upstream")
        scores[decode] = outputs(run_dir, "00000")[2]

    assert fingerprints["draft"] != fingerprints["full"]
    more_workers = EmbedStage(run_config(tmp_path / "full", decode="full", decode_workers=3))
    assert more_workers.fingerprint("upstream") == fingerprints["full"]  # decode_workers only changes speed
    assert not np.array_equal(scores["draft"], scores["full"])
    np.testing.assert_allclose(scores["draft"], scores["full"], atol=0.05)


def test_a_decode_worker_that_dies_fails_its_shard_and_the_next_try_succeeds(tmp_path: Path):
    layout = RunLayout(tmp_path / "run")
    write_download_shard(layout, "00000", good_samples(0, 40))
    config = run_config(tmp_path / "run", decode_workers=2, batch_size=2)
    stage = EmbedStage(config)
    ctx = StageContext(config, layout, stage.fingerprint("upstream"), ("00000",))
    stage.setup()
    real_start = stage._start_encoding
    killed: list[int] = []

    def kill_workers_on_first_batch(batch: Any) -> Any:
        if not killed:
            killed.extend(stage.decoders().pids())
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
        return real_start(batch)

    stage._start_encoding = kill_workers_on_first_batch  # type: ignore[method-assign]
    with pytest.raises(DecodeWorkerError, match="decode worker process died"):
        stage.process_shard(ctx, "00000", tmp_path / "scratch")
    assert len(killed) == 2

    stage._start_encoding = real_start  # type: ignore[method-assign]
    report = run_shard(stage, ctx, "00000")

    assert report.stats.kept == 40
    assert not set(stage.decoders().pids()) & set(killed)  # new workers
    assert layout.marker_path("embed", "00000").exists()


def test_gpu_decoding_is_refused_without_a_gpu(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"embed\.decode.*'gpu'.*cpu"):
        run_config(tmp_path / "run", decode="gpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: decode 'gpu' with device auto is valid here")
    stage = EmbedStage(run_config(tmp_path / "run", decode="gpu", device="auto"))
    with pytest.raises(ConfigError, match=r"embed\.decode: 'gpu' decodes JPEGs on the model's cuda device"):
        stage.preflight()


def test_the_clip_224_download_preset_writes_224_px_centre_crops(served_world: ServedWorld, tmp_path: Path):
    import yaml
    from PIL import Image

    from curate.config import load_config
    from curate.io.wds import iter_members
    from curate.pipeline import run_pipeline

    pipeline = served_world.pipeline(tmp_path)
    raw = yaml.safe_load(pipeline.read_text())
    del raw["download"]["image_size"]  # the world's own size: the preset's must apply
    raw["download"].update(preset="clip_224", min_image_size=0)
    pipeline.write_text(yaml.safe_dump(raw))
    config = load_config(pipeline)
    assert (config.download.image_size, config.download.resize_mode) == (224, "center_crop")
    assert "preset" not in config.download.model_dump()  # resolved: same fingerprint as the keys spelled out

    assert run_pipeline(config).complete

    sizes = {
        Image.open(io.BytesIO(members["jpg"])).size
        for tar in sorted((tmp_path / "run" / "download").glob("*.tar"))
        for _, members in iter_members(tar)
    }
    assert sizes == {(224, 224)}


def test_the_gpu_decode_path_run_on_the_cpu_gives_pil_pixels_within_one_level(tmp_path: Path):
    """decode: gpu hands JPEGs over undecoded and decodes them where the model is; with the model on the cpu
    (torchvision decodes there too) its pixels can be checked against PIL's. A PNG is decoded by the worker."""
    from PIL import Image

    from curate.io.wds import Span
    from curate.stages.embed import load_clip
    from curate.stages.embed_input import BatchJob, DecodeSpec, TarFiles, gpu_pixels, prepare, preprocessed

    rng = np.random.default_rng(0)
    blobs = []
    for i, fmt in enumerate(["JPEG", "PNG", "JPEG", "JPEG"]):
        gradient = np.linspace(0, 200, 120)[None, :, None]
        pixels = (rng.random((90 + 10 * i, 120, 3)) * 40 + gradient).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt)
        blobs.append(buffer.getvalue())
    blob_file = tmp_path / "members.bin"
    blob_file.write_bytes(b"".join(blobs))
    offsets = np.cumsum([0, *map(len, blobs)])
    spans = [Span(int(offsets[i]), len(b)) for i, b in enumerate(blobs)]
    job = BatchJob(str(blob_file), list("abcd"), spans, list("wxyz"), [None] * 4)
    loaded = load_clip(model="curate-tiny", device="cpu")

    batch = prepare(DecodeSpec.for_model(loaded, "gpu"), job, TarFiles())
    decoded = gpu_pixels(loaded, batch)

    assert batch.jpeg_rows == [0, 2, 3] and batch.images is not None and len(batch.images) == 1  # the PNG
    full = DecodeSpec.for_model(loaded, "full")
    expected = torch.from_numpy(np.stack([preprocessed(full, decode_image(b)) for b in blobs]))
    assert decoded.shape == expected.shape == (4, TINY_SIDE, TINY_SIDE, 3) and decoded.dtype == torch.uint8
    difference = (decoded.int() - expected.int()).abs()
    assert difference.max() <= 1 and difference[1].max() == 0  # the PNG went through PIL itself
