"""`notmnist_pipeline`: download both archives -> unpack -> a decode task per letter -> splits -> train.

The seed's values are the defaults (core/seed.py). Every data stage is cached on what determines its
output and on that output being in the data root, intact (tasks/stage.py), so a rerun, or a retry after a
failure, takes finished stages from the cache and redoes the rest: a half-downloaded archive from
its `.part`, a damaged stage from scratch, training from its last finished epoch.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from core.defaults import DEDUP, READ_TIMEOUT_SECONDS, TRAIN_TIMEOUT_SECONDS
from core.parameters import Count, Dedup, Positive, Rate, Seconds, Seed, Sha256, TaskRunner
from core.seed import (
    BATCH_SIZE,
    EPOCHS,
    LARGE_ARCHIVE,
    LARGE_BYTES,
    LEARNING_RATE,
    MIN_IMAGES_LARGE,
    MIN_IMAGES_SMALL,
    NOTMNIST_BASE_URL,
    SEED,
    SMALL_ARCHIVE,
    SMALL_BYTES,
    TEST_SIZE,
    TRAIN_SIZE,
    VALID_SIZE,
)
from flows.letters import decode_archives, letter_runner
from flows.reports import publish_letters, publish_splits
from flows.train import cancel_training_runs, pipeline_result, train_and_report
from storage.layout import archive_stem
from tasks.cancellation import cancellable
from tasks.download import download_task
from tasks.splits import check_parameters, splits_task
from tasks.stage import open_data_root
from tasks.unpack import unpack_task


def archive_url(base_url: str, name: str) -> str:
    """Where archive `name` is under `base_url` (a URL, file:// URL or folder; with or without its last slash)."""
    return base_url if base_url.endswith("/" + name) else f"{base_url.rstrip('/')}/{name}"


@flow(name="notmnist-pipeline", on_cancellation=[cancel_training_runs], on_crashed=[cancel_training_runs])
@cancellable
def notmnist_pipeline(
    base_url: str = NOTMNIST_BASE_URL,
    data_dir: str = "data",
    large_archive: str = LARGE_ARCHIVE,
    large_bytes: Count | None = LARGE_BYTES,
    large_sha256: Sha256 | None = None,
    small_archive: str = SMALL_ARCHIVE,
    small_bytes: Count | None = SMALL_BYTES,
    small_sha256: Sha256 | None = None,
    min_images_large: Count = MIN_IMAGES_LARGE,
    min_images_small: Count = MIN_IMAGES_SMALL,
    train_size: Positive = TRAIN_SIZE,
    valid_size: Positive = VALID_SIZE,
    test_size: Positive = TEST_SIZE,
    dedup: Dedup = DEDUP,
    seed: Seed = SEED,
    epochs: Positive = EPOCHS,
    batch_size: Positive = BATCH_SIZE,
    learning_rate: Rate = LEARNING_RATE,
    workers: Positive | None = None,
    task_runner: TaskRunner = "processes",
    dask_address: str | None = None,
    train_deployment: str | None = None,
    train_timeout_seconds: Seconds = TRAIN_TIMEOUT_SECONDS,
    read_timeout_seconds: Seconds = READ_TIMEOUT_SECONDS,
    scratch_dir: str | None = None,
) -> dict[str, Any]:
    """The whole notMNIST experiment; returns test accuracy and loss, model path, fingerprint and report.

    Args:
        base_url: where both archives are published (http(s), file:// or a folder).
        data_dir: the data root: a folder, or s3://bucket/prefix (endpoint and keys from the AWS_* variables).
        large_archive: the archive valid and train are drawn from.
        large_bytes: the size it must have (unset: not checked).
        large_sha256: the sha256 it must have (unset: not checked).
        small_archive: the archive test is drawn from.
        small_bytes: the size it must have (unset: not checked).
        small_sha256: the sha256 it must have (unset: not checked).
        min_images_large: fewest usable images per letter of the large archive.
        min_images_small: fewest usable images per letter of the small archive.
        train_size: training rows (size // 10 per class).
        valid_size: validation rows.
        test_size: test rows.
        dedup: none, cross-split or all: which duplicate images may repeat across or within splits.
        seed: seed of the shuffles, the weights and each epoch's order.
        epochs: training epochs.
        batch_size: training batch size.
        learning_rate: Adadelta's learning rate.
        workers: decode processes (threads with the threads task runner; the local cluster's workers with dask
            and no address); unset: one per core.
        task_runner: where the letter tasks run: processes, threads, or dask.
        dask_address: the scheduler of an existing Dask cluster (tcp://HOST:8786) for the dask task runner;
            unset: a local cluster is started for the run.
        train_deployment: send training to this deployment (e.g. train/gpu) instead of training here.
        train_timeout_seconds: how long to wait for a training sent to a deployment.
        read_timeout_seconds: a download attempt ends after this long without data; the next one resumes.
        scratch_dir: the local working copy of an s3:// data root: downloads, and every
            folder while it is written (default: under ~/.cache/notmnist).
    """
    # Split sizes the splits stage would refuse fail here, before minutes of downloading and decoding.
    check_parameters({"train": train_size, "valid": valid_size, "test": test_size}, dedup)
    root = open_data_root(data_dir, scratch_dir)  # fails here, before any download, when it cannot be written
    archives = {
        large_archive: (large_bytes, large_sha256, min_images_large),
        small_archive: (small_bytes, small_sha256, min_images_small),
    }
    downloads = {
        name: download_task.submit(
            root, archive_url(base_url, name), expected_bytes=size, sha256=sha256, read_timeout=read_timeout_seconds
        )
        for name, (size, sha256, _) in archives.items()
    }
    with letter_runner(task_runner, workers, dask_address) as runner:  # open first: its workers start during the unpack
        unpacked = {name: unpack_task.submit(root, name, wait_for=[downloads[name]]) for name in archives}
        minimums = {name: minimum for name, (_, _, minimum) in archives.items()}
        letters = decode_archives(runner, root, downloads, unpacked, minimums)
    glyphs = {
        f"{archive_stem(name)}_glyphs": publish_letters(root, name, letters[name]) for name in archives
    }
    splits = splits_task(
        root, large=large_archive, small=small_archive, train_size=train_size, valid_size=valid_size,
        test_size=test_size, seed=seed, dedup=dedup,
    )
    publish_splits(splits)
    training = dict(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    result, report = train_and_report(
        root, "notmnist", splits, training, train_deployment, train_timeout_seconds, pictures=glyphs
    )
    return pipeline_result(root, result, splits, report)
