"""`train_flow`: training as a flow of its own, so a GPU work pool can run just this part.

The parent pipeline runs it as a subflow, or, with `train_deployment` set, runs its deployment and
waits for it. Either way the flow is given the data root and the split folder's key, and finds the
splits and the model folder through storage/ (see README, "A server, work pools, workers and a GPU").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from core.defaults import TRAIN_TIMEOUT_SECONDS
from core.errors import PipelineError
from core.seed import BATCH_SIZE, EPOCHS, LEARNING_RATE, SEED
from flows.reports import publish_report, publish_training
from storage.layout import DataRoot
from storage.models import MODEL_FILE, read_metrics, write_report
from tasks.train import train_task


@flow(name="train", persist_result=True)
def train_flow(
    data_dir: str = "data",
    splits: str = "",
    experiment: str = "notmnist",
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    seed: int = SEED,
) -> dict[str, Any]:
    """Train the seed's CNN on a split folder; returns test accuracy/loss, where the model is, and the device.

    Args:
        data_dir: the data root, holding splits/ and models/.
        splits: the split folder's name under splits/.
        experiment: notmnist or mnist (normalisation).
        epochs: training epochs.
        batch_size: training batch size.
        learning_rate: Adadelta's learning rate.
        seed: seed of the weights and of each epoch's shuffle.
    """
    result = train_task(
        Path(data_dir), splits, experiment=experiment, epochs=epochs, batch_size=batch_size,
        learning_rate=learning_rate, seed=seed,
    )
    if FlowRunContext.get().flow_run.parent_task_run_id is None:  # on its own (e.g. the GPU pool); a parent publishes
        publish_training(experiment, read_metrics(DataRoot(data_dir).root / result["model"]))
    return result


def train(
    layout: DataRoot, experiment: str, splits: str, training: dict[str, Any], deployment: str | None,
    timeout_seconds: float = TRAIN_TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """Train in this process as a subflow, or on `deployment`'s work pool when one is named."""
    parameters = dict(data_dir=str(layout.root), splits=splits, experiment=experiment, **training)
    if deployment:
        return train_remotely(deployment, parameters, timeout_seconds)
    return train_flow(**parameters)


def train_and_report(
    layout: DataRoot, experiment: str, splits: dict, training: dict[str, Any], deployment: str | None,
    timeout_seconds: float,
) -> tuple[dict[str, Any], Path]:
    """Train (here or on `deployment`), publish the epoch table and the report; returns the result and report.md."""
    result = train(layout, experiment, splits["key"], training, deployment, timeout_seconds)
    model_dir = layout.root / result["model"]
    metrics = read_metrics(model_dir)
    publish_training(experiment, metrics)
    report = write_report(model_dir, publish_report(experiment, result, metrics, splits))
    return result, report


def train_remotely(deployment: str, parameters: dict[str, Any], timeout_seconds: float) -> dict[str, Any]:
    """Run `train_flow`'s deployment (e.g. "train/gpu"), wait for it, and return its persisted result."""
    try:
        run = run_deployment(name=deployment, parameters=parameters, timeout=timeout_seconds)
    except ObjectNotFound as error:
        raise PipelineError(
            f"No deployment named {deployment!r}: create it with `prefect deploy --all` (see prefect.yaml), "
            "or leave train_deployment empty to train in this process."
        ) from error
    state = run.state
    if state is None or not state.is_final():
        raise PipelineError(
            f"Training run {run.name!r} of {deployment!r} did not finish within {timeout_seconds:.0f} s "
            f"(state: {state.name if state else 'unknown'}); is a worker polling its work pool?"
        )
    if not state.is_completed():
        raise PipelineError(f"Training run {run.name!r} of {deployment!r} ended {state.name}: {state.message}")
    return state.result()


def pipeline_result(layout: DataRoot, result: dict[str, Any], splits: dict, report: Path) -> dict[str, Any]:
    """What a pipeline returns: the test scores, where the model and report are, the dataset fingerprint."""
    return {
        "test_accuracy": result["test_accuracy"],
        "test_loss": result["test_loss"],
        "val_accuracy": result.get("val_accuracy"),
        "model_path": str(layout.root / result["model"] / MODEL_FILE),
        "dataset_fingerprint": splits["fingerprint"],
        "report": str(report),
        "device": result.get("device"),
    }
