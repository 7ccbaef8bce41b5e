"""The validate stage: train the same small model on each arm's training set (curated/, a random subset of the
download, or a subset chosen by re-applying some of the run's rules; arms.py), with the same recipe and samples
seen, over several seeds; evaluate each on a held-out set; compare the arms seed by seed (paired.py); write
OUTPUT/validate/metrics.json.

Each (arm, seed) lives in OUTPUT/validate/<arm>-seed<k>/: `checkpoint.pt` (the trainer resumes it), `run.json`
(the fingerprint of what it trains on) and `result.json` (written last: training summary, metrics and the
fingerprint of training + evaluation). A finished run whose fingerprint matches is not redone; a run with
another training fingerprint is wiped, since the trainer's own check only compares recipes, not data.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from curate.io.fs import read_json, write_json_atomic
from curate.io.wds import count_samples as count_tar_samples
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
from curate.stages.input import InputOutputs
from curate.stages.materialize import CuratedOutputs
from curate.stages.validate.arms import (  # baseline_pool and contaminated_uids: part of this module's interface
    Subset,
    baseline_pool,
    check_arms,
    contaminated_uids,
    data_folder,
    ensure_subset,
    read_subset,
)
from curate.stages.validate.arms import subset_fingerprint as arm_data_fingerprint
from curate.stages.validate.paired import paired_difference, verdict

__all__ = ["ValidateOutputs", "ValidateStage", "baseline_pool", "contaminated_uids", "run_validation"]

if TYPE_CHECKING:
    from curate.config import PipelineConfig, ValidateConfig
    from curate.stages.validate.evaluate import EvalOptions
    from curate.stages.validate.train import Progress, TrainRecipe, TrainResult

log = logging.getLogger(__name__)

STAGE = "validate"
TABLE_METRICS = (("zero_shot_acc", "zero-shot acc"), ("image_to_text_r5", "i->t R@5"), ("text_to_image_r5", "t->i R@5"))

ProgressFactory = Callable[..., AbstractContextManager[Any]]

# Settings that change how a run executes, not what it computes.
SCHEDULING_FIELDS = frozenset(
    {"device", "workers", "checkpoint_every", "decode_workers", "decoded_cache_mb", "eval_batch_size"}
)
# Settings that only change the evaluation: changing them re-evaluates the checkpoints, never retrains.
EVAL_FIELDS = frozenset(
    {"eval_set", "classnames", "templates", "task_templates", "recall_ks", "probe_train_fraction", "probe_l2"}
)
# Settings that choose which runs there are and how they are compared, not what one (arm, seed) computes; an
# arm's data fingerprint holds what its subset depends on.
PLAN_FIELDS = frozenset({"arms", "seeds", "paired_bar", "baseline_size", "baseline_seed"})


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
            decoded_cache_mb=cfg.decoded_cache_mb,
            shuffle_buffer=cfg.shuffle_buffer,
        )
    except ValueError as err:
        raise ValueError(f"validate: {err}") from None


def settings(cfg: ValidateConfig, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The settings a run's fingerprints cover; a model config or eval set counts by its content, not its path."""
    return identify_paths(cfg.model_dump(mode="json", exclude=set(SCHEDULING_FIELDS | PLAN_FIELDS | exclude)))


# ---------------------------------------------------------------- training data of each arm


def curated_shards(layout: RunLayout) -> list[Path]:
    """The curated shards, ready to read (on a bucket: fetched into this process's mirror)."""
    shards = CuratedOutputs(layout).shards()
    if not shards:
        raise FileNotFoundError(f"{layout.where(layout.stage_dir('curated'))} holds no shards to train on")
    return [layout.fetch(shard) for shard in shards]


def input_shards(layout: RunLayout) -> list[str]:
    return InputOutputs(layout).shards()


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
        "train_threads": torch_threads(),
        "checkpoint": str(trained.checkpoint),
    }
    write_json_atomic(result_path, result)
    return result


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def train(
    cfg: ValidateConfig, shards: Sequence[Path], out_dir: Path, seed: int, progress: Progress | None
) -> TrainResult:
    recipe = train_recipe(cfg, seed)
    if cfg.objective == "simclr":
        from curate.stages.validate.simclr import train_simclr

        return train_simclr(shards, recipe, out_dir, cfg.simclr_temperature, progress=progress)
    from curate.stages.validate.train import train_clip

    return train_clip(shards, recipe, out_dir, progress=progress)


def eval_options(cfg: ValidateConfig) -> EvalOptions:
    from curate.stages.validate.evaluate import EvalOptions

    return EvalOptions(
        templates=tuple(cfg.templates),
        classnames=tuple(cfg.classnames) if cfg.classnames else None,
        ks=tuple(cfg.recall_ks),
        probe_train_fraction=cfg.probe_train_fraction,
        probe_l2=cfg.probe_l2,
        batch_size=cfg.eval_batch_size,
        text_metrics=cfg.objective == "clip",
        task_templates={task: tuple(templates) for task, templates in cfg.task_templates.items()},
    )


def evaluate(cfg: ValidateConfig, checkpoint: Path, model: str | None = None) -> dict[str, Any]:
    """Every metric of `checkpoint` (a `model`, default validate.model) on validate.eval_set."""
    from curate.clip import resolve_device, resolve_model_name
    from curate.stages.validate.evalsets import load_eval_set
    from curate.stages.validate.evaluate import evaluate_checkpoint

    device = str(resolve_device(cfg.device))
    name = resolve_model_name(model or cfg.model)
    return evaluate_checkpoint(checkpoint, name, load_eval_set(Path(cfg.eval_set)), eval_options(cfg), device)


# ---------------------------------------------------------------- the stage


class ValidateOutputs(StageOutputs):
    stage = STAGE

    @property
    def metrics_path(self) -> Path:
        return self.folder / "metrics.json"

    def metrics(self) -> dict[str, Any]:
        return dict(self.layout.read_json(self.metrics_path))

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.folder / f"{arm}-seed{seed}"


class ValidateStage(Stage):
    """Phases: `subsets` (one task per arm drawn from the download: its training shards, chosen from the run's
    saved fates and scores), `runs` (one task per arm and seed, each resuming its own checkpoint; GPU tasks when
    on cuda) and `metrics` (the table and the paired differences)."""

    name = STAGE
    speed_only = SCHEDULING_FIELDS
    decides_fates = False
    default = False
    outputs = ValidateOutputs

    @property
    def cfg(self) -> ValidateConfig:
        """The settings, with an eval set at a URL replaced by its local copy (fetched once per process)."""
        from curate.io.local_copy import is_remote, local_copy

        cfg = self.config.validate
        if cfg.eval_set is None or not is_remote(cfg.eval_set):
            return cfg
        if getattr(self, "_local_cfg", None) is None:
            self.check_remote_eval_set(cfg.eval_set)
            local = local_copy(cfg.eval_set, self.storage, "validate.eval_set")
            self._local_cfg = cfg.model_copy(update={"eval_set": str(local)})
        return self._local_cfg

    def check_remote_eval_set(self, url: str) -> None:
        from curate.config import ConfigError

        labels = f"{url.rstrip('/')}/labels.json"
        try:
            found = self.storage.info(labels)
        except OSError as err:
            raise ConfigError(f"validate.eval_set: cannot read {labels}: {err}") from None
        if found is None:
            raise ConfigError(f"validate.eval_set: {url!r} has no labels.json")

    def preflight(self) -> None:
        from curate.config import ConfigError

        if self.config.validate.eval_set is None:
            raise ConfigError("validate.eval_set: the validate stage needs a held-out eval set folder (labels.json)")
        if not (Path(self.cfg.eval_set) / "labels.json").is_file():
            raise ConfigError(f"validate.eval_set: {self.cfg.eval_set!r} has no labels.json")
        check_arms(self.config)
        if self.cfg.task_templates:
            from curate.stages.validate.evalsets import load_eval_set

            tasks = list(load_eval_set(Path(self.cfg.eval_set)).tasks)
            unknown = sorted(set(self.cfg.task_templates) - set(tasks))
            if unknown:
                raise ConfigError(f"validate.task_templates: {unknown} are not tasks of the eval set; it has {tasks}")
        if self.cfg.bar_metrics:
            known = metric_names(self.cfg)
            unknown = [name for name in self.cfg.bar_metrics if name not in known]
            if unknown:
                raise ConfigError(f"validate.bar_metrics: {unknown} are not metrics of this eval set; they are {known}")

    def resources(self) -> dict[str, float]:
        from curate.clip import wants_gpu

        return {"GPU": 1} if wants_gpu(self.cfg.device) else {}

    def workers(self) -> int:
        return self.cfg.workers

    def phases(self) -> list[Phase]:
        return [
            Phase("subsets", self._subset_names, self._subset, commit="in_place", resources={}, workers=1),
            Phase("runs", self._run_names, self._run, commit="in_place"),
            Phase("metrics", single_task, self._metrics, resources={}, workers=1),
        ]

    def _subset_names(self, _ctx: StageContext) -> list[str]:
        return [arm for arm in self.cfg.arms if arm != "curated"]

    def _run_names(self, _ctx: StageContext) -> list[str]:
        return [f"{arm}-seed{seed}" for seed in range(self.cfg.seeds) for arm in self.cfg.arms]

    def _subset(self, ctx: StageContext, arm: str, _workdir: Path) -> TaskOutput:
        n_curated = count_samples(curated_shards(ctx.layout))
        subset = ensure_subset(self.config, ctx, arm, n_curated, CuratedOutputs(ctx.layout).fingerprint())
        folder = data_folder(ctx.layout, arm).name  # its tars, then the marker (a bucket gets them in this order)
        files = (*(f"{folder}/{tar.name}" for tar in subset.shards), f"{folder}/_done.json")
        return TaskOutput(counts={"samples": subset.samples, "pool": subset.pool}, files=files)

    def _arm_data(self, layout: RunLayout, arm: str) -> Subset:
        """An arm's training shards, sample count and data fingerprint (the subsets phase wrote them for every
        arm but curated)."""
        upstream = CuratedOutputs(layout).fingerprint()
        if arm == "curated":
            shards = curated_shards(layout)
            n = count_samples(shards)
            return Subset(shards, n, n, upstream)
        subset = read_subset(layout, arm, arm_data_fingerprint(self.config, arm, upstream))
        if subset is None:
            raise FileNotFoundError(f"{data_folder(layout, arm)} is missing or stale; the subsets phase writes it")
        return subset

    def _eval_print(self) -> str:
        from curate.stages.validate.evalsets import eval_set_fingerprint

        return digest({"eval_set": eval_set_fingerprint(Path(self.cfg.eval_set)), "settings": settings(self.cfg)})

    def _run(self, ctx: StageContext, task: str, _workdir: Path) -> TaskOutput:
        from curate.clip import resolve_device
        from curate.cores import use_task_share

        arm, _, seed_text = task.rpartition("-seed")
        seed = int(seed_text)
        data = self._arm_data(ctx.layout, arm)
        train_print = digest({"data": data.fingerprint, "seed": seed, "settings": settings(self.cfg, EVAL_FIELDS)})
        out_dir = ValidateOutputs(ctx.layout).run_dir(arm, seed)
        cfg = self.worker_config()
        use_task_share(resolve_device(cfg.device).type)
        result = run_arm(cfg, data.shards, out_dir, seed, train_print, self._eval_print(), None)
        return TaskOutput(counts={"steps": int(result["steps"])}, files=(f"{out_dir.name}/result.json",))

    def worker_config(self) -> ValidateConfig:
        """The settings of this process's runs: a local pool worker takes its own GPU (worker i: cuda:i mod the
        GPUs torch sees)."""
        from curate.clip import worker_device
        from curate.executors.local import worker_rank

        return self.cfg.model_copy(update={"device": worker_device(self.cfg.device, worker_rank())})

    def _metrics(self, ctx: StageContext, _task: str, workdir: Path) -> TaskOutput:
        outputs = ValidateOutputs(ctx.layout)
        runs: dict[str, list[dict[str, Any]]] = {}
        counts: dict[str, int] = {}
        for arm in self.cfg.arms:
            data = self._arm_data(ctx.layout, arm)
            counts[f"{arm}_samples"] = data.samples
            if arm != "curated":
                counts[f"{arm}_pool"] = data.pool
            runs[arm] = [
                ctx.layout.read_json(outputs.run_dir(arm, seed) / "result.json") for seed in range(self.cfg.seeds)
            ]
        upstream = CuratedOutputs(ctx.layout).fingerprint()
        metrics = metrics_document(self.cfg, runs, upstream, self._eval_print(), counts)
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


def metric_names(cfg: ValidateConfig) -> list[str]:
    """The metrics each run reports on cfg.eval_set (evaluate_checkpoint's names)."""
    from curate.stages.validate.evalsets import load_eval_set

    tasks = list(load_eval_set(Path(cfg.eval_set)).tasks)
    names = ["linear_probe_acc", *(f"linear_probe_acc_{task}" for task in tasks)]
    if cfg.objective == "clip":
        names += ["zero_shot_acc", *(f"zero_shot_acc_{task}" for task in tasks)]
        names += [f"{way}_r{k}" for way in ("image_to_text", "text_to_image") for k in cfg.recall_ks]
    return names


def comparisons(arms: Sequence[str]) -> list[tuple[str, str]]:
    """(arm, against) pairs: every arm against the first listed (the reference), then each against the one
    listed before it."""
    pairs = [(arm, arms[0]) for arm in arms[1:]]
    pairs += [(arms[i], arms[i - 1]) for i in range(2, len(arms))]
    return pairs


def bar_metrics(cfg: ValidateConfig, names: Sequence[str]) -> list[str]:
    """The metrics a pair must clear the bar on: validate.bar_metrics, or the zero-shot accuracies (the
    linear probe for an image-only objective)."""
    if cfg.bar_metrics:
        return list(cfg.bar_metrics)
    zero_shot = [name for name in names if name.startswith("zero_shot_acc_")] or ["zero_shot_acc"]
    return zero_shot if cfg.objective == "clip" else ["linear_probe_acc"]


def metrics_document(
    cfg: ValidateConfig, runs: dict[str, list[dict[str, Any]]], upstream: str, eval_print: str, data: dict[str, int]
) -> dict[str, Any]:
    first = next(iter(runs.values()))[0]
    names = sorted(name for name in first["metrics"] if name != "n_eval")
    summary = {
        arm: {name: summarize([run["metrics"][name] for run in arm_runs]) for name in names}
        for arm, arm_runs in runs.items()
    }
    bar = bar_metrics(cfg, names)
    missing = sorted(set(bar) - set(names))
    if missing:
        raise ValueError(f"validate.bar_metrics: {missing} are not among the metrics {names}")
    paired = {}
    for arm, against in comparisons(list(runs)):
        # both arms of a seed start from that seed's initial weights: the per-seed differences are paired
        by_metric = {}
        for name in names:
            diff = paired_difference(
                arm, summary[arm][name]["values"], against, summary[against][name]["values"], cfg.paired_bar
            )
            by_metric[name] = {**diff.to_dict(), "verdict": verdict(diff, name)}
        paired[f"{arm} - {against}"] = {
            "arm": arm,
            "against": against,
            "bar_metrics": bar,
            "passes": all(by_metric[name]["passes"] for name in bar),
            "metrics": by_metric,
        }
    recipe = train_recipe(cfg, 0).to_dict()
    recipe.pop("seed")
    return {
        "fingerprint": digest(
            {"upstream": upstream, "eval": eval_print, "plan": cfg.model_dump(mode="json", include=set(PLAN_FIELDS))}
        ),
        "objective": cfg.objective,
        "recipe": recipe,
        "arms": list(runs),
        "seeds": list(range(cfg.seeds)),
        "samples_seen": first["samples_seen"],
        "eval_set": {"path": cfg.eval_set, "n": first["metrics"]["n_eval"]},
        "data": data,
        "summary": summary,
        "paired": paired,
        "runs": {arm: [_run_entry(run) for run in arm_runs] for arm, arm_runs in runs.items()},
    }


def _run_entry(run: dict[str, Any]) -> dict[str, Any]:
    entry = {key: run[key] for key in ("seed", "metrics", "samples_seen", "steps", "train_seconds", "losses")}
    return {**entry, "train_threads": run.get("train_threads")}  # None in a result written before it was recorded


def table_columns(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric, label) of the table: zero-shot per eval-set task, retrieval R@5, the linear probe per task."""
    names = next(iter(metrics["summary"].values()))
    tasks = [name.removeprefix("zero_shot_acc_") for name in names if name.startswith("zero_shot_acc_")]
    probes = [name.removeprefix("linear_probe_acc_") for name in names if name.startswith("linear_probe_acc_")]
    columns = [(f"zero_shot_acc_{task}", f"zero-shot {task}") for task in tasks]
    if not columns:
        columns = [(key, label) for key, label in TABLE_METRICS[:1] if key in names]
    columns += [(key, label) for key, label in TABLE_METRICS[1:] if key in names]
    columns += [(f"linear_probe_acc_{task}", f"probe {task}") for task in probes]
    return columns or [("linear_probe_acc", "linear probe")]


def pair_names(metrics: dict[str, Any]) -> list[str]:
    """The pairs of metrics.json in comparison order (the file itself keeps its keys sorted)."""
    return [f"{arm} - {against}" for arm, against in comparisons(metrics["arms"])]


def pair_verdict(pair: dict[str, Any]) -> str:
    """One line: whether `pair` clears the paired bar on every bar metric, naming the ones it misses."""
    bar = pair["metrics"][pair["bar_metrics"][0]]["bar"]
    what = f"{pair['arm']} vs {pair['against']}"
    labels = [_metric_label(name) for name in pair["bar_metrics"]]
    n = len(pair["metrics"][pair["bar_metrics"][0]]["per_seed"])
    if pair["passes"]:
        rule = f"(> {bar:g}x std, 95% CI excludes 0)"
        return f"verdict: {what}: PASSES the paired bar {rule} on {', '.join(labels)}, {n} seeds"
    misses = []
    for name in pair["bar_metrics"]:
        cell = pair["metrics"][name]
        if not cell["passes"]:
            interval = "no CI" if cell["ci95"] is None else f"CI [{cell['ci95'][0]:+.3f}, {cell['ci95'][1]:+.3f}]"
            misses.append(f"{_metric_label(name)} {cell['mean']:+.3f} ± {cell['std']:.3f}, {interval}")
    return (
        f"verdict: {what}: does NOT pass the paired bar (> {bar:g}x std, 95% CI excludes 0), {n} seeds: "
        + "; ".join(misses)
    )


def _metric_label(name: str) -> str:
    if name.startswith("zero_shot_acc_"):
        return f"zero-shot {name.removeprefix('zero_shot_acc_')}"
    return dict((*TABLE_METRICS, ("linear_probe_acc", "linear probe"))).get(name, name)


def format_verdicts(metrics: dict[str, Any]) -> str:
    return "\n".join(pair_verdict(metrics["paired"][name]) for name in pair_names(metrics))


def format_validation_table(metrics: dict[str, Any]) -> str:
    """Mean ± std over seeds per arm, the paired per-seed differences (mean ± std, 95% interval) per pair, and
    one verdict line per pair (metrics.json holds one per pair and metric too)."""
    columns = table_columns(metrics)
    pairs = pair_names(metrics)
    width = max(22, *(len(name) + 2 for name in pairs))
    lines = [f"{'arm':<{width}}" + "".join(f"{label:>18}" for _, label in columns)]
    for arm in metrics["arms"]:
        summary = metrics["summary"][arm]
        cells = "".join(f"{summary[key]['mean']:>11.3f} ± {summary[key]['std']:.3f}" for key, _ in columns)
        lines.append(f"{arm:<{width}}{cells}")
    for name in pairs:
        pair = metrics["paired"][name]
        cells = "".join(
            f"{pair['metrics'][key]['mean']:>+11.3f} ± {pair['metrics'][key]['std']:.3f}" for key, _ in columns
        )
        lines.append(f"{name:<{width}}{cells}")
        intervals = "".join(_interval_cell(pair["metrics"][key]["ci95"]) for key, _ in columns)
        lines.append(f"{'  95% CI':<{width}}{intervals}")
    seeds, samples = len(metrics["seeds"]), metrics["samples_seen"]
    lines.append(
        f"({seeds} seeds, {samples} samples seen per run, {metrics['eval_set']['n']} eval images; "
        "pairs: mean ± std of the per-seed differences, both arms of a seed starting from the same weights)"
    )
    lines.append(format_verdicts(metrics))
    return "\n".join(lines)


def _interval_cell(interval: list[float] | None) -> str:
    return f"{'':>18}" if interval is None else f"{f'[{interval[0]:+.3f}, {interval[1]:+.3f}]':>18}"
