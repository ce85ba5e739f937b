"""`notmnist_pipeline`: download both archives -> extract -> shards -> splits -> train.

The seed's values are the defaults. Every data stage is cached on what determines its output, so a
rerun (or a retry after a failure) takes finished stages from the cache and resumes the rest: a
half-downloaded archive from its `.part`, training from its last finished epoch.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.reports import publish_letters, publish_splits
from flows.train import train_and_report
from storage.layout import DataRoot, archive_stem
from tasks.caching import refresh_unless
from tasks.decode import shards_are_there, shards_task
from tasks.download import download_is_there, download_task
from tasks.extract import extract_task, finished_extraction
from tasks.splits import splits_are_there, splits_task

# The archives as published (the Udacity notebook's maybe_download checks exactly these sizes).
BASE_URL = "https://commondatastorage.googleapis.com/books1000/"
LARGE_ARCHIVE, LARGE_BYTES = "notMNIST_large.tar.gz", 247_336_696
SMALL_ARCHIVE, SMALL_BYTES = "notMNIST_small.tar.gz", 8_458_043


@flow(name="notmnist-pipeline")
def notmnist_pipeline(
    base_url: str = BASE_URL,
    data_dir: str = "data",
    large_archive: str = LARGE_ARCHIVE,
    large_bytes: int | None = LARGE_BYTES,
    large_sha256: str | None = None,
    small_archive: str = SMALL_ARCHIVE,
    small_bytes: int | None = SMALL_BYTES,
    small_sha256: str | None = None,
    min_images_large: int = 45_000,
    min_images_small: int = 1_800,
    train_size: int = 200_000,
    valid_size: int = 10_000,
    test_size: int = 10_000,
    dedup: str = "cross-split",
    seed: int = 133,
    epochs: int = 2,
    batch_size: int = 128,
    learning_rate: float = 1.0,
    workers: int | None = None,
    train_deployment: str | None = None,
    train_timeout_seconds: float = 6 * 3600,
) -> dict[str, Any]:
    """The whole notMNIST experiment; returns test accuracy and loss, model path, fingerprint and report."""
    layout = DataRoot(data_dir)
    archives = {large_archive: (large_bytes, large_sha256), small_archive: (small_bytes, small_sha256)}
    downloads = {
        name: refresh_unless(download_task, download_is_there(base_url + name, layout.raw, size)).submit(
            base_url + name, layout.raw, size, sha256
        )
        for name, (size, sha256) in archives.items()
    }
    shard_dirs = {}
    for name, minimum in ((large_archive, min_images_large), (small_archive, min_images_small)):
        archive = downloads[name].result()
        top = refresh_unless(extract_task, finished_extraction(archive, layout.extracted) is not None)(
            archive, layout.extracted
        )
        shard_dirs[name] = layout.shards(name)
        manifests = refresh_unless(shards_task, shards_are_there(shard_dirs[name]))(
            top, shard_dirs[name], minimum, workers
        )
        publish_letters(archive_stem(name), manifests)

    split_parameters = dict(
        large_shards=shard_dirs[large_archive], small_shards=shard_dirs[small_archive],
        splits_root=layout.splits_root, train_size=train_size, valid_size=valid_size, test_size=test_size,
        seed=seed, dedup=dedup,
    )
    splits = refresh_unless(splits_task, splits_are_there(**split_parameters))(**split_parameters)
    publish_splits(splits)

    training = dict(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    result, report = train_and_report(layout, "notmnist", splits, training, train_deployment, train_timeout_seconds)
    return {
        "test_accuracy": result["test_accuracy"],
        "test_loss": result["test_loss"],
        "val_accuracy": result.get("val_accuracy"),
        "model_path": result["model_path"],
        "dataset_fingerprint": splits["fingerprint"],
        "report": str(report),
        "device": result.get("device"),
    }
