"""Stopping a run the moment it is cancelled, from the UI, `prefect flow-run cancel` or Ctrl-C, training included.

A run a worker started is stopped by its worker. A run started in a terminal has none: Prefect marks
it Cancelling and waits, while the run goes on training and publishing. `cancellable` closes that gap
for a flow or task run in this process's main thread:

- a watcher thread polls the outermost run's state; when it reads Cancelling (or Cancelled) it
  interrupts the main thread, as Ctrl-C would, wherever it waits (a future, a training step, a poll);
- code on the interrupt's way may swallow it (Keras, tracing a model's first step, has bare `except:`
  clauses): training after each group of batches, and each `cancellable` run as its body returns,
  checks whether an interrupt was raised that no run has caught, and raises it again
  (`raise_if_interrupt_lost`);
- the interrupt unwinds to the innermost `cancellable` run, which ends Cancelled instead of Crashed
  (a training sent to a work pool is cancelled on the way, flows/train.py); each run around it
  then meets the `CancelledRun` its child's state raises, and ends Cancelled too, publishing
  nothing more;
- the command line reads the outermost state and says whose training was cancelled, with exit code
  130 after Ctrl-C and 1 after a cancel through the API (`stop_cause`).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import CancelledRun
from prefect.states import Cancelled

POLL_SECONDS = 1.0  # how soon a run started in a terminal notices it was cancelled through the API
# How long a finished run waits for its watcher to end. A watcher asking an API that has gone away can be stuck in
# one request (up to Prefect's request timeout): it is left behind then, and once its run is done it interrupts nothing.
JOIN_SECONDS = 5.0
INTERRUPT = "interrupt"  # Ctrl-C (SIGINT) reached this process
CANCEL = "cancel"  # a run of this process was cancelled through the API

# {"cause": INTERRUPT or CANCEL} once a run of this process was told to stop (kept for the command line to read);
# "raised": True once the interrupt was raised in the main thread, "caught": True once a `cancellable` run caught it
_stop: dict[str, object] = {}
_watching = threading.Lock()  # held while a watcher runs: one per process, on the outermost run


def stop_cause() -> str | None:
    """Why a run of this process stopped: INTERRUPT, CANCEL, or None while none was told to."""
    return _stop.get("cause")


def raise_if_interrupt_lost() -> None:
    """KeyboardInterrupt if, in the watched run going on, one was raised in the main thread and no `cancellable` run
    has caught it: the code it landed in swallowed it, and the work goes on. Call it where long work continues
    (training does, per batch); a `cancellable` run whose body returns calls it too."""
    if _watching.locked() and _stop.get("raised") and not _stop.get("caught"):
        raise KeyboardInterrupt


def cancellable(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` (a flow's or task's body) ends its run Cancelled when the run is interrupted or cancelled.

    Put it under `@flow` or `@task`. The returned Cancelled state carries the sentence the command line
    prints: the `CancelledRun` a child raised, or "NAME cancelled" for the run that stopped itself.
    """

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            return function(*args, **kwargs)
        try:
            with _interrupt_records_its_cause(), _watched(_run_id()):
                result = function(*args, **kwargs)
                raise_if_interrupt_lost()  # swallowed after the last check: the run still ends Cancelled
                return result
        except KeyboardInterrupt:
            _stop.setdefault("cause", INTERRUPT)
            _stop["caught"] = True
            return Cancelled(message=f"{_run_name()} cancelled")
        except CancelledRun as child:  # a child run ended Cancelled: this run goes no further
            if stop_cause() is None:
                raise
            _stop["caught"] = True  # the interrupt reached a run (flows/train.py turns it into CancelledRun)
            said = str(child)  # the innermost training run's name is the one a user looks for
            return Cancelled(message=said if said.startswith("training run ") else f"{_run_name()} cancelled")

    # Prefect checks a call's parameters against the signature, resolving its annotations in the namespace of the
    # function it holds, this wrapper's: give it the signature with the annotations already resolved.
    run.__signature__ = inspect.signature(function, eval_str=True)
    return run


def unless_cancelled(value: Any) -> Any:
    """A child run's result; `CancelledRun` when the child ended Cancelled (calling a flow or task hands back the
    State a `cancellable` run returned, where a failure would have raised)."""
    if isinstance(value, State) and value.is_cancelled():
        raise CancelledRun(value.message)
    return value


@contextmanager
def _interrupt_records_its_cause() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt as always, having recorded that it was Ctrl-C (not a cancel) first."""

    def interrupted(signum, frame) -> None:
        _stop.setdefault("cause", INTERRUPT)
        _stop["raised"] = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _watched(run_id) -> Iterator[None]:
    """Poll `run_id`'s state while the block runs; a cancel interrupts the main thread. One watcher per process."""
    if run_id is None or not _watching.acquire(blocking=False):
        yield
        return
    _stop.clear()  # the outermost run of a new command (or test): no stop seen, raised or caught yet
    done = threading.Event()
    context = contextvars.copy_context()  # Prefect's settings (which API) live in context variables
    watcher = threading.Thread(target=context.run, args=(_watch, run_id, done), name="cancellation watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        try:
            watcher.join(JOIN_SECONDS)  # a cancel read just as the run ended may interrupt even this
        finally:
            _watching.release()


def _watch(run_id, done: threading.Event) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    # A poll the API does not answer is simply made again a second later: Prefect's own retries of a request (five,
    # backing off to a minute in all, once it has connected) kept a run whose API went away from ending for minutes.
    with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}), get_client(sync_client=True) as client:
        while not done.wait(POLL_SECONDS):
            try:
                state = client.read_flow_run(run_id).state
            except Exception:  # the API is busy or restarting: look again at the next poll
                continue
            if state is not None and (state.is_cancelling() or state.is_cancelled()) and not done.is_set():
                _stop.setdefault("cause", CANCEL)
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return


def _run_id():
    """The flow run to watch: the one this code runs in (a task's, for a task)."""
    context = FlowRunContext.get()
    return context.flow_run.id if context is not None and context.flow_run is not None else None


def _run_name() -> str:
    task_context = TaskRunContext.get()
    if task_context is not None and task_context.task_run is not None:
        return f"task run {task_context.task_run.name}"
    context = FlowRunContext.get()
    kind = "training run" if context.flow.name == "train" else "run"
    return f"{kind} {context.flow_run.name}"
