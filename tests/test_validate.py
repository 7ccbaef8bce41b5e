"""The validate stage: metrics on hand-checkable cases, the SimCLR loss, and the driver on a real run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import webdataset as wds

from curate.cli import main as curate_main
from curate.config import PipelineConfig, load_config, validate_config
from curate.cores import share_of
from curate.stage import RunLayout, kept_uids
from curate.stages.dedup.decontaminate import load_eval_images
from curate.stages.validate import stage as validate_stage
from curate.stages.validate.evalsets import load_eval_set, make_demo_eval_set
from curate.stages.validate.evaluate import linear_probe, recall_at_k, retrieval_recalls, zero_shot_accuracy
from curate.stages.validate.paired import paired_difference
from curate.stages.validate.simclr import nt_xent_loss, train_simclr
from curate.stages.validate.stage import format_validation_table, input_shards, pair_names, run_validation
from curate.stages.validate.train import TrainRecipe, load_checkpoint
from tests.run_fixtures import CuratedRun, shared_curated_run
from tests.s3_fixtures import S3Bucket
from tests.world_fixtures import ServedWorld

MICRO_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


# ---------------------------------------------------------------- metrics


def test_nt_xent_matches_the_formula() -> None:
    torch.manual_seed(0)
    a, b, tau = torch.randn(3, 5), torch.randn(3, 5), 0.5
    z = torch.nn.functional.normalize(torch.cat([a, b]), dim=1)
    n2 = len(z)
    expected = 0.0
    for i in range(n2):
        j = (i + 3) % n2  # the other view of the same image
        numerator = math.exp(float(z[i] @ z[j]) / tau)
        denominator = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n2) if k != i)
        expected += -math.log(numerator / denominator)
    assert float(nt_xent_loss(a, b, tau)) == pytest.approx(expected / n2, rel=1e-5)


def test_recall_at_k_on_a_hand_checked_matrix() -> None:
    # query 0 ranks its match first, query 1 second, query 2 third
    similarity = torch.tensor([[0.9, 0.1, 0.2], [0.8, 0.5, 0.1], [0.7, 0.6, 0.3]])
    recalls = recall_at_k(similarity, torch.eye(3, dtype=torch.bool), ks=(1, 2, 3))
    assert recalls == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}


def test_retrieval_counts_an_identical_caption_as_a_hit() -> None:
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    texts = torch.tensor([[1.0, 0.0], [0.6, 0.8], [1.0, 0.0]])  # texts 0 and 2 are the same words
    recalls = retrieval_recalls(images, texts, ["a red circle", "a blue star", "a red circle"], ks=(1, 2))
    # image->text top-1: image 0 -> texts 0 and 2 tie (both its words: hit), image 1 -> text 1 (hit),
    # image 2 -> text 1 (miss; text 1 is second-to-last at k=2: texts 0 and 2 tie at 0.6, so rank 1: hit)
    assert recalls["image_to_text_r1"] == pytest.approx(2 / 3)
    assert recalls["image_to_text_r2"] == 1.0
    # text->image top-1: text 0 -> image 0 (hit), text 1 -> image 2 (miss), text 2 -> image 0, whose caption
    # has the same words (hit)
    assert recalls["text_to_image_r1"] == pytest.approx(2 / 3)
    assert recalls["text_to_image_r2"] == 1.0


class WordTokenizer:
    """Each text becomes the ids of its words in a fixed vocabulary."""

    def __init__(self, vocabulary: list[str]) -> None:
        self.index = {word: i for i, word in enumerate(vocabulary)}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([torch.bincount(torch.tensor(self._ids(t)), minlength=len(self.index)) for t in texts])

    def _ids(self, text: str) -> list[int]:
        return [self.index[w.strip(".")] for w in text.split() if w.strip(".") in self.index]


class ClassWordModel:
    """Embeds a text as the class word it contains (one-hot over the classes)."""

    def __init__(self, n_classes: int) -> None:
        self.n_classes = n_classes

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = tokens[:, : self.n_classes].float()
        return torch.nn.functional.normalize(features, dim=1) if normalize else features


def test_zero_shot_with_a_constructed_model_gives_the_expected_accuracy() -> None:
    classes = ["circle", "square", "star"]
    tokenizer = WordTokenizer([*classes, "a", "photo", "of", "drawing", "shape"])
    templates = ["a photo of a {}.", "a drawing of a {}.", "a {} shape."]
    classifier = open_clip.build_zero_shot_classifier(ClassWordModel(3), tokenizer, classes, templates, device="cpu")
    torch.testing.assert_close(classifier, torch.eye(3))
    # images embedded near their class axis, except the last one, placed on the "star" axis though a circle
    images = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1, 0], [0, 1, 0.2], [0.1, 0, 1], [0, 0.2, 1]]), dim=1)
    labels = torch.tensor([0, 1, 2, 0])
    assert zero_shot_accuracy(images, classifier, labels) == pytest.approx(0.75)


def test_linear_probe_separates_separable_classes() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(4)[:3] * 3
    labels = torch.arange(60) % 3
    features = centres[labels] + 0.3 * torch.randn(60, 4, generator=generator)
    accuracy = linear_probe(features[:30], labels[:30], features[30:], labels[30:], n_classes=3)
    assert accuracy == 1.0


def test_paired_difference_on_hand_checked_seeds() -> None:
    # differences 0.10, 0.20, 0.30: mean 0.2, std 0.1, t(0.975, 2) = 4.3027 -> 0.2 ± 0.2484, which holds 0
    wide = paired_difference("curated", [0.6, 0.7, 0.8], "baseline", [0.5, 0.5, 0.5])
    assert wide.per_seed == pytest.approx([0.1, 0.2, 0.3]) and wide.mean == pytest.approx(0.2)
    assert wide.std == pytest.approx(0.1) and wide.ratio == pytest.approx(2.0)
    assert wide.ci95 == pytest.approx((0.2 - 0.248414, 0.2 + 0.248414), abs=1e-6)
    assert not wide.passes and "does NOT pass" in wide.verdict
    # differences 0.30, 0.31, 0.29, 0.31, 0.29: mean 0.3, std 0.01, t(0.975, 4) = 2.7764 -> 0.3 ± 0.012417
    tight = paired_difference("curated", [0.80, 0.82, 0.84, 0.86, 0.88], "baseline", [0.50, 0.51, 0.55, 0.55, 0.59])
    assert tight.mean == pytest.approx(0.3) and tight.std == pytest.approx(0.01) and tight.ratio == pytest.approx(30)
    assert tight.ci95 == pytest.approx((0.3 - 0.012417, 0.3 + 0.012417), abs=1e-6)
    assert tight.passes and "PASSES" in tight.verdict and "[+0.288, +0.312]" in tight.verdict
    # an interval that excludes 0 is not enough below the bar: differences 0.02 .. 0.10, mean 0.06 = 1.9 stds,
    # CI [+0.021, +0.099]
    below_bar = paired_difference("a", [0.32, 0.34, 0.36, 0.38, 0.40], "b", [0.3] * 5, bar=5)
    assert below_bar.ci95 is not None and below_bar.ci95[0] > 0 and not below_bar.passes
    assert paired_difference("a", [0.32, 0.34, 0.36, 0.38, 0.40], "b", [0.3] * 5, bar=1.5).passes
    single = paired_difference("a", [0.9], "b", [0.1])
    assert single.ci95 is None and not single.passes and "no verdict" in single.verdict
    with pytest.raises(ValueError, match="paired seeds"):
        paired_difference("a", [0.9, 0.8], "b", [0.1])


# ---------------------------------------------------------------- eval set


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_eval_set(tmp_path_factory.mktemp("eval"), n=24, seed=2024, image_size=64)


def test_demo_eval_set_is_labelled_and_readable_by_decontamination(eval_set: Path) -> None:
    loaded = load_eval_set(eval_set)
    assert len(loaded) == 24 and loaded.classes == ["circle", "square", "triangle", "star", "cross", "heart"]
    raw = json.loads((eval_set / "labels.json").read_text())
    for item, label in zip(raw["items"], loaded.labels, strict=True):
        assert loaded.classes[label] == item["shape"] and item["color"] in item["caption"]
    # the same images labelled by colour, by shape and by the joint class, each item with its class of each task
    assert set(loaded.tasks) == {"color", "shape", "joint"} and loaded.tasks["shape"].labels == loaded.labels
    assert len(loaded.tasks["joint"].classes) == len(loaded.tasks["color"].classes) * len(loaded.classes)
    for i, item in enumerate(raw["items"]):
        color = loaded.tasks["color"].classes[loaded.tasks["color"].labels[i]]
        joint = loaded.tasks["joint"].classes[loaded.tasks["joint"].labels[i]]
        assert color == item["color"] and joint == f"{item['color']} {item['shape']}"
    images, _ids = load_eval_images([str(eval_set)])
    assert len(images) == 24 and images[0].size == (64, 64)
    mtime = (eval_set / "labels.json").stat().st_mtime_ns
    make_demo_eval_set(eval_set, n=24, seed=2024, image_size=64)  # same arguments: kept as is
    assert (eval_set / "labels.json").stat().st_mtime_ns == mtime


# ---------------------------------------------------------------- the driver on a real run


@pytest.fixture(scope="module")
def curated_run(served_world: ServedWorld, tmp_path_factory: pytest.TempPathFactory) -> CuratedRun:
    """A copy of the session's shared run: these tests write validate/ into it, which other files' tests of the
    shared run (the report's "no validation" page) must not see, whatever order they run in."""
    shared = shared_curated_run(served_world, tmp_path_factory)
    root = tmp_path_factory.mktemp("validated-run") / "run"
    shutil.copytree(shared.root, root, ignore=shutil.ignore_patterns("report", "search"))
    return CuratedRun(root, shared.truth, shared.scorer)


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "curate-validate-micro.json"
    path.write_text(json.dumps(MICRO_CONFIG))
    return path


def with_validate(run: CuratedRun, dedup: dict[str, Any] | None = None, **settings: Any) -> PipelineConfig:
    raw = load_config(RunLayout(run.root).config_path).model_dump(mode="json")
    raw["output"] = str(run.root)
    raw["validate"] = settings
    raw["dedup"].update(dedup or {})
    return validate_config(raw)


def quick_settings(model: Path, eval_set: Path, **changes: Any) -> dict[str, Any]:
    return {
        "model": str(model),
        "batch_size": 8,
        "samples_seen": 24,
        "lr": 2e-3,
        "warmup_steps": 1,
        "seeds": 2,
        "device": "cpu",
        "decode_workers": 1,
        "shuffle_buffer": 16,
        "eval_set": str(eval_set),
        **changes,
    }


def test_both_arms_train_with_equal_compute_and_finished_arms_are_skipped(
    curated_run: CuratedRun, micro_model: Path, eval_set: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = with_validate(curated_run, **quick_settings(micro_model, eval_set))
    layout = RunLayout(curated_run.root)
    metrics = run_validation(config, layout)

    assert json.loads((layout.root / "validate" / "metrics.json").read_text()) == metrics
    assert metrics["data"]["baseline_samples"] == metrics["data"]["curated_samples"] > 0
    assert metrics["data"]["baseline_pool"] > metrics["data"]["curated_samples"]
    # download shard by download shard, each by uid: the order img2dataset's fetches finished in (the tar
    # order of the download) must not reach training
    written = [
        sample["__key__"]
        for tar in sorted((layout.root / "validate" / "baseline-data").glob("*.tar"))
        for sample in wds.WebDataset(str(tar), shardshuffle=False)
    ]
    chosen = set(written)
    downloaded = [set(kept_uids(layout, "download", shard).to_pylist()) for shard in input_shards(layout)]
    by_shard = [sorted(uids & chosen) for uids in downloaded]
    assert written == [uid for uids in by_shard for uid in uids] and len(written) == len(chosen)
    for arm in ("curated", "baseline"):
        runs = metrics["runs"][arm]
        assert [r["seed"] for r in runs] == [0, 1]
        assert all(r["samples_seen"] == 24 and r["steps"] == 3 and len(r["losses"]) == 3 for r in runs)
        for name in ("zero_shot_acc", "linear_probe_acc", "image_to_text_r5", "text_to_image_r10"):
            assert 0 <= metrics["summary"][arm][name]["mean"] <= 1 and metrics["summary"][arm][name]["std"] >= 0
        assert (layout.root / "validate" / f"{arm}-seed1" / "checkpoint.pt").exists()
    assert metrics["runs"]["curated"][0]["losses"] != metrics["runs"]["baseline"][0]["losses"]
    assert pair_names(metrics) == ["curated - baseline"]
    pair = metrics["paired"]["curated - baseline"]
    assert pair["bar_metrics"] == ["zero_shot_acc_color", "zero_shot_acc_joint", "zero_shot_acc_shape"]
    summary = metrics["summary"]
    for name in ("zero_shot_acc", "zero_shot_acc_shape", "zero_shot_acc_color", "linear_probe_acc_joint"):
        diff = pair["metrics"][name]
        assert diff["mean"] == pytest.approx(summary["curated"][name]["mean"] - summary["baseline"][name]["mean"])
        curated_runs, baseline_runs = metrics["runs"]["curated"], metrics["runs"]["baseline"]
        by_seed = zip(curated_runs, baseline_runs, strict=True)
        assert diff["per_seed"] == pytest.approx([c["metrics"][name] - b["metrics"][name] for c, b in by_seed])
        assert diff["std"] == pytest.approx(np.std(diff["per_seed"], ddof=1)) and len(diff["ci95"]) == 2
    assert pair["passes"] == all(pair["metrics"][name]["passes"] for name in pair["bar_metrics"])
    assert metrics["recipe"]["samples_seen"] == 24 and metrics["eval_set"]["n"] == 24
    table = format_validation_table(metrics)
    assert "curated - baseline" in table and "zero-shot shape" in table and "2 seeds" in table
    assert "95% CI" in table and table.splitlines()[-1].startswith("verdict: curated vs baseline: ")
    assert "curated - baseline on zero_shot_acc_shape: " in pair["metrics"]["zero_shot_acc_shape"]["verdict"]

    # a finished arm is not trained again; one whose result is missing is evaluated from its checkpoint
    (layout.root / "validate" / "baseline-seed1" / "result.json").unlink()
    trained: list[str] = []
    original = validate_stage.train

    def recording_train(cfg: Any, shards: Any, out_dir: Path, seed: int, progress: Any) -> Any:
        trained.append(out_dir.name)
        result = original(cfg, shards, out_dir, seed, progress)
        assert result.resumed_from_step == 0 and result.steps == 3  # complete checkpoint: nothing retrained
        return result

    monkeypatch.setattr(validate_stage, "train", recording_train)
    again = run_validation(config, layout)
    assert trained == ["baseline-seed1"]
    assert again["summary"] == metrics["summary"]

    # other prompt templates re-evaluate every checkpoint without retraining any
    checkpoints = sorted((layout.root / "validate").glob("*-seed*/checkpoint.pt"))
    before = [p.stat().st_mtime_ns for p in checkpoints]
    retemplated = with_validate(curated_run, **quick_settings(micro_model, eval_set, templates=["a {}."]))
    assert run_validation(retemplated, layout)["fingerprint"] != metrics["fingerprint"]
    assert len(checkpoints) == 4 and [p.stat().st_mtime_ns for p in checkpoints] == before


def test_runs_trained_side_by_side_each_on_its_share_of_the_cores_match_runs_trained_one_by_one(
    curated_run: CuratedRun, micro_model: Path, eval_set: Path, tmp_path: Path
) -> None:
    settings = quick_settings(micro_model, eval_set, decode_workers=0)
    one_by_one = run_validation(with_validate(curated_run, **settings), RunLayout(curated_run.root))
    root = tmp_path / "run"
    shutil.copytree(curated_run.root, root, ignore=shutil.ignore_patterns("validate", "report", "search"))
    copy = CuratedRun(root, curated_run.truth, curated_run.scorer)
    side_by_side = run_validation(with_validate(copy, **settings, workers=2), RunLayout(root))

    assert side_by_side["fingerprint"] == one_by_one["fingerprint"]  # workers only schedules
    for arm in ("curated", "baseline"):
        pool_runs = side_by_side["runs"][arm]
        assert [run["train_threads"] for run in pool_runs] == [share_of(2)] * 2
        for pooled, alone in zip(pool_runs, one_by_one["runs"][arm], strict=True):
            assert pooled["losses"] == pytest.approx(alone["losses"], rel=1e-4)
            assert pooled["metrics"] == pytest.approx(alone["metrics"], abs=1e-6)


def test_simclr_objective_lowers_its_loss_and_resumes(
    curated_run: CuratedRun, micro_model: Path, tmp_path: Path
) -> None:
    shards = sorted((curated_run.root / "curated").glob("*.tar"))
    recipe = TrainRecipe(
        model=str(micro_model),
        batch_size=16,
        samples_seen=16 * 32,
        lr=2e-3,
        warmup_steps=1,
        device="cpu",
        checkpoint_every=2,
        decode_workers=1,
        shuffle_buffer=32,
    )
    whole = train_simclr(shards, recipe, tmp_path / "whole")
    # single steps of 16 are noisy: compare the first and last quarters
    assert whole.steps == 32 and np.mean(whole.losses[-8:]) < np.mean(whole.losses[:8]), whole.losses

    class Crash(RuntimeError):
        pass

    calls: list[int] = []

    def crash_at_step_3(samples: int, loss: float) -> None:
        calls.append(samples)
        if len(calls) == 3:
            raise Crash

    with pytest.raises(Crash):
        train_simclr(shards, recipe, tmp_path / "resumed", progress=crash_at_step_3)
    resumed = train_simclr(shards, recipe, tmp_path / "resumed")
    assert resumed.resumed_from_step == 2
    np.testing.assert_allclose(resumed.losses, whole.losses, atol=1e-5)
    model, _, _ = open_clip.create_model_and_transforms("curate-validate-micro", pretrained=str(resumed.checkpoint))
    assert torch.equal(
        model.state_dict()["visual.proj"], load_checkpoint(resumed.checkpoint)["state_dict"]["visual.proj"]
    )


def test_the_baseline_pool_leaves_out_downloads_close_to_the_eval_set(curated_run: CuratedRun, eval_set: Path) -> None:
    layout = RunLayout(curated_run.root)
    shards = validate_stage.input_shards(layout)
    downloaded = set(validate_stage.baseline_pool(layout, shards, set()))
    for threshold, expected in ((-1.0, downloaded), (1.0, set())):
        config = with_validate(curated_run, {"eval_sets": [str(eval_set)], "contamination_threshold": threshold})
        assert validate_stage.contaminated_uids(config, layout, shards) == expected
    assert validate_stage.baseline_pool(layout, shards, downloaded) == []


def test_the_baseline_pool_leaves_out_a_planted_copy_of_an_eval_image_and_its_near_copies_only(
    curated_run: CuratedRun, tmp_path: Path
) -> None:
    from curate.io.wds import iter_samples
    from curate.stages.download import DownloadOutputs
    from curate.stages.embed import EmbedOutputs

    layout = RunLayout(curated_run.root)
    shards = validate_stage.input_shards(layout)
    embed = EmbedOutputs(layout)
    vectors: dict[str, np.ndarray] = {}  # every embedded download's stored image embedding, normalised
    for shard in (s for s in shards if embed.has(s)):
        uids = embed.metadata(shard, columns=["uid"])["uid"].to_pylist()
        for uid, vector in zip(uids, embed.image_embeddings(shard).astype(np.float32), strict=True):
            vectors[uid] = vector / np.linalg.norm(vector)
    shard = next(s for s in shards if embed.has(s))
    target = next(s for s in iter_samples(DownloadOutputs(layout).tar_path(shard)) if s.uid in vectors)
    held_out = tmp_path / "held-out"
    held_out.mkdir()
    (held_out / f"copy.{target.image_extension}").write_bytes(target.members[target.image_extension])

    threshold = 0.9995  # the shared run's model has random weights: most images lie above 0.98 of each other
    config = with_validate(curated_run, {"eval_sets": [str(held_out)], "contamination_threshold": threshold})
    found = validate_stage.contaminated_uids(config, layout, shards)
    similarity = {uid: float(vector @ vectors[target.uid]) for uid, vector in vectors.items()}
    assert target.uid in found and len(found) < len(vectors) / 10
    assert all(similarity[uid] > threshold - 3e-4 for uid in found)  # float16 storage: a small margin
    assert all(similarity[uid] < threshold + 3e-4 for uid in set(vectors) - found)
    downloaded = set(validate_stage.baseline_pool(layout, shards, set()))
    assert set(validate_stage.baseline_pool(layout, shards, found)) == downloaded - found


def test_demo_eval_set_can_be_labelled_by_colour(tmp_path: Path) -> None:
    from examples.demo_world import colors

    eval_set = load_eval_set(make_demo_eval_set(tmp_path / "eval", n=12, seed=2024, image_size=64, label="color"))
    raw = json.loads((tmp_path / "eval" / "labels.json").read_text())
    assert eval_set.classes == colors() and len(eval_set) == 12
    for item, label in zip(raw["items"], eval_set.labels, strict=True):
        assert eval_set.classes[label] == item["color"] and item["color"] in item["caption"]
    with pytest.raises(ValueError, match="label must be one of"):
        make_demo_eval_set(tmp_path / "other", n=4, seed=1, label="size")


def test_train_scorer_exports_weights_that_the_embed_stage_loads(
    curated_run: CuratedRun, micro_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from curate.stages.embed import load_clip

    dest = tmp_path / "scorer" / "scorer.pt"
    settings = {"model": micro_model, "batch_size": 8, "samples_seen": 32, "warmup_steps": 1, "device": "cpu"}
    overrides = [arg for key, value in settings.items() for arg in ("--set", f"validate.{key}={value}")]
    assert curate_main(["train-scorer", str(curated_run.root), "--out", str(dest), *overrides]) == 0

    out, err = capsys.readouterr()
    assert f"--set embed.pretrained={dest.resolve()}" in out
    assert "loss=" in err and "sample/s" in err  # the progress bar shows the loss and the rate
    info = json.loads(dest.with_suffix(".json").read_text())
    assert info["steps"] == 4 and info["recipe"]["samples_seen"] == 32
    kept = int((pd.read_parquet(RunLayout(curated_run.root).ledger_path)["status"] == "kept").sum())
    assert info["curated_samples"] == kept and info["source_run"] == str(curated_run.root.resolve())
    assert not (curated_run.root / "scorer").exists()  # nothing is written into the run when --out is given
    loaded = load_clip(model=str(micro_model), pretrained=str(dest), device="cpu")
    trained = load_checkpoint(dest.with_name("scorer.train-seed0") / "checkpoint.pt")["state_dict"]
    for name, tensor in loaded.model.state_dict().items():
        torch.testing.assert_close(tensor, trained[name], msg=name)


def test_train_scorer_writes_to_a_bucket_and_the_embed_stage_loads_it_from_there(
    curated_run: CuratedRun,
    micro_model: Path,
    s3_bucket: S3Bucket,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import tempfile

    from curate.io.storage import Storage
    from curate.stages.embed import EmbedStage
    from curate.stages.validate.bootstrap import local_export, training_dir

    monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path / "cache"))
    url = s3_bucket.url("models/scorer.pt")
    settings = {"model": micro_model, "batch_size": 8, "samples_seen": 16, "warmup_steps": 1, "device": "cpu"}
    overrides = [arg for key, value in settings.items() for arg in ("--set", f"validate.{key}={value}")]
    overrides += ["--set", f"storage.options={json.dumps(s3_bucket.options)}"]
    assert curate_main(["train-scorer", str(curated_run.root), "--out", url, "--no-progress", *overrides]) == 0
    assert f"--set embed.pretrained={url}" in capsys.readouterr().out
    info = json.loads(s3_bucket.fs.cat_file(url.removesuffix(".pt").removeprefix("s3://") + ".json"))
    assert info["pretrained"] == url and info["steps"] == 2
    assert not (curated_run.root / "scorer").exists()
    trained_here = training_dir(local_export(url), seed=0)
    assert trained_here.is_relative_to(tempfile.gettempdir())
    assert (trained_here / "checkpoint.pt").is_file()  # where the same command, interrupted, resumes

    options = {"output": str(tmp_path / "run"), "input": {"path": "crawl.parquet"}}
    config = validate_config(
        {**options, "storage": {"options": s3_bucket.options}, "embed": {"model": str(micro_model), "pretrained": url}}
    )
    stage = EmbedStage(config)
    stage.setup()
    assert stage.storage == Storage(s3_bucket.options) and stage._loaded is not None
    weights = s3_bucket.fs.cat_file(url.removeprefix("s3://"))
    [copy] = [p for p in (tmp_path / "cache").rglob("scorer.pt")]
    assert copy.read_bytes() == weights


def test_train_scorer_refuses_a_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert curate_main(["train-scorer", str(tmp_path), "--no-progress"]) == 1
    assert "not a curate run" in capsys.readouterr().err


def test_a_png_encoded_run_goes_through_validate(
    served_world: ServedWorld, tiny_checkpoint: Path, micro_model: Path, eval_set: Path, tmp_path: Path
) -> None:
    from curate.pipeline import run_pipeline
    from tests.world_fixtures import full_pipeline_overrides

    pipeline = served_world.pipeline(tmp_path, output=tmp_path / "run", download={"encode_format": "png"})
    stages = "stages=[input,download,embed,filter,dedup,materialize,validate]"
    validate = [f"validate.{key}={value}" for key, value in quick_settings(micro_model, eval_set, seeds=1).items()]
    result = run_pipeline(load_config(pipeline, [*full_pipeline_overrides(tiny_checkpoint), stages, *validate]))

    assert result.complete
    curated = sorted((tmp_path / "run" / "curated").glob("*.tar"))
    sample = next(iter(wds.WebDataset(str(curated[0]), shardshuffle=False)))
    assert sample["png"][:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((tmp_path / "run" / "validate" / "metrics.json").read_text())
    assert metrics["data"]["curated_samples"] > 0 and metrics["data"]["baseline_samples"] > 0
    assert metrics["runs"]["curated"][0]["steps"] == 3


def test_validation_runs_are_dask_tasks_whose_trainer_starts_its_decode_workers(
    curated_run: CuratedRun, micro_model: Path, eval_set: Path
) -> None:
    from curate.config import DaskConfig
    from curate.executors.dask import DaskExecutor
    from curate.pipeline import run_stage, stage_fingerprints
    from curate.stage import StageContext
    from curate.stages import plan

    config = with_validate(curated_run, **quick_settings(micro_model, eval_set, seeds=1, decode_workers=2))
    config = config.model_copy(update={"stages": [*config.stages, "validate"]})
    stages = plan(config)
    stage = stages[-1]
    layout = RunLayout(curated_run.root)
    ctx = StageContext(config, layout, "dask-" + stage_fingerprints(stages)["validate"], tuple(input_shards(layout)))
    executor = DaskExecutor(DaskConfig(n_workers=1, dashboard_address=":0"))
    try:
        assert run_stage(stage, ctx, executor) == 4  # baseline, two runs, metrics
    finally:
        executor.close()
    metrics = json.loads((layout.root / "validate" / "metrics.json").read_text())
    assert [run["steps"] for arm in ("curated", "baseline") for run in metrics["runs"][arm]] == [3, 3]


def test_curation_settings_are_compared_from_the_runs_saved_scores(
    curated_run: CuratedRun, micro_model: Path, eval_set: Path, tmp_path: Path
) -> None:
    from curate.ledger import read_ledger
    from curate.report import write_report
    from curate.stages.filters import FilterOutputs
    from curate.stages.materialize import uid_hex

    root = tmp_path / "run"
    shutil.copytree(curated_run.root, root, ignore=shutil.ignore_patterns("validate", "report", "search"))
    arms = ["no_filter", "basic_filters", "clip_score", "curated"]
    copied = CuratedRun(root, curated_run.truth, curated_run.scorer)
    config = with_validate(copied, **quick_settings(micro_model, eval_set, arms=arms))
    layout = RunLayout(root)
    metrics = run_validation(config, layout)

    # each arm's subset is the run's own decisions re-applied from its ledger: no embedding was recomputed
    ledger = read_ledger(root)
    downloaded = ledger[~ledger.stage.isin(["input", "download"]) | ledger.status.eq("kept")]
    cutoff = FilterOutputs(layout).summary()["clip_cutoff"]
    expected = {
        "no_filter": set(downloaded.uid),
        "basic_filters": set(downloaded.uid) - set(ledger.uid[ledger.reason.eq("caption_words")]),
        "clip_score": set(downloaded.uid[downloaded.clip_score >= cutoff]),
    }
    assert expected["clip_score"] < expected["no_filter"] and expected["basic_filters"] < expected["no_filter"]
    for arm, uids in expected.items():
        keys = {
            sample["__key__"]
            for tar in sorted((root / "validate" / f"{arm}-data").glob("*.tar"))
            for sample in wds.WebDataset(str(tar), shardshuffle=False)
        }
        assert keys == {uid_hex(uid) for uid in uids}, arm
        assert metrics["data"][f"{arm}_samples"] == len(uids)
    assert metrics["data"]["curated_samples"] == int(ledger.status.eq("kept").sum())

    # every arm trains the same way, on the same number of samples, and is compared with the reference (the first)
    # and with the arm listed before it
    assert metrics["arms"] == arms and set(metrics["summary"]) == set(arms)
    assert {run["samples_seen"] for arm in arms for run in metrics["runs"][arm]} == {24}
    assert pair_names(metrics) == [
        "basic_filters - no_filter",
        "clip_score - no_filter",
        "curated - no_filter",
        "clip_score - basic_filters",
        "curated - clip_score",
    ]
    for pair in metrics["paired"].values():
        diff = pair["metrics"]["zero_shot_acc_shape"]
        by_seed = zip(metrics["runs"][pair["arm"]], metrics["runs"][pair["against"]], strict=True)
        expected_diffs = [a["metrics"]["zero_shot_acc_shape"] - b["metrics"]["zero_shot_acc_shape"] for a, b in by_seed]
        assert diff["per_seed"] == pytest.approx(expected_diffs)
    table = format_validation_table(metrics)
    assert all(f"\n{arm} " in table for arm in arms) and "curated - clip_score" in table

    # the report shows the table, the verdicts and the per-seed differences as a plot
    page = write_report(root).read_text()
    section = page[page.index('id="validation"') :]
    assert "curated - no_filter" in section and "clip_score" in section and "95% CI" in section
    assert 'alt="per-seed differences between arms"' in section


def test_an_arm_without_the_rule_it_reapplies_is_a_config_error(
    curated_run: CuratedRun, micro_model: Path, eval_set: Path
) -> None:
    from curate.config import ConfigError
    from curate.stages.validate.stage import ValidateStage

    with pytest.raises(ValueError, match=r"unknown arm 'clip_scores' \(did you mean 'clip_score'\?\)"):
        with_validate(curated_run, **quick_settings(micro_model, eval_set, arms=["curated", "clip_scores"]))
    config = with_validate(curated_run, **quick_settings(micro_model, eval_set, arms=["no_filter", "basic_filters"]))
    raw = config.model_dump(mode="json")
    raw["filter"]["caption_min_words"] = None
    with pytest.raises(ConfigError, match=r"^validate\.arms: basic_filters needs one of filter\.caption_min_words"):
        ValidateStage(validate_config(raw)).preflight()


def _run_result(seed: int, color: float, shape: float) -> dict[str, Any]:
    metrics = {"zero_shot_acc": color, "zero_shot_acc_color": color, "zero_shot_acc_shape": shape}
    metrics |= {"linear_probe_acc": color, "linear_probe_acc_color": color, "linear_probe_acc_shape": shape}
    return {
        "seed": seed,
        "metrics": {**metrics, "n_eval": 24},
        "samples_seen": 24,
        "steps": 3,
        "train_seconds": 1.0,
        "losses": [3.0, 2.0, 1.0],
    }


def test_metrics_document_pairs_seeds_and_states_one_verdict_per_pair(
    curated_run: CuratedRun, micro_model: Path, eval_set: Path, tmp_path: Path
) -> None:
    from curate.io.fs import write_json_atomic

    cfg = with_validate(curated_run, **quick_settings(micro_model, eval_set, seeds=3)).validate
    # colour: differences 0.1, 0.2, 0.3 (2 stds, CI 0.2 ± 0.248 holds 0); shape: 0.30, 0.31, 0.29 (30 stds)
    runs = {
        "baseline": [_run_result(k, 0.5, 0.2) for k in range(3)],
        "curated": [_run_result(k, c, s) for k, (c, s) in enumerate([(0.6, 0.50), (0.7, 0.51), (0.8, 0.49)])],
    }
    document = validate_stage.metrics_document(cfg, runs, "upstream", "eval", {"curated_samples": 10})
    write_json_atomic(tmp_path / "metrics.json", document)
    metrics = json.loads((tmp_path / "metrics.json").read_text())  # as the report and the CLI read it

    pair = metrics["paired"]["curated - baseline"]
    assert pair["bar_metrics"] == ["zero_shot_acc_color", "zero_shot_acc_shape"] and not pair["passes"]
    color, shape = pair["metrics"]["zero_shot_acc_color"], pair["metrics"]["zero_shot_acc_shape"]
    assert color["per_seed"] == pytest.approx([0.1, 0.2, 0.3]) and color["std"] == pytest.approx(0.1)
    assert color["ci95"] == pytest.approx([0.2 - 0.248414, 0.2 + 0.248414], abs=1e-6) and not color["passes"]
    assert shape["mean"] == pytest.approx(0.3) and shape["std"] == pytest.approx(0.01) and shape["passes"]
    assert validate_stage.format_verdicts(metrics) == (
        "verdict: curated vs baseline: does NOT pass the paired bar (> 5x std, 95% CI excludes 0), 3 seeds: "
        "zero-shot color +0.200 ± 0.100, CI [-0.048, +0.448]"
    )
    lines = format_validation_table(metrics).splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["baseline", "curated", "curated"]  # the arms' order
    assert "+0.200 ± 0.100" in lines[3] and "[-0.048, +0.448]" in lines[4] and lines[-1].startswith("verdict:")

    runs["curated"] = [_run_result(k, c, 0.5) for k, c in enumerate([0.80, 0.81, 0.79])]  # both now 30 stds
    passing = validate_stage.metrics_document(cfg, runs, "upstream", "eval", {"curated_samples": 10})
    assert validate_stage.format_verdicts(passing) == (
        "verdict: curated vs baseline: PASSES the paired bar (> 5x std, 95% CI excludes 0) on zero-shot color, "
        "zero-shot shape, 3 seeds"
    )


def test_task_templates_reach_the_zero_shot_classifier_and_name_eval_set_tasks(
    curated_run: CuratedRun, micro_model: Path, eval_set: Path
) -> None:
    from curate.config import ConfigError
    from curate.stages.validate.stage import ValidateStage

    config = with_validate(curated_run, **quick_settings(micro_model, eval_set, task_templates={"shape": ["a {}"]}))
    options = validate_stage.eval_options(config.validate)
    assert options.templates_for("shape") == ["a {}"] and options.templates_for("color") == config.validate.templates
    ValidateStage(config).preflight()
    misspelt = with_validate(curated_run, **quick_settings(micro_model, eval_set, task_templates={"shapes": ["{}"]}))
    with pytest.raises(ConfigError, match=r"^validate\.task_templates: \['shapes'\] are not tasks of the eval set"):
        ValidateStage(misspelt).preflight()
