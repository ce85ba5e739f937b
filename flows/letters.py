"""The decode stage as one Prefect task per (archive, letter), fanned out on a task runner of the user's choice.

Each letter task (the seed's `load_letter`) is named for its letter, cached on its own input and
output, and retried on its own, so the UI shows twenty tasks for the two archives and a failure
redoes one letter. Where they run:

  processes  the tasks run in threads here, and decode their batches on one pool of this machine's
             processes, one per core by default, started when an archive is unpacked or a letter
             needs decoding (so a cached rerun starts none, and the cache is looked up here)
  threads    a pool of threads in this process, decoding in them
  dask       a Dask cluster: an existing one (`dask_address`, tcp://...), or a local one started for
             the run; each task fetches its packed letter from the data root and publishes its shards
             there (tasks/stage.py), so workers on other machines need only reach the data root (an
             s3:// one), each in a working copy of its own
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from prefect.client.orchestration import get_client
from prefect.futures import PrefectFuture, as_completed, wait
from prefect.settings import get_current_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from core.errors import PipelineError
from core.parameters import TASK_RUNNERS
from core.seed import LETTERS
from storage.layout import DataRoot
from tasks.decode import TooFewImagesError, letter_task, shared_worker_pool


@contextlib.contextmanager
def letter_runner(kind: str, workers: int | None = None, dask_address: str | None = None) -> Iterator[TaskRunner]:
    """A started task runner for the letter tasks (see the module docstring); stopped on leaving."""
    workers = workers or os.cpu_count() or 1
    if kind == "threads":
        runner: TaskRunner = ThreadPoolTaskRunner(max_workers=workers)
    elif kind == "processes":
        with ThreadPoolTaskRunner(max_workers=len(LETTERS)) as runner, shared_worker_pool(workers):
            yield runner
        return
    elif kind == "dask":
        runner = _dask_runner(workers, dask_address)
    else:
        raise PipelineError(f"task_runner must be one of {', '.join(TASK_RUNNERS)}; got {kind!r}")
    with _api_shared_with_workers(), runner:
        yield runner


def _dask_runner(workers: int, address: str | None) -> TaskRunner:
    """Prefect's Dask task runner on the cluster at `address`, or on a local one of `workers` processes."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as error:
        raise PipelineError("task_runner 'dask' needs prefect-dask and distributed: pip install '.[dask]'") from error
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": workers, "processes": True, "threads_per_worker": 1, "dashboard_address": ":0",
    })


@contextlib.contextmanager
def _api_shared_with_workers() -> Iterator[None]:
    """Point worker processes at the API this run uses: on Prefect's embedded API, each one would start its own."""
    if get_current_settings().api.url or os.environ.get("PREFECT_API_URL"):
        yield
        return
    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    os.environ["PREFECT_API_URL"] = url
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def decode_archives(
    runner: TaskRunner, root: DataRoot, downloads: dict[str, PrefectFuture], unpacked: dict[str, PrefectFuture],
    min_images: dict[str, int],
) -> dict[str, dict[str, dict]]:
    """Decode each archive's letters on `runner` as soon as its unpack ends (the small archive's while the large
    one is still being read); returns each archive's letter manifests."""
    names = {future.task_run_id: name for name, future in unpacked.items()}
    decoding = {}
    for future in as_completed(list(unpacked.values())):
        name = names[future.task_run_id]
        downloads[name].result()  # a failed download is the run's error (its unpack then never started)
        future.result()
        parameters = {"root": root, "archive": name, "min_images": min_images[name]}
        decoding[name] = {letter: runner.submit(letter_task, parameters={**parameters, "letter": letter})
                          for letter in LETTERS}
    return {name: letter_manifests(decoding[name]) for name in unpacked}


def letter_manifests(futures: dict[str, PrefectFuture]) -> dict[str, dict]:
    """Each letter's manifest, once every task has ended; letters with too few images are reported together."""
    wait(list(futures.values()))
    manifests, short = {}, []
    for letter, future in futures.items():
        try:
            manifests[letter] = future.result()
        except TooFewImagesError as error:
            short.append(str(error))
    if short:
        raise TooFewImagesError(" ".join(short))
    return manifests
