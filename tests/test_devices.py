"""Devices and precision: `precision: auto` per device, one model per GPU for the local executor's workers, the
LocalCluster's GPU workers, validation runs asking Dask for a GPU, SimCLR under autocast, and checkpoints that
resume on a machine with fewer GPUs. GPUs are faked at the torch level, inside each test only."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds

import curate.executors.local
from curate import clip
from curate.config import ConfigError, DaskConfig, PipelineConfig, load_config, validate_config
from curate.cores import TASK_THREADS_ENV, host_cores, task_threads
from curate.executors.dask import ClusterPlan, DaskExecutor, plan_local_cluster
from curate.executors.local import LocalExecutor, worker_rank
from curate.pipeline import run_pipeline
from curate.stage import Phase, RunLayout, Stage, StageContext, TaskOutput
from curate.stages.dedup.stage import DedupStage
from curate.stages.embed import EmbedStage
from curate.stages.validate.evalsets import make_demo_eval_set
from curate.stages.validate.simclr import train_simclr
from curate.stages.validate.stage import ValidateStage
from curate.stages.validate.train import (
    TrainRecipe,
    TrainState,
    cuda_rng_state,
    load_checkpoint,
    restore_cuda_rng_state,
    restore_state,
    save_checkpoint,
)
from examples.demo_world import encode_image, make_caption, random_scene, render_scene
from tests.run_fixtures import CuratedRun, shared_curated_run
from tests.world_fixtures import ServedWorld

pytestmark = pytest.mark.timeout(600)

MICRO_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """torch in this process sees `count` CUDA devices (nothing is ever run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def config(tmp_path: Path, **sections: dict[str, Any]) -> PipelineConfig:
    return validate_config({"output": str(tmp_path / "run"), "input": {"path": "crawl.parquet"}, **sections})


# ---------------------------------------------------------------- precision


def test_precision_auto_is_the_default_and_resolves_per_device(tmp_path: Path) -> None:
    defaults = config(tmp_path)
    assert defaults.embed.precision == defaults.validate.precision == "auto"
    assert clip.resolve_precision("auto", torch.device("cuda", 1)) == "bf16"
    assert clip.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert clip.resolve_precision("fp16", torch.device("cuda")) == "fp16"
    assert clip.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ConfigError, match=r"embed\.precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"):
        config(tmp_path, embed={"precision": "fp8"})


def test_auto_on_cpu_embeds_exactly_as_fp32(tiny_checkpoint: Path) -> None:
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens = None
    results = {}
    for precision in ("auto", "fp32", "bf16"):
        loaded = clip.load_clip(clip.ClipSpec("curate-tiny", str(tiny_checkpoint), "cpu", precision))
        tokens = loaded.tokenizer(["a red circle", "a blue star", "two green squares", "a heart"])
        results[precision] = (loaded.precision, *clip.encode_pairs(loaded, images, tokens))
    assert results["auto"][0] == results["fp32"][0] == "fp32" and results["bf16"][0] == "bf16"
    for auto, fp32 in zip(results["auto"][1:], results["fp32"][1:], strict=True):
        assert np.array_equal(auto, fp32)  # bit-identical: what a run on cpu stored before stays valid
    assert not np.array_equal(results["bf16"][1], results["fp32"][1])  # bf16 is a real autocast


def test_tf32_matmuls_on_cuda_only() -> None:
    before = torch.get_float32_matmul_precision()
    try:
        clip.configure_matmul(torch.device("cpu"), "auto")
        assert torch.get_float32_matmul_precision() == before  # cpu: never touched
        clip.configure_matmul(torch.device("cuda", 0), "auto")
        assert torch.get_float32_matmul_precision() == "high"  # TF32
        clip.configure_matmul(torch.device("cuda", 0), "fp32")
        assert torch.get_float32_matmul_precision() == "highest"  # an explicit fp32 stays IEEE fp32
    finally:
        torch.set_float32_matmul_precision(before)


# ---------------------------------------------------------------- one model per GPU


@pytest.mark.parametrize("section", ["embed", "validate"])
@pytest.mark.parametrize(
    ("device", "gpus", "rank", "expected"),
    [
        ("cuda", 2, 0, "cuda:0"),
        ("cuda", 2, 3, "cuda:1"),
        ("auto", 4, 2, "cuda:2"),
        ("auto", 8, 9, "cuda:1"),
        ("auto", 0, 1, "auto"),  # no GPU: auto stays auto (cpu)
        ("cuda:1", 2, 0, "cuda:1"),  # an explicit card is kept
        ("cpu", 2, 1, "cpu"),
        ("cuda", 2, None, "cuda"),  # not a pool worker: in the driver, on Dask
    ],
)
def test_local_workers_spread_over_the_gpus_torch_sees(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    section: str,
    device: str,
    gpus: int,
    rank: int | None,
    expected: str,
) -> None:
    fake_gpus(monkeypatch, gpus)
    monkeypatch.setattr(curate.executors.local, "_rank", rank)
    monkeypatch.delenv(TASK_THREADS_ENV, raising=False)
    threads = torch.get_num_threads()
    if section == "embed":
        chosen = EmbedStage(config(tmp_path, embed={"device": device})).worker_device()
    else:  # each of validate.workers runs in the local pool
        chosen = ValidateStage(config(tmp_path, validate={"device": device, "workers": 2})).worker_config().device
    assert chosen == expected
    assert torch.get_num_threads() == threads  # outside a pool no share is given: torch's threads stay


def test_embed_asks_dask_for_a_gpu_on_cuda_and_on_auto_where_one_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for gpus, auto in ((0, {}), (2, {"GPU": 1})):
        fake_gpus(monkeypatch, gpus)
        assert EmbedStage(config(tmp_path)).resources() == auto
        assert EmbedStage(config(tmp_path, embed={"device": "cuda:1"})).resources() == {"GPU": 1}
        assert EmbedStage(config(tmp_path, embed={"device": "cpu"})).resources() == {}


def test_dedup_asks_dask_for_a_gpu_only_to_embed_its_eval_sets_on_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_gpus(monkeypatch, 0)
    for device, wanted in (("cuda", {"GPU": 1}), ("cuda:1", {"GPU": 1}), ("cpu", {})):
        stage = DedupStage(config(tmp_path, embed={"device": device}, dedup={"eval_sets": ["held-out/"]}))
        assert stage.phase("eval").resources == wanted  # the run's own model embeds the eval sets
        assert stage.resources() == {} and all(p.resources is None for p in stage.phases() if p.name != "eval")
    assert "eval" not in [p.name for p in DedupStage(config(tmp_path, embed={"device": "cuda"})).phases()]


def test_the_config_takes_cuda_n_for_embed_and_validate(tmp_path: Path) -> None:
    chosen = config(tmp_path, embed={"device": "cuda:3"}, validate={"device": "cuda:1"})
    assert (chosen.embed.device, chosen.validate.device) == ("cuda:3", "cuda:1")
    assert EmbedStage(chosen).resources() == {"GPU": 1}
    with pytest.raises(ConfigError, match=r"embed\.device: unknown device 'gpu:0'; give auto, cpu, cuda or cuda:N"):
        config(tmp_path, embed={"device": "gpu:0"})
    with pytest.raises(ConfigError, match=r"validate\.device: unknown device 'cuda:-1'"):
        config(tmp_path, validate={"device": "cuda:-1"})


class RankProbe(Stage):
    """Reports which pool worker ran each task (a stage only this test knows)."""

    name = "probe"
    section = None
    decides_fates = False

    def phases(self) -> list[Phase]:
        return [Phase("ranks", lambda _ctx: ["a", "b", "c", "d"], self._probe)]

    def _probe(self, _ctx: StageContext, _task: str, _workdir: Path) -> TaskOutput:
        time.sleep(1.0)  # long enough for both workers to take tasks
        return TaskOutput(counts={"rank": worker_rank(), "pid": os.getpid(), "threads": task_threads()})


def test_each_local_worker_process_takes_its_own_rank_and_its_share_of_the_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TASK_THREADS_ENV, raising=False)
    stage = RankProbe(config(tmp_path))
    ctx = StageContext(stage.config, RunLayout(tmp_path / "run"), "probe-print")
    reports = list(LocalExecutor().map_tasks(stage, ctx, "ranks", ["a", "b", "c", "d"], workers=2))
    rank_of = {report.stats.counts["pid"]: report.stats.counts["rank"] for report in reports}
    assert len(reports) == 4 and sorted(rank_of.values()) == [0, 1]  # two processes, ranks 0 and 1
    assert worker_rank() is None  # the driver is no pool worker
    assert {report.stats.counts["threads"] for report in reports} == {max(1, host_cores() // 2)}

    monkeypatch.setenv(TASK_THREADS_ENV, "3")  # the user's own setting wins
    ctx = StageContext(stage.config, RunLayout(tmp_path / "run-3"), "probe-print")
    reports = list(LocalExecutor().map_tasks(stage, ctx, "ranks", ["a", "b"], workers=2))
    assert {report.stats.counts["threads"] for report in reports} == {3}


# ---------------------------------------------------------------- the LocalCluster's GPU workers


def worker_view() -> dict[str, str | None]:
    import dask

    return {
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        "tick": str(dask.config.get("distributed.admin.tick.interval")),
        "threads": str(task_threads()),
    }


def test_the_local_cluster_plan_for_faked_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(TASK_THREADS_ENV, raising=False)
    fake_gpus(monkeypatch, 0)
    assert plan_local_cluster(DaskConfig()) == ClusterPlan(None, ())  # no GPU: LocalCluster's own default
    assert plan_local_cluster(DaskConfig(n_workers=3)) == ClusterPlan(3, ())

    fake_gpus(monkeypatch, 2)
    assert plan_local_cluster(DaskConfig(n_workers=3)) == ClusterPlan(3, ("0", "1"))
    assert plan_local_cluster(DaskConfig()).cpu_workers == max(1, host_cores() - 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # the driver's own selection is what the workers get
    assert plan_local_cluster(DaskConfig(n_workers=3)).gpus == ("3", "5")
    share = str(max(1, host_cores() // 5))  # 3 CPU workers and 2 GPU workers share the host's cores
    assert ClusterPlan(3, ("3", "5")).cpu_worker_options() == {
        "env": {TASK_THREADS_ENV: share, "CUDA_VISIBLE_DEVICES": ""}  # no card
    }
    assert ClusterPlan(3, ()).cpu_worker_options() == {"env": {TASK_THREADS_ENV: str(max(1, host_cores() // 3))}}
    assert ClusterPlan(2, (), threads_per_worker=2).tasks_at_once() == 4
    assert ClusterPlan(None, ()).tasks_at_once() == host_cores()  # LocalCluster's default: a worker per core
    monkeypatch.setenv(TASK_THREADS_ENV, "2")  # set by the user: the workers inherit it
    assert ClusterPlan(3, ()).cpu_worker_options() == {}
    monkeypatch.delenv(TASK_THREADS_ENV)

    template = {
        "cls": "Nanny",
        "options": {"nthreads": 4, "host": "127.0.0.1", "memory_limit": "4GiB", "env": {"CUDA_VISIBLE_DEVICES": ""}},
    }
    workers = ClusterPlan(3, ("3", "5")).gpu_workers(template)
    assert workers == {
        f"gpu-{i}": {
            "cls": "Nanny",
            "options": {
                "nthreads": 1,
                "host": "127.0.0.1",
                "memory_limit": "4GiB",
                "resources": {"GPU": 1},
                "env": {TASK_THREADS_ENV: share, "CUDA_VISIBLE_DEVICES": device},
            },
        }
        for i, device in enumerate(("3", "5"))
    }


def test_the_local_cluster_starts_one_gpu_worker_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("CUDA_VISIBLE_DEVICES", "MALLOC_TRIM_THRESHOLD_", TASK_THREADS_ENV):
        monkeypatch.delenv(key, raising=False)
    fake_gpus(monkeypatch, 2)
    executor = DaskExecutor(DaskConfig(n_workers=1, dashboard_address=":0"))
    try:
        workers = executor.client.scheduler_info()["workers"]
        seen = executor.client.run(worker_view)
    finally:
        executor.close()
    by_name = {
        str(info["name"]): (info["resources"], info["nthreads"], seen[address]) for address, info in workers.items()
    }
    assert sorted(by_name) == ["0", "gpu-0", "gpu-1"]
    assert by_name["0"][:2] == ({}, 1) and by_name["0"][2]["CUDA_VISIBLE_DEVICES"] == ""  # the CPU worker sees none
    for index in (0, 1):
        resources, nthreads, view = by_name[f"gpu-{index}"]
        assert (resources, nthreads, view["CUDA_VISIBLE_DEVICES"]) == ({"GPU": 1}, 1, str(index))
    # every worker, GPU ones included, gets the LocalCluster's settings (malloc tuning, slower housekeeping)
    assert all(view["MALLOC_TRIM_THRESHOLD_"] is None and view["tick"] == "1s" for *_, view in by_name.values())
    # three tasks at once on this host: each task's dedup threads are its share of the cores
    assert {view["threads"] for *_, view in by_name.values()} == {str(max(1, host_cores() // 3))}


# ---------------------------------------------------------------- validation runs ask for a GPU


@pytest.fixture(scope="module")
def curated_run(served_world: ServedWorld, tmp_path_factory: pytest.TempPathFactory) -> CuratedRun:
    return shared_curated_run(served_world, tmp_path_factory)


def test_validation_runs_on_cuda_ask_dask_for_a_gpu_and_a_cluster_without_one_refuses_at_once(
    curated_run: CuratedRun, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(curated_run.root, run_dir)
    model = tmp_path / "curate-devices-micro.json"
    model.write_text(json.dumps(MICRO_CONFIG))
    raw = load_config(RunLayout(run_dir).config_path).model_dump(mode="json")
    raw["output"], raw["stages"] = str(run_dir), [*raw["stages"], "validate"]
    raw["validate"] = {
        "model": str(model),
        "batch_size": 8,
        "samples_seen": 16,
        "warmup_steps": 1,
        "seeds": 1,
        "device": "cuda",
        "decode_workers": 0,
        "eval_set": str(make_demo_eval_set(tmp_path / "eval", n=12, seed=1, image_size=64)),
    }
    validated = validate_config(raw)
    stage = ValidateStage(validated)
    assert stage.resources() == {"GPU": 1} and stage.phase("runs").resources is None  # runs take the stage's
    assert stage.phase("subsets").resources == {} and stage.phase("metrics").resources == {}

    executor = DaskExecutor(DaskConfig(n_workers=1, dashboard_address=":0"))
    try:
        started = time.perf_counter()
        with pytest.raises(ConfigError, match=r"stage 'validate' needs worker resource GPU=1 but none of the"):
            run_pipeline(validated, executor=executor, only_stage="validate")
        assert time.perf_counter() - started < 60
    finally:
        executor.close()
    layout = RunLayout(run_dir)
    assert layout.marker_path("validate", "baseline", "subsets").exists()  # the CPU phase ran on the CPU worker
    assert not layout.marker_dir("validate", "runs").exists()


# ---------------------------------------------------------------- SimCLR precision, checkpoints and GPUs


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("simclr-data")
    model = root / "curate-devices-simclr.json"
    model.write_text(json.dumps(MICRO_CONFIG))
    rng = np.random.default_rng(0)
    path = root / "00000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(16):
            scene = random_scene(rng, (40, 40))
            caption = make_caption(rng, scene.shape, scene.color, scene.count, scene.background)
            sink.write({"__key__": f"{i:05d}", "jpg": encode_image(render_scene(rng, scene), "jpeg"), "txt": caption})
    return model, [path]


def test_simclr_trains_under_the_configured_precision(shards: tuple[Path, list[Path]], tmp_path: Path) -> None:
    model, paths = shards
    losses = {}
    for precision in ("auto", "fp32", "bf16"):
        recipe = TrainRecipe(
            model=str(model),
            batch_size=8,
            samples_seen=16,
            warmup_steps=1,
            device="cpu",
            precision=precision,  # type: ignore[arg-type]
            decode_workers=0,
            shuffle_buffer=8,
        )
        losses[precision] = train_simclr(paths, recipe, tmp_path / precision).losses
    assert losses["auto"] == losses["fp32"]  # auto is fp32 on cpu, to the bit
    assert losses["bf16"] != losses["fp32"] and all(np.isfinite(losses["bf16"]))


def test_a_checkpoint_saved_with_two_gpus_resumes_on_a_machine_with_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    restored: list[tuple[int, list[int]]] = []

    def set_rng_state(state: torch.Tensor, device: Any = "cuda") -> None:
        index = torch.device(device if not isinstance(device, int) else f"cuda:{device}").index or 0
        if index >= torch.cuda.device_count():
            raise IndexError("tuple index out of range")  # what torch raises for a device this machine lacks
        restored.append((index, state.tolist()))

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((3,), torch.device(device).index))
    fake_gpus(monkeypatch, 2)
    saved_on_second_gpu = {"cuda_rng_state": cuda_rng_state(torch.device("cuda", 1))}
    older_format = {"cuda_rng_states": [torch.full((3,), 0), torch.full((3,), 1)]}  # every GPU's state

    fake_gpus(monkeypatch, 1)
    restore_cuda_rng_state(saved_on_second_gpu, torch.device("cuda", 0))
    restore_cuda_rng_state(older_format, torch.device("cuda"))
    assert restored == [(0, [1, 1, 1]), (0, [0, 0, 0])]  # the training GPU's state, onto this machine's GPU

    # a real checkpoint, resumed on cpu: no GPU state is saved or restored
    model = torch.nn.Linear(4, 2)
    state = TrainState(model, torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False), step=3)
    save_checkpoint(tmp_path / "checkpoint.pt", state, TrainRecipe(), "linear")
    checkpoint = {**load_checkpoint(tmp_path / "checkpoint.pt"), **older_format}
    assert checkpoint["cuda_rng_state"] is None
    resumed = TrainState(model, torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False))
    restore_state(resumed, checkpoint)
    assert resumed.step == 3 and len(restored) == 2


def test_a_task_outside_any_pool_takes_every_core_unless_the_environment_gives_its_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(TASK_THREADS_ENV, raising=False)
    assert task_threads() == host_cores()
    for unusable in ("0", "-2", "two", ""):
        monkeypatch.setenv(TASK_THREADS_ENV, unusable)
        assert task_threads() == host_cores()
    monkeypatch.setenv(TASK_THREADS_ENV, " 5 ")
    assert task_threads() == 5


def test_a_task_on_a_dask_worker_curate_did_not_start_takes_the_host_cores_over_its_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from distributed import Client, LocalCluster

    monkeypatch.delenv(TASK_THREADS_ENV, raising=False)  # nobody told the worker its share
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        assert client.submit(task_threads, pure=False).result() == max(1, host_cores() // 2)
    assert task_threads() == host_cores()  # outside the worker: every core


def test_the_embed_model_on_cpu_takes_the_share_its_executor_gave_and_otherwise_leaves_torch_alone(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = torch.get_num_threads()
    stage = EmbedStage(config(tmp_path, embed={"model": "curate-tiny", "pretrained": str(tiny_checkpoint)}))
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv(TASK_THREADS_ENV, raising=False)
        stage.setup()  # in the driver, no pool: torch keeps what it had
        assert torch.get_num_threads() == 2
        monkeypatch.setenv(TASK_THREADS_ENV, "1")  # as the local pool and curate's LocalCluster set it
        stage.setup()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
