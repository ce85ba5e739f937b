"""Training stage: the seed's CNN on a split folder, deterministic, resumable, recorded.

It reads a split folder of the data root (storage/splits.py; every file checked against its digest
before training starts) and writes a model folder (storage/models.py) whole or not at all. While it
trains, the last finished epoch's checkpoint and history live in the model's backup folder
(storage.layout.backup_folder), so a killed or retried run continues from there; one training at a
time holds that folder's lock.
"""

from __future__ import annotations

import math
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
from filelock import FileLock

from core.errors import PipelineError
from core.seed import BATCH_SIZE, EPOCHS, LEARNING_RATE, NORMALISATIONS, SEED, reported
from storage import checkpoints
from storage.atomic import read_json, remove, remove_temporaries_of, write_json
from storage.layout import DataRoot, backup_folder, lock_file
from storage.models import METRICS_FILE, MODEL_FILE, RECORD_FILE, find_model, model_writer
from storage.splits import read_splits_manifest
from tasks.batches import ShuffleEachEpoch, SplitBatches, open_splits, read_failures_raised, training_input
from tasks.models import build_one_layer_cnn, make_optimizer
from tasks.reporting import Progress, artifact_key, stage_logger
from tasks.stage import retry_unless_pipeline_error, stage_task
from tasks.trained import OPTIMIZER, TRAIN_STAGE, best_effort, model_folder, model_parameters, summary
from tasks.training_callbacks import BatchProgress, EpochCheckpoint, EpochRecorder, LostInterruptRaised, history_columns
from tasks.training_record import confusion_matrix, per_class_accuracy, provenance

LOSS = "categorical_crossentropy"  # the seed's, on one-hot labels
MISCLASSIFIED_KEPT = 24
# Batches per call into the compiled training step: Keras' per-batch work in Python (dispatch,
# callbacks, logs) is then paid once per 16 batches, which on CPU made up a tenth of the step time.
STEPS_PER_EXECUTION = 16


def make_deterministic(seed: int) -> None:
    """Seed Python, NumPy and the backend; with TensorFlow also make its ops deterministic.

    Op determinism costs a little speed (on GPUs mostly) and is process-wide; without it, the
    same seed can still give different weights from run to run (parallel reductions).
    """
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def _prepare_backup(backup: Path, identity: dict, logger) -> None:
    """Keep a checkpoint only if it was made by these parameters on this dataset; start it otherwise."""
    try:
        found = read_json(backup / checkpoints.IDENTITY)
    except (OSError, ValueError):
        found = None
    if found != identity and backup.exists():
        logger.warning("Discarding the checkpoint in %s: it belongs to other parameters or data", backup)
        remove(backup)
    if found != identity:
        backup.mkdir(parents=True, exist_ok=True)
        write_json(backup / checkpoints.IDENTITY, identity)


def _check_parameters(experiment: str, epochs: int, batch_size: int) -> None:
    if experiment not in NORMALISATIONS:
        raise PipelineError(f"Unknown experiment {experiment!r}; choose one of {', '.join(NORMALISATIONS)}.")
    if epochs < 1:
        raise PipelineError(f"epochs must be at least 1; got {epochs}.")
    if batch_size < 1:
        raise PipelineError(f"batch_size must be at least 1; got {batch_size}.")


def train_model(
    root: DataRoot | Path | str,
    splits: str,
    *,
    experiment: str = "notmnist",
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    seed: int = SEED,
    extra_callbacks: list[keras.callbacks.Callback] | None = None,
) -> dict[str, Any]:
    """Train the seed's CNN on a split folder and write the model folder it determines.

    Reuses an intact model folder made by the same parameters from the same dataset; resumes an
    interrupted training from its last finished epoch. With an object-store data root (through
    `train_task`, the stage boundary), the splits are fetched first, each epoch's checkpoint is
    published so that a retry on another machine resumes it, and the model folder is published whole.

    Args:
        root: the data root (a DataRoot, a folder, or s3://bucket/prefix).
        splits: the split folder's name under splits/ (its manifest's `key`).
        experiment: "notmnist" or "mnist" (the normalisation; class names come from the splits).
        epochs, batch_size, learning_rate, seed: the seed's values by default (Adadelta).
        extra_callbacks: more Keras callbacks for `fit` (run after the stage's own).

    Returns:
        test_accuracy, test_loss, val_accuracy, model (relative to the data root), model_path,
        metrics_path, record_path, dataset_fingerprint, device, samples_per_second, epochs_run.
    """
    _check_parameters(experiment, epochs, batch_size)
    layout, logger = DataRoot.of(root), stage_logger(__name__)
    split_dir = layout.splits(splits)
    manifest = read_splits_manifest(split_dir)
    fingerprint = manifest["fingerprint"]
    training = {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed}
    parameters = model_parameters(experiment, training)
    (model_dir,) = model_folder(layout, {"splits": splits, "experiment": experiment, **training}, local=True)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    backup = backup_folder(model_dir)
    # Two pipelines on one data root may ask for the same model: one trains, the other then finds it.
    with FileLock(str(lock_file(backup))):
        if (found := find_model(model_dir, parameters, fingerprint)) is not None:
            logger.info("Already trained with these parameters on this dataset: %s", layout.url(model_dir))
            return summary(layout, model_dir, found[1], fingerprint)
        remove_temporaries_of(model_dir)  # a model folder a killed run was writing
        make_deterministic(seed)
        batches = open_splits(split_dir, manifest, experiment=experiment, batch_size=batch_size, seed=seed)
        model = build_one_layer_cnn(classes=len(manifest["class_names"]), seed=seed)
        trainer, inputs = training_input(model, batches)  # `model` itself, or fed on the device (JAX)
        optimizer = make_optimizer(OPTIMIZER, learning_rate)
        for compiled in [model] if trainer is model else [model, trainer]:  # the model saved is compiled too
            compiled.compile(optimizer=optimizer, loss=LOSS, metrics=["accuracy"], steps_per_execution=STEPS_PER_EXECUTION)
        if best_effort(lambda: checkpoints.take_newer(layout, backup), f"read {layout.url(backup)}", logger):
            logger.info("Resuming from the checkpoint in %s", layout.url(backup))
        _prepare_backup(backup, {"parameters": parameters, "dataset_fingerprint": fingerprint}, logger)
        with read_failures_raised(batches):
            entries, started_at = _fit(trainer, batches, inputs, layout, backup, experiment, epochs, extra_callbacks,
                                       logger)
            metrics = _evaluate(trainer, inputs["test"], batches["test"], manifest["class_names"], entries,
                                batches["train"].rows)
        metrics.update(experiment=experiment, epochs_run=epochs - started_at, resumed_from_epoch=started_at)
        record = _record(model, parameters, manifest, layout.relative(split_dir), batches)
        metrics["device"] = record["device"]
        with model_writer(model_dir) as writer:
            model.save(writer.work / MODEL_FILE)
            write_json(writer.work / METRICS_FILE, metrics)
            write_json(writer.work / RECORD_FILE, record)
            if (backup / checkpoints.TENSORBOARD).is_dir():
                shutil.copytree(backup / checkpoints.TENSORBOARD, writer.work / checkpoints.TENSORBOARD)
            writer.commit(experiment=experiment, dataset_fingerprint=fingerprint)
        remove(backup)  # the data root's copy goes once the model is published there (TRAIN_STAGE)
    logger.info(
        "%s: test accuracy %.4f (seed %s), test loss %.4f, val accuracy %.4f, on %s",
        experiment, metrics["test_accuracy"], reported(experiment).get("test_accuracy"),
        metrics["test_loss"], metrics["val_accuracy"], metrics["device"],
    )
    return summary(layout, model_dir, metrics, fingerprint)


def _fit(
    model: keras.Model, batches: dict[str, SplitBatches], inputs: dict[str, Any], layout: DataRoot, backup: Path,
    experiment: str, epochs: int, extra_callbacks: list[keras.callbacks.Callback] | None, logger,
) -> tuple[list[dict], int]:
    """Fit from the last checkpoint in `backup` (if any) on `inputs` (`training_input`'s); returns every epoch's
    history and the epoch started from."""
    train = batches["train"]
    logger.info(
        "Training %s: %s train / %s valid / %s test rows, %d epochs of %d batches",
        experiment, f"{train.rows:,}", f"{batches['valid'].rows:,}", f"{batches['test'].rows:,}", epochs, len(train),
    )
    key = artifact_key(experiment, "training")
    with Progress(f"train {experiment}", epochs * len(train), key=key, unit="batches") as progress:
        recorder = EpochRecorder(
            backup / checkpoints.HISTORY, logger=logger, progress=progress, epochs=epochs,
            steps_per_epoch=len(train), samples_per_epoch=train.rows,
        )
        # The checkpoint stays after `fit` until the outputs are in place, so a crash while evaluating
        # or saving does not cost the training.
        # Published after each epoch, so that a retry on another machine resumes; when the store cannot take
        # it, training goes on (a retry here still resumes from the local checkpoint).
        checkpoint = EpochCheckpoint(backup, logger=logger, saved=lambda: best_effort(
            lambda: checkpoints.publish(layout, backup), f"publish the checkpoint to {layout.url(backup)}", logger,
        ))
        callbacks = [ShuffleEachEpoch(train), recorder, checkpoint, BatchProgress(progress), *_tensorboard(backup),
                     LostInterruptRaised()]
        # Our progress and per-epoch log lines replace Keras' own bar, which would garble logs and TTYs alike.
        model.fit(
            inputs["train"], validation_data=inputs["valid"], epochs=epochs, shuffle=False, verbose=0,
            callbacks=callbacks + list(extra_callbacks or []),
        )
    entries = recorder.completed_entries()
    if diverged := [entry["epoch"] + 1 for entry in entries if not math.isfinite(entry.get("loss", 0.0))]:
        # Resuming from diverged weights would only diverge again.
        best_effort(lambda: checkpoints.drop(layout, backup), f"remove {layout.url(backup)}", logger)
        raise PipelineError(
            f"The training loss became {entries[diverged[0] - 1]['loss']} in epoch {diverged[0]}: the model "
            "diverged. Train again with a lower learning rate."
        )
    if len(entries) != epochs:
        raise PipelineError(
            f"Training ended with {len(entries)} of {epochs} epochs recorded: a callback stopped it, or "
            f"{layout.url(backup)} lost its history.json; delete that folder to train from the start."
        )
    # The epoch this call started from: 0 for a fresh run, `epochs` when an earlier run had finished them all.
    return entries, recorder.first_epoch_run if recorder.first_epoch_run is not None else epochs


def _tensorboard(backup: Path) -> list[keras.callbacks.Callback]:
    """Keras' TensorBoard callback (it writes through TensorFlow's summaries), where TensorFlow is the backend."""
    if keras.backend.backend() != "tensorflow":
        return []
    return [keras.callbacks.TensorBoard(log_dir=str(backup / checkpoints.TENSORBOARD), write_graph=False)]


def _record(
    model: keras.Model, parameters: dict, manifest: dict, split_dir: str, batches: dict[str, SplitBatches]
) -> dict[str, Any]:
    """What produced the model: parameters, the dataset (relative to the data root), software and machine."""
    return {
        "experiment": parameters["experiment"],
        "model": model.name,
        "loss": LOSS,
        "parameters": parameters,
        "dataset": {
            "fingerprint": manifest["fingerprint"],
            "splits": split_dir,
            "rows": {split: item.rows for split, item in batches.items()},
        },
        **provenance(),
        "seed_reported": reported(parameters["experiment"]),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _evaluate(
    model: keras.Model, feed, test: SplitBatches, class_names: list[str], entries: list[dict], train_rows: int
) -> dict[str, Any]:
    """Test loss and accuracy, confusion matrix, per-class accuracy, history and speed, of `model` reading `feed`."""
    started = time.perf_counter()
    scores = model.evaluate(feed, verbose=0, return_dict=True, callbacks=[LostInterruptRaised()])
    predicted = np.argmax(model.predict(feed, verbose=0, callbacks=[LostInterruptRaised()]), axis=1)
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
        # The first test rows the model got wrong, for the pictures (row of the test split, true, predicted).
        "misclassified": [
            {"row": int(row), "true": class_names[test.labels[row]], "predicted": class_names[predicted[row]]}
            for row in np.flatnonzero(predicted != np.asarray(test.labels))[:MISCLASSIFIED_KEPT]
        ],
        "training_seconds": seconds,
        "samples_per_second": train_rows * len(entries) / seconds,
        "evaluation_seconds": time.perf_counter() - started,
    }


train_task = stage_task(
    train_model, stage=TRAIN_STAGE, name="train", task_run_name="train {experiment}", cached=False, stops=True, retries=1,
    retry_delay_seconds=10, retry_condition_fn=retry_unless_pipeline_error,
)
