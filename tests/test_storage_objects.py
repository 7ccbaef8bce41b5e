"""What a run reads whole from a URL (moto's S3 server on loopback): `embed.pretrained`, `dedup.eval_sets` and
`validate.eval_set` in a bucket give the same model, images and fingerprints as the same files on disk; each
machine fetches an object once into its cache, again only when the object changes; a missing object is one line
naming the setting."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from curate.clip import ClipSpec, embed_images, load_clip, resolve_model
from curate.config import ConfigError, PipelineConfig, validate_config
from curate.io.local_copy import CACHE_ENV
from curate.io.storage import Storage
from curate.stages.dedup.decontaminate import embed_eval_sets, load_eval_images
from curate.stages.dedup.stage import DedupStage
from curate.stages.embed import EmbedStage, register_model_configs
from curate.stages.validate.evalsets import load_eval_set, make_demo_eval_set
from curate.stages.validate.stage import ValidateStage
from tests.s3_fixtures import S3Bucket


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "objects"


def pictures(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(n)]


def config(tmp_path: Path, storage: Storage | None = None, **sections: dict[str, Any]) -> PipelineConfig:
    raw: dict[str, Any] = {"output": str(tmp_path / "run"), "input": {"path": "crawl.parquet"}, **sections}
    if storage is not None:
        raw["storage"] = {"options": storage.options}
    return validate_config(raw)


def cached_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def test_a_checkpoint_in_a_bucket_loads_as_the_file_it_was_and_is_fetched_once_per_change(
    s3_bucket: S3Bucket, tiny_checkpoint: Path, cache: Path, tmp_path: Path
) -> None:
    storage = Storage(s3_bucket.options)
    url = s3_bucket.upload(tiny_checkpoint, "models/tiny.pt")
    images = pictures(3, seed=1)
    on_disk = embed_images(load_clip(ClipSpec("curate-tiny", str(tiny_checkpoint), "cpu")), images)

    assert resolve_model(ClipSpec("curate-tiny", url, "cpu", storage=storage)) == ("curate-tiny", url)
    assert cached_files(cache) == []  # looking the object up fetches nothing
    from_bucket = embed_images(load_clip(ClipSpec("curate-tiny", url, "cpu", storage=storage)), images)
    assert np.array_equal(on_disk, from_bucket)
    [copy] = cached_files(cache)
    assert copy.name == "tiny.pt" and copy.read_bytes() == tiny_checkpoint.read_bytes()
    fetched_at = copy.stat().st_mtime_ns
    load_clip(ClipSpec("curate-tiny", url, "cpu", storage=storage))
    assert cached_files(cache) == [copy] and copy.stat().st_mtime_ns == fetched_at  # not fetched again

    import open_clip

    register_model_configs()
    torch.manual_seed(7)
    other = tmp_path / "other.pt"
    torch.save(open_clip.create_model("curate-tiny").state_dict(), other)
    s3_bucket.upload(other, "models/tiny.pt")  # the same key, other weights
    changed = embed_images(load_clip(ClipSpec("curate-tiny", url, "cpu", storage=storage)), images)
    assert len(cached_files(cache)) == 2 and not np.array_equal(changed, on_disk)


def test_a_checkpoint_url_with_nothing_there_is_one_line_naming_the_setting(
    s3_bucket: S3Bucket, tiny_checkpoint: Path, cache: Path, tmp_path: Path
) -> None:
    storage = Storage(s3_bucket.options)
    s3_bucket.upload(tiny_checkpoint, "models/tiny.pt")
    missing = s3_bucket.url("models/none.pt")
    for pretrained, message in [
        (missing, f"embed.pretrained: nothing at {missing}"),
        (s3_bucket.url("models"), f"embed.pretrained: {s3_bucket.url('models')} is a folder, not a checkpoint file"),
    ]:
        stage = EmbedStage(config(tmp_path, storage, embed={"model": "curate-tiny", "pretrained": pretrained}))
        with pytest.raises(ConfigError) as error:
            stage.preflight()
        assert str(error.value) == message
    assert cached_files(cache) == []


def test_weights_moved_from_a_disk_into_a_bucket_are_the_same_setting(
    s3_bucket: S3Bucket, tiny_checkpoint: Path, cache: Path, tmp_path: Path
) -> None:
    storage = Storage(s3_bucket.options)
    url = s3_bucket.upload(tiny_checkpoint, "models/weights.pt")
    on_disk = EmbedStage(config(tmp_path, embed={"model": "curate-tiny", "pretrained": str(tiny_checkpoint)}))
    in_bucket = EmbedStage(config(tmp_path, storage, embed={"model": "curate-tiny", "pretrained": url}))
    assert on_disk.fingerprint("up") == in_bucket.fingerprint("up")
    assert cached_files(cache) == []  # a file's identity is read in place: two ranged reads, no copy
    s3_bucket.fs.pipe(url.removeprefix("s3://"), b"other bytes")
    assert in_bucket.fingerprint("up") != on_disk.fingerprint("up")


def write_eval_sets(folder: Path) -> tuple[Path, Path]:
    """A folder of images (one in a subfolder) and a webdataset tar of two more."""
    images = folder / "held-out"
    (images / "sub").mkdir(parents=True)
    first, second, third, fourth = pictures(4, seed=2)
    first.save(images / "a.png")
    second.save(images / "sub" / "b.jpg", quality=95)
    tar_path = folder / "more.tar"
    with tarfile.open(tar_path, "w") as tar:
        for key, image in (("000", third), ("001", fourth)):
            data = io.BytesIO()
            image.save(data, "PNG")
            member = tarfile.TarInfo(f"{key}.png")
            member.size = data.tell()
            data.seek(0)
            tar.addfile(member, data)
    return images, tar_path


def test_eval_sets_in_a_bucket_give_the_images_ids_and_embeddings_they_give_on_disk(
    s3_bucket: S3Bucket, tiny_checkpoint: Path, cache: Path, tmp_path: Path
) -> None:
    storage = Storage(s3_bucket.options)
    folder, tar_path = write_eval_sets(tmp_path / "evals")
    s3_bucket.fs.put(str(folder), s3_bucket.url("evals/held-out").removeprefix("s3://"), recursive=True)
    tar_url = s3_bucket.upload(tar_path, "evals/more.tar")
    local_paths = [str(folder), str(tar_path)]

    images, ids = load_eval_images(local_paths)
    assert ids == ["held-out/a.png", "held-out/sub/b.jpg", "more.tar/000.png", "more.tar/001.png"]
    for urls in (
        [s3_bucket.url("evals/held-out"), tar_url],
        [s3_bucket.url("evals/held-out"), s3_bucket.url("evals/*.tar")],
    ):
        from_bucket, bucket_ids = load_eval_images(urls, storage)
        assert bucket_ids == ids
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, from_bucket, strict=True))

    embed = config(tmp_path, embed={"model": "curate-tiny", "pretrained": str(tiny_checkpoint)}).embed
    remote_embed = embed.model_copy(update={"pretrained": s3_bucket.upload(tiny_checkpoint, "models/tiny.pt")})
    on_disk, _ = embed_eval_sets(local_paths, embed)
    from_bucket, _ = embed_eval_sets([s3_bucket.url("evals/held-out"), tar_url], remote_embed, storage)
    assert np.array_equal(on_disk, from_bucket)
    on_disk_stage = DedupStage(config(tmp_path, dedup={"eval_sets": local_paths}))
    in_bucket_stage = DedupStage(
        config(tmp_path, storage, dedup={"eval_sets": [s3_bucket.url("evals/held-out"), tar_url]})
    )
    assert on_disk_stage.fingerprint("up") == in_bucket_stage.fingerprint("up")
    with pytest.raises(ConfigError, match=r"^dedup\.eval_sets: nothing at s3://.*/evals/gone$"):
        load_eval_images([s3_bucket.url("evals/gone")], storage)
    s3_bucket.fs.pipe(s3_bucket.url("evals/notes.txt").removeprefix("s3://"), b"not an eval set")
    refused = [
        ("evals/gone", "nothing at s3://"),
        ("evals/*.zip", "s3://.* matches nothing"),
        ("evals/notes.txt", "s3://.*/notes.txt is not a folder of images or a .tar"),
    ]
    for missing, message in refused:
        stage = DedupStage(config(tmp_path, storage, dedup={"eval_sets": [tar_url, s3_bucket.url(missing)]}))
        with pytest.raises(ConfigError, match=rf"^dedup\.eval_sets: {message}"):
            stage.preflight()  # before any work: looked up, not fetched


def test_a_validation_eval_set_in_a_bucket_is_read_from_its_local_copy_with_the_same_fingerprint(
    s3_bucket: S3Bucket, cache: Path, tmp_path: Path
) -> None:
    storage = Storage(s3_bucket.options)
    local = make_demo_eval_set(tmp_path / "eval", n=6, seed=3)
    url = s3_bucket.url("eval")
    s3_bucket.fs.put(str(local), url.removeprefix("s3://"), recursive=True)
    stages = ["input", "download", "embed", "filter", "dedup", "materialize", "validate"]
    on_disk = ValidateStage(config(tmp_path, stages=stages, validate={"eval_set": str(local)}))
    in_bucket = ValidateStage(config(tmp_path, storage, stages=stages, validate={"eval_set": url}))
    in_bucket.preflight()
    copied, original = load_eval_set(Path(in_bucket.cfg.eval_set)), load_eval_set(local)
    assert copied.labels == original.labels and copied.captions == original.captions
    assert [f.read_bytes() for f in copied.files] == [f.read_bytes() for f in original.files]
    assert in_bucket.fingerprint("up") == on_disk.fingerprint("up")
    assert in_bucket._eval_print() == on_disk._eval_print()

    s3_bucket.fs.rm(f"{url.removeprefix('s3://')}/labels.json")
    gone = ValidateStage(config(tmp_path, storage, stages=stages, validate={"eval_set": url}))
    with pytest.raises(ConfigError) as error:
        gone.preflight()
    assert str(error.value) == f"validate.eval_set: {url!r} has no labels.json"


def test_copies_fetched_at_once_by_several_threads_agree_and_a_changed_folder_is_fetched_again(
    s3_bucket: S3Bucket, cache: Path, tmp_path: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from curate.io.local_copy import local_copy

    storage = Storage(s3_bucket.options)
    folder, tar_path = write_eval_sets(tmp_path / "evals")
    s3_bucket.fs.put(str(folder), s3_bucket.url("evals/held-out").removeprefix("s3://"), recursive=True)
    tar_url = s3_bucket.upload(tar_path, "evals/more.tar")
    folder_url = s3_bucket.url("evals/held-out")
    with ThreadPoolExecutor(4) as pool:
        copies = list(pool.map(lambda url: local_copy(url, storage, "test"), [folder_url, tar_url] * 4))
    assert set(copies[0::2]) == {copies[0]} and set(copies[1::2]) == {copies[1]}
    assert copies[1].read_bytes() == tar_path.read_bytes()
    assert sorted(p.relative_to(copies[0]) for p in copies[0].rglob("*") if p.is_file()) == [
        Path("a.png"),
        Path("sub/b.jpg"),
    ]
    assert not list(cache.rglob(".fetching-*"))  # no scratch left behind, whoever won each race

    s3_bucket.fs.pipe(f"{folder_url.removeprefix('s3://')}/a.png", b"replaced")
    again = local_copy(folder_url, storage, "test")
    assert again != copies[0] and (again / "a.png").read_bytes() == b"replaced"
    assert (copies[0] / "a.png").read_bytes() == (folder / "a.png").read_bytes()  # the old copy is untouched


def test_without_curate_cache_dir_objects_are_fetched_under_the_home_cache(
    s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from curate.io.local_copy import local_copy

    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "weights.pt").write_bytes(b"weights")
    copy = local_copy(s3_bucket.upload(tmp_path / "weights.pt", "models/weights.pt"), Storage(s3_bucket.options), "t")
    assert copy.is_relative_to(tmp_path / "home" / ".cache" / "curate" / "objects")
    assert copy.read_bytes() == b"weights"
