"""The embed stage with the tiny model config: equality with open_clip, model loading and errors,
per-image failures, row alignment, model-per-worker, and one run through the pipeline."""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

import curate.stages.embed as embed
from curate.config import ConfigError, EmbedConfig, PipelineConfig, load_config, validate_config
from curate.io.fs import write_parquet_atomic
from curate.ledger import make_fates, read_fate_parts, read_ledger
from curate.pipeline import run_pipeline
from curate.runner import run_shard
from curate.stage import RunLayout, StageContext
from curate.stages.embed import EmbedStage, embed_images, embed_texts, embedding_paths, load_clip, read_embeddings
from tests.world_fixtures import ServedWorld

TINY = "curate-tiny"
EMB_ATOL = 1e-3  # embeddings are stored as float16: ~5e-4 relative error on unit vectors' entries
SCORE_ATOL = 1e-4  # clip_score is computed in float32 before the float16 cast


@dataclass(frozen=True)
class Reference:
    """A tiny model with known weights, saved as a checkpoint, and open_clip's own transforms for it."""

    checkpoint: Path
    model: Any
    preprocess: Any
    tokenizer: Any

    def encode(self, images: list[bytes], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        pixels = torch.stack([self.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        with torch.no_grad():
            img = self.model.encode_image(pixels, normalize=True)
            txt = self.model.encode_text(self.tokenizer(captions), normalize=True)
        return img.numpy(), txt.numpy()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    embed.register_model_configs()
    torch.manual_seed(1234)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY)
    model.eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    # the layout open_clip's trainer writes (and load_checkpoint reads): DDP "module." prefix under state_dict
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return Reference(path, model, preprocess, open_clip.get_tokenizer(TINY))


def jpeg(seed: int, size: tuple[int, int] = (72, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def uid_of(i: int) -> str:
    return f"{i:032x}"


def run_config(run_dir: Path, **embed_settings: Any) -> PipelineConfig:
    settings = {"model": TINY, "device": "cpu", "batch_size": 4, "decode_workers": 2, **embed_settings}
    return validate_config(
        {
            "output": str(run_dir),
            "stages": ["input", "download", "embed"],
            "input": {"path": "unused.parquet"},
            "embed": settings,
        }
    )


def write_download_shard(
    layout: RunLayout, shard: str, samples: list[dict[str, Any]], absent: Sequence[str] = ()
) -> None:
    """A tar as img2dataset writes it (key.jpg/.txt/.json), and download fates keeping its uids plus `absent`."""
    download = layout.stage_dir("download")
    download.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(download / f"{shard}.tar")) as sink:
        for i, sample in enumerate(samples):
            meta = {"uid": sample["uid"], "url": f"http://127.0.0.1/{sample['uid']}.jpg", "caption": sample["caption"]}
            sink.write(
                {"__key__": f"{int(shard):05d}{i:04d}", "jpg": sample["jpg"], "txt": sample["caption"], "json": meta}
            )
    uids = [s["uid"] for s in samples] + list(absent)
    write_parquet_atomic(make_fates(uids, "kept"), layout.fates_path("download", shard))


def good_samples(start: int, n: int) -> list[dict[str, Any]]:
    return [{"uid": uid_of(i), "caption": f"a picture number {i}", "jpg": jpeg(i)} for i in range(start, start + n)]


def embed_stage(**settings: Any) -> EmbedStage:
    return EmbedStage(validate_config({"output": "unused", "input": {"path": "unused"}, "embed": settings}))


def process(config: PipelineConfig, shard: str) -> tuple[Any, Path]:
    stage = EmbedStage(config)
    layout = RunLayout(Path(config.output))
    workdir = layout.scratch_dir("embed") / shard
    workdir.mkdir(parents=True)
    return stage.process_shard(StageContext(config, layout, "test"), shard, workdir), workdir


def read_outputs(root: Path, shard: str) -> tuple[np.ndarray, np.ndarray, Any]:
    img_path, text_path, meta_path = embedding_paths(root, shard)
    return np.load(img_path), np.load(text_path), pq.read_table(meta_path)


def test_stage_embeddings_equal_open_clip_on_the_same_inputs(reference: Reference, tmp_path: Path):
    config = run_config(tmp_path / "run", pretrained=str(reference.checkpoint))
    samples = good_samples(0, 10)
    write_download_shard(RunLayout(tmp_path / "run"), "00000", samples)

    fates, workdir = process(config, "00000")

    img, txt, meta = read_outputs(workdir, "00000")
    assert img.dtype == txt.dtype == np.float16 and img.shape == txt.shape == (10, 128)
    assert meta.column_names == ["uid", "url", "caption", "clip_score"]
    ref_img, ref_txt = reference.encode([s["jpg"] for s in samples], [s["caption"] for s in samples])
    np.testing.assert_allclose(img.astype(np.float32), ref_img, atol=EMB_ATOL)
    np.testing.assert_allclose(txt.astype(np.float32), ref_txt, atol=EMB_ATOL)
    np.testing.assert_allclose(meta["clip_score"].to_numpy(), (ref_img * ref_txt).sum(1), atol=SCORE_ATOL)
    assert fates["status"].to_pylist() == ["kept"] * 10
    assert fates["clip_score"].to_pylist() == meta["clip_score"].to_pylist()


def test_checkpoint_weights_differ_from_a_random_init(reference: Reference):
    images = [Image.open(io.BytesIO(jpeg(i))) for i in range(3)]
    loaded = load_clip(model=TINY, pretrained=str(reference.checkpoint), device="cpu")
    random_init = load_clip(model=TINY, device="cpu")
    ref_img, ref_txt = reference.encode([jpeg(i) for i in range(3)], ["a", "b", "c"])

    np.testing.assert_allclose(embed_images(loaded, images), ref_img, atol=1e-5)
    np.testing.assert_allclose(embed_texts(loaded, ["a", "b", "c"]), ref_txt, atol=1e-5)
    assert np.abs(embed_images(random_init, images) - ref_img).max() > 0.1
    assert not loaded.model.training and loaded.device == torch.device("cpu")


def test_custom_model_config_json_loads(tmp_path: Path):
    config = json.loads((embed.MODEL_CONFIG_DIR / f"{TINY}.json").read_text())
    config["embed_dim"] = 48
    path = tmp_path / "my-small-clip.json"
    path.write_text(json.dumps(config))

    loaded = load_clip(model=str(path), device="cpu")

    assert loaded.model_name == "my-small-clip" and loaded.embed_dim == 48
    assert embed_texts(loaded, ["a red square"]).shape == (1, 48)


def test_batched_pixel_steps_equal_open_clip_preprocess_exactly():
    loaded = load_clip(model=TINY, device="cpu")
    steps = loaded.pixel_steps
    assert steps is not None
    rng = np.random.default_rng(0)
    images = [
        Image.open(io.BytesIO(jpeg(1, size=(120, 50)))),
        Image.fromarray(rng.integers(0, 255, (30, 90, 4), dtype=np.uint8), "RGBA"),
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8), "L"),
    ]
    expected = torch.stack([loaded.preprocess(im) for im in images])
    pixels = torch.from_numpy(np.stack([steps.pixels(im) for im in images]))
    assert pixels.dtype == torch.uint8
    assert torch.equal(steps.to_model_input(pixels, loaded.device), expected)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"model": "ViT-B-23"}, "did you mean 'ViT-B-32'"),
        ({"model": "configs/missing.json"}, "no such model-config file"),
        ({"model": TINY, "pretrained": "checkpoints/epoch_3.pt"}, "no such checkpoint file"),
        ({"model": TINY, "pretrained": "weights.safetensors"}, "no such checkpoint file"),
        ({"model": "ViT-B-32", "pretrained": "laion2b"}, "valid tags: openai, "),
        ({"model": TINY, "pretrained": "openai"}, "has no pretrained tags"),
        ({"model": TINY, "device": "cpu", "precision": "fp16"}, "needs a CUDA device"),
    ],
)
def test_preflight_errors_name_the_key(settings: dict[str, Any], message: str):
    with pytest.raises(ConfigError, match=r"embed\.") as caught:
        embed_stage(**settings).preflight()
    assert message in str(caught.value)


def test_a_json_that_would_shadow_a_builtin_model_is_refused(tmp_path: Path):
    path = tmp_path / "ViT-B-32.json"
    path.write_text((embed.MODEL_CONFIG_DIR / f"{TINY}.json").read_text())
    with pytest.raises(ConfigError, match="would replace open_clip's registered model 'ViT-B-32'"):
        embed_stage(model=str(path)).preflight()
    assert open_clip.get_model_config("ViT-B-32")["embed_dim"] == 512


def test_a_bad_model_fails_the_run_before_anything_is_written(tmp_path: Path):
    table = tmp_path / "crawl.csv"
    table.write_text("url,caption\nhttp://127.0.0.1/a.jpg,a\n")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(json.dumps({"output": str(tmp_path / "run"), "input": {"path": str(table)}}))
    config = load_config(pipeline, overrides=["stages=[input,download,embed]", "embed.model=ViT-B-23"])
    with pytest.raises(ConfigError, match="ViT-B-32"):
        run_pipeline(config)
    assert not (tmp_path / "run").exists()


def test_undecodable_images_fail_alone_and_outputs_stay_row_aligned(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # a 160x160 image is then a decompression bomb
    samples = good_samples(10, 7)
    broken = {
        uid_of(90): b"\xff\xd8\xff\xe0 this is not a jpeg",
        uid_of(91): jpeg(91)[:300],  # truncated
        uid_of(92): jpeg(92, size=(160, 160)),
    }
    samples += [{"uid": uid, "caption": "broken", "jpg": data} for uid, data in broken.items()]
    samples = samples[::-1]  # tar order is not uid order
    config = run_config(tmp_path / "run", batch_size=3)
    write_download_shard(RunLayout(tmp_path / "run"), "00003", samples, absent=[uid_of(99)])

    fates, workdir = process(config, "00003")

    by_uid = {row["uid"]: row for row in fates.to_pylist()}
    assert len(fates) == len(by_uid) == 11
    assert (by_uid[uid_of(90)]["status"], by_uid[uid_of(90)]["reason"]) == ("failed", "decode_error")
    assert (by_uid[uid_of(91)]["status"], by_uid[uid_of(91)]["reason"]) == ("failed", "decode_error")
    assert (by_uid[uid_of(92)]["status"], by_uid[uid_of(92)]["reason"]) == ("failed", "decompression_bomb")
    assert (by_uid[uid_of(99)]["status"], by_uid[uid_of(99)]["reason"]) == ("failed", "missing_sample")
    kept = sorted(uid for uid, row in by_uid.items() if row["status"] == "kept")
    assert kept == [uid_of(i) for i in range(10, 17)]
    assert all(by_uid[uid]["clip_score"] is not None for uid in kept)

    img, txt, meta = read_outputs(workdir, "00003")
    assert meta["uid"].to_pylist() == kept and img.shape == txt.shape == (7, 128)
    assert meta["caption"].to_pylist() == [f"a picture number {i}" for i in range(10, 17)]
    assert meta["url"].to_pylist() == [f"http://127.0.0.1/{uid}.jpg" for uid in kept]
    stored_dot = (img.astype(np.float32) * txt.astype(np.float32)).sum(1)
    np.testing.assert_allclose(meta["clip_score"].to_numpy(), stored_dot, atol=2 * EMB_ATOL)
    np.testing.assert_allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1, atol=EMB_ATOL)
    assert [by_uid[uid]["clip_score"] for uid in kept] == meta["clip_score"].to_pylist()


@pytest.fixture
def counted_loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EmbedConfig]]:
    calls: list[EmbedConfig] = []
    real = embed.load_clip

    def counting(cfg: EmbedConfig | None = None, /, **settings: Any) -> embed.LoadedClip:
        calls.append(cfg)
        return real(cfg, **settings)

    monkeypatch.setattr(embed, "load_clip", counting)
    yield calls


def test_model_loads_once_per_worker_and_is_never_pickled(counted_loads: list[EmbedConfig], tmp_path: Path):
    config = run_config(tmp_path / "run")
    layout = RunLayout(tmp_path / "run")
    write_download_shard(layout, "00000", good_samples(0, 5))
    write_download_shard(layout, "00001", good_samples(5, 6))
    write_parquet_atomic(make_fates([], "kept"), layout.fates_path("download", "00002"))  # empty, no tar
    stage = EmbedStage(config)
    ctx = StageContext(config, layout, f"fingerprint-{tmp_path.name}")

    reports = [run_shard(stage, ctx, shard) for shard in ("00000", "00001", "00002")]

    assert len(counted_loads) == 1
    assert [r.stats.kept for r in reports] == [5, 6, 0]
    assert stage._loaded is not None and pickle.loads(pickle.dumps(stage))._loaded is None
    assert len(pickle.dumps(stage)) < 4096  # the config, not the weights
    img, txt, meta = read_outputs(layout.stage_dir("embed"), "00002")
    assert img.shape == txt.shape == (0, 128) and img.dtype == np.float16 and meta.num_rows == 0
    uids, img_all, txt_all, meta_all = read_embeddings(tmp_path / "run")
    assert list(uids) == [uid_of(i) for i in range(11)] and img_all.shape == txt_all.shape == (11, 128)
    assert meta_all.num_rows == 11 and img_all.dtype == np.float32


def test_pipeline_embeds_every_uid_download_kept(served_world: ServedWorld, tmp_path: Path):
    overrides = ["stages=[input,download,embed]", f"embed.model={TINY}", "embed.batch_size=16", "embed.device=cpu"]
    config = load_config(served_world.pipeline(tmp_path), overrides=overrides)

    result = run_pipeline(config)

    assert result.complete
    run = tmp_path / "run"
    download = read_fate_parts(sorted((run / "download" / "fates").glob("*.parquet"))).to_pandas()
    embedded = read_fate_parts(sorted((run / "embed" / "fates").glob("*.parquet"))).to_pandas()
    download_kept = set(download.loc[download.status == "kept", "uid"])
    assert len(download_kept) > 20
    assert sorted(embedded.uid) == sorted(download_kept)  # exactly one embed fate per uid download kept
    ledger = read_ledger(run).set_index("uid")
    kept = ledger[ledger.status == "kept"]
    assert set(kept.index) == set(embedded.loc[embedded.status == "kept", "uid"])
    assert (kept.stage == "embed").all() and kept.clip_score.notna().all()
    uids, img, _, meta = read_embeddings(run)
    assert set(uids) == set(kept.index) and img.shape == (len(kept), 128)
    np.testing.assert_allclose(kept.loc[list(uids), "clip_score"].to_numpy(float), meta["clip_score"].to_numpy())
    assert result.stats["embed"].kept == len(kept)
