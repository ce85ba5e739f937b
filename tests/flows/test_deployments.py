"""Deployments against a real `prefect server` on 127.0.0.1, with a real process worker for the gpu pool."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.settings import PREFECT_API_URL, temporary_settings

from core.errors import PipelineError
from flows.notmnist import notmnist_pipeline
from flows.train import train_remotely
from tests.flows.conftest import pipeline_parameters

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[dict[str, str]]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME; yields the environment to use it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_KEY", None)
    log = open(home / "server.log", "w")
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=home)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/api/health", timeout=2).ok:
                break
        except requests.ConnectionError:
            pass
        if server.poll() is not None:
            pytest.fail(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    else:
        server.terminate()
        pytest.fail("prefect server did not become healthy within 120 s")
    for pool in ("cpu", "gpu"):
        subprocess.run([PREFECT, "work-pool", "create", pool, "--type", "process"], env=env, check=True,
                       capture_output=True, cwd=ROOT)
    yield env
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def deployed(prefect_server) -> subprocess.CompletedProcess:
    return subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], env=prefect_server, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def read(env: dict[str, str], coroutine_factory):
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(coroutine_factory())


def test_deploy_all_registers_every_deployment_and_the_weekly_schedule(prefect_server, deployed):
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    async def deployments():
        async with get_client() as client:
            return await client.read_deployments()

    found = {d.name: d for d in read(prefect_server, deployments)}
    assert set(found) == {"weekly", "gpu", "mnist", "iris"}
    assert found["gpu"].work_pool_name == "gpu" and found["weekly"].work_pool_name == "cpu"
    assert [s.schedule.cron for s in found["weekly"].schedules] == ["0 3 * * 1"]
    assert found["gpu"].job_variables["env"]["CUDA_VISIBLE_DEVICES"] == "0"


def test_training_is_dispatched_to_a_worker_of_the_gpu_pool(prefect_server, deployed, served_archives, tmp_path):
    assert deployed.returncode == 0
    worker_env = {**prefect_server, "PREFECT_LOGGING_LEVEL": "INFO"}  # the training run's epoch lines reach the API
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "gpu", "--limit", "1"], env=worker_env,
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        parameters = pipeline_parameters(served_archives, tmp_path / "data", train_deployment="train/gpu",
                                         train_timeout_seconds=300)
        with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
            state = notmnist_pipeline(**parameters, return_state=True)
            assert state.is_completed(), state.message
            result = state.result()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert 0.0 <= result["test_accuracy"] <= 1.0 and Path(result["model_path"]).exists()

    async def child_runs():
        async with get_client() as client:
            deployment = await client.read_deployment_by_name("train/gpu")
            runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [deployment.id]}))
            artifacts = await client.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
            return runs, artifacts

    runs, artifacts = read(prefect_server, child_runs)
    assert [(run.work_pool_name, run.state.name) for run in runs] == [("gpu", "Completed")]
    assert {"notmnist-splits", "notmnist-report", "notmnist-confusion-matrix"} <= {a.key for a in artifacts}

    async def parent_log():
        async with get_client() as client:
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
        return [log.message for log in logs]

    lines = read(prefect_server, parent_log)
    sent = f"Training sent to train/gpu as run {runs[0].name}: http://127.0.0.1:"
    assert any(line.startswith(sent) and line.endswith(f"/runs/flow-run/{runs[0].id}") for line in lines), lines
    assert [line.split(": ", 1)[0] for line in lines if ": Epoch " in line] == [runs[0].name] * 2


def test_a_training_run_nobody_picks_up_times_out_with_a_clear_error(prefect_server, deployed, tmp_path):
    assert deployed.returncode == 0
    parameters = {"data_dir": str(tmp_path), "splits": "nothing-here"}
    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        with pytest.raises(PipelineError, match=r"did not finish within 3 s .*it was cancelled\. Is a worker polling"):
            train_remotely("train/gpu", parameters, timeout_seconds=3)

    async def runs_left():
        async with get_client() as client:
            deployment = await client.read_deployment_by_name("train/gpu")
            runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [deployment.id]}))
        return [run.state.name for run in runs if run.parameters.get("splits") == "nothing-here"]

    assert read(prefect_server, runs_left) == ["Cancelled"]  # nothing left Late in the queue for the next worker
