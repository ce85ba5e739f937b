"""The training stage under JAX (what a GPU machine without TensorFlow runs), on the CPU, in a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from storage.layout import DataRoot
from storage.splits import read_splits_manifest
from tasks.batches import open_splits

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def under_jax(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("jax")
    completed = subprocess.run(
        [sys.executable, "-m", "tests.tasks.jax_training", str(workdir)], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=240,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_the_splits_pixels_live_on_the_device_and_each_batch_is_fed_as_row_numbers(under_jax):
    assert under_jax["backend"] == "jax"
    # The model `fit` runs holds the pixels of every split as one non-trainable array, then the CNN's weights.
    assert under_jax["fit_variables"] == ["device_pixels/pixels", "one_layer_cnn/convolution/kernel",
                                          "one_layer_cnn/convolution/bias", "one_layer_cnn/dense/kernel",
                                          "one_layer_cnn/dense/bias"]
    # Each epoch's batches name the rows of SplitBatches' order for (seed, epoch); valid follows train's rows.
    assert under_jax["orders_match"]
    assert under_jax["valid_first_rows"] == [under_jax["train_rows"] + i for i in range(3)]


def test_a_training_interrupted_after_an_epoch_resumes_to_the_uninterrupted_result(under_jax):
    straight, resumed = under_jax["straight"], under_jax["resumed"]
    assert straight["test_accuracy"] > 0.5  # ten classes: well above chance
    assert resumed["epochs_run"] == 1  # the first epoch came from the checkpoint, pixels not in it
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], rel=1e-5)
    assert resumed["test_accuracy"] == straight["test_accuracy"]


def test_the_saved_model_is_the_plain_cnn_and_scores_the_same_under_tensorflow(under_jax):
    """What the JAX run saved holds no device pixels and needs no JAX: this TensorFlow process scores it alike."""
    result = under_jax["straight"]
    model = keras.saving.load_model(result["model_path"])
    assert model.name == "one_layer_cnn" and len(model.get_weights()) == 4
    split_dir = DataRoot(Path(result["model_path"]).parents[2]).splits("synthetic")
    test = open_splits(split_dir, read_splits_manifest(split_dir), experiment="notmnist", batch_size=32,
                       seed=133)["test"]
    scores = model.evaluate(test.keras_input(), verbose=0, return_dict=True)
    assert scores["accuracy"] == pytest.approx(result["test_accuracy"])
    assert scores["loss"] == pytest.approx(result["test_loss"], rel=1e-4)
    assert np.isfinite(scores["loss"])
