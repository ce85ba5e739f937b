"""`train_flow`: training as a flow of its own, so a GPU work pool can run just this part.

The parent pipeline runs it as a subflow, or, with `train_deployment` set, runs its deployment and
waits for it. Either way the flow is given the data root and the split folder's key, and finds the
splits and the model folder through storage/ (see README, "Training on another machine"). A
training sent to a work pool shares nothing with its parent but the Prefect API and the data root:
the parent reads the model folder back from the data root when the run has completed, so no
result storage needs to be shared, and it cancels the run when it stops waiting for it (timeout,
failure, cancellation), so none is left running or queued.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.exceptions import CancelledRun, ObjectNotFound

from core.defaults import TRAIN_TIMEOUT_SECONDS
from core.errors import PipelineError
from core.parameters import Experiment, Positive, Rate, Seed
from core.seed import BATCH_SIZE, EPOCHS, LEARNING_RATE, SEED
from flows.reports import publish_pictures, publish_report, publish_training, run_url
from storage.checkpoints import TENSORBOARD
from storage.disk import writing
from storage.layout import DataRoot
from storage.models import MODEL_FILE, read_metrics, write_report
from tasks.cancellation import cancellable, unless_cancelled
from tasks.reporting import import_keras_quietly, stage_logger
from tasks.stage import attach, in_working_copy, open_data_root
from tasks.trained import find_trained

RELAYED = "relayed"  # marks a log record repeated from a training subflow (the terminal showed it already)
POLL_SECONDS = 2.0  # how often the pipeline looks at a training run it sent to a work pool


@flow(name="train", persist_result=True)
@cancellable
def train_flow(
    data_dir: str = "data",
    splits: str = "",
    experiment: Experiment = "notmnist",
    epochs: Positive = EPOCHS,
    batch_size: Positive = BATCH_SIZE,
    learning_rate: Rate = LEARNING_RATE,
    seed: Seed = SEED,
    scratch_dir: str | None = None,
) -> dict[str, Any]:
    """Train the seed's CNN on a split folder; returns test accuracy/loss, where the model is, and the device.

    Args:
        data_dir: the data root, holding splits/ and models/: a folder, or s3://bucket/prefix (endpoint and keys
            from the AWS_* variables).
        splits: the split folder's name under splits/ (`notmnist train` takes the newest when it is not given).
        experiment: notmnist or mnist (normalisation).
        epochs: training epochs.
        batch_size: training batch size.
        learning_rate: Adadelta's learning rate.
        seed: seed of the weights and of each epoch's shuffle.
        scratch_dir: the local working copy of an s3:// data root, where the splits are fetched to and
            the model is written before it is published (default: under ~/.cache/notmnist).
    """
    import_keras_quietly()  # Keras (2 s and 400 MB to import) only in a process that trains
    from tasks.train import train_task

    root = open_data_root(data_dir, scratch_dir)
    result = unless_cancelled(train_task(
        root, splits, experiment=experiment, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
        seed=seed,
    ))
    if FlowRunContext.get().flow_run.parent_task_run_id is None:  # on its own (e.g. the GPU pool); a parent publishes
        publish_training(experiment, read_metrics(root.root / result["model"]))
    return result


def train(
    layout: DataRoot, experiment: str, splits: str, training: dict[str, Any], deployment: str | None,
    timeout_seconds: float = TRAIN_TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """Train in this process as a subflow, or on `deployment`'s work pool when one is named.

    Either way the caller's log says where training went and carries its per-epoch lines.
    """
    parameters = dict(data_dir=layout.location, splits=splits, experiment=experiment, **training)
    logger = stage_logger(__name__)
    if (result := find_trained(layout, splits, experiment, training)) is not None:  # Keras not even imported
        logger.info("Already trained with these parameters on this dataset: %s", layout.url(layout.root / result["model"]))
        return result
    if deployment:
        # The worker keeps its own working copy: its scratch_dir is its own default.
        unless_cancelled(remote_training(deployment, parameters, timeout_seconds))
        if (result := find_trained(layout, splits, experiment, training)) is None:
            raise PipelineError(
                f"The training run of {deployment!r} completed, but {layout.location} holds no model of these "
                "splits and parameters: does the worker see the same data root (and its AWS variables)?"
            )
        return result
    logger.info("Training %s in this process, as a subflow of this run", experiment)
    with _relayed_epochs(logger):
        return unless_cancelled(train_flow(**parameters, scratch_dir=layout.scratch))


@contextlib.contextmanager
def _relayed_epochs(logger) -> Iterator[None]:
    """Repeat the training task's epoch lines in `logger` (the caller's run), whose log would stay silent."""

    class Relay(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "task_run_name", "").startswith("train ") and record.getMessage().startswith("Epoch "):
                logger.info("%s: %s", record.task_run_name, record.getMessage(), extra={RELAYED: True})

    relay, source = Relay(), logging.getLogger("prefect.task_runs")
    source.addHandler(relay)
    try:
        yield
    finally:
        source.removeHandler(relay)


def train_and_report(
    layout: DataRoot, experiment: str, splits: dict, training: dict[str, Any], deployment: str | None,
    timeout_seconds: float, pictures: dict[str, bytes] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Train (here or on `deployment`); publish the epoch table, the pictures (with `pictures` given, such as
    glyph grids) and the report, also written beside the model; returns the result and report.md."""
    result = train(layout, experiment, splits["key"], training, deployment, timeout_seconds)
    with writing(f"the report and pictures of {result['model']}", layout.root):
        model_dir, split_dir = in_working_copy(layout, layout.root / result["model"], layout.splits(splits["key"]))
        metrics = read_metrics(model_dir)
        publish_training(experiment, metrics)
        figures = publish_pictures(experiment, model_dir, metrics, split_dir, splits, pictures or {})
        # TensorBoard reads local folders: an s3:// root's logs are in this machine's working copy.
        tensorboard = str(model_dir / TENSORBOARD)
        report = write_report(model_dir, publish_report(experiment, result, metrics, splits, figures, tensorboard))
        attach(layout, [model_dir / name for name in (report.name, *figures)])
    return result, report


def train_remotely(deployment: str, parameters: dict[str, Any], timeout_seconds: float) -> None:
    """Run `train_flow`'s deployment (e.g. "train/gpu") and wait for it to complete, relaying its epochs.

    A child run that does not finish within `timeout_seconds` is cancelled, and so is one whose parent
    fails or is stopped while waiting, so no training keeps running, or waits in its pool's queue,
    after the pipeline gave up on it.
    """
    logger = stage_logger(__name__)
    try:
        run = run_deployment(name=deployment, parameters=parameters, timeout=0)
    except ObjectNotFound as error:
        raise PipelineError(
            f"No deployment named {deployment!r}: create it with `prefect deploy --all` (see prefect.yaml), "
            "or leave train_deployment empty to train in this process."
        ) from error
    logger.info("Training sent to %s as run %s: %s", deployment, run.name, run_url(run.id) or run.id)
    try:
        state = _wait_relaying(run, timeout_seconds, logger)
    except KeyboardInterrupt:  # Ctrl-C, or this run cancelled through the API (tasks/cancellation.py)
        _cancel(run.id)
        raise CancelledRun(f"training run {run.name} cancelled") from None
    except BaseException:  # this run failed or its process is being stopped: so is the child
        _cancel(run.id)
        raise
    if state is None or not state.is_final():
        _cancel(run.id)
        raise PipelineError(
            f"Training run {run.name!r} of {deployment!r} did not finish within {timeout_seconds:.0f} s "
            f"(state: {state.name if state else 'unknown'}); it was cancelled. Is a worker polling its work pool?"
        )
    if not state.is_completed():
        raise PipelineError(f"Training run {run.name!r} of {deployment!r} ended {state.name}: {state.message}")
    logger.info("Training run %s completed; reading its model from the data root", run.name)


# The wait as a task run of the pipeline, named for what it waits on: the training run is its child in the UI's graph
# (run_deployment links it to the task run it is called from), and nothing of the worker's is kept in its result.
remote_training = task(
    cancellable(train_remotely), name="train-remotely", task_run_name="train {parameters[experiment]} on {deployment}",
    persist_result=False,
)


def pipeline_result(layout: DataRoot, result: dict[str, Any], splits: dict, report: Path) -> dict[str, Any]:
    """What a pipeline returns: the test scores, where the model and report are, the dataset fingerprint."""
    return {
        "test_accuracy": result["test_accuracy"],
        "test_loss": result["test_loss"],
        "val_accuracy": result.get("val_accuracy"),
        "model_path": layout.url(layout.root / result["model"] / MODEL_FILE),
        "dataset_fingerprint": splits["fingerprint"],
        "report": layout.url(report),
        "device": result.get("device"),
    }


def _wait_relaying(run, timeout_seconds: float, logger):
    """Poll the child run until it ends or `timeout_seconds` pass, logging its new epoch lines; its last state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    deadline, relayed, settled = time.monotonic() + timeout_seconds, 0, None
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(run.id).state
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])), sort=LogSort.TIMESTAMP_ASC)
            for log in logs[relayed:]:  # not marked relayed: this terminal has not shown them (the worker's has)
                if log.message.startswith("Epoch ") or ": test accuracy " in log.message:
                    logger.info("%s: %s", run.name, log.message)
            finished = state is not None and state.is_final()
            # A run's last log lines reach the API after its final state: wait until they stop coming.
            if (finished and len(logs) == relayed and settled is not None) or time.monotonic() >= deadline:
                return state
            settled = len(logs) if finished else None
            relayed = len(logs)
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))


def _cancel(flow_run_id) -> None:
    """Cancel a child run: a scheduled one becomes Cancelled at once (no worker picks it up later), a running
    one Cancelling (its worker stops the process). A run already over is left alone."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
        if state is None or not state.is_final():
            client.set_flow_run_state(flow_run_id, Cancelling(message="the pipeline stopped waiting for it"))


def cancel_training_runs(flow, flow_run, state) -> None:
    """Flow hook (on cancellation and crash): cancel the training runs this run sent to a work pool.

    It runs where Prefect runs hooks, after this run's own process may be gone, so it finds the
    children through the API rather than in memory.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id]))
        )
    for child in children:
        if child.deployment_id is not None:  # a run sent to a work pool, not an in-process subflow
            _cancel(child.id)
