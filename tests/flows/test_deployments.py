"""Deployments against a real `prefect server` on 127.0.0.1, with a real process worker for the gpu pool.

The worker shares nothing with the pipeline but the Prefect API and an S3 server (SeaweedFS, on
127.0.0.1): it runs in a folder of its own with its own HOME, and gets the code by cloning the
deployed commit from a bare repository (file://) that holds this checkout's working tree.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.settings import PREFECT_API_URL, temporary_settings

import flows.train
from core.errors import PipelineError
from flows.notmnist import notmnist_pipeline
from flows.train import train_remotely
from storage.layout import DataRoot
from storage.letters import letter_folder
from storage.models import read_metrics
from tests.flows.conftest import overwrite_in_place, pipeline_parameters
from tests.flows.test_pipeline import task_runs

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))


@pytest.fixture(scope="module")
def pools(prefect_server) -> None:
    """The work pools prefect.yaml deploys to, on the session's server."""
    for pool in ("cpu", "gpu", "gpu-checkout"):
        subprocess.run([PREFECT, "work-pool", "create", pool, "--type", "process"], env=prefect_server, check=True,
                       capture_output=True, cwd=ROOT)


def git(*arguments: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    return subprocess.run(["git", *arguments], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> dict[str, str]:
    """A bare repository (file:// URL) holding this checkout's working tree as one commit, and a clone of it
    to deploy from: what workers clone is then exactly the code under test, committed or not."""
    folder = tmp_path_factory.mktemp("repository")
    identity = {"GIT_AUTHOR_NAME": "tests", "GIT_AUTHOR_EMAIL": "tests@localhost", "GIT_COMMITTER_NAME": "tests",
                "GIT_COMMITTER_EMAIL": "tests@localhost"}
    index = {**os.environ, **identity, "GIT_INDEX_FILE": str(folder / "index")}  # the checkout's own index is untouched
    git("read-tree", "HEAD", cwd=ROOT, env=index)
    git("add", "--all", cwd=ROOT, env=index)
    tree = git("write-tree", cwd=ROOT, env=index)
    commit = git("commit-tree", tree, "-p", "HEAD", "-m", "the working tree under test", cwd=ROOT, env=index)
    bare = folder / "notmnist-pipeline.git"
    git("init", "--bare", "--quiet", str(bare), cwd=folder)
    git("push", "--quiet", str(bare), f"{commit}:refs/heads/main", cwd=ROOT)
    git("clone", "--quiet", "--branch", "main", str(bare), str(folder / "deployer"), cwd=folder)
    return {"url": bare.as_uri(), "commit": commit, "deployer": str(folder / "deployer")}


@pytest.fixture(scope="module")
def deployed(prefect_server, pools, repository) -> subprocess.CompletedProcess:
    return subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], cwd=repository["deployer"],
                          env={**prefect_server, "NOTMNIST_REPOSITORY": repository["url"]},
                          capture_output=True, text=True, timeout=300)


def read(env: dict[str, str], coroutine_factory):
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(coroutine_factory())


def training_run_states(env: dict[str, str], splits: str) -> list[str]:
    """The states of the runs of train/gpu that were given the split folder `splits`."""

    async def states():
        async with get_client() as client:
            deployment = await client.read_deployment_by_name("train/gpu")
            runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [deployment.id]}))
        return [run.state.name for run in runs if run.parameters.get("splits") == splits]

    return read(env, states)


def test_deploy_all_registers_every_deployment_and_the_weekly_schedule(prefect_server, deployed, repository):
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    async def deployments():
        async with get_client() as client:
            return await client.read_deployments()

    found = {d.name: d for d in read(prefect_server, deployments)}
    assert set(found) == {"weekly", "gpu", "gpu-checkout", "mnist", "iris"}
    assert found["gpu"].work_pool_name == "gpu" and found["weekly"].work_pool_name == "cpu"
    assert [s.schedule.cron for s in found["weekly"].schedules] == ["0 3 * * 1"]
    assert found["gpu"].job_variables["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    # Workers clone the repository at the deployed commit; nothing of the deployer's machine is baked in.
    clone = found["gpu"].pull_steps[0]["prefect.deployments.steps.git_clone"]
    assert (clone["repository"], clone["commit_sha"]) == (repository["url"], repository["commit"])
    assert repository["deployer"] not in json.dumps([d.pull_steps for d in found.values()])
    # The checkout variant reads NOTMNIST_CHECKOUT on the worker, when the run starts, from a pool of its own.
    script = found["gpu-checkout"].pull_steps[0]["prefect.deployments.steps.run_shell_script"]
    assert "${NOTMNIST_CHECKOUT:?" in script["script"] and found["gpu-checkout"].work_pool_name == "gpu-checkout"


def test_training_on_a_worker_that_shares_nothing_but_the_api_and_the_object_store(
    prefect_server, deployed, repository, served_archives, s3_server, s3_root, tmp_path, caplog
):
    """The worker runs in a folder of its own, with its own HOME, and gets the code by cloning the deployed
    commit; the pipeline and the worker exchange data only through S3."""
    assert deployed.returncode == 0
    machine = tmp_path / "gpu-machine"
    machine.mkdir()
    worker_env = {**prefect_server, **s3_server, "HOME": str(machine), "PREFECT_HOME": str(machine / ".prefect"),
                  "PREFECT_LOGGING_LEVEL": "INFO"}  # the training run's epoch lines reach the API
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "gpu", "--limit", "1"], env=worker_env,
                              cwd=machine, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        parameters = pipeline_parameters(served_archives, tmp_path / "unused", train_deployment="train/gpu",
                                         train_timeout_seconds=300)
        parameters.update(data_dir=s3_root, scratch_dir=str(tmp_path / "pipeline-machine"))
        with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
            # A first run trains here (one epoch), so the bucket holds every stage; then same-size damage in the
            # bucket. The run that sends training to the worker repairs the data root first, so the worker's
            # copy of the splits, fetched from the bucket, passes its sha256 checks.
            first = notmnist_pipeline(**{**parameters, "train_deployment": None, "epochs": 1}, return_state=True)
            assert first.is_completed(), first.message
            pipeline = DataRoot(s3_root, parameters["scratch_dir"])
            model_dir = first.result()["model_path"].removeprefix(s3_root + "/").removesuffix("/model.keras")
            split_dir = json.loads((pipeline.root / model_dir / "record.json").read_text())["dataset"]["splits"]
            time.sleep(1.1)  # the store's listing times have whole seconds: a rewrite must be seen as one
            damaged = [overwrite_in_place(pipeline, pipeline.root / split_dir),
                       overwrite_in_place(pipeline, letter_folder(pipeline.shards("notMNIST_large"), "A"))]
            with caplog.at_level("INFO"):
                state = notmnist_pipeline(**parameters, return_state=True)
            # The first run's epochs were its training subflow's, repeated (marked) in its own log; the worker's two
            # reach this process only through the API, and the terminal prints them.
            remote = [record for record in caplog.records
                      if ": Epoch " in record.getMessage() and not getattr(record, "relayed", False)]
            assert len(remote) == 2, [record.getMessage() for record in caplog.records if "Epoch" in record.getMessage()]
            assert state.is_completed(), state.message
            result = state.result()
            states = {run.name: run.state.name for run in task_runs(state.state_details.flow_run_id)}
            assert states["train notmnist on train/gpu"] == "Completed"  # the wait, named for what it waits on
            # Prefect's run_deployment links the child through a task run of its own, randomly named; it now hangs
            # under the named wait. Every other task run is named for what it does.
            assert len([name for name in states if " " not in name]) == 1, states
            assert states["decode notMNIST_large A"] == "Completed" and states["decode notMNIST_large B"] == "Cached"
            warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
            for url in damaged:  # one warning line names each damaged object
                assert [line for line in warnings if url in line] == [f"Damaged in the data root: {url} was written "
                                                                      "again after its folder was committed; this "
                                                                      "stage runs again to replace it"], warnings
            # Every committed folder of the data root is whole again: a fresh working copy fetches each, verified.
            reader = DataRoot(s3_root, tmp_path / "reader")
            for folder in [reader.root / split_dir, *(letter_folder(reader.shards(archive), letter) for letter in
                                                      "ABCDEFGHIJ" for archive in ("notMNIST_large", "notMNIST_small"))]:
                assert reader.fetch(folder)
    finally:
        worker.terminate()
        worker.wait(timeout=30)

    # The model, its metrics and the report, read back from the object store.
    layout = DataRoot(s3_root, tmp_path / "reader")
    model = result["model_path"].removeprefix(s3_root + "/").removesuffix("/model.keras")
    assert layout.fetch(layout.root / model)
    metrics = read_metrics(layout.root / model)
    assert metrics["test_accuracy"] == result["test_accuracy"]
    assert layout.store.read_bytes(f"{model}/report.md").decode().startswith("# notmnist run")
    record = json.loads((layout.root / model / "record.json").read_text())
    assert record["git_commit"] == repository["commit"]  # trained by the code the worker cloned
    # The worker trained from its own copy of the splits, under its own HOME; the checkpoint is gone.
    assert list((machine / ".cache" / "notmnist").rglob("train_x.npy"))
    assert not list((machine / ".cache" / "notmnist").rglob("*.backup"))
    assert layout.store.manifest(model + ".backup") is None

    async def child_runs():
        async with get_client() as client:
            deployment = await client.read_deployment_by_name("train/gpu")
            runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [deployment.id]}))
            artifacts = await client.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
            return runs, artifacts

    runs, artifacts = read(prefect_server, child_runs)
    runs = [run for run in runs if run.parameters.get("data_dir") == s3_root]
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
    assert any(line.startswith(f"{runs[0].name}: notmnist: test accuracy ") for line in lines), lines  # its scores


def test_a_parent_that_stops_waiting_cancels_its_training_run(prefect_server, deployed, tmp_path, monkeypatch):
    assert deployed.returncode == 0

    def interrupted(*arguments):
        raise KeyboardInterrupt  # what stopping the parent's process looks like from inside it

    monkeypatch.setattr(flows.train, "_wait_relaying", interrupted)
    parameters = {"data_dir": str(tmp_path), "splits": "interrupted-parent"}
    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        with pytest.raises(KeyboardInterrupt):
            train_remotely("train/gpu", parameters, timeout_seconds=60)

    assert training_run_states(prefect_server, "interrupted-parent") == ["Cancelled"]


def test_a_training_run_nobody_picks_up_times_out_with_a_clear_error(prefect_server, deployed, tmp_path):
    assert deployed.returncode == 0
    parameters = {"data_dir": str(tmp_path), "splits": "nothing-here"}
    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        with pytest.raises(PipelineError, match=r"did not finish within 3 s .*it was cancelled\. Is a worker polling"):
            train_remotely("train/gpu", parameters, timeout_seconds=3)

    # Nothing left Late in the queue for the next worker.
    assert training_run_states(prefect_server, "nothing-here") == ["Cancelled"]
