"""Keras callbacks of the training stage: each epoch's metrics to the log, the progress bar and disk."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from storage.atomic import atomic_path, is_temporary, read_json, remove, remove_leftovers, write_json
from storage.checkpoints import STATE, WEIGHTS, epoch_folder, epoch_folders, load_variables, save_variables
from tasks.cancellation import raise_if_interrupt_lost
from tasks.reporting import Progress


def load_history(path: Path) -> list[dict]:
    """Per-epoch entries saved by an earlier, interrupted run (empty when there are none)."""
    try:
        entries = read_json(path)
    except (OSError, ValueError):
        return []
    return entries if isinstance(entries, list) else []


def history_columns(entries: list[dict]) -> dict[str, list[float]]:
    """Entries (one dict per epoch) as columns (one list per measure), in epoch order."""
    names = [name for name in entries[0] if name != "epoch"] if entries else []
    return {name: [entry.get(name) for entry in entries] for name in names}


class BatchProgress(keras.callbacks.Callback):
    """Advances a `Progress` by one for every training batch.

    With `steps_per_execution` > 1, Keras calls the hook once per group of batches, with the index
    of the group's last batch: the progress advances by the batches done since the last call.

    On backends that run batch hooks in a thread pool (JAX, PyTorch; not TensorFlow), an unmarked
    batch hook makes Keras wait for each step's results before starting the next; marked
    `async_safe`, the hooks may overlap, hence the lock.
    """

    async_safe = True

    def __init__(self, progress: Progress):
        super().__init__()
        self.progress = progress
        self._lock = threading.Lock()
        self._next_batch = 0  # of the current epoch

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._next_batch = 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if steps := (self.params or {}).get("steps"):
            batch = min(batch, steps - 1)  # a last, shorter group is reported as a whole one
        with self._lock:
            done, self._next_batch = batch + 1 - self._next_batch, max(self._next_batch, batch + 1)
            if done > 0:
                self.progress.advance(done)


class LostInterruptRaised(keras.callbacks.Callback):
    """Ends `fit`, `evaluate` or `predict` with a KeyboardInterrupt (a cancel or Ctrl-C, tasks/cancellation.py)
    that the code it landed in swallowed. Keras, tracing a model's first step, builds ops inside bare `except:`
    clauses: a run cancelled in that second would otherwise train on to its last epoch.

    `async_safe`: where Keras runs batch hooks in a thread (JAX, PyTorch), it raises the hook's exception in the
    main thread at its next hook.
    """

    async_safe = True

    def _check(self, step: int, logs: dict | None = None) -> None:
        raise_if_interrupt_lost()

    on_train_batch_end = on_test_batch_end = on_predict_batch_end = on_epoch_end = _check


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the model and optimizer after every epoch, atomically, and restores the newest readable one.

    Each checkpoint is a folder `epoch-NNNN/` (weights, then the epoch it ends) written under a
    temporary name and renamed into place, so a kill -9 while saving leaves no checkpoint that looks
    complete. On `fit`, checkpoints are tried newest first; one that cannot be read (damaged by an
    earlier crash, or from another Keras) is discarded with a warning, and training continues from
    the next readable one, or from scratch. Keras' `BackupAndRestore` writes in place, so one crash
    mid-save made every retry fail. `async_safe`: it does nothing per batch.
    """

    async_safe = True
    WEIGHTS, STATE = WEIGHTS, STATE

    def __init__(
        self, backup_dir: Path, *, logger: logging.Logger | logging.LoggerAdapter, saved: Callable[[], None] | None = None
    ):
        super().__init__()
        self.backup_dir = Path(backup_dir)
        self.logger = logger
        self.saved = saved  # called after each checkpoint is in place (e.g. to publish it)

    def checkpoints(self) -> list[Path]:
        """The finished checkpoints, newest first."""
        return sorted((path for path in epoch_folders(self.backup_dir) if not is_temporary(path)), reverse=True)

    def on_train_begin(self, logs: dict | None = None) -> None:
        remove_leftovers(self.backup_dir)  # checkpoints a killed run was writing; this run holds the lock
        for checkpoint in self.checkpoints():
            try:
                epoch = int(read_json(checkpoint / self.STATE)["epoch"])
                self._restore(load_variables(checkpoint / self.WEIGHTS))
            except (OSError, ValueError, KeyError, TypeError) as error:
                self.logger.warning("Discarding the unreadable checkpoint %s (%s)", checkpoint, error)
                remove(checkpoint)
                continue
            self.model._initial_epoch = epoch  # how Keras' own BackupAndRestore resumes `fit`
            return

    def _variables(self) -> dict[str, list]:
        """The model's variables and its optimizer's, in the order they are saved and restored. A model fed on the
        device (tasks.batches.DeviceSplits) saves those of the model it trains, without the device's pixels."""
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)  # its variables must exist to be restored
        trained = getattr(self.model, "trained", self.model)
        return {"model": list(trained.variables), "optimizer": list(optimizer.variables) if optimizer else []}

    def _restore(self, saved: dict[str, list[np.ndarray]]) -> None:
        """Assign a checkpoint's arrays; ValueError (nothing assigned) when they do not fit this model."""
        variables = self._variables()
        for group, values in variables.items():
            shapes = [tuple(variable.shape) for variable in values]
            if shapes != [array.shape for array in saved[group]]:
                raise ValueError(f"its {group} variables do not fit this model ({len(saved[group])} arrays "
                                 f"for {len(values)} variables)")
        for group, values in variables.items():
            for variable, array in zip(values, saved[group]):
                variable.assign(array)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        with atomic_path(epoch_folder(self.backup_dir, epoch + 1)) as temporary:
            temporary.mkdir()
            save_variables(temporary / self.WEIGHTS, {group: [variable.numpy() for variable in values]
                                                      for group, values in self._variables().items()})
            write_json(temporary / self.STATE, {"epoch": epoch + 1})
        for older in self.checkpoints()[1:]:
            remove(older)
        if self.saved is not None:
            self.saved()


class EpochRecorder(keras.callbacks.Callback):
    """Logs each epoch's metrics, restarts the progress where a resumed run begins, keeps the history on disk.

    The history file lives beside the backup checkpoint, so a resumed run reports every epoch, not
    only those it ran itself. Place it before `EpochCheckpoint`: the history is written first, and
    an entry for an epoch whose checkpoint never landed is dropped when that epoch runs again.
    """

    def __init__(
        self, history_path: Path, *, logger: logging.Logger | logging.LoggerAdapter, progress: Progress,
        epochs: int, steps_per_epoch: int, samples_per_epoch: int,
    ):
        super().__init__()
        self.history_path = Path(history_path)
        self.logger = logger
        self.progress = progress
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.samples_per_epoch = samples_per_epoch
        self.entries = load_history(self.history_path)
        self.first_epoch_run: int | None = None
        self._epoch_started = self._epoch_cpu_started = 0.0
        self._training_seconds: float | None = None
        self._training_cpu_seconds = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self.first_epoch_run is None:
            self.first_epoch_run = epoch
            self.entries = [entry for entry in self.entries if entry["epoch"] < epoch]
            if epoch:
                self.logger.info("Resuming from the checkpoint after epoch %d of %d", epoch, self.epochs)
            self.progress.reset(epoch * self.steps_per_epoch)
        self._training_seconds = None
        self._epoch_started, self._epoch_cpu_started = time.perf_counter(), time.process_time()

    def on_test_begin(self, logs: dict | None = None) -> None:
        # Validation runs inside the epoch; samples per second counts the training steps alone.
        if self._training_seconds is None:
            self._training_seconds = time.perf_counter() - self._epoch_started
            self._training_cpu_seconds = time.process_time() - self._epoch_cpu_started

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._training_seconds is None:  # no validation data
            self.on_test_begin()
        seconds = self._training_seconds
        measures = {name: float(value) for name, value in sorted((logs or {}).items())}
        entry = {
            "epoch": epoch, **measures, "seconds": seconds, "samples_per_second": self.samples_per_epoch / seconds,
            # The process's CPU time over the same steps (every thread): less disturbed by other jobs than seconds.
            "cpu_seconds": self._training_cpu_seconds,
        }
        self.entries = [e for e in self.entries if e["epoch"] < epoch] + [entry]
        write_json(self.history_path, self.entries)
        self.logger.info(
            "Epoch %d/%d: %s (%.1f s, %.0f samples/s)", epoch + 1, self.epochs,
            ", ".join(f"{name} {value:.4f}" for name, value in measures.items()), seconds, entry["samples_per_second"],
        )

    def completed_entries(self) -> list[dict]:
        """The history of epochs 0..epochs-1, whether run now or before an interruption."""
        return [entry for entry in self.entries if entry["epoch"] < self.epochs]
