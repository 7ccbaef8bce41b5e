"""The validate stage: train the same small model on curated/ and on a random subset of the unfiltered download,
with the same recipe and samples seen, over several seeds; evaluate each on a held-out set; write
OUTPUT/validate/metrics.json.

Each (arm, seed) lives in OUTPUT/validate/<arm>-seed<k>/: `checkpoint.pt` (the trainer resumes it), `run.json`
(the fingerprint of what it trains on) and `result.json` (written last: training summary, metrics and the
fingerprint of training + evaluation). A finished run whose fingerprint matches is not redone; a run with
another training fingerprint is wiped, since the trainer's own check only compares recipes, not data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from curate.io.fs import read_json, write_json_atomic
from curate.stage import RunLayout, kept_uids

if TYPE_CHECKING:
    from curate.config import PipelineConfig, ValidateConfig
    from curate.stages.validate.train import Progress, TrainRecipe, TrainResult

log = logging.getLogger(__name__)

ARMS = ("curated", "baseline")
STAGE = "validate"
BASELINE_DATA = "baseline-data"
BASELINE_RULE = 2  # bump when the way the baseline subset is drawn changes: its runs are then retrained
TABLE_METRICS = (("zero_shot_acc", "zero-shot acc"), ("image_to_text_r5", "i->t R@5"), ("text_to_image_r5", "t->i R@5"))

ProgressFactory = Callable[..., AbstractContextManager[Any]]

# Settings that change how a run executes, not what it computes.
SCHEDULING_FIELDS = frozenset({"device", "checkpoint_every", "decode_workers", "eval_batch_size"})
# Settings that only change the evaluation: changing them re-evaluates the checkpoints, never retrains.
EVAL_FIELDS = frozenset({"eval_set", "classnames", "templates", "recall_ks", "probe_train_fraction", "probe_l2"})


# ---------------------------------------------------------------- recipe and fingerprints


def train_recipe(cfg: ValidateConfig, seed: int) -> TrainRecipe:
    from curate.stages.validate.train import TrainRecipe

    try:
        return TrainRecipe(
            model=cfg.model,
            batch_size=cfg.batch_size,
            samples_seen=cfg.samples_seen,
            lr=cfg.lr,
            warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay,
            seed=seed,
            device=cfg.device,
            precision=cfg.precision,
            augment=cfg.augment,
            checkpoint_every=cfg.checkpoint_every,
            decode_workers=cfg.decode_workers,
            shuffle_buffer=cfg.shuffle_buffer,
        )
    except ValueError as err:
        raise ValueError(f"validate: {err}") from None


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def upstream_fingerprint(layout: RunLayout) -> str:
    """The curated set's fingerprint (materialize's marker covers every upstream stage)."""
    marker = layout.root / "curated" / "_done.json"
    if not marker.exists():
        raise FileNotFoundError(f"{layout.root}: curated/ is not materialized; run the pipeline through materialize")
    return str(read_json(marker)["fingerprint"])


def settings(cfg: ValidateConfig, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    return cfg.model_dump(mode="json", exclude=set(SCHEDULING_FIELDS | exclude))


# ---------------------------------------------------------------- training data of each arm


def curated_shards(layout: RunLayout) -> list[Path]:
    shards = sorted((layout.root / "curated").glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"{layout.root}/curated holds no shards to train on")
    return shards


def input_shards(layout: RunLayout) -> list[str]:
    from curate.stages.input import read_manifest

    manifest = read_manifest(layout.stage_dir("input"))
    if manifest is None:
        raise FileNotFoundError(f"{layout.root}: the input stage has not finished")
    return list(manifest["shards"])


def baseline_pool(layout: RunLayout, shards: Sequence[str], contaminated: set[str]) -> list[str]:
    """Every successfully downloaded uid, minus those close to an eval image: the unfiltered data."""
    pool: set[str] = set()
    for shard in shards:
        pool.update(kept_uids(layout, "download", shard).to_pylist())
    return sorted(pool - contaminated)


def contaminated_uids(config: PipelineConfig, layout: RunLayout, shards: Sequence[str]) -> set[str]:
    """Downloaded uids within dedup's contamination threshold of an eval image. dedup only sees the samples
    that passed the filters; the baseline draws from every download, so the same rule is applied to all."""
    if not config.dedup.eval_sets or "embed" not in config.stages:
        return set()
    from curate.stages.dedup.decontaminate import contaminated, embed_eval_sets

    eval_emb, _ = embed_eval_sets(config.dedup.eval_sets, config.embed)
    found: set[str] = set()
    embed_dir = layout.stage_dir("embed")
    for shard in shards:
        emb_path = embed_dir / "img_emb" / f"img_emb_{shard}.npy"
        if not emb_path.exists():  # a shard with no downloaded image
            continue
        uids = pq.read_table(embed_dir / "metadata" / f"metadata_{shard}.parquet", columns=["uid"])["uid"]
        mask = contaminated(np.load(emb_path), eval_emb, config.dedup.contamination_threshold).mask
        found.update(uid for uid, hit in zip(uids.to_pylist(), mask, strict=True) if hit)
    return found


def baseline_subset(pool: Sequence[str], size: int, seed: int) -> set[str]:
    picked = np.random.default_rng(seed).choice(len(pool), size=min(size, len(pool)), replace=False)
    return {pool[i] for i in picked}


def baseline_size(cfg: ValidateConfig, n_curated: int, n_pool: int) -> int:
    if cfg.baseline_size == "curated":
        return min(n_curated, n_pool)
    if cfg.baseline_size == "all":
        return n_pool
    return min(int(cfg.baseline_size), n_pool)


def ensure_baseline_shards(
    config: PipelineConfig, layout: RunLayout, n_curated: int, upstream: str
) -> tuple[list[Path], int, str]:
    """Write (or reuse) validate/baseline-data/*.tar, the baseline's random subset of the download; returns
    its shards, the size of the pool it was drawn from and its fingerprint."""
    import webdataset as wds

    from curate.stages.materialize import download_samples

    cfg = config.validate  # type: ignore[attr-defined]
    folder = layout.stage_dir(STAGE) / BASELINE_DATA
    fingerprint = digest(
        {"rule": BASELINE_RULE, "upstream": upstream, "size": cfg.baseline_size, "seed": cfg.baseline_seed}
    )
    marker = folder / "_done.json"
    if marker.exists() and read_json(marker)["fingerprint"] == fingerprint:
        return sorted(folder.glob("*.tar")), int(read_json(marker)["pool"]), fingerprint
    shards = input_shards(layout)
    pool = baseline_pool(layout, shards, contaminated_uids(config, layout, shards))
    size = baseline_size(cfg, n_curated, len(pool))
    subset = baseline_subset(pool, size, cfg.baseline_seed)
    scratch = folder.parent / f".{BASELINE_DATA}.{uuid.uuid4().hex[:8]}.tmp"
    scratch.mkdir(parents=True)
    try:
        with wds.ShardWriter(str(scratch / "%05d.tar"), maxcount=10_000, verbose=0) as writer:
            for shard in shards:
                # by uid, as curated/ is: img2dataset writes a shard's samples in the order their fetches
                # finished, and the training stream (hence the baseline's result) follows the tar order
                chosen = {uid: members for uid, members in download_samples(layout, shard) if uid in subset}
                for uid in sorted(chosen):
                    writer.write({"__key__": uid, **chosen[uid]})
        write_json_atomic(
            scratch / "_done.json", {"fingerprint": fingerprint, "samples": len(subset), "pool": len(pool)}
        )
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("validate: baseline subset of %d of %d downloaded samples", len(subset), len(pool))
    return sorted(folder.glob("*.tar")), len(pool), fingerprint


def count_samples(shards: Sequence[Path]) -> int:
    import tarfile

    total = 0
    for path in shards:
        with tarfile.open(path) as tar:
            total += sum(1 for m in tar if m.isfile() and m.name.endswith(".txt"))
    return total


# ---------------------------------------------------------------- one (arm, seed)


def run_arm(
    cfg: ValidateConfig,
    shards: Sequence[Path],
    out_dir: Path,
    seed: int,
    train_print: str,
    eval_print: str,
    progress: Progress | None,
) -> dict[str, Any]:
    """Train (resuming) and evaluate one arm with one seed; reuse a finished result with the same fingerprint."""
    result_path, run_path = out_dir / "result.json", out_dir / "run.json"
    fingerprint = digest({"train": train_print, "eval": eval_print})
    if result_path.exists() and read_json(result_path).get("fingerprint") == fingerprint:
        log.info("validate: %s is done; skipping", out_dir.name)
        return read_json(result_path)
    if run_path.exists() and read_json(run_path).get("fingerprint") != train_print:
        log.info("validate: %s was trained on other data or settings; starting afresh", out_dir.name)
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_path, {"fingerprint": train_print})
    trained = train(cfg, shards, out_dir, seed, progress)
    metrics = evaluate(cfg, trained.checkpoint)
    result = {
        "fingerprint": fingerprint,
        "seed": seed,
        "metrics": metrics,
        "losses": trained.losses,
        "samples_seen": trained.samples_seen,
        "steps": trained.steps,
        "train_seconds": round(trained.seconds, 2),
        "checkpoint": str(trained.checkpoint),
    }
    write_json_atomic(result_path, result)
    return result


def train(
    cfg: ValidateConfig, shards: Sequence[Path], out_dir: Path, seed: int, progress: Progress | None
) -> TrainResult:
    recipe = train_recipe(cfg, seed)
    if cfg.objective == "simclr":
        from curate.stages.validate.simclr import train_simclr

        return train_simclr(shards, recipe, out_dir, cfg.simclr_temperature, progress=progress)
    from curate.stages.validate.train import train_clip

    return train_clip(shards, recipe, out_dir, progress=progress)


def evaluate(cfg: ValidateConfig, checkpoint: Path) -> dict[str, Any]:
    from curate.stages.validate.evalsets import load_eval_set
    from curate.stages.validate.evaluate import EvalOptions, evaluate_checkpoint
    from curate.stages.validate.train import resolve_device, resolve_model_name

    options = EvalOptions(
        templates=tuple(cfg.templates),
        classnames=tuple(cfg.classnames) if cfg.classnames else None,
        ks=tuple(cfg.recall_ks),
        probe_train_fraction=cfg.probe_train_fraction,
        probe_l2=cfg.probe_l2,
        batch_size=cfg.eval_batch_size,
        text_metrics=cfg.objective == "clip",
    )
    device = str(resolve_device(cfg.device))
    return evaluate_checkpoint(
        checkpoint, resolve_model_name(cfg.model), load_eval_set(Path(cfg.eval_set)), options, device
    )


# ---------------------------------------------------------------- the driver


def run_validation(
    config: PipelineConfig, layout: RunLayout, progress: ProgressFactory | None = None
) -> dict[str, Any]:
    """Train and evaluate every (arm, seed), resuming what was interrupted; write and return metrics.json."""
    from curate.stages.validate.evalsets import eval_set_fingerprint

    cfg = config.validate  # type: ignore[attr-defined]
    if cfg.eval_set is None:
        raise ValueError("validate.eval_set: the validate stage needs a held-out eval set folder (labels.json)")
    progress = progress or (lambda *_args: nullcontext(None))
    upstream = upstream_fingerprint(layout)
    data = {"curated": curated_shards(layout)}
    n_curated = count_samples(data["curated"])
    data["baseline"], n_pool, baseline_print = ensure_baseline_shards(config, layout, n_curated, upstream)
    data_prints = {"curated": upstream, "baseline": baseline_print}
    eval_print = digest({"eval_set": eval_set_fingerprint(Path(cfg.eval_set)), "settings": settings(cfg)})
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for seed in range(cfg.seeds):
        for arm in ARMS:
            train_print = digest({"data": data_prints[arm], "seed": seed, "settings": settings(cfg, EVAL_FIELDS)})
            with progress(f"validate {arm} seed {seed}", cfg.samples_seen, "sample") as bar:
                result = run_arm(
                    cfg,
                    data[arm],
                    layout.stage_dir(STAGE) / f"{arm}-seed{seed}",
                    seed,
                    train_print,
                    eval_print,
                    None if bar is None else _bar_updater(bar),
                )
            runs[arm].append(result)
    metrics = metrics_document(
        cfg,
        runs,
        upstream,
        eval_print,
        {
            "curated_samples": n_curated,
            "baseline_samples": count_samples(data["baseline"]),
            "baseline_pool": n_pool,
        },
    )
    write_json_atomic(layout.stage_dir(STAGE) / "metrics.json", metrics)
    return metrics


def _bar_updater(bar: Any) -> Progress:
    """Advance `bar` by each step's samples (tqdm shows samples/s) and show the step's loss."""

    def update(samples: int, loss: float) -> None:
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.update(samples)

    return update


def summarize(values: Sequence[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "values": [float(v) for v in array]}


def metrics_document(
    cfg: ValidateConfig, runs: dict[str, list[dict[str, Any]]], upstream: str, eval_print: str, data: dict[str, int]
) -> dict[str, Any]:
    names = sorted(runs["curated"][0]["metrics"])
    summary = {
        arm: {name: summarize([run["metrics"][name] for run in arm_runs]) for name in names if name != "n_eval"}
        for arm, arm_runs in runs.items()
    }
    difference = {}
    for name in summary["curated"]:
        curated, baseline = summary["curated"][name], summary["baseline"][name]
        larger_std = max(curated["std"], baseline["std"])
        diff = curated["mean"] - baseline["mean"]
        # both arms start from the same weights for a given seed: the per-seed differences are paired
        per_seed = summarize(np.subtract(curated["values"], baseline["values"]))
        difference[name] = {
            "curated_minus_baseline": diff,
            "larger_std": larger_std,
            "exceeds_3_std": bool(diff > 3 * larger_std),
            "per_seed": per_seed["values"],
            "per_seed_std": per_seed["std"],
            "curated_wins_every_seed": bool(min(per_seed["values"]) > 0),
        }
    recipe = train_recipe(cfg, 0).to_dict()
    recipe.pop("seed")
    return {
        "fingerprint": digest({"upstream": upstream, "eval": eval_print, "settings": settings(cfg)}),
        "objective": cfg.objective,
        "recipe": recipe,
        "seeds": list(range(cfg.seeds)),
        "samples_seen": runs["curated"][0]["samples_seen"],
        "eval_set": {"path": cfg.eval_set, "n": runs["curated"][0]["metrics"]["n_eval"]},
        "data": data,
        "summary": summary,
        "difference": difference,
        "runs": {arm: [_run_entry(run) for run in arm_runs] for arm, arm_runs in runs.items()},
    }


def _run_entry(run: dict[str, Any]) -> dict[str, Any]:
    return {key: run[key] for key in ("seed", "metrics", "samples_seen", "steps", "train_seconds", "losses")}


def format_validation_table(metrics: dict[str, Any]) -> str:
    """Mean ± std over seeds per arm, and curated minus baseline, for the metrics the demo quotes."""
    shown = [(key, label) for key, label in TABLE_METRICS if key in metrics["summary"]["curated"]]
    if not shown:  # image-only objective: the linear probe is the only metric
        shown = [("linear_probe_acc", "linear probe acc")]
    header = f"{'arm':<22}" + "".join(f"{label:>20}" for _, label in shown)
    lines = [header]
    for arm in ARMS:
        cells = "".join(
            f"{metrics['summary'][arm][key]['mean']:>12.3f} ± {metrics['summary'][arm][key]['std']:.3f}"
            for key, _ in shown
        )
        lines.append(f"{arm:<22}{cells}")
    diffs = "".join(f"{metrics['difference'][key]['curated_minus_baseline']:>+20.3f}" for key, _ in shown)
    lines.append(f"{'curated - baseline':<22}{diffs}")
    seeds, samples = len(metrics["seeds"]), metrics["samples_seen"]
    lines.append(f"({seeds} seeds, {samples} samples seen per run, {metrics['eval_set']['n']} eval images)")
    return "\n".join(lines)
