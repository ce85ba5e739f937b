"""The multi-machine topology on one machine (`notmnist stack up`): a real `prefect server`, SeaweedFS, the work
pools and deployments made by the commands README gives an operator, and a `cpu` and a `gpu` process worker.

Each worker shares nothing with the pipeline but the Prefect API and the S3 server: it runs in a folder
of its own with its own HOME, and gets the code by cloning the deployed commit from a bare repository
(file://) that holds this checkout's working tree. The module ends with `notmnist stack down`, which
must leave no process of the stack behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.exceptions import CancelledRun
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelling

import flows.train
from core.errors import PipelineError
from demo.stack import DEPLOY_COMMAND, POOL_COMMANDS, group_members
from flows.train import train_remotely
from storage.layout import DataRoot
from storage.letters import letter_folder
from storage.models import read_metrics
from tests.flows.conftest import free_port, objects_under, overwrite_in_place
from tests.flows.test_pipeline import picture_links, task_runs

ROOT = Path(__file__).resolve().parents[2]
NOTMNIST = str(Path(sys.executable).with_name("notmnist"))


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


@dataclass
class Stack:
    folder: Path
    env: dict[str, str]  # what `stack up` says to export: PREFECT_API_URL and the AWS_* variables
    up: subprocess.CompletedProcess

    def processes(self) -> dict[str, dict]:
        return json.loads((self.folder / "stack.json").read_text())["processes"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, repository) -> Iterator[Stack]:
    """`notmnist stack up`, deploying the working tree under test; `stack down` at the end if a test did not."""
    folder = tmp_path_factory.mktemp("stack")
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("PREFECT_", "AWS_"))}  # nothing of this test session's servers
    up = subprocess.run(
        [NOTMNIST, "stack", "up", "--folder", str(folder), "--port", str(free_port()), "--checkout",
         repository["deployer"], "--repository", repository["url"], "--json"],
        env=environment, capture_output=True, text=True, timeout=300,
    )
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    exported = dict(pair.split("=", 1) for pair in json.loads(up.stdout)["export"].split())
    try:
        yield Stack(folder, exported, up)
    finally:
        if (folder / "stack.json").exists():
            subprocess.run([NOTMNIST, "stack", "down", "--folder", str(folder)], capture_output=True, timeout=120)


@pytest.fixture
def on_stack(stack, monkeypatch) -> Iterator[Stack]:
    """This process talks to the stack's API and S3 server, as a user who exported what `stack up` printed."""
    for name, value in stack.env.items():
        monkeypatch.setenv(name, value)
    with temporary_settings({PREFECT_API_URL: stack.env["PREFECT_API_URL"]}):
        yield stack


def read(env: dict[str, str], coroutine_factory):
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(coroutine_factory())


def training_run_states(env: dict[str, str], splits: str, deployment: str = "train/gpu") -> list[str]:
    """The states of the runs of `deployment` that were given the split folder `splits`."""

    async def states():
        async with get_client() as client:
            found = await client.read_deployment_by_name(deployment)
            runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [found.id]}))
        return [run.state.name for run in runs if run.parameters.get("splits") == splits]

    return read(env, states)


def test_the_readmes_deploy_commands_are_the_ones_the_stack_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Training on another machine"):]
    section = section[:section.index("\n## ")]
    lines = [line.split("  #", 1)[0].strip() for line in section.splitlines()]
    assert [line for line in lines if line.startswith("prefect work-pool create")] == list(POOL_COMMANDS)
    assert any(line.startswith("NOTMNIST_REPOSITORY=") and line.endswith(" " + DEPLOY_COMMAND) for line in lines)
    assert "notmnist stack up" in lines and "notmnist stack down" in lines


def test_deploy_all_registers_every_deployment_and_the_weekly_schedule(stack, repository):
    async def deployments():
        async with get_client() as client:
            return await client.read_deployments()

    found = {d.name: d for d in read(stack.env, deployments)}
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


WORKER_ROOT = "s3://notmnist/worker-training"


def test_training_on_a_worker_that_shares_nothing_but_the_api_and_the_object_store(
    on_stack, repository, served_archives, tmp_path
):
    """The stack's gpu worker runs in a folder of its own, with its own HOME, and gets the code by cloning the
    deployed commit; the pipeline (`notmnist run`, as a user runs it) and the worker exchange data only through S3."""
    machine = on_stack.folder / "workers" / "gpu"
    s3_root, scratch = WORKER_ROOT, tmp_path / "pipeline-machine"
    # A first run trains here (one epoch), so the bucket holds every stage; then same-size damage in the
    # bucket. The run that sends training to the worker repairs the data root first, so the worker's
    # copy of the splits, fetched from the bucket, passes its sha256 checks.
    first = subprocess.run(pipeline_command(served_archives, s3_root, scratch, "--epochs", "1", "--json"),
                           env=terminal_environment(on_stack, scratch), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    pipeline = DataRoot(s3_root, scratch)
    model_dir = json.loads(first.stdout)["model_path"].removeprefix(s3_root + "/").removesuffix("/model.keras")
    split_dir = json.loads((pipeline.root / model_dir / "record.json").read_text())["dataset"]["splits"]
    time.sleep(1.1)  # the store's listing times have whole seconds: a rewrite must be seen as one
    damaged = [overwrite_in_place(pipeline, pipeline.root / split_dir),
               overwrite_in_place(pipeline, letter_folder(pipeline.shards("notMNIST_large"), "A"))]
    second = subprocess.run(
        pipeline_command(served_archives, s3_root, scratch, "--epochs", "2", "--train-deployment", "train/gpu",
                         "--train-timeout-seconds", "300", "--json"),
        env=terminal_environment(on_stack, scratch), capture_output=True, text=True, timeout=300,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    lines = second.stderr.splitlines()
    # The worker's two epoch lines reach this terminal only through the API, and it prints them.
    assert len([line for line in lines if ": Epoch " in line]) == 2, second.stderr[-3000:]
    result = json.loads(second.stdout)
    flow_run_id = next(line for line in lines if " View at " in line).rsplit("/", 1)[1]
    states = {run.name: run.state.name for run in task_runs(flow_run_id)}
    assert states["train notmnist on train/gpu"] == "Completed"  # the wait, named for what it waits on
    # Prefect's run_deployment links the child through a task run of its own, randomly named; it now hangs
    # under the named wait. Every other task run is named for what it does.
    assert len([name for name in states if " " not in name]) == 1, states
    assert states["decode notMNIST_large A"] == "Completed" and states["decode notMNIST_large B"] == "Cached"
    warnings = [line.split("] ", 1)[1] for line in lines if line.startswith("WARNING ")]
    for url in damaged:  # one warning line names each damaged object
        assert [line for line in warnings if url in line] == [f"Damaged in the data root: {url} was written "
                                                              "again after its folder was committed; this "
                                                              "stage runs again to replace it"], warnings
    # Every committed folder of the data root is whole again: a fresh working copy fetches each, verified.
    reader = DataRoot(s3_root, tmp_path / "reader")
    for folder in [reader.root / split_dir, *(letter_folder(reader.shards(archive), letter) for letter in
                                              "ABCDEFGHIJ" for archive in ("notMNIST_large", "notMNIST_small"))]:
        assert reader.fetch(folder)

    # The model, its metrics and the report, read back from the object store.
    layout = DataRoot(s3_root, tmp_path / "reader")
    model = result["model_path"].removeprefix(s3_root + "/").removesuffix("/model.keras")
    assert layout.fetch(layout.root / model)
    metrics = read_metrics(layout.root / model)
    assert metrics["test_accuracy"] == result["test_accuracy"]
    assert layout.store.read_bytes(f"{model}/report.md").decode().startswith("# notmnist run")
    record = json.loads((layout.root / model / "record.json").read_text())
    assert record["git_commit"] == repository["commit"]  # trained by the code the worker cloned
    # TensorFlow's start-up and C++ log lines stay out of the worker's output too.
    worker_log = (on_stack.folder / "logs" / "gpu-worker.log").read_text()
    assert "notmnist: test accuracy" in worker_log
    assert not [line for line in worker_log.splitlines() if "absl::InitializeLog" in line or "cuda drivers" in line
                or re.match(r"[IWE]0000 ", line)], worker_log[-3000:]
    # The worker trained from its own copy of the splits, under its own HOME; the checkpoint is gone.
    assert list((machine / ".cache" / "notmnist").rglob("train_x.npy"))
    assert not list((machine / ".cache" / "notmnist").rglob("*.backup"))
    assert layout.store.manifest(model + ".backup") is None

    async def child_runs():
        async with get_client() as client:
            deployment = await client.read_deployment_by_name("train/gpu")
            runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [deployment.id]}))
            artifacts = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return runs, artifacts

    runs, artifacts = read(on_stack.env, child_runs)
    runs = [run for run in runs if run.parameters.get("data_dir") == s3_root]
    assert [(run.work_pool_name, run.state.name) for run in runs] == [("gpu", "Completed")]
    keys = {artifact.key for artifact in artifacts}
    assert {"notmnist-splits", "notmnist-report", "notmnist-confusion-matrix"} <= keys
    # The report links each picture's artifact page in the UI, by the key it was published under.
    (report,) = [artifact.data for artifact in artifacts if artifact.key == "notmnist-report"]
    linked = picture_links(report)
    assert {key for key, _, _ in linked} == {"notmnist-confusion-matrix", "notmnist-learning-curves",
                                             "notmnist-misclassified", "notmnist-large-glyphs", "notmnist-small-glyphs"}
    api = on_stack.env["PREFECT_API_URL"]
    assert all(key == target and ui + "/api" == api and key in keys for key, ui, target in linked), report
    # TensorBoard reads local folders: the hint names the logs in this machine's working copy.
    assert f"`tensorboard --logdir {pipeline.root / model / 'tensorboard'}`" in report

    async def parent_log():
        async with get_client() as client:
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        return [log.message for log in logs]

    lines = read(on_stack.env, parent_log)
    sent = f"Training sent to train/gpu as run {runs[0].name}: http://127.0.0.1:"
    assert any(line.startswith(sent) and line.endswith(f"/runs/flow-run/{runs[0].id}") for line in lines), lines
    assert [line.split(": ", 1)[0] for line in lines if ": Epoch " in line] == [runs[0].name] * 2
    assert any(line.startswith(f"{runs[0].name}: notmnist: test accuracy ") for line in lines), lines  # its scores


def test_a_parent_that_stops_waiting_cancels_its_training_run(on_stack, tmp_path, monkeypatch):
    def interrupted(*arguments):
        raise KeyboardInterrupt  # what Ctrl-C, or a cancel the pipeline's watcher saw, looks like inside the wait

    monkeypatch.setattr(flows.train, "_wait_relaying", interrupted)
    parameters = {"data_dir": str(tmp_path), "splits": "interrupted-parent"}
    # train/gpu-checkout: no worker of the stack polls its pool, so the run is still waiting when it is cancelled
    with pytest.raises(CancelledRun, match=r"^training run [a-z-]+ cancelled$"):
        train_remotely("train/gpu-checkout", parameters, timeout_seconds=60)

    assert training_run_states(on_stack.env, "interrupted-parent", "train/gpu-checkout") == ["Cancelled"]


def test_a_training_run_nobody_picks_up_times_out_with_a_clear_error(on_stack, tmp_path):
    parameters = {"data_dir": str(tmp_path), "splits": "nothing-here"}
    with pytest.raises(PipelineError, match=r"did not finish within 3 s .*it was cancelled\. Is a worker polling"):
        train_remotely("train/gpu-checkout", parameters, timeout_seconds=3)

    # Nothing left Late in the queue for the next worker.
    assert training_run_states(on_stack.env, "nothing-here", "train/gpu-checkout") == ["Cancelled"]


def pipeline_command(served, data_root: str, scratch: Path, *options: str) -> list[str]:
    """`notmnist run` on the session's small archives, with a data root on the stack's S3 server."""
    sizes = served.sizes
    return [
        NOTMNIST, "run", "--data-dir", data_root, "--scratch-dir", str(scratch), "--base-url", served.server.base_url,
        "--large-bytes", str(sizes["notMNIST_large.tar.gz"]), "--small-bytes", str(sizes["notMNIST_small.tar.gz"]),
        "--min-images-large", "30", "--min-images-small", "10", "--train-size", "250", "--valid-size", "50",
        "--test-size", "50", "--workers", "1", "--task-runner", "threads", *options,
    ]


def terminal_environment(stack: Stack, scratch: Path) -> dict[str, str]:
    """A user's terminal that exported what `stack up` printed, with a Prefect home of its own."""
    return {**os.environ, **stack.env, "PREFECT_HOME": str(scratch / "prefect-home")}


class Terminal:
    """`notmnist run` in a process of its own, training sent to the stack's gpu worker; its stderr read as it comes."""

    def __init__(self, stack: Stack, served, data_root: str, scratch: Path):
        command = pipeline_command(served, data_root, scratch, "--epochs", "2000", "--train-deployment", "train/gpu")
        self.process = subprocess.Popen(command, env=terminal_environment(stack, scratch), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stderr), daemon=True)
        self.reader.start()

    def wait_for(self, text: str, seconds: float = 180, count: int = 1) -> str:
        """The first line holding `text`, once `count` lines hold it."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if len(found := [line for line in list(self.lines) if text in line]) >= count:
                return found[0]
            assert self.process.poll() is None, "".join(self.lines)[-3000:]
            time.sleep(0.2)
        pytest.fail(f"no line with {text!r} within {seconds:.0f} s: {''.join(self.lines)[-3000:]}")

    def training_run(self) -> str:
        """The name of the training run the pipeline sent to train/gpu, once the terminal shows two of its epochs
        (which they are depends on the checkpoint a run before left)."""
        self.wait_for(": Epoch ", count=2)
        return self.wait_for("Training sent to train/gpu as run ").split(" as run ", 1)[1].split(":", 1)[0]

    def finish(self, seconds: float = 60) -> int:
        code = self.process.wait(timeout=seconds)
        self.reader.join(timeout=10)
        return code


def flow_run_named(env: dict[str, str], name: str):
    async def find():
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
            return runs[0]

    return read(env, find)


def parent_of(env: dict[str, str], child) -> object:
    async def find():
        async with get_client() as client:
            link = await client.read_task_run(child.parent_task_run_id)
            return await client.read_flow_run(link.flow_run_id)

    return read(env, find)


def state_within(env: dict[str, str], name: str, wanted: str, seconds: float = 60) -> str:
    deadline = time.monotonic() + seconds
    while (state := flow_run_named(env, name).state.name) != wanted and time.monotonic() < deadline:
        time.sleep(0.5)
    return state


def report_artifacts(env: dict[str, str], flow_run_id) -> list[str]:
    async def keys():
        async with get_client() as client:
            found = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return [artifact.key for artifact in found if artifact.key and "report" in artifact.key]

    return read(env, keys)


@pytest.mark.parametrize("how, exit_code", [("cancel", 1), ("ctrl-c", 130)], ids=["prefect flow-run cancel", "ctrl-c"])
def test_stopping_a_pipeline_in_the_terminal_cancels_its_training_on_the_worker(
    on_stack, served_archives, tmp_path, how, exit_code
):
    """Cancelled through the API (as the UI and `prefect flow-run cancel` do) or with Ctrl-C, mid-training: the
    training run on the worker ends Cancelled, the pipeline publishes nothing more, and the terminal says so.
    They use the worker test's data root: where it ran first, every data stage is done and they go straight to
    training a model of their own (other epochs)."""
    stack = on_stack
    reports = report_objects(DataRoot(WORKER_ROOT, tmp_path / "reader"))
    terminal = Terminal(stack, served_archives, WORKER_ROOT, tmp_path)
    child = flow_run_named(stack.env, terminal.training_run())
    parent = parent_of(stack.env, child)
    if how == "cancel":
        async def cancel():
            async with get_client() as client:
                await client.set_flow_run_state(parent.id, Cancelling(message="cancelled from the test"))

        read(stack.env, cancel)
    else:
        terminal.process.send_signal(signal.SIGINT)

    assert terminal.finish() == exit_code
    said = [line.rstrip() for line in terminal.lines if line.startswith("notmnist run:")]
    assert said == [f"notmnist run: cancelled: training run {child.name} cancelled"], "".join(terminal.lines)[-3000:]
    assert state_within(stack.env, child.name, "Cancelled") == "Cancelled"
    assert flow_run_named(stack.env, parent.name).state.name == "Cancelled"
    assert report_artifacts(stack.env, parent.id) == []  # nothing published after the cancel
    assert report_objects(DataRoot(WORKER_ROOT, tmp_path / "reader")) == reports


def report_objects(layout: DataRoot) -> list[str]:
    return sorted(key for key in objects_under(layout) if key.endswith("report.md"))


def test_stack_down_stops_every_process_it_started_and_only_those(stack):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        started = stack.processes()
        assert set(started) == {"prefect server", "seaweedfs", "cpu worker", "gpu worker"}
        down = subprocess.run([NOTMNIST, "stack", "down", "--folder", str(stack.folder), "--json"],
                              capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        left = {name: members for name, process in started.items()  # each ran in a process group of its own
                if (members := group_members(process["pid"]))}
        assert left == {}
        assert bystander.poll() is None
        assert not (stack.folder / "stack.json").exists()
    finally:
        bystander.kill()
        bystander.wait()
