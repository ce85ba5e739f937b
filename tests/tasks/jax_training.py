"""The training stage under JAX, in a process of its own (Keras' backend is chosen once per process).

    KERAS_BACKEND=jax python -m tests.tasks.jax_training WORKDIR

Trains the synthetic split folder twice, once straight through and once interrupted after its first epoch
and resumed, records the rows each training batch of the device input names, and prints one JSON object.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import keras
import numpy as np

from storage.layout import DataRoot
from storage.splits import read_splits_manifest
from tasks.batches import DeviceSplits, batch_order, open_splits
from tasks.train import train_model
from tests.tasks.synthetic_splits import write_split_folder

FAST = {"epochs": 2, "batch_size": 32}


class Interrupted(Exception):
    pass


class InterruptAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise Interrupted


class FitVariables(keras.callbacks.Callback):
    """The paths of the variables of the model `fit` runs, seen from inside `fit`."""

    def on_train_begin(self, logs=None):
        self.variables = [variable.path for variable in self.model.variables]


def main(workdir: Path) -> None:
    straight, resumed = workdir / "straight", workdir / "resumed"
    for root in (straight, resumed):
        write_split_folder(root)
    seen = FitVariables()
    result = train_model(straight, "synthetic", **FAST, extra_callbacks=[seen])
    try:
        train_model(resumed, "synthetic", **FAST, extra_callbacks=[InterruptAfterFirstEpoch()])
    except Interrupted:
        pass
    again = train_model(resumed, "synthetic", **FAST)

    split_dir = DataRoot(straight).splits("synthetic")
    batches = open_splits(split_dir, read_splits_manifest(split_dir), experiment="notmnist", batch_size=32, seed=133)
    device, train = DeviceSplits(batches), batches["train"]
    feed, orders_match = device.keras_input("train"), True
    for epoch in (0, 1, 5):
        train.set_epoch(epoch)
        fed = np.concatenate([feed[i][0] for i in range(len(feed))])
        orders_match &= bool(np.array_equal(fed, batch_order(train.rows, 32, 133, epoch)))
    valid_rows = device.keras_input("valid")[0][0]
    print(json.dumps({
        "backend": keras.backend.backend(), "straight": result, "resumed": again,
        "fit_variables": seen.variables, "orders_match": orders_match,
        "valid_first_rows": valid_rows[:3].tolist(), "train_rows": train.rows,
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
