"""A cancel or a Ctrl-C that some code swallows on its way is sent again until the run has stopped.

Keras, tracing a model's first step, wraps graph building in bare `except:` clauses: an interrupt that lands
there is lost, and a run cancelled during that second went on training to its last epoch.
"""

from __future__ import annotations

import contextvars
import signal
import threading
import time

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.states import Cancelling

import tasks.cancellation
from tasks.cancellation import CANCEL, INTERRUPT, cancellable, stop_cause


@pytest.mark.parametrize("how, cause", [("cancel", CANCEL), ("ctrl-c", INTERRUPT)], ids=["api cancel", "ctrl-c"])
def test_an_interrupt_swallowed_on_its_way_is_sent_again_and_the_run_ends_cancelled(
        prefect_api, monkeypatch, how, cause):
    monkeypatch.setattr(tasks.cancellation, "RESEND_SECONDS", 1.0)
    running, swallowed, sent = threading.Event(), [], {}

    @flow(name="swallows an interrupt")
    @cancellable
    def swallows_the_first_interrupt() -> str:
        sent["run"] = FlowRunContext.get().flow_run.id
        running.set()
        try:
            time.sleep(20)
        except:  # noqa: E722 (what the library code in question does)
            swallowed.append(time.monotonic())
        time.sleep(20)  # only a second interrupt ends this before the test gives up on it
        return "slept on"

    def stop_it() -> None:
        running.wait(60)
        sent["at"] = time.monotonic()
        if how == "ctrl-c":
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            return
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(sent["run"], Cancelling(message="cancelled from the test"))

    stopper = threading.Thread(target=contextvars.copy_context().run, args=(stop_it,), daemon=True)
    stopper.start()
    state = swallows_the_first_interrupt(return_state=True)
    stopped_after = time.monotonic() - sent["at"]
    stopper.join(timeout=10)

    assert len(swallowed) == 1  # the first interrupt was lost ...
    assert state.is_cancelled(), state  # ... the second ended the run
    assert state.message.endswith(" cancelled")
    assert stop_cause() == cause
    assert stopped_after < 12  # well short of the 20 s the body sleeps on after swallowing
