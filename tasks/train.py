"""Training stage: the seed's CNN on a split folder, deterministic, resumable, recorded.

    <model dir>/               written whole or not at all (a temporary folder renamed into place)
      model.keras              the trained model
      metrics.json             test/validation results, per-epoch history, confusion matrix, speed
      record.json              dataset fingerprint, parameters, versions, commit, device, seed's numbers
    <model dir>.backup/        while training: the last finished epoch's checkpoint and history;
                               a killed or retried run continues from it; removed once the model is in place
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import keras
import numpy as np
from prefect import task

from storage.atomic import atomic_path, read_json, remove, write_json
from tasks.batches import ShuffleEachEpoch, SplitBatches, open_splits, read_split_manifest
from tasks.errors import PipelineError
from tasks.models import build_one_layer_cnn, make_optimizer
from tasks.reporting import Progress, artifact_key, stage_logger
from tasks.training_callbacks import BatchProgress, EpochBackup, EpochRecorder, history_columns
from tasks.training_record import SEED_REPORTED, confusion_matrix, per_class_accuracy, provenance

MODEL_FILE, METRICS_FILE, RECORD_FILE = "model.keras", "metrics.json", "record.json"
BACKUP_IDENTITY, BACKUP_HISTORY = "run.json", "history.json"
LOSS = "categorical_crossentropy"  # the seed's loss, on one-hot labels


@dataclass(frozen=True)
class Experiment:
    """A dataset the CNN trains on: its class names, in label order."""

    class_names: tuple[str, ...]


EXPERIMENTS = {
    "notmnist": Experiment(tuple("ABCDEFGHIJ")),
    "mnist": Experiment(tuple("0123456789")),
}


def backup_folder(model_dir: Path) -> Path:
    """Where the checkpoint of an unfinished training of `model_dir` lives: a sibling that survives a crash."""
    model_dir = Path(model_dir)
    return model_dir.with_name(model_dir.name + ".backup")


def make_deterministic(seed: int) -> None:
    """Seed Python, NumPy and the backend; with TensorFlow also make its ops deterministic.

    Op determinism costs a little speed (on GPUs mostly) and is process-wide; without it, the
    same seed can still give different weights from run to run (parallel reductions).
    """
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def _summary(model_dir: Path, metrics: dict, fingerprint: str) -> dict[str, Any]:
    return {
        "test_accuracy": metrics["test_accuracy"],
        "test_loss": metrics["test_loss"],
        "val_accuracy": metrics.get("val_accuracy"),
        "model_path": str(model_dir / MODEL_FILE),
        "metrics_path": str(model_dir / METRICS_FILE),
        "record_path": str(model_dir / RECORD_FILE),
        "dataset_fingerprint": fingerprint,
        "device": metrics["device"],
        "samples_per_second": metrics["samples_per_second"],
        "epochs_run": metrics["epochs_run"],
    }


def finished_training(model_dir: Path, parameters: dict, fingerprint: str) -> dict[str, Any] | None:
    """The summary of a finished training of these parameters on this dataset, or None if it must run."""
    model_dir = Path(model_dir)
    try:
        record = read_json(model_dir / RECORD_FILE)
        metrics = read_json(model_dir / METRICS_FILE)
    except (OSError, ValueError):
        return None
    if record.get("parameters") != parameters or record.get("dataset", {}).get("fingerprint") != fingerprint:
        return None
    if not (model_dir / MODEL_FILE).is_file():
        return None
    return _summary(model_dir, metrics, fingerprint)


def _prepare_backup(backup: Path, identity: dict, logger) -> None:
    """Keep a checkpoint only if it was made by these parameters on this dataset; start it otherwise."""
    try:
        found = read_json(backup / BACKUP_IDENTITY)
    except (OSError, ValueError):
        found = None
    if found != identity and backup.exists():
        logger.warning("Discarding the checkpoint in %s: it belongs to other parameters or data", backup)
        remove(backup)
    if found != identity:
        backup.mkdir(parents=True, exist_ok=True)
        write_json(backup / BACKUP_IDENTITY, identity)


def _check_parameters(experiment: str, epochs: int, batch_size: int) -> None:
    if experiment not in EXPERIMENTS:
        raise PipelineError(f"Unknown experiment {experiment!r}; choose one of {', '.join(EXPERIMENTS)}.")
    if epochs < 1:
        raise PipelineError(f"epochs must be at least 1; got {epochs}.")
    if batch_size < 1:
        raise PipelineError(f"batch_size must be at least 1; got {batch_size}.")


def train_model(
    split_dir: Path,
    model_dir: Path,
    *,
    experiment: str = "notmnist",
    epochs: int = 2,
    batch_size: int = 128,
    optimizer: str = "adadelta",
    learning_rate: float = 1.0,
    seed: int = 133,
    extra_callbacks: list[keras.callbacks.Callback] | None = None,
) -> dict[str, Any]:
    """Train the seed's CNN on a split folder and write model, metrics and record into `model_dir`.

    Reuses a finished `model_dir` made by the same parameters from the same dataset; resumes an
    interrupted one from its last finished epoch.

    Args:
        split_dir: folder of {train,valid,test}_{x,y}.npy and manifest.json.
        model_dir: where model.keras, metrics.json and record.json go.
        experiment: "notmnist" or "mnist" (normalisation and class names).
        epochs, batch_size, optimizer, learning_rate, seed: the seed's values by default.
        extra_callbacks: more Keras callbacks for `fit` (run after the stage's own).

    Returns:
        test_accuracy, test_loss, val_accuracy, model_path, metrics_path, record_path,
        dataset_fingerprint, device, samples_per_second, epochs_run.
    """
    _check_parameters(experiment, epochs, batch_size)
    logger = stage_logger(__name__)
    split_dir, model_dir = Path(split_dir), Path(model_dir)
    manifest = read_split_manifest(split_dir)
    fingerprint = manifest["fingerprint"]
    parameters = {
        "experiment": experiment, "epochs": epochs, "batch_size": batch_size, "optimizer": optimizer.lower(),
        "learning_rate": learning_rate, "seed": seed,
    }
    if (done := finished_training(model_dir, parameters, fingerprint)) is not None:
        logger.info("Already trained with these parameters on this dataset: %s", model_dir)
        return done

    class_names = list(EXPERIMENTS[experiment].class_names)
    make_deterministic(seed)
    batches = open_splits(
        split_dir, manifest, experiment=experiment, classes=len(class_names), batch_size=batch_size, seed=seed
    )
    train = batches["train"]
    model = build_one_layer_cnn(classes=len(class_names))
    model.compile(optimizer=make_optimizer(optimizer, learning_rate), loss=LOSS, metrics=["accuracy"])

    backup = backup_folder(model_dir)
    _prepare_backup(backup, {"parameters": parameters, "dataset_fingerprint": fingerprint}, logger)
    logger.info(
        "Training %s on %s: %s train / %s valid / %s test rows, %d epochs of %d batches",
        experiment, split_dir, f"{train.rows:,}", f"{batches['valid'].rows:,}", f"{batches['test'].rows:,}",
        epochs, len(train),
    )
    with Progress(f"train {experiment}", epochs * len(train), key=artifact_key(experiment, "training"), unit="batches") as progress:
        recorder = EpochRecorder(
            backup / BACKUP_HISTORY, logger=logger, progress=progress, epochs=epochs,
            steps_per_epoch=len(train), samples_per_epoch=train.rows,
        )
        # The checkpoint is kept after `fit` (delete_checkpoint=False) until the outputs are in place,
        # so a crash while evaluating or saving does not cost the training.
        callbacks = [ShuffleEachEpoch(train), recorder, EpochBackup(backup), BatchProgress(progress), *(extra_callbacks or [])]
        # Our progress and per-epoch log lines replace Keras' own bar, which would garble logs and TTYs alike.
        model.fit(train, validation_data=batches["valid"], epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)

    entries = recorder.completed_entries()
    if len(entries) != epochs:
        raise PipelineError(
            f"Training ended with {len(entries)} of {epochs} epochs recorded: a callback stopped it, or {backup} "
            "lost its history.json; delete that folder to train from the start."
        )
    # The epoch this call started from: 0 for a fresh run, `epochs` when an earlier run had finished them all.
    started_at = recorder.first_epoch_run if recorder.first_epoch_run is not None else epochs
    metrics = _evaluate(model, batches["test"], class_names, entries, train.rows)
    metrics.update(experiment=experiment, epochs_run=epochs - started_at, resumed_from_epoch=started_at)
    provenance_now = provenance()
    metrics["device"] = provenance_now["device"]
    record = {
        "experiment": experiment,
        "model": model.name,
        "loss": LOSS,
        "parameters": parameters,
        "dataset": {
            "fingerprint": fingerprint,
            "split_dir": str(split_dir),
            "rows": {split: item.rows for split, item in batches.items()},
        },
        **provenance_now,
        "seed_reported": SEED_REPORTED.get(experiment, {}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_path(model_dir) as temporary:
        temporary.mkdir()
        model.save(temporary / MODEL_FILE)
        write_json(temporary / METRICS_FILE, metrics)
        write_json(temporary / RECORD_FILE, record)
    remove(backup)
    logger.info(
        "%s: test accuracy %.4f (seed %s), test loss %.4f, val accuracy %.4f, on %s",
        experiment, metrics["test_accuracy"], SEED_REPORTED.get(experiment, {}).get("test_accuracy"),
        metrics["test_loss"], metrics["val_accuracy"], metrics["device"],
    )
    return _summary(model_dir, metrics, fingerprint)


def _evaluate(
    model: keras.Model, test: SplitBatches, class_names: list[str], entries: list[dict], train_rows: int
) -> dict[str, Any]:
    """Test loss and accuracy, confusion matrix, per-class accuracy, history and speed."""
    started = time.perf_counter()
    scores = model.evaluate(test, verbose=0, return_dict=True)
    predicted = np.argmax(model.predict(test, verbose=0), axis=1)
    matrix = confusion_matrix(np.asarray(test.labels), predicted, len(class_names))
    history = history_columns(entries)
    seconds = sum(history["seconds"])
    return {
        "test_loss": float(scores["loss"]),
        "test_accuracy": float(scores["accuracy"]),
        "val_loss": history.get("val_loss", [None])[-1],
        "val_accuracy": history.get("val_accuracy", [None])[-1],
        "history": history,
        "class_names": class_names,
        "per_class_accuracy": per_class_accuracy(matrix, class_names),
        "confusion_matrix": matrix.tolist(),
        "training_seconds": seconds,
        "samples_per_second": train_rows * len(entries) / seconds,
        "evaluation_seconds": time.perf_counter() - started,
    }


def _retry_unless_pipeline_error(task, task_run, state) -> bool:
    """Prefect retry condition: a crash mid-training is worth a retry (it resumes); bad input is not."""
    try:
        state.result()
    except PipelineError:
        return False
    except Exception:
        return True
    return False


@task(name="train", retries=1, retry_delay_seconds=10, retry_condition_fn=_retry_unless_pipeline_error)
def train_task(
    split_dir: Path,
    model_dir: Path,
    experiment: str = "notmnist",
    epochs: int = 2,
    batch_size: int = 128,
    optimizer: str = "adadelta",
    learning_rate: float = 1.0,
    seed: int = 133,
) -> dict[str, Any]:
    """Prefect task: `train_model`; a retry resumes from the last finished epoch."""
    return train_model(
        split_dir, model_dir, experiment=experiment, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
        learning_rate=learning_rate, seed=seed,
    )
