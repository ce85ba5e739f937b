"""`train_flow`: training as a flow of its own, so a GPU work pool can run just this part.

The parent pipeline either calls it as a subflow (in-process) or, with `train_deployment` set,
runs its deployment and waits: the child reads the splits from, and writes the model to, the data
root, which must then be the same path on both machines (a shared mount).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from flows.reports import publish_report, publish_training
from storage.atomic import write_bytes
from storage.layout import DataRoot
from tasks.errors import PipelineError
from tasks.train import train_task


def model_folder(layout: DataRoot, experiment: str, dataset_fingerprint: str, training: dict[str, Any]) -> Path:
    """Where a model trained on this dataset with these hyper-parameters goes (one folder per combination)."""
    key = hashlib.sha256(json.dumps(training, sort_keys=True).encode()).hexdigest()[:8]
    return layout.models(f"{experiment}-{dataset_fingerprint[:12]}-{key}")


def train_here_or_there(
    layout: DataRoot, experiment: str, splits: dict, training: dict[str, Any], deployment: str | None,
    timeout_seconds: float,
) -> dict[str, Any]:
    """Train in this process as a subflow, or on `deployment`'s work pool when one is named."""
    parameters = dict(
        split_dir=splits["folder"], model_dir=str(model_folder(layout, experiment, splits["fingerprint"], training)),
        experiment=experiment, **training,
    )
    if deployment:
        return train_remotely(deployment, parameters, timeout_seconds)
    return train_flow(**parameters)


def train_and_report(
    layout: DataRoot, experiment: str, splits: dict, training: dict[str, Any], deployment: str | None,
    timeout_seconds: float,
) -> tuple[dict[str, Any], Path]:
    """Train (here or on `deployment`), publish the epoch table and the report; returns the result and report.md."""
    result = train_here_or_there(layout, experiment, splits, training, deployment, timeout_seconds)
    metrics = json.loads(Path(result["metrics_path"]).read_text())
    publish_training(experiment, metrics)
    report = Path(result["metrics_path"]).with_name("report.md")
    write_bytes(report, publish_report(experiment, result, metrics, splits).encode())
    return result, report


@flow(name="train", persist_result=True)
def train_flow(
    split_dir: str,
    model_dir: str,
    experiment: str = "notmnist",
    epochs: int = 2,
    batch_size: int = 128,
    learning_rate: float = 1.0,
    seed: int = 133,
) -> dict[str, Any]:
    """Train the seed's CNN on a split folder; returns test accuracy/loss, paths and the device used."""
    result = train_task(
        Path(split_dir), Path(model_dir), experiment=experiment, epochs=epochs, batch_size=batch_size,
        learning_rate=learning_rate, seed=seed,
    )
    run = FlowRunContext.get().flow_run
    if run.parent_task_run_id is None:  # run on its own (e.g. on the GPU pool); a parent publishes its own
        publish_training(experiment, json.loads(Path(result["metrics_path"]).read_text()))
    return result


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
