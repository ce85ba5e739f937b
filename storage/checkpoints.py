"""A training's checkpoint: the last finished epoch of an unfinished model, beside the model folder it will become.

    models/<key>.backup/
      run.json                    the parameters and dataset fingerprint the checkpoint belongs to
      history.json                every finished epoch's metrics, so a resumed run reports them all
      epoch-NNNN/                 the newest finished epoch: checkpoint.npz (the model's and optimizer's
                                  variables), then state.json
      tensorboard/                Keras' TensorBoard logs, moved into the model folder at the end

The folder changes in place while training runs, so it has no manifest of its own: on an object-store
data root it is published after every epoch with a manifest describing it as it is (storage/objects.py
generations), and a machine that resumes takes the data root's copy when it is further on than its own.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from storage.atomic import remove
from storage.layout import DataRoot

IDENTITY, HISTORY, TENSORBOARD = "run.json", "history.json", "tensorboard"
WEIGHTS, STATE = "checkpoint.npz", "state.json"
EPOCH_PREFIX = "epoch-"
VARIABLE_GROUPS = ("model", "optimizer")


def save_variables(path: Path, variables: dict[str, list[np.ndarray]]) -> None:
    """Each group's variables ("model", "optimizer") as arrays of one NPZ file, written with plain file writes.

    Not Keras' `.weights.h5`: HDF5 met a full disk with an OSError and then, at exit, a segmentation fault
    when its file could not be closed; a plain write fails once, with ENOSPC.
    """
    arrays = {f"{group}-{index:05d}": np.asarray(array) for group in VARIABLE_GROUPS
              for index, array in enumerate(variables[group])}
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def load_variables(path: Path) -> dict[str, list[np.ndarray]]:
    """What `save_variables` wrote; ValueError for a file that is not such a checkpoint (never unpickled)."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            names = sorted(arrays.files)
            return {group: [arrays[name] for name in names if name.startswith(f"{group}-")] for group in VARIABLE_GROUPS}
    except (zipfile.BadZipFile, EOFError, AttributeError) as error:
        raise ValueError(f"{path} is not a readable checkpoint ({error})") from error


def epoch_folder(backup: Path, epoch: int) -> Path:
    """The checkpoint of the model after `epoch` finished epochs."""
    return Path(backup) / f"{EPOCH_PREFIX}{epoch:04d}"


def epoch_folders(backup: Path) -> list[Path]:
    """Every checkpoint folder (finished or not) in `backup`, by name."""
    return sorted(Path(backup).glob(f"{EPOCH_PREFIX}*")) if Path(backup).is_dir() else []


def last_epoch(names) -> int:
    """The epoch of the newest finished checkpoint among file names relative to a backup folder (-1: none)."""
    epochs = [int(name.split("/")[0].removeprefix(EPOCH_PREFIX)) for name in names
              if name.startswith(EPOCH_PREFIX) and name.endswith("/" + STATE)]
    return max(epochs, default=-1)


def take_newer(root: DataRoot, backup: Path) -> bool:
    """Take the data root's checkpoint when it is further on than this working copy's (another machine ran more
    epochs, or this one has none); True when it did."""
    published = root.committed(backup)
    if published is None:
        return False
    local = [path.relative_to(backup).as_posix() for path in Path(backup).rglob(STATE)]
    if last_epoch(published["files"]) <= last_epoch(local):
        return False
    return root.fetch(backup)


def publish(root: DataRoot, backup: Path) -> None:
    """Publish the checkpoint as it is now, so that a retry on another machine resumes from it."""
    root.publish(backup, describe=True)


def drop(root: DataRoot, backup: Path) -> None:
    """Remove a finished training's checkpoint from the working copy and the data root."""
    remove(backup)
    root.discard(backup)
