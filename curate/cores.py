"""How many threads one task may use: its share of the host's cores.

An executor that runs several tasks side by side on one host (the local executor's pool, curate's LocalCluster)
tells each worker process its share in `TASK_THREADS_ENV`. A task on a worker of a cluster curate did not start
takes the host's cores over that worker's task slots (`nthreads`); anywhere else, every core. Oversubscribed
cores cost time: two processes each searching a 130k x 512 near-duplicate partition at once on a 2-core host took
6.9-7.2 s with 2 threads each, 6.1-6.8 s with 1.
"""

from __future__ import annotations

import os
import sys

TASK_THREADS_ENV = "CURATE_TASK_THREADS"


def host_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def share_of(tasks_at_once: int) -> int:
    """Threads per task when `tasks_at_once` tasks share this host's cores."""
    return max(1, host_cores() // max(1, tasks_at_once))


def task_threads() -> int:
    """This task's share of the cores (at least 1)."""
    return assigned_share() or host_cores()


def assigned_share() -> int | None:
    """The share an executor gave this process, or a Dask worker's share of its host; None anywhere else."""
    share = os.environ.get(TASK_THREADS_ENV, "").strip()
    if share.isdigit() and int(share) > 0:
        return int(share)
    slots = dask_worker_slots()
    return share_of(slots) if slots else None


def dask_worker_slots() -> int | None:
    """The task slots (threads) of the Dask worker running this task; None outside one."""
    if "distributed" not in sys.modules:
        return None  # not imported: this process is no Dask worker
    from distributed import get_worker

    try:
        return int(get_worker().state.nthreads)
    except (ValueError, AttributeError):  # ValueError: not in a worker
        return None


def use_task_share(device_type: str) -> None:
    """A model on cpu takes the share of the cores its executor gave this process as torch's threads: otherwise
    a local pool's workers would each start one thread per core, and a Dask worker one thread (its nanny's
    OMP_NUM_THREADS=1) whatever its share. Anywhere else (no share given, or a GPU model) torch is left alone."""
    share = assigned_share()
    if share and device_type == "cpu":
        import torch

        torch.set_num_threads(share)
