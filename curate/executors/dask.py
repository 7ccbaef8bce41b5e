"""Run shards as Dask tasks: on a LocalCluster of worker processes, or on an existing cluster.

One task per shard or partition (never per image). The task is the same `run_task` the local executor calls, so a
re-executed task (Dask re-runs a dead worker's tasks, finished ones included) commits the same files
again: shard commits are idempotent. A stage whose model must run on a GPU asks for the `GPU` worker
resource; workers offer it when started with `dask worker ... --resources GPU=1`, and a phase asking for a
resource no worker offers fails at once. The output directory must be on a filesystem that every worker sees.

On a machine where torch sees GPUs, the LocalCluster is the usual CPU workers plus one worker per GPU
(`plan_local_cluster`): each sees only its own card (`CUDA_VISIBLE_DEVICES`) and offers `GPU=1`, so the stages on
cuda run one model per GPU while the CPU stages use every worker. The CPU workers see no GPU, so no task there
puts a model on a card. Without GPUs it is the plain LocalCluster.

LocalCluster workers keep glibc's default malloc tuning, not the `MALLOC_TRIM_THRESHOLD_=65536` Dask's nanny
sets by default (see `WORKER_ENV_UNSET`), and run without Dask's statistical profiler unless
`dask.worker_profiler` is set: it samples every thread's stack every 10 ms, which on a machine whose cores
all run shard tasks is CPU taken from them (in one back-to-back pair of embed benchmark runs, 2-worker
shards ran 13% slower than 1-worker ones with it, 4% without). Its scheduler, nannies and workers also run
Dask's housekeeping timers less often (`RUNTIME_INTERVALS`). On a cluster started with `dask worker`, the
same is done with `distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_: null`,
`distributed.worker.profile.enabled: false`, `distributed.worker.daemon: false` and the `RUNTIME_INTERVALS` keys
in the Dask config.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from curate.config import ConfigError, DaskConfig
from curate.cores import TASK_THREADS_ENV, host_cores, share_of
from curate.executors import ShardMapping, execute_task, reported
from curate.runner import ShardFailed, TaskReport
from curate.stage import Stage, StageContext

log = logging.getLogger(__name__)

# Variables Dask's nanny sets in every worker it spawns that we leave unset in the LocalCluster's workers.
# MALLOC_TRIM_THRESHOLD_=65536 (meant to hand freed memory back to the OS sooner) switches off glibc's
# dynamic mmap threshold: every buffer over 128 KiB, i.e. each activation of a model's forward pass, is then
# a fresh mmap that is page-faulted in and unmapped again. Embedding 24-image shards with ViT-B-32 on one CPU
# thread took 20-40% longer per shard with it (4.6-5.0 s against 3.4-3.9 s; system time 19-20 s against
# under 2 s for 16 shards). A worker holds one model and reuses its buffers shard after shard.
WORKER_ENV_UNSET = ("MALLOC_TRIM_THRESHOLD_",)

# Dask's housekeeping timers, slowed down in the LocalCluster (scheduler, nannies, workers). At Dask's defaults
# (event-loop tick 20 ms, system monitor 500 ms, memory monitor 100 ms) an idle 2-worker cluster used 11% of a
# core (the scheduler and nannies 6%, each worker 2.5%); at these, 2%. Shard tasks get that CPU back when every
# core runs one. The tick still reports an event loop blocked for longer than `distributed.admin.tick.limit`
# (3 s), and a worker over its memory limit is still stopped, half a second later at most.
# Dask starts workers as daemon processes, and a daemon process may not start children: the validation
# trainer's decode workers (a torch DataLoader) could then not run inside a task.
WORKER_PROCESSES = {"distributed.worker.daemon": False}

RUNTIME_INTERVALS = {
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "500ms",
}


@dataclass(frozen=True)
class ClusterPlan:
    """The LocalCluster's workers: `cpu_workers` ordinary ones (None: one per core, LocalCluster's default) and
    one per entry of `gpus`, the CUDA_VISIBLE_DEVICES value that worker sees."""

    cpu_workers: int | None
    gpus: tuple[str, ...] = ()
    threads_per_worker: int = 1

    def cpu_worker_options(self) -> dict[str, Any]:
        """Extra LocalCluster worker options of the CPU workers: each task's share of the host's cores (unless
        the environment sets one) and, with GPU workers beside them, no GPU to see."""
        env = self.core_share()
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return {"env": env} if env else {}

    def core_share(self) -> dict[str, str]:
        """The environment telling a worker each task's share of the host's cores; empty where it is set."""
        if TASK_THREADS_ENV in os.environ:
            return {}  # the workers inherit it
        return {TASK_THREADS_ENV: str(share_of(self.tasks_at_once()))}

    def tasks_at_once(self) -> int:
        """Tasks the whole LocalCluster runs side by side (LocalCluster's default: one worker per core)."""
        cpu_workers = self.cpu_workers if self.cpu_workers is not None else host_cores() // self.threads_per_worker
        return max(1, cpu_workers) * self.threads_per_worker + len(self.gpus)

    def gpu_workers(self, template: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Worker specs for the GPU workers, from the LocalCluster's own worker template (same host, memory
        limit, security, ...): one thread (one task, one model at a time), its card only, and `GPU=1`."""
        specs = {}
        for index, device in enumerate(self.gpus):
            options = {
                **template["options"],
                "nthreads": 1,
                "resources": {"GPU": 1},
                "env": {**self.core_share(), "CUDA_VISIBLE_DEVICES": device},
            }
            specs[f"gpu-{index}"] = {"cls": template["cls"], "options": options}
        return specs


def visible_gpus() -> tuple[str, ...]:
    """The CUDA_VISIBLE_DEVICES value of each GPU torch sees here (the driver's own selection, if it has one)."""
    torch = sys.modules.get("torch")
    if torch is None:
        if not glob.glob("/dev/nvidia[0-9]*"):
            return ()  # no NVIDIA device node: no GPU, and the driver need not load torch (~575 MiB) to know it
        import torch
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    selected = [part.strip() for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    if len(selected) >= count:
        return tuple(selected[:count])
    return tuple(str(index) for index in range(count))


def plan_local_cluster(cfg: DaskConfig, gpus: tuple[str, ...] | None = None) -> ClusterPlan:
    """With GPUs, `dask.n_workers` CPU workers (default: one per core left after one per GPU) plus the GPU
    workers; without, LocalCluster's workers exactly as configured."""
    gpus = visible_gpus() if gpus is None else gpus
    if not gpus:
        return ClusterPlan(cfg.n_workers, threads_per_worker=cfg.threads_per_worker)
    cpu_workers = (
        cfg.n_workers if cfg.n_workers is not None else max(1, host_cores() // cfg.threads_per_worker - len(gpus))
    )
    return ClusterPlan(cpu_workers, gpus, cfg.threads_per_worker)


class DaskExecutor(ShardMapping):
    def __init__(self, cfg: DaskConfig, scheduler: str | None = None) -> None:
        from distributed import Client

        self.cfg = cfg
        self.cluster = None
        self._lifetime = ExitStack()
        if scheduler:
            self.client = Client(scheduler)
        else:
            self._lifetime.enter_context(while_the_cluster_runs())
            self.cluster, self.client = start_local_cluster(cfg, plan_local_cluster(cfg))
        log.info("dask dashboard: %s", self.dashboard_link)

    @property
    def dashboard_link(self) -> str:
        return str(self.client.dashboard_link)

    def map_tasks(
        self,
        stage: Stage,
        ctx: StageContext,
        phase: str,
        tasks: list[str],
        workers: int,
        resources: dict[str, float] | None = None,
    ) -> Iterator[TaskReport]:
        from distributed import as_completed

        if not tasks:
            return
        self.require_resources(stage.name, resources or {})
        submission = uuid.uuid4().hex[:8]  # a fresh key per submission: Dask remembers keys it has seen
        futures = self.client.map(
            execute_task,
            [stage] * len(tasks),
            [ctx] * len(tasks),
            [phase] * len(tasks),
            tasks,
            key=[f"{stage.name}-{phase}-{task}-{submission}" for task in tasks],
            resources=resources or None,
            retries=self.cfg.shard_retries,
            pure=False,
        )
        task_of = {future.key: task for future, task in zip(futures, tasks, strict=True)}
        try:
            for future in as_completed(futures):
                if future.status == "error":
                    error = future.exception()
                    raise ShardFailed(stage.name, task_of[future.key], f"{type(error).__name__}: {error}", phase)
                yield reported(future.result())
        finally:
            unfinished = [future for future in futures if not future.done()]
            if unfinished:
                self.client.cancel(unfinished)

    def require_resources(self, stage: str, resources: dict[str, float]) -> None:
        """Fail at once, naming the resource, when no worker offers what the tasks ask for (Dask would wait)."""
        if not resources:
            return
        offered = [info.get("resources", {}) for info in self.client.scheduler_info()["workers"].values()]
        for name, amount in resources.items():
            if not any(worker.get(name, 0) >= amount for worker in offered):
                raise ConfigError(
                    f"stage {stage!r} needs worker resource {name}={amount:g} but none of the cluster's "
                    f"{len(offered)} workers offers it (start GPU workers with `dask worker ... --resources {name}=1`)"
                )

    def close(self) -> None:
        try:
            self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        finally:
            self._lifetime.close()


def start_local_cluster(cfg: DaskConfig, plan: ClusterPlan) -> tuple[Any, Any]:
    """(cluster, client) of a LocalCluster with `plan`'s workers, started inside `worker_environment`."""
    from distributed import Client, LocalCluster

    with worker_environment(profiler=cfg.worker_profiler):
        cluster = LocalCluster(
            n_workers=plan.cpu_workers,
            threads_per_worker=cfg.threads_per_worker,
            processes=True,
            host="127.0.0.1",
            memory_limit=cfg.memory_limit,
            dashboard_address=cfg.dashboard_address,
            **plan.cpu_worker_options(),
        )
        client = Client(cluster)
        if plan.gpus:
            cluster.worker_spec.update(plan.gpu_workers(cluster.new_spec))
            cluster.scale(len(cluster.worker_spec))  # starts the workers the spec now names
            client.wait_for_workers(len(cluster.worker_spec))
            log.info("dask: %d GPU workers (CUDA_VISIBLE_DEVICES %s)", len(plan.gpus), ", ".join(plan.gpus))
    return cluster, client


@contextmanager
def while_the_cluster_runs() -> Iterator[None]:
    """Held from the LocalCluster's start to its close. A nanny restarting a dead worker reads
    `distributed.worker.daemon` again (a daemonic worker could not start the decode processes embed and
    validation use) and writes the pre-spawn variables into this process again: they are put back at close."""
    import dask

    saved = {key: os.environ.get(key) for key in pre_spawn_keys()}
    try:
        with dask.config.set(WORKER_PROCESSES):
            yield
    finally:
        put_back(saved)


def pre_spawn_keys() -> set[str]:
    import dask

    return set(dask.config.get("distributed.nanny.pre-spawn-environ")) | {"PYTHONHASHSEED"}


def put_back(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextmanager
def worker_environment(profiler: bool = False) -> Iterator[None]:
    """Start the LocalCluster inside: its workers get Dask's pre-spawn variables less `WORKER_ENV_UNSET`,
    Dask's statistical profiler only when `profiler` is true, and every server the `RUNTIME_INTERVALS`
    (a nanny hands its config to its worker).

    A nanny writes the pre-spawn variables (OMP_NUM_THREADS=1, ...) into this process's own os.environ before
    it spawns its worker; they are put back as they were once the workers are up, so that processes this
    driver starts later (the local executor's pools) do not inherit them (a nanny restarting a dead worker
    writes them again, until `while_the_cluster_runs` ends). A variable the user set in the environment reaches
    the workers unchanged.
    """
    import dask

    saved = {key: os.environ.get(key) for key in pre_spawn_keys()}
    unset = {f"distributed.nanny.pre-spawn-environ.{key}": None for key in WORKER_ENV_UNSET}
    settings = {**unset, **RUNTIME_INTERVALS, **WORKER_PROCESSES, "distributed.worker.profile.enabled": profiler}
    try:
        with dask.config.set(settings):
            yield
    finally:
        put_back(saved)
