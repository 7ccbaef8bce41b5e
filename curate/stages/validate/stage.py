"""The validate stage: train the same small model on curated/ and on a random subset of the unfiltered download,
with the same recipe and samples seen, over several seeds; evaluate each on a held-out set; write
OUTPUT/validate/metrics.json.

Each (arm, seed) lives in OUTPUT/validate/<arm>-seed<k>/: `checkpoint.pt` (the trainer resumes it), `run.json`
(the fingerprint of what it trains on) and `result.json` (written last: training summary, metrics and the
fingerprint of training + evaluation). A finished run whose fingerprint matches is not redone; a run with
another training fingerprint is wiped, since the trainer's own check only compares recipes, not data.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from curate.io.fs import read_json, write_json_atomic
from curate.io.wds import count_samples as count_tar_samples
from curate.io.wds import iter_samples
from curate.stage import (
    Phase,
    RunLayout,
    Stage,
    StageContext,
    StageOutputs,
    TaskOutput,
    digest,
    identify_paths,
    single_task,
)
from curate.stages.download import DownloadOutputs
from curate.stages.embed import EmbedOutputs
from curate.stages.input import InputOutputs
from curate.stages.materialize import CuratedOutputs, uid_hex

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


def settings(cfg: ValidateConfig, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The settings a run's fingerprints cover; a model config or eval set counts by its content, not its path."""
    return identify_paths(cfg.model_dump(mode="json", exclude=set(SCHEDULING_FIELDS | exclude)))


# ---------------------------------------------------------------- training data of each arm


def curated_shards(layout: RunLayout) -> list[Path]:
    shards = CuratedOutputs(layout).shards()
    if not shards:
        raise FileNotFoundError(f"{layout.root}/curated holds no shards to train on")
    return shards


def input_shards(layout: RunLayout) -> list[str]:
    return InputOutputs(layout).shards()


def baseline_pool(layout: RunLayout, shards: Sequence[str], contaminated: set[str]) -> list[str]:
    """Every successfully downloaded uid, minus those close to an eval image: the unfiltered data."""
    pool: set[str] = set()
    for shard in shards:
        pool.update(DownloadOutputs(layout).kept_uids(shard).to_pylist())
    return sorted(pool - contaminated)


def contaminated_uids(config: PipelineConfig, layout: RunLayout, shards: Sequence[str]) -> set[str]:
    """Downloaded uids within dedup's contamination threshold of an eval image. dedup only sees the samples
    that passed the filters; the baseline draws from every download, so the same rule is applied to all,
    with the evaluation embeddings dedup's `eval` phase computed."""
    if not config.dedup.eval_sets or "embed" not in config.stages:
        return set()
    from curate.stages.dedup.decontaminate import contaminated
    from curate.stages.dedup.stage import DedupOutputs

    dedup = DedupOutputs(layout)
    if dedup.eval_paths()[0].exists():
        eval_emb, _ = dedup.eval_embeddings()
    else:  # dedup ran without these eval sets
        from curate.stages.dedup.decontaminate import embed_eval_sets

        eval_emb, _ = embed_eval_sets(config.dedup.eval_sets, config.embed)
    found: set[str] = set()
    embed = EmbedOutputs(layout)
    for shard in shards:
        if not embed.has(shard):  # a shard with no downloaded image
            continue
        uids = embed.metadata(shard, columns=["uid"])["uid"]
        mask = contaminated(embed.image_embeddings(shard), eval_emb, config.dedup.contamination_threshold).mask
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
                tar_path = DownloadOutputs(layout).tar_path(shard)
                chosen = {s.uid: s for s in iter_samples(tar_path, subset)} if tar_path.exists() else {}
                for uid in sorted(chosen):
                    writer.write({"__key__": uid_hex(uid), **chosen[uid].members})  # a key never holds a dot
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
    return sum(count_tar_samples(path) for path in shards)


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
    from curate.clip import resolve_device, resolve_model_name
    from curate.stages.validate.evalsets import load_eval_set
    from curate.stages.validate.evaluate import EvalOptions, evaluate_checkpoint

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


# ---------------------------------------------------------------- the stage


class ValidateOutputs(StageOutputs):
    stage = STAGE

    @property
    def metrics_path(self) -> Path:
        return self.folder / "metrics.json"

    def metrics(self) -> dict[str, Any]:
        return read_json(self.metrics_path)

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.folder / f"{arm}-seed{seed}"


class ValidateStage(Stage):
    """Phases: `baseline` (the unfiltered arm's random subset of the download), `runs` (one task per arm and
    seed, each resuming its own checkpoint; GPU tasks when on cuda) and `metrics` (the table)."""

    name = STAGE
    speed_only = SCHEDULING_FIELDS
    decides_fates = False
    default = False
    outputs = ValidateOutputs

    @property
    def cfg(self) -> ValidateConfig:
        return self.config.validate

    def preflight(self) -> None:
        from curate.config import ConfigError

        if self.cfg.eval_set is None:
            raise ConfigError("validate.eval_set: the validate stage needs a held-out eval set folder (labels.json)")
        if not (Path(self.cfg.eval_set) / "labels.json").is_file():
            raise ConfigError(f"validate.eval_set: {self.cfg.eval_set!r} has no labels.json")

    def resources(self) -> dict[str, float]:
        from curate.clip import wants_gpu

        return {"GPU": 1} if wants_gpu(self.cfg.device) else {}

    def phases(self) -> list[Phase]:
        return [
            Phase("baseline", single_task, self._baseline, commit="in_place", resources={}),
            Phase("runs", self._run_names, self._run, commit="in_place"),
            Phase("metrics", single_task, self._metrics, resources={}),
        ]

    def _run_names(self, _ctx: StageContext) -> list[str]:
        return [f"{arm}-seed{seed}" for seed in range(self.cfg.seeds) for arm in ARMS]

    def _data(self, layout: RunLayout) -> tuple[dict[str, list[Path]], dict[str, str], int, int]:
        """Each arm's shards and data fingerprint, the curated sample count and the baseline's pool size."""
        upstream = CuratedOutputs(layout).fingerprint()
        data = {"curated": curated_shards(layout)}
        n_curated = count_samples(data["curated"])
        data["baseline"], n_pool, baseline_print = ensure_baseline_shards(self.config, layout, n_curated, upstream)
        return data, {"curated": upstream, "baseline": baseline_print}, n_curated, n_pool

    def _eval_print(self) -> str:
        from curate.stages.validate.evalsets import eval_set_fingerprint

        return digest({"eval_set": eval_set_fingerprint(Path(self.cfg.eval_set)), "settings": settings(self.cfg)})

    def _baseline(self, ctx: StageContext, _task: str, _workdir: Path) -> TaskOutput:
        data, _, n_curated, n_pool = self._data(ctx.layout)
        counts = {"curated": n_curated, "baseline": count_samples(data["baseline"]), "pool": n_pool}
        return TaskOutput(counts=counts, files=(f"{BASELINE_DATA}/_done.json",))

    def _run(self, ctx: StageContext, task: str, _workdir: Path) -> TaskOutput:
        arm, _, seed_text = task.rpartition("-seed")
        seed = int(seed_text)
        data, data_prints, _, _ = self._data(ctx.layout)
        train_print = digest({"data": data_prints[arm], "seed": seed, "settings": settings(self.cfg, EVAL_FIELDS)})
        out_dir = ValidateOutputs(ctx.layout).run_dir(arm, seed)
        result = run_arm(self.cfg, data[arm], out_dir, seed, train_print, self._eval_print(), None)
        return TaskOutput(counts={"steps": int(result["steps"])}, files=(f"{out_dir.name}/result.json",))

    def _metrics(self, ctx: StageContext, _task: str, workdir: Path) -> TaskOutput:
        outputs = ValidateOutputs(ctx.layout)
        data, data_prints, n_curated, n_pool = self._data(ctx.layout)
        runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
        for seed in range(self.cfg.seeds):
            for arm in ARMS:
                runs[arm].append(read_json(outputs.run_dir(arm, seed) / "result.json"))
        counts = {
            "curated_samples": n_curated,
            "baseline_samples": count_samples(data["baseline"]),
            "baseline_pool": n_pool,
        }
        metrics = metrics_document(self.cfg, runs, data_prints["curated"], self._eval_print(), counts)
        write_json_atomic(workdir / outputs.metrics_path.name, metrics)
        return TaskOutput(counts=counts)


def run_validation(
    config: PipelineConfig, layout: RunLayout, progress: ProgressFactory | None = None
) -> dict[str, Any]:
    """Train and evaluate every (arm, seed) on the run's curated set as it is, in this process, resuming what was
    interrupted; returns metrics.json."""
    from curate.executors.local import LocalExecutor
    from curate.io.lock import run_lock
    from curate.pipeline import run_stage, stage_fingerprints
    from curate.stages import plan

    if STAGE not in config.stages:
        config = config.model_copy(update={"stages": [*config.stages, STAGE]})
    stages = plan(config)
    stage = stages[-1]
    stage.preflight()
    ctx = StageContext(config, layout, stage_fingerprints(stages)[STAGE], tuple(InputOutputs(layout).shards()))
    with run_lock(layout.root):
        run_stage(stage, ctx, LocalExecutor(), progress)
    return ValidateOutputs(layout).metrics()


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
