"""The demo's CLIP scorer: a tiny CLIP trained here, on a clean split of another demo world.

No pretrained weights can be downloaded on these machines, so the demo scores its pairs with a model
trained on data we control. To keep that honest the training world uses another seed than the demo's
(a clean seed split, never the demo's own rows) and keeps only the rows with truthful captions. Images
pass through img2dataset's resizer with the demo pipeline's download settings, so the scorer sees
what the pipeline's embed stage will see.

    python -m examples.demo_scorer --out runs/demo-scorer [--seed 0] [--n-base 1500] [--samples-seen N]

writes out/scorer.pt (open_clip-loadable weights) and out/scorer.json (model, checkpoint, calibration,
training summary), skips training when both exist for the same recipe, then measures how well the
suggested threshold separates the demo world's mismatched and junk captions from its good rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from curate.config import DownloadConfig
from curate.io.fs import read_json, write_json_atomic
from curate.scorer import ClipScorer, calibrate, quantiles, suggest_threshold
from curate.stages.validate.train import Progress, TrainRecipe, export_model, train_clip
from examples.demo_world import World, generate_world

log = logging.getLogger(__name__)

DEMO_PIPELINE = Path(__file__).resolve().parent.parent / "pipelines" / "demo.yaml"
WORLD_SEED_OFFSET = 1000  # the scorer's world seed is 1000 + seed; the demo's world uses seed 0
CALIBRATION_FRACTION = 0.1
SAMPLES_PER_SHARD = 256
MODEL = "curate-cnn-64"  # what pipelines/demo.yaml embeds with: a 64 px conv net, it learns shape (README)
DEFAULT_N_BASE = 3000
DEFAULT_SAMPLES_SEEN = 128 * 400

DROP_KINDS = {"mismatch": ("mismatch",), "junk": ("junk_caption",), "combined": ("mismatch", "junk_caption")}
KEEP_KINDS = ("clean", "dup_exact", "dup_near", "dup_url_caption", "slow")


def demo_recipe(seed: int = 0, samples_seen: int = DEFAULT_SAMPLES_SEEN) -> TrainRecipe:
    return TrainRecipe(
        model=MODEL,
        batch_size=128,
        samples_seen=samples_seen,
        lr=5e-3,
        warmup_steps=10,
        weight_decay=0.1,
        seed=seed,
        device="cpu",
        precision="fp32",
        augment=True,
        checkpoint_every=20,
        decode_workers=2,
    )


def ensure_demo_scorer(
    out: Path,
    seed: int = 0,
    n_base: int = DEFAULT_N_BASE,
    samples_seen: int = DEFAULT_SAMPLES_SEEN,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train (or reuse) the demo scorer in `out`; returns the content of out/scorer.json.

    `progress` is called with the samples and the loss of every training step.
    """
    out = Path(out)
    recipe = demo_recipe(seed, samples_seen)
    spec = {"train": recipe.to_dict(), "data": data_spec(seed, n_base)}
    existing = _reusable(out, spec)
    if existing is not None:
        log.info("reusing the demo scorer in %s", out)
        return existing

    started = time.perf_counter()
    split = ensure_training_shards(out / "shards", spec["data"])
    prepared = time.perf_counter()
    result = train_clip(split["train"], recipe, out / "train", progress=progress)
    export_model(result.checkpoint, out / "scorer.pt")
    trained = time.perf_counter()
    calibration = calibrate(out / "scorer.pt", MODEL, split["calibration"], seed=seed, device="cpu")
    info = {
        "model": MODEL,
        "checkpoint": str((out / "scorer.pt").resolve()),
        "recipe": spec,
        "n_train": split["n_train"],
        "n_calibration": split["n_calibration"],
        "calibration": calibration,
        "training": _loss_summary(result.losses, result.samples_seen, result.seconds),
        "seconds": {
            "data": round(prepared - started, 1),
            "train": round(trained - prepared, 1),
            "calibrate": round(time.perf_counter() - trained, 1),
        },
    }
    write_json_atomic(out / "scorer.json", info)
    shutil.rmtree(out / "train", ignore_errors=True)  # optimizer state; scorer.pt holds the weights
    return info


def data_spec(seed: int, n_base: int) -> dict[str, Any]:
    settings = download_settings()
    return {
        "world_seed": seed + WORLD_SEED_OFFSET,
        "n_base": n_base,
        "kinds": ["clean"],
        "calibration_fraction": CALIBRATION_FRACTION,
        "image_size": settings.image_size,
        "resize_mode": settings.resize_mode,
        "encode_quality": settings.encode_quality,
    }


def download_settings() -> DownloadConfig:
    """The demo pipeline's download settings (image size, resize mode, quality), so training images match.

    Only that section is read: the scorer does not depend on the rest of the pipeline."""
    raw = yaml.safe_load(DEMO_PIPELINE.read_text(encoding="utf-8")) or {}
    return DownloadConfig.model_validate(raw.get("download", {}))


def _reusable(out: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    info_path, checkpoint = out / "scorer.json", out / "scorer.pt"
    if not (info_path.exists() and checkpoint.exists()):
        return None
    info = read_json(info_path)
    if info.get("recipe") != spec:
        log.info("%s was made by another recipe; retraining", info_path)
        return None
    return {**info, "checkpoint": str(checkpoint.resolve())}  # the folder may have moved


def _loss_summary(losses: Sequence[float], samples_seen: int, seconds: float) -> dict[str, Any]:
    k = max(1, len(losses) // 10)
    return {
        "steps": len(losses),
        "samples_seen": samples_seen,
        "seconds": round(seconds, 1),
        "loss_first": float(np.mean(losses[:k])),
        "loss_last": float(np.mean(losses[-k:])),
        "loss_min": float(np.min(losses)),
        "loss_every_10_steps": [round(float(loss), 4) for loss in losses[::10]],
    }


# ---------------------------------------------------------------- data


def make_resizer(settings: DownloadConfig) -> Any:
    from img2dataset.resizer import Resizer

    return Resizer(
        image_size=settings.image_size,
        resize_mode=settings.resize_mode,
        resize_only_if_bigger=settings.resize_only_if_bigger,
        encode_format="jpg",
        encode_quality=settings.encode_quality,
    )


def resize_like_download(resizer: Any, path: Path) -> bytes:
    import io

    with open(path, "rb") as stream:
        data, *_, error = resizer(io.BytesIO(stream.read()))
    if error is not None:
        raise ValueError(f"{path}: img2dataset's resizer failed: {error}")
    return data


def ensure_training_shards(folder: Path, data: dict[str, Any]) -> dict[str, Any]:
    """The shards for `data` (see data_spec), written unless folder/split.json says they already are."""
    marker = folder / "split.json"
    if marker.exists() and (done := read_json(marker))["data"] == data:
        return {
            **done,
            "train": [folder / p for p in done["train"]],
            "calibration": [folder / p for p in done["calibration"]],
        }
    split = write_training_shards(folder, data["world_seed"], data["n_base"], download_settings())
    names = {key: [p.name for p in split[key]] for key in ("train", "calibration")}
    write_json_atomic(marker, {**split, **names, "data": data})  # written last: the shards are complete
    return split


def write_training_shards(folder: Path, world_seed: int, n_base: int, settings: DownloadConfig) -> dict[str, Any]:
    """Shards of the clean rows of a fresh world: train-*.tar and calibration-*.tar (jpg/txt/json)."""
    import webdataset as wds

    with tempfile.TemporaryDirectory(prefix="demo-scorer-world-") as tmp:
        world = generate_world(Path(tmp), n_base=n_base, seed=world_seed)
        clean = world.truth[world.truth["kind"] == "clean"].sort_values("row_key").reset_index(drop=True)
        held_out = np.random.default_rng(world_seed).random(len(clean)) < CALIBRATION_FRACTION
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        resizer = make_resizer(settings)
        split: dict[str, Any] = {}
        for name, rows in (("train", clean[~held_out]), ("calibration", clean[held_out])):
            paths = []
            for start in range(0, len(rows), SAMPLES_PER_SHARD):
                paths.append(folder / f"{name}-{start // SAMPLES_PER_SHARD:05d}.tar")
                with wds.TarWriter(str(paths[-1])) as sink:
                    for _, row in rows.iloc[start : start + SAMPLES_PER_SHARD].iterrows():
                        sink.write(_sample(world, row, resizer))
            split[name], split[f"n_{name}"] = paths, len(rows)
    return split


def _sample(world: World, row: pd.Series, resizer: Any) -> dict[str, Any]:
    meta = {"row_key": row["row_key"], "shape": row["shape"], "color": row["color"], "count": int(row["count"])}
    return {
        "__key__": row["row_key"],
        "jpg": resize_like_download(resizer, world.files_dir / row["url_path"]),
        "txt": row["caption"],
        "json": json.dumps(meta),
    }


# ---------------------------------------------------------------- measurement on the demo world


def measure_separation(info: dict[str, Any], n_base: int = 600, seed: int = 0) -> dict[str, Any]:
    """Score every demo-world row that has an image; precision and recall of "drop" at the suggested threshold.

    Positives are mismatch and junk_caption rows; negatives are clean, duplicate and slow rows (rows with
    other faults are dropped for other reasons and left out).
    """
    with tempfile.TemporaryDirectory(prefix="demo-world-") as tmp:
        world = generate_world(Path(tmp), n_base=n_base, seed=seed)
        rows = world.truth[world.truth["kind"].isin([*DROP_KINDS["combined"], *KEEP_KINDS])].reset_index(drop=True)
        resizer = make_resizer(download_settings())
        images = [resize_like_download(resizer, world.files_dir / path) for path in rows["url_path"]]
    scorer = ClipScorer.load(info["checkpoint"], info["model"], device="cpu")
    scores = scorer.score(images, rows["caption"].fillna("").tolist())
    threshold = float(info["calibration"]["suggested_threshold"])
    return separation_report(rows["kind"].to_numpy(), scores, threshold)


def separation_report(kinds: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    dropped = scores < threshold
    keep_rows = np.isin(kinds, KEEP_KINDS)
    report: dict[str, Any] = {"threshold": threshold, "n_rows": len(kinds)}
    for name, drop_kinds in DROP_KINDS.items():
        positive = np.isin(kinds, drop_kinds)
        considered = positive | keep_rows
        true_drops = int((dropped & positive).sum())
        n_dropped = int((dropped & considered).sum())
        best, best_accuracy = suggest_threshold(scores[keep_rows], scores[positive])
        report[name] = {
            "positives": int(positive.sum()),
            "precision": true_drops / n_dropped if n_dropped else float("nan"),
            "recall": true_drops / int(positive.sum()),
            "oracle_threshold": best,
            "oracle_balanced_accuracy": best_accuracy,
        }
    report["score_quantiles"] = {
        kind: quantiles(scores[kinds == kind], (0.05, 0.5, 0.95)) for kind in sorted(set(kinds.tolist()))
    }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo-scorer"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-base", type=int, default=DEFAULT_N_BASE)
    parser.add_argument("--samples-seen", type=int, default=DEFAULT_SAMPLES_SEEN)
    parser.add_argument("--no-measure", action="store_true", help="skip the separation check on the demo world")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().handlers[0].addFilter(lambda record: record.name != "root")  # open_clip's chatter

    info = ensure_demo_scorer(args.out, seed=args.seed, n_base=args.n_base, samples_seen=args.samples_seen)
    calibration = info["calibration"]
    print(f"scorer: {info['checkpoint']}  threshold {calibration['suggested_threshold']:.4f}")
    print(f"training: {json.dumps(info['training'])}  seconds: {json.dumps(info['seconds'])}")
    if args.no_measure:
        return 0
    report = measure_separation(info)
    write_json_atomic(args.out / "separation.json", report)
    print(f"demo world (seed 0, n_base 600), drop = score < {report['threshold']:.4f}:")
    for name in DROP_KINDS:
        part = report[name]
        print(
            f"  {name:<9} n={part['positives']:<4} precision {part['precision']:.3f}  recall {part['recall']:.3f}"
            f"  (best here {part['oracle_threshold']:.4f}: balanced acc {part['oracle_balanced_accuracy']:.3f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
