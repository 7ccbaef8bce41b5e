"""Helper processes that end with the process that started them.

A spawned pool worker (a decode worker, a local executor's task process) that waits for its next job is not
told when its parent dies: when a Dask worker is SIGKILLed or the LocalCluster stops it, its decode workers
were left running, each holding a torch import (~0.9 GB), until the machine restarted.
"""

from __future__ import annotations

import os
import threading
import time

PARENT_CHECK_SECONDS = 0.5


def exit_with_parent(parent: int) -> None:
    """Call once in a spawned helper process, with the pid of the process that started it (read there, and
    passed along: by the time a slow start reaches this call, the parent may already be gone). The helper
    exits as soon as that process is no longer its parent."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(1)  # the parent is gone: nobody is left to take this process's results

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
