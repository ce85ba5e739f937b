"""`mnist_pipeline`: the seed's MNIST experiment — fetch `mnist.npz`, lay it out as splits, train the CNN."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from core.defaults import READ_TIMEOUT_SECONDS, TRAIN_TIMEOUT_SECONDS
from core.parameters import Count, Positive, Rate, Seconds, Seed, Sha256
from core.seed import BATCH_SIZE, EPOCHS, LEARNING_RATE, MNIST_BYTES, MNIST_SHA256, MNIST_URL, SEED
from flows.train import cancel_training_runs, pipeline_result, train_and_report
from tasks.cancellation import cancellable
from tasks.download import download_task
from tasks.mnist import mnist_splits_task
from tasks.stage import open_data_root


@flow(name="mnist-pipeline", on_cancellation=[cancel_training_runs], on_crashed=[cancel_training_runs])
@cancellable
def mnist_pipeline(
    data_dir: str = "data",
    url: str = MNIST_URL,
    expected_bytes: Count | None = MNIST_BYTES,
    sha256: Sha256 | None = MNIST_SHA256,
    epochs: Positive = EPOCHS,
    batch_size: Positive = BATCH_SIZE,
    learning_rate: Rate = LEARNING_RATE,
    seed: Seed = SEED,
    train_deployment: str | None = None,
    train_timeout_seconds: Seconds = TRAIN_TIMEOUT_SECONDS,
    read_timeout_seconds: Seconds = READ_TIMEOUT_SECONDS,
    scratch_dir: str | None = None,
) -> dict[str, Any]:
    """MNIST with the seed's CNN (Adadelta lr 1.0, batch 128, 2 epochs); returns test accuracy, paths, report.

    Args:
        data_dir: the data root: a folder, or s3://bucket/prefix (endpoint and keys from the AWS_* variables).
        url: where mnist.npz is (http(s), file:// or a path).
        expected_bytes: the size it must have (unset: not checked).
        sha256: the sha256 it must have (unset: not checked).
        epochs: training epochs.
        batch_size: training batch size.
        learning_rate: Adadelta's learning rate.
        seed: seed of the weights and of each epoch's shuffle.
        train_deployment: send training to this deployment (e.g. train/gpu) instead of training here.
        train_timeout_seconds: how long to wait for a training sent to a deployment.
        read_timeout_seconds: a download attempt ends after this long without data; the next one resumes.
        scratch_dir: the local working copy of an s3:// data root (default: under ~/.cache/notmnist).
    """
    root = open_data_root(data_dir, scratch_dir)  # fails here, before the download, when it cannot be written
    npz = download_task(root, url, expected_bytes=expected_bytes, sha256=sha256, read_timeout=read_timeout_seconds)
    splits = mnist_splits_task(root, Path(npz["file"]).name)
    training = dict(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    result, report = train_and_report(root, "mnist", splits, training, train_deployment, train_timeout_seconds)
    return pipeline_result(root, result, splits, report)
