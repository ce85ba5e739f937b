"""Running a stage's heavy part in a process of its own, which ends with it.

Half a million small Python objects (file names, digests, PNG bytes) freed in a long-lived process leave its
heap fragmented: the memory stays resident and is counted against the run until the process ends. A stage
whose work holds such objects runs it in a spawned process (spawn: the pipeline's process runs Prefect's
threads, which fork() would copy in unknown states), gets back a small result, and the memory goes with the
process.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

PARENT_CHECK_SECONDS = 0.5  # how soon a child notices that its parent died
Result = TypeVar("Result")


def run_in_own_process(function: Callable[..., Result], *args: Any, **kwargs: Any) -> Result:
    """`function(*args, **kwargs)` in a spawned process that exits with this one; returns its result or raises its
    exception. The function, its arguments and its result must pickle."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=watch_parent,
                             initargs=(os.getpid(),)) as pool:
        return pool.submit(function, *args, **kwargs).result()


def watch_parent(parent: int) -> None:
    """In a child process: end it once `parent` is gone (a parent killed with SIGKILL tells its children nothing)."""
    threading.Thread(target=_exit_with_parent, args=(parent,), name="watch parent", daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)  # no clean-up to do: the parent's temporary files are removed by the next run
