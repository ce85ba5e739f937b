"""One Prefect server for the whole test session, and small notMNIST archives served from 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock
from prefect.settings import PREFECT_API_URL, temporary_settings
from pyarrow import fs as arrow_fs

from core.errors import PipelineError
from demo.loopback import FileServer
from demo.stack import stop_group, wait_for_api
from demo.synthetic import make_archive
from flows.embedded_api import free_port, send_what_prefect_queued
from storage.atomic import read_json, write_json
from storage.layout import DataRoot
from tests.conftest import PREFECT_SERVER, SESSION_FOLDER
from tests.processes import alive, children_of


@pytest.fixture(autouse=True)
def no_api_left_running() -> Iterator[None]:
    """A command called in-process (`main`) stops the Prefect API it started, however it ended."""
    yield
    assert servers_started_here() == [], "a command left the Prefect API it started running"


def servers_started_here() -> list[int]:
    """This process's children that serve a Prefect API with uvicorn (as embedded APIs do) and have not ended."""
    return [child for child, command in children_of(os.getpid()).items() if "uvicorn" in command and alive(child)]


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[dict[str, str]]:
    """One `prefect server start` for the whole test session, shared by its xdist workers: on a free loopback port,
    with its own PREFECT_HOME (a database of its own). The first worker to need it starts it; tests/conftest.py stops
    it when the session ends. Yields the environment for processes that use it (command lines, workers)."""
    shared = Path(os.environ[SESSION_FOLDER])
    with FileLock(str(shared / "prefect-server.lock")):
        if not (state := shared / PREFECT_SERVER).exists():
            # A home of each try's own: a worker whose try failed leaves its half-made database behind.
            write_json(state, _start_prefect_server(Path(tempfile.mkdtemp(prefix="prefect-home-", dir=shared))))
        env = {**_without_api_key(os.environ), **read_json(state)["env"]}
    try:
        yield env
    finally:
        send_what_prefect_queued()  # this worker's last logs: sent at exit, they could find the server gone


def _start_prefect_server(home: Path) -> dict:
    """Start the session's server in a process group of its own (it outlives the worker that starts it); returns its
    process group and the settings that reach it, once it answers."""
    port = free_port()
    env = {"PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    with open(home / "server.log", "w") as log:
        server = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                                   "127.0.0.1", "--port", str(port)], env={**_without_api_key(os.environ), **env},
                                  stdout=log, stderr=subprocess.STDOUT, cwd=home, start_new_session=True)
    try:
        wait_for_api(f"http://127.0.0.1:{port}/api", lambda: server.poll() is None, home / "server.log", 120)
    except BaseException as error:
        stop_group(server.pid, grace_seconds=30)
        if isinstance(error, PipelineError):  # with the log's end: the session's folder goes with the session
            pytest.fail(f"{error}\n{(home / 'server.log').read_text()[-2000:]}")
        raise
    return {"process_group": server.pid, "env": env}


def _without_api_key(environment) -> dict[str, str]:
    """`environment` less PREFECT_API_KEY: the session's server is a local one, not Prefect Cloud."""
    return {name: value for name, value in environment.items() if name != "PREFECT_API_KEY"}


@pytest.fixture(scope="session")
def prefect_api(prefect_server) -> Iterator[None]:
    """This process's flows and clients use the session's Prefect server (its start takes seconds: once)."""
    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
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


def objects_under(layout: DataRoot) -> list[str]:
    """Every object of the data root, by key."""
    prefix = layout.store.base
    selector = arrow_fs.FileSelector(prefix, recursive=True, allow_not_found=True)
    return sorted(info.path for info in layout.store.fs.get_file_info(selector) if info.type == arrow_fs.FileType.File)


def overwrite_in_place(layout, folder) -> str:
    """Flip one byte of the first file of a committed folder in the data root, keeping its size (a new PUT)."""
    relative = layout.relative(folder)
    manifest = layout.store.manifest(relative)
    name = sorted(manifest["files"])[0]
    key = f"{relative}/{manifest['generation']}/{name}"
    data = bytearray(layout.store.read_bytes(key))
    data[len(data) // 2] ^= 0xFF
    layout.store.write_bytes(key, bytes(data))
    return f"{layout.store.url(key)}"
