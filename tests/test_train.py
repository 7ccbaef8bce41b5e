from __future__ import annotations

import dataclasses
import io
import json
import logging
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image

from curate.clip import resolve_model_name
from curate.scorer import calibrate, mismatched_captions, suggest_threshold
from curate.stages.validate.batches import PreparedCache, SampleReader, make_batches, prepared_bytes
from curate.stages.validate.simclr import TwoViewDecoder
from curate.stages.validate.train import (
    SampleDecoder,
    TrainRecipe,
    TrainResult,
    decode_side,
    load_checkpoint,
    train_clip,
)
from examples.demo_world import COLORS, encode_image, make_caption, random_scene, render_scene

# Smaller than curate-tiny so each step takes milliseconds; registered from its JSON path (as curate-train-micro:
# a file named after curate's own curate-micro would be refused, it would change what that name means).
MICRO_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
SAMPLES_PER_SHARD = 24


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """(model-config path, two shards of demo-world scenes in img2dataset's jpg/txt/json layout)."""
    root = tmp_path_factory.mktemp("train-data")
    config = root / "curate-train-micro.json"
    config.write_text(json.dumps(MICRO_CONFIG))
    rng = np.random.default_rng(0)
    shards = []
    for number in range(2):
        shards.append(root / f"{number:05d}.tar")
        with wds.TarWriter(str(shards[-1])) as sink:
            for i in range(SAMPLES_PER_SHARD):
                scene = random_scene(rng, (48, 48))
                sink.write(
                    {
                        "__key__": f"{number:05d}{i:04d}",
                        "jpg": encode_image(render_scene(rng, scene), "jpeg"),
                        "txt": make_caption(rng, scene.shape, scene.color, scene.count, scene.background),
                        "json": json.dumps({"uid": f"{number}-{i}"}),
                    }
                )
    return config, shards


def recipe(config: Path, **changes: object) -> TrainRecipe:
    settings = {
        "model": str(config),
        "batch_size": 16,
        "samples_seen": 16 * 16,
        "lr": 2e-3,
        "warmup_steps": 2,
        "device": "cpu",
        "checkpoint_every": 100,
        "decode_workers": 2,
        "shuffle_buffer": 32,
    }
    return TrainRecipe(**{**settings, **changes})


@pytest.fixture(scope="module")
def trained(data: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    config, shards = data
    return train_clip(shards, recipe(config), tmp_path_factory.mktemp("run"))


def test_short_run_lowers_loss(trained: TrainResult) -> None:
    assert trained.steps == 16 and trained.samples_seen == 16 * 16
    assert len(trained.losses) == 16 and all(np.isfinite(trained.losses))
    assert np.mean(trained.losses[-4:]) < np.mean(trained.losses[:4]) - 0.2, trained.losses


def test_checkpoint_reloads_through_open_clip(trained: TrainResult, data: tuple[Path, list[Path]]) -> None:
    checkpoint = load_checkpoint(trained.checkpoint)
    assert checkpoint["model_name"] == "curate-train-micro" and checkpoint["step"] == 16
    assert TrainRecipe.from_dict(checkpoint["recipe"]) == recipe(data[0])
    model, _, _ = open_clip.create_model_and_transforms("curate-train-micro", pretrained=str(trained.checkpoint))
    reloaded = model.state_dict()
    assert reloaded.keys() == checkpoint["state_dict"].keys()
    for name, tensor in checkpoint["state_dict"].items():
        assert torch.equal(reloaded[name], tensor), name


def test_finished_run_is_not_retrained(trained: TrainResult, data: tuple[Path, list[Path]]) -> None:
    config, shards = data
    again = train_clip(shards, recipe(config), trained.checkpoint.parent)
    assert again.losses == trained.losses and again.steps == trained.steps


class Crash(RuntimeError):
    pass


def test_resumed_run_ends_with_the_uninterrupted_weights(data: tuple[Path, list[Path]], tmp_path: Path) -> None:
    config, shards = data
    budget = recipe(config, samples_seen=16 * 6, warmup_steps=1, checkpoint_every=2, augment=True)
    whole = train_clip(shards, budget, tmp_path / "whole")

    calls = []

    def crash_at_step_3(samples: int, loss: float) -> None:
        calls.append(samples)
        if len(calls) == 3:
            raise Crash  # after step 3; the last checkpoint is from step 2

    with pytest.raises(Crash):
        train_clip(shards, budget, tmp_path / "resumed", progress=crash_at_step_3)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 2
    # decode threads are an execution detail: a different count must not change the result
    resumed = train_clip(shards, dataclasses.replace(budget, decode_workers=3), tmp_path / "resumed")

    assert resumed.resumed_from_step == 2 and resumed.steps == 6
    np.testing.assert_allclose(resumed.losses, whole.losses, atol=1e-5)
    final, expected = load_checkpoint(resumed.checkpoint)["state_dict"], load_checkpoint(whole.checkpoint)["state_dict"]
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-5, rtol=0, msg=name)


def test_training_logs_its_loss_and_samples_per_s_every_ten_steps_and_at_the_end(
    data: tuple[Path, list[Path]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What `curate run -v` shows of each validation run (INFO): step, loss, lr and samples/s."""
    config, shards = data
    with caplog.at_level(logging.INFO, logger="curate.stages.validate.train"):
        result = train_clip(shards, recipe(config, samples_seen=16 * 11, warmup_steps=1), tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in lines] == ["10/11", "11/11"]
    for line, step in zip(lines, (10, 11), strict=True):
        fields = line.split()
        assert fields[2] == "loss" and float(fields[3]) == pytest.approx(result.losses[step - 1], abs=1e-4)
        assert fields[-1] == "samples/s" and float(fields[-2]) > 0
    assert len(result.losses) == 11


def first_batches(
    shards: list[Path], config: Path, workers: int, start_step: int, n: int, cache_mb: int = 0, decoder: object = None
) -> list[torch.Tensor]:
    decoder = decoder or micro_decoder(config)
    settings = recipe(
        config, seed=3, batch_size=10, shuffle_buffer=16, decode_workers=workers, decoded_cache_mb=cache_mb
    )
    batches = make_batches(shards, decoder, settings, start_step=start_step)
    taken = [next(batches) for _ in range(n)]
    batches.close()
    return [torch.cat([images.flatten(), texts.flatten().float()]) for images, texts in taken]


def micro_decoder(config: Path) -> SampleDecoder:
    name = resolve_model_name(str(config))
    _, train_transform, _ = open_clip.create_model_and_transforms(name)
    return SampleDecoder(train_transform, open_clip.get_tokenizer(name), augment=True, seed=3, input_size=32)


@dataclasses.dataclass
class CountingDecoder:
    """A SampleDecoder that counts the JPEGs it decodes (in-process only: the count stays in this process)."""

    inner: SampleDecoder | TwoViewDecoder
    prepared: int = 0

    def __call__(self, index: int, jpg: bytes, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.finish(index, self.prepare(jpg, caption))

    def prepare(self, jpg: bytes, caption: str) -> Any:
        self.prepared += 1
        return self.inner.prepare(jpg, caption)

    def finish(self, index: int, prepared: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.finish(index, prepared)


def test_decoded_images_are_kept_across_epochs_without_changing_a_batch(data: tuple[Path, list[Path]]) -> None:
    config, shards = data
    n_samples = 2 * SAMPLES_PER_SHARD
    uncached = CountingDecoder(micro_decoder(config))
    plain = first_batches(shards, config, workers=0, start_step=0, n=12, decoder=uncached)  # 120 samples: 2.5 epochs
    assert uncached.prepared == 120
    cached = CountingDecoder(micro_decoder(config))
    kept = first_batches(shards, config, workers=0, start_step=0, n=12, cache_mb=1, decoder=cached)
    assert cached.prepared == n_samples  # each JPEG decoded once, in the first epoch
    assert all(torch.equal(a, b) for a, b in zip(kept, plain, strict=True))
    with_workers = first_batches(shards, config, workers=2, start_step=0, n=12, cache_mb=1)
    assert all(torch.equal(a, b) for a, b in zip(with_workers, plain, strict=True))


def test_simclr_views_from_kept_images_are_the_views_of_fresh_decodes(data: tuple[Path, list[Path]]) -> None:
    config, shards = data
    _, train_transform, _ = open_clip.create_model_and_transforms(resolve_model_name(str(config)))
    uncached = CountingDecoder(TwoViewDecoder(train_transform, seed=3))
    plain = first_batches(shards, config, workers=0, start_step=0, n=12, decoder=uncached)
    cached = CountingDecoder(TwoViewDecoder(train_transform, seed=3))
    kept = first_batches(shards, config, workers=0, start_step=0, n=12, cache_mb=4, decoder=cached)
    assert (uncached.prepared, cached.prepared) == (120, 2 * SAMPLES_PER_SHARD)
    assert all(torch.equal(a, b) for a, b in zip(kept, plain, strict=True))


def test_the_decoded_cache_stops_filling_at_its_budget(data: tuple[Path, list[Path]]) -> None:
    config, shards = data
    decoder = micro_decoder(config)
    reader = SampleReader(shards)
    one = decoder.prepare(*reader.read(0, 0))
    reader.close()
    size = prepared_bytes(one)
    width, height = one[0].size
    assert size == width * height * 3 + one[1].nelement() * one[1].element_size()
    cache = PreparedCache(budget=3 * size + size // 2)
    for sample in range(5):
        cache.add((0, sample), one)
    assert cache.used == 3 * size
    assert [cache.get((0, sample)) is not None for sample in range(5)] == [True, True, True, False, False]


def test_batches_do_not_depend_on_the_number_of_decode_workers(data: tuple[Path, list[Path]]) -> None:
    config, shards = data
    in_process = first_batches(shards, config, workers=0, start_step=0, n=7)  # 70 samples: wraps an epoch
    assert len({b.sum().item() for b in in_process}) == 7  # seven different batches
    for workers in (2, 3):
        with_workers = first_batches(shards, config, workers, start_step=0, n=7)
        assert all(torch.equal(a, b) for a, b in zip(with_workers, in_process, strict=True))
    resumed = first_batches(shards, config, workers=2, start_step=4, n=3)
    assert all(torch.equal(a, b) for a, b in zip(resumed, in_process[4:], strict=True))


def test_shard_index_reads_back_every_jpg_txt_pair_and_skips_the_rest(tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    members = {
        "a.jpg": b"jpeg-a",
        "a.txt": "caption ä".encode(),
        "a.json": b"{}",
        "only-image.jpg": b"jpeg-b",  # no caption: not a training sample
        "dir/c.jpg": b"jpeg-c",  # key "dir/c"
        "dir/c.txt": b"caption c",
        "dir/e.seg.jpg": b"not an image",  # webdataset's extension is all after the first dot: "seg.jpg"
        "dir/e.txt": b"caption e",
    }
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = {"comment": "x" * 600}  # a pax header block before every member
            tar.addfile(info, io.BytesIO(data))
    reader = SampleReader([shard])
    assert len(reader.index(0)) == 2
    assert [reader.read(0, i) for i in range(2)] == [(b"jpeg-a", "caption ä"), (b"jpeg-c", "caption c")]
    reader.close()
    assert sorted(ref for ref, _ in zip(reader.refs(seed=0, shuffle_buffer=8), range(4), strict=False)) == [
        (0, 0),
        (0, 0),
        (0, 1),
        (0, 1),  # two epochs of two samples
    ]


def test_a_reader_keeps_only_a_few_shards_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import curate.stages.validate.batches as batches

    monkeypatch.setattr(batches, "OPEN_SHARDS", 2)
    shards = []
    for number in range(5):
        shards.append(tmp_path / f"{number:05d}.tar")
        with wds.TarWriter(str(shards[-1])) as sink:
            sink.write({"__key__": "a", "jpg": f"jpeg-{number}".encode(), "txt": f"caption {number}"})
    reader = SampleReader(shards)
    assert [reader.read(shard, 0) for shard in (0, 1, 2, 3, 4, 0)] == [
        (f"jpeg-{n}".encode(), f"caption {n}") for n in (0, 1, 2, 3, 4, 0)
    ]
    assert len(reader._files) == 2
    reader.close()


def test_training_batches_come_from_png_and_webp_shards(data: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """download.encode_format: png (or webp) writes <key>.png members; training reads them like jpgs."""
    config, _ = data
    rng = np.random.default_rng(1)
    shard, written = tmp_path / "00000.tar", []
    with wds.TarWriter(str(shard)) as sink:
        for i in range(12):
            scene = random_scene(rng, (48, 48))
            extension = "webp" if i % 3 == 0 else "png"
            encoded = io.BytesIO()
            render_scene(rng, scene).save(encoded, format=extension.upper())
            caption = make_caption(rng, scene.shape, scene.color, scene.count, scene.background)
            sink.write({"__key__": f"{i:04d}", extension: encoded.getvalue(), "txt": caption, "json": {"uid": str(i)}})
            written.append((encoded.getvalue(), caption))
    reader = SampleReader([shard])
    assert [reader.read(0, i) for i in range(len(reader.index(0)))] == written
    reader.close()
    batches = first_batches([shard], config, workers=0, start_step=0, n=2)
    assert len(batches) == 2 and all(torch.isfinite(b).all() for b in batches)


def test_jpegs_decode_at_the_smallest_scale_that_covers_the_crop(data: tuple[Path, list[Path]]) -> None:
    config, _ = data
    _, train_transform, _ = open_clip.create_model_and_transforms(resolve_model_name(str(config)))
    assert decode_side(32, None) == 32  # no random crop: the input side
    assert decode_side(32, train_transform) == 34  # the crop keeps >= 90% of the area: 32 / sqrt(0.9) -> 34
    with Image.open(io.BytesIO(encode_image(Image.new("RGB", (224, 224), "red"), "jpeg"))) as raw:
        raw.draft("RGB", (34, 34))
        assert raw.size == (56, 56)  # libjpeg's 1/4 scale: the smallest of 224, 112, 56, 28 that is >= 34


def test_another_recipe_starts_afresh(trained: TrainResult, data: tuple[Path, list[Path]], tmp_path: Path) -> None:
    config, shards = data
    first = train_clip(shards, recipe(config, samples_seen=16 * 2, warmup_steps=1), tmp_path)
    second = train_clip(shards, recipe(config, samples_seen=16 * 2, warmup_steps=1, seed=1), tmp_path)
    assert second.resumed_from_step == 0 and second.losses != first.losses


class ColourScorer:
    """Known answers: an image embeds as its mean colour, a caption as the colour it names."""

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        return _unit(np.array([np.asarray(image, float).mean(axis=(0, 1)) - 128 for image in images]))

    def embed_texts(self, captions: list[str]) -> np.ndarray:
        return _unit(np.array([np.array(COLORS[caption.split()[1]], float) - 128 for caption in captions]))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_calibrated_threshold_lies_between_the_clusters() -> None:
    rng = np.random.default_rng(0)
    pairs = []
    for name in ["red", "green", "blue", "yellow", "purple", "black"] * 4:
        jittered = np.clip(np.array(COLORS[name]) + rng.integers(-30, 31, size=3), 0, 255).astype(np.uint8)
        pairs.append((Image.new("RGB", (8, 8), tuple(int(c) for c in jittered)), f"a {name} square"))
    result = calibrate(None, "unused", pairs, seed=3, scorer=ColourScorer())  # type: ignore[arg-type]

    matched, mismatched = result["matched_quantiles"], result["mismatched_quantiles"]
    assert mismatched["0.99"] < result["suggested_threshold"] < matched["0.01"]
    assert result["balanced_accuracy"] == 1.0 and result["n_pairs"] == 24


def test_suggested_threshold_balances_overlapping_clusters() -> None:
    matched, mismatched = np.array([0.5, 0.6, 0.7, 0.8, 0.25]), np.array([0.1, 0.2, 0.3, 0.35, 0.65])
    threshold, accuracy = suggest_threshold(matched, mismatched)
    assert 0.35 < threshold < 0.5 and accuracy == pytest.approx(0.5 * (4 / 5 + 4 / 5))
    f1_threshold, _ = suggest_threshold(matched, mismatched, objective="f1_mismatched")
    assert 0.25 <= f1_threshold <= 0.55


def test_mismatched_captions_never_pair_an_image_with_its_own_text() -> None:
    captions = ["a", "b", "a", "c", "d", "b"]
    shuffled = mismatched_captions(captions, seed=0)
    assert all(new != old for new, old in zip(shuffled, captions, strict=True))
    assert shuffled == mismatched_captions(captions, seed=0)


def test_calibrate_scores_a_trained_checkpoint(trained: TrainResult, data: tuple[Path, list[Path]]) -> None:
    result = calibrate(trained.checkpoint, str(data[0]), data[1], seed=0, device="cpu")
    assert result["n_pairs"] == 2 * SAMPLES_PER_SHARD
    assert -1 <= result["suggested_threshold"] <= 1
    assert result["matched_quantiles"]["0.5"] > result["mismatched_quantiles"]["0.5"]


def test_one_seed_starts_every_arm_from_the_same_weights_whatever_its_data(
    data: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    config, shards = data
    # one step at a learning rate too small to move a weight: the checkpoint holds the initial weights
    # (an update of ~1e-30 still shows on a weight initialised to exactly 0, hence the tolerance below)
    frozen = {"samples_seen": 16, "warmup_steps": 0, "lr": 1e-30, "decode_workers": 0}
    weights = {}
    for arm, shard, seed in (("a", shards[0], 0), ("b", shards[1], 0), ("c", shards[0], 1)):
        result = train_clip([shard], recipe(config, seed=seed, **frozen), tmp_path / arm)
        weights[arm] = load_checkpoint(result.checkpoint)["state_dict"]

    def largest_difference(one: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
        assert one.keys() == other.keys()
        return max(float((one[name] - other[name]).abs().max()) for name in one)

    assert largest_difference(weights["a"], weights["b"]) < 1e-20  # same seed, other data: same start
    assert largest_difference(weights["a"], weights["c"]) > 1e-3  # another seed: another start


class Retrained(RuntimeError):
    pass


def test_the_demo_scorer_trains_on_a_clean_split_of_another_world_once_and_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README, "The demo world": curate-cnn-64, 51,200 samples seen (400 steps of 128, lr 5e-3), on the clean rows
    of a world drawn with another seed than the crawl's and the eval set's, part of it held out for calibration;
    trained once and reused while the recipe is the same."""
    from curate.io.fs import write_json_atomic
    from examples import demo_scorer, run_demo
    from examples.demo_world import kind_counts

    recipe = demo_scorer.demo_recipe()
    assert (recipe.model, recipe.batch_size, recipe.samples_seen, recipe.lr) == ("curate-cnn-64", 128, 51_200, 5e-3)
    assert recipe.total_steps == 400
    data = demo_scorer.data_spec(seed=0, n_base=demo_scorer.DEFAULT_N_BASE)
    assert data["kinds"] == ["clean"] and 0 < data["calibration_fraction"] < 1
    assert len({0, data["world_seed"], run_demo.EVAL_WORLD_SEED}) == 3  # crawl, scorer and eval worlds
    assert kind_counts(data["n_base"])["clean"] == 2100  # ~1,900 to train on, ~200 to calibrate on

    def retrain(*args: object, **kwargs: object) -> None:
        raise Retrained

    monkeypatch.setattr(demo_scorer, "ensure_training_shards", retrain)
    out = tmp_path / "scorer"
    out.mkdir()
    (out / "scorer.pt").write_bytes(b"weights")
    spec = {"train": recipe.to_dict(), "data": data}
    write_json_atomic(out / "scorer.json", {"model": recipe.model, "recipe": spec, "calibration": {}})
    reused = demo_scorer.ensure_demo_scorer(out)
    assert reused["checkpoint"] == str((out / "scorer.pt").resolve()) and reused["recipe"] == spec
    with pytest.raises(Retrained):
        demo_scorer.ensure_demo_scorer(out, samples_seen=128 * 40)  # another recipe: trained afresh
