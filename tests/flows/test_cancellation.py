"""A cancel or a Ctrl-C that the code it lands in swallows still stops the training; a run whose API stops
answering still ends.

Keras, tracing a model's first step, builds ops inside bare `except:` clauses: an interrupt that lands there
is lost, and a pipeline cancelled in that second trained on to its last epoch.
"""

from __future__ import annotations

import signal
import socket
import time
import uuid

import keras
from prefect import flow
from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks import cancellation
from tasks.cancellation import INTERRUPT, _watched, cancellable, stop_cause
from tasks.train import train_model
from tests.tasks.synthetic_splits import write_split_folder


class SwallowsAnInterrupt(keras.callbacks.Callback):
    """Raises SIGINT in the main thread after the first batch group and swallows what it raises, as a bare
    `except:` in library code would."""

    def __init__(self):
        super().__init__()
        self.swallowed, self.batch_groups_after = 0, 0

    def on_train_batch_end(self, batch, logs=None):
        self.batch_groups_after += self.swallowed
        if self.swallowed == 0:
            try:
                signal.raise_signal(signal.SIGINT)  # the handler runs here, in the main thread, and raises
            except:  # noqa: E722 (what the library code in question does)
                self.swallowed += 1


def test_an_interrupt_swallowed_during_training_still_ends_the_run_cancelled(prefect_api, tmp_path):
    write_split_folder(tmp_path, rows={"train": 640, "valid": 64, "test": 64})
    swallower = SwallowsAnInterrupt()

    @flow(name="trains", persist_result=False)
    @cancellable
    def trains() -> dict:
        return train_model(tmp_path, "synthetic", epochs=50, batch_size=32, extra_callbacks=[swallower])

    state = trains(return_state=True)

    assert swallower.swallowed == 1  # the interrupt was lost on its way ...
    assert state.is_cancelled(), state  # ... and the training still stopped, at the next group of batches
    assert swallower.batch_groups_after <= 1
    assert stop_cause() == INTERRUPT
    assert not list(tmp_path.glob("models/*/model.keras"))


def test_an_interrupt_swallowed_after_the_last_check_still_ends_the_run_cancelled(prefect_api):
    @flow(name="swallows at its end", persist_result=False)
    @cancellable
    def swallows_at_its_end() -> str:
        try:
            signal.raise_signal(signal.SIGINT)
        except:  # noqa: E722 (what the library code in question does)
            pass
        return "went on"

    state = swallows_at_its_end(return_state=True)

    assert state.is_cancelled(), state
    assert stop_cause() == INTERRUPT


def test_a_run_whose_api_stops_answering_ends_without_waiting_on_its_watcher(monkeypatch):
    """The watcher asks the API every second whether the run was cancelled. An API that went away left it in one
    request for Prefect's timeout (60 s) and its retries, and the finished run waited for it: minutes, after a
    pipeline's embedded API was killed."""
    monkeypatch.setattr(cancellation, "JOIN_SECONDS", 0.5)
    with socket.socket() as silent:  # takes connections (the system's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{silent.getsockname()[1]}/api"}):
            watching = _watched(uuid.uuid4())
            watching.__enter__()
            time.sleep(1.5)  # the watcher's first request is under way, unanswered
            started = time.monotonic()
            watching.__exit__(None, None, None)
            waited = time.monotonic() - started
    assert waited < 5, waited  # before: the request's whole timeout and its retries
