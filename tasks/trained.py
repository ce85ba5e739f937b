"""What a training leaves in the data root, and how to find it again, without importing Keras.

The training stage's boundary (`TRAIN_STAGE`: where its model folder is, what it reads, what follows its
publish) and `find_trained`, which reads a finished training's result back: the pipeline asks it first,
so a rerun whose model is already in the data root never imports Keras (2 s and 400 MB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.errors import PipelineError
from storage import checkpoints
from storage.layout import DataRoot, backup_folder, model_key
from storage.models import METRICS_FILE, MODEL_FILE, RECORD_FILE, find_model
from storage.splits import read_splits_manifest
from tasks.reporting import stage_logger
from tasks.stage import Stage

OPTIMIZER = "adadelta"  # the seed's


def summary(layout: DataRoot, model_dir: Path, metrics: dict, fingerprint: str) -> dict[str, Any]:
    """What training returns: the scores, where the model folder's files are in the data root, speed and device."""
    return {
        "test_accuracy": metrics["test_accuracy"],
        "test_loss": metrics["test_loss"],
        "val_accuracy": metrics.get("val_accuracy"),
        "model": layout.relative(model_dir),
        "model_path": layout.url(model_dir / MODEL_FILE),
        "metrics_path": layout.url(model_dir / METRICS_FILE),
        "record_path": layout.url(model_dir / RECORD_FILE),
        "dataset_fingerprint": fingerprint,
        "device": metrics["device"],
        "samples_per_second": metrics["samples_per_second"],
        "epochs_run": metrics["epochs_run"],
    }


def _training(parameters: dict[str, Any]) -> dict[str, Any]:
    return {name: parameters[name] for name in ("epochs", "batch_size", "learning_rate", "seed")}


def model_parameters(experiment: str, training: dict[str, Any]) -> dict[str, Any]:
    """What a model folder's record must name to be reused: the experiment, training parameters, optimizer."""
    return {"experiment": experiment, **training, "optimizer": OPTIMIZER}


def model_folder(root: DataRoot, parameters: dict[str, Any], *, local: bool = False) -> list[Path] | None:
    """The model folder of these splits and training parameters, named after the splits' dataset fingerprint as the
    data root records it (with `local`, as the working copy's splits do); None while the splits are not there."""
    folder = root.splits(parameters["splits"])
    splits = read_splits_manifest(folder) if local else root.committed(folder, verify=False)
    if splits is None or "fingerprint" not in splits:
        return None
    return [root.model(model_key(parameters["experiment"], splits["fingerprint"], _training(parameters)))]


def _split_folder(root: DataRoot, parameters: dict[str, Any]) -> list[Path]:
    return [root.splits(parameters["splits"])]


def _trained(root: DataRoot, parameters: dict[str, Any], result: dict[str, Any]) -> list[Path]:
    return [root.root / result["model"]]


def drop_checkpoint(root: DataRoot, parameters: dict[str, Any], logger=None) -> None:
    """Once the model folder is in the data root, its training's checkpoint goes, here and in the data root."""
    outputs = model_folder(root, parameters)
    if outputs is None:
        return
    backup = backup_folder(outputs[0])
    best_effort(lambda: checkpoints.drop(root, backup), f"remove {root.url(backup)}", logger or stage_logger(__name__))


def best_effort(action, what: str, logger) -> Any:
    """Run `action`, returning what it returns; a failure of the object store is a warning (and None), not the end
    of a training."""
    try:
        return action()
    except PipelineError as error:
        logger.warning("Could not %s: %s", what, error)
        return None


def find_trained(root: DataRoot, splits: str, experiment: str, training: dict[str, Any]) -> dict[str, Any] | None:
    """The result `train_model` returned for these splits and parameters, read back from the data root
    (the model folder fetched into the working copy, verified), or None when there is no such model."""
    parameters = {"splits": splits, "experiment": experiment, **training}
    outputs = TRAIN_STAGE.fetch_outputs(root, parameters)
    if outputs is None:
        return None
    (model_dir,) = outputs
    fingerprint = root.committed(root.splits(splits), verify=False)["fingerprint"]
    found = find_model(model_dir, model_parameters(experiment, training), fingerprint)
    return None if found is None else summary(root, model_dir, found[1], fingerprint)


TRAIN_STAGE = Stage(outputs=model_folder, reads=_split_folder, after_publish=drop_checkpoint, built=_trained)
