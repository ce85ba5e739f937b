"""Shared fixtures: a loopback file server with injectable faults, and a loopback S3 server."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.loopback import FileServer
from demo.stack import stop_group
from storage.atomic import read_json

# The modules that take longest, longest first. The two workers take whole modules in the order collected
# (pyproject: --dist loadfile --no-loadscope-reorder), so these start at once rather than one of them being
# left for the end while the other worker has nothing to do. Every other module follows in its usual order.
LONGEST_FIRST = (
    "flows/test_deployments.py", "flows/test_cli.py", "flows/test_crash_consistency.py", "flows/test_pipeline.py",
    "tasks/test_train.py", "flows/test_object_store.py", "tasks/test_train_jax.py", "flows/test_embedded_api.py",
)


# A folder of the whole session's, shared by its xdist workers (they inherit the variable), and what it may hold: the
# Prefect server the first worker that needs one starts (tests/flows/conftest.py), stopped when the session ends.
SESSION_FOLDER = "NOTMNIST_TEST_SESSION_FOLDER"
PREFECT_SERVER = "prefect-server.json"


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the session itself, not one of its xdist workers
        os.environ[SESSION_FOLDER] = tempfile.mkdtemp(prefix="notmnist-tests-")


def pytest_sessionfinish(session: pytest.Session) -> None:
    if hasattr(session.config, "workerinput") or SESSION_FOLDER not in os.environ:
        return  # every worker has ended before the session finishes
    folder = Path(os.environ.pop(SESSION_FOLDER))
    if (state := folder / PREFECT_SERVER).exists():
        stop_group(read_json(state)["process_group"], grace_seconds=30)
    shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests = Path(__file__).parent
    if missing := [module for module in LONGEST_FIRST if not (tests / module).is_file()]:
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FIRST names modules that are gone: {missing}")
    rank = {module: place for place, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0].removeprefix("tests/"), len(rank)))  # stable


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory) -> Iterator[Path]:
    """The user's cache folder (drawn pictures, working copies) is one of the session's own, not this machine's."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("user-cache")
        patch.setenv("XDG_CACHE_HOME", str(folder))
        yield folder


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[FileServer]:
    """A threaded HTTP server on 127.0.0.1 serving a temporary folder."""
    with FileServer(tmp_path / "served") as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A SeaweedFS S3 server on 127.0.0.1 for the session, with the bucket `notmnist`; the AWS_* variables
    that reach it are set in this process while it runs (and yielded, for subprocesses)."""
    from demo.s3server import create_bucket, seaweed_s3

    with seaweed_s3(tmp_path_factory.mktemp("seaweedfs")) as environment, pytest.MonkeyPatch.context() as patch:
        create_bucket(environment, "notmnist")
        for name, value in environment.items():
            patch.setenv(name, value)
        yield environment


@pytest.fixture
def s3_root(s3_server, request) -> str:
    """An s3:// data root of its own for one test."""
    return f"s3://notmnist/{request.node.name.replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:8]}"
