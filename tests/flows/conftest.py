"""One Prefect API for the whole test session, and small notMNIST archives served from 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from demo.loopback import FileServer
from demo.synthetic import make_archive


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """Prefect's embedded API, started once per session (it takes seconds to start)."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


@dataclass
class ServedArchives:
    server: FileServer
    sizes: dict[str, int]
    sha256: dict[str, str]


@pytest.fixture(scope="session")
def served_archives(tmp_path_factory) -> Iterator[ServedArchives]:
    """A large (40 per letter) and a small (12 per letter) generated archive behind a loopback server."""
    folder = tmp_path_factory.mktemp("served")
    archives = [
        make_archive(folder, "notMNIST_large", per_letter=40, seed=11, fonts=()),
        make_archive(folder, "notMNIST_small", per_letter=12, seed=12, fonts=()),
    ]
    with FileServer(folder) as server:
        yield ServedArchives(
            server, {a.path.name: a.size_bytes for a in archives}, {a.path.name: a.sha256 for a in archives}
        )


def pipeline_parameters(served: ServedArchives, data_dir: Path, **overrides) -> dict:
    """Parameters that fit the tiny generated archives."""
    parameters = dict(
        base_url=served.server.base_url,
        data_dir=str(data_dir),
        large_bytes=served.sizes["notMNIST_large.tar.gz"],
        large_sha256=served.sha256["notMNIST_large.tar.gz"],
        small_bytes=served.sizes["notMNIST_small.tar.gz"],
        small_sha256=served.sha256["notMNIST_small.tar.gz"],
        min_images_large=30,
        min_images_small=10,
        train_size=250,
        valid_size=50,
        test_size=50,
        epochs=2,
        workers=2,
        task_runner="threads",  # the default, processes, is run by the CLI and crash tests (it costs a spawn per run)
    )
    parameters.update(overrides)
    return parameters


@pytest.fixture(scope="session")
def dask_address() -> Iterator[str]:
    """A real Dask cluster for the session: a scheduler and two worker processes on 127.0.0.1."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address=":0") as cluster:
        yield cluster.scheduler_address
