"""A training's checkpoint: the last finished epoch of an unfinished model, beside the model folder it will become.

    models/<key>.backup/
      run.json                    the parameters and dataset fingerprint the checkpoint belongs to
      history.json                every finished epoch's metrics, so a resumed run reports them all
      epoch-NNNN/                 the newest finished epoch: checkpoint.weights.h5, then state.json
      tensorboard/                Keras' TensorBoard logs, moved into the model folder at the end

The folder changes in place while training runs, so it has no manifest of its own: on an object-store
data root it is published after every epoch with a manifest describing it as it is (storage/objects.py
generations), and a machine that resumes takes the data root's copy when it is further on than its own.
"""

from __future__ import annotations

from pathlib import Path

from storage.atomic import remove
from storage.layout import DataRoot

IDENTITY, HISTORY, TENSORBOARD = "run.json", "history.json", "tensorboard"
WEIGHTS, STATE = "checkpoint.weights.h5", "state.json"
EPOCH_PREFIX = "epoch-"


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
