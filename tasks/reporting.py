"""Logs and progress that reach the terminal outside Prefect and the run's logs and UI inside it."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from types import TracebackType

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from rich import progress as rich_progress

# The UI needs no more than about one update a second; more would only load the API.
ARTIFACT_UPDATE_SECONDS = 1.0


def in_prefect_run() -> bool:
    """True inside a Prefect flow or task run."""
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from free text: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def stage_logger(name: str) -> logging.Logger | logging.LoggerAdapter:
    """The run logger inside a Prefect run (so lines reach the UI), else the module's logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(name)


class Progress:
    """Progress of one long piece of work: a terminal bar on a TTY, a Prefect progress artifact in a run.

    Use as a context manager; call `advance(n)` as work completes. `key` must be lowercase
    letters, digits and dashes (Prefect's rule for artifact keys).
    """

    def __init__(self, description: str, total: int | None, *, key: str | None = None, unit: str = "items"):
        self.description = description
        self.total = total
        self.key = key
        self.unit = unit
        self.completed = 0
        self._artifact_id = None
        self._last_artifact_update = 0.0
        self._bar = None
        self._bar_task = None

    def __enter__(self) -> Progress:
        if sys.stderr.isatty():
            self._start_bar()
        if in_prefect_run() and self.total:
            self._artifact_id = create_progress_artifact(0.0, key=self.key, description=self.description)
        return self

    def _start_bar(self) -> None:
        if self.unit == "bytes":
            counter = (rich_progress.DownloadColumn(), rich_progress.TransferSpeedColumn())
        else:
            counter = (rich_progress.MofNCompleteColumn(),)
        self._bar = rich_progress.Progress(
            rich_progress.TextColumn("{task.description}"),
            rich_progress.BarColumn(),
            rich_progress.TaskProgressColumn(),
            *counter,
            rich_progress.TimeRemainingColumn(),
        )
        self._bar.start()
        self._bar_task = self._bar.add_task(self.description, total=self.total)

    def reset(self, completed: int = 0) -> None:
        """Start counting again from `completed` (a transfer restarted or resumed)."""
        self.completed = completed
        self._report(force=True)

    def advance(self, amount: int) -> None:
        """Record `amount` more units of finished work."""
        self.completed += amount
        self._report()

    def _report(self, force: bool = False) -> None:
        if self._bar is not None:
            self._bar.update(self._bar_task, completed=self.completed)
        now = time.monotonic()
        if self._artifact_id is not None and (force or now - self._last_artifact_update >= ARTIFACT_UPDATE_SECONDS):
            self._last_artifact_update = now
            percent = min(100.0, 100.0 * self.completed / self.total) if self.total else 0.0
            update_progress_artifact(self._artifact_id, percent)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is None and self._artifact_id is not None:
            update_progress_artifact(self._artifact_id, 100.0)
        if self._bar is not None:
            self._bar.stop()


@contextlib.contextmanager
def quiet_native_start_up() -> Iterator[None]:
    """While the block runs (an import of TensorFlow), its C++ start-up lines ("All log messages before
    absl::InitializeLog() ...", "Could not find cuda drivers ...") are dropped: they are written to the process's
    stderr before TensorFlow's log settings apply, so TF_CPP_MIN_LOG_LEVEL does not silence them. Python's own
    errors still show (after the block). Kept with TF_CPP_MIN_LOG_LEVEL=0 (`--debug`) or once TensorFlow is in."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") == "0" or "tensorflow" in sys.modules:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_keras_quietly() -> None:
    """Import Keras (and its TensorFlow) without TensorFlow's start-up lines on the terminal, and with its C++ log
    off (as on a worker, where no command line set it), unless TF_CPP_MIN_LOG_LEVEL says otherwise (0: all).

    TensorFlow imports JAX where it is installed, for tf.lite's converter alone: 76 MB and a second of start-up a
    TensorFlow training never uses. Unless Keras runs on JAX, JAX is out of sight while TensorFlow is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    hide_jax = os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow" and "jax" not in sys.modules
    if hide_jax:
        sys.modules["jax"] = None  # `import jax` raises ImportError, which tf.lite expects where JAX is missing
    try:
        with quiet_native_start_up():
            import keras  # noqa: F401
    finally:
        if hide_jax:
            del sys.modules["jax"]
