"""A function run in a process of its own: its result, its errors, and the process gone with the call."""

from __future__ import annotations

import os

import pytest

from core.errors import PipelineError
from tasks.own_process import run_in_own_process
from tests.processes import alive


def refuse(reason: str) -> None:
    raise PipelineError(reason)


def test_the_result_comes_from_another_process_which_ends_with_the_call():
    pid = run_in_own_process(os.getpid)
    assert pid != os.getpid()
    assert not alive(pid)


def test_an_error_reaches_the_caller_with_its_type_and_message():
    with pytest.raises(PipelineError, match="^use smaller split sizes$"):
        run_in_own_process(refuse, "use smaller split sizes")
