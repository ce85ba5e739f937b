"""Shared fixtures: a loopback file server with injectable faults."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.loopback import FileServer


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[FileServer]:
    """A threaded HTTP server on 127.0.0.1 serving a temporary folder."""
    with FileServer(tmp_path / "served") as server:
        yield server
