"""`mnist_pipeline`: the seed's MNIST experiment — fetch `mnist.npz`, convert it to splits, train the CNN."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.train import train_and_report
from storage.digests import sha256_of
from storage.layout import DataRoot
from tasks.caching import refresh_unless
from tasks.download import download_is_there, download_task
from tasks.mnist import MNIST_BYTES, MNIST_SHA256, MNIST_URL, mnist_splits_task


@flow(name="mnist-pipeline")
def mnist_pipeline(
    data_dir: str = "data",
    url: str = MNIST_URL,
    expected_bytes: int | None = MNIST_BYTES,
    sha256: str | None = MNIST_SHA256,
    epochs: int = 2,
    batch_size: int = 128,
    learning_rate: float = 1.0,
    seed: int = 133,
    train_deployment: str | None = None,
    train_timeout_seconds: float = 3600,
) -> dict[str, Any]:
    """MNIST with the seed's CNN (Adadelta lr 1.0, batch 128, 2 epochs); returns test accuracy, paths, report."""
    layout = DataRoot(data_dir)
    npz = refresh_unless(download_task, download_is_there(url, layout.raw, expected_bytes))(
        url, layout.raw, expected_bytes, sha256
    )
    splits = mnist_splits_task(npz, layout.splits(f"mnist-{(sha256 or sha256_of(npz))[:12]}"))
    training = dict(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    result, report = train_and_report(layout, "mnist", splits, training, train_deployment, train_timeout_seconds)
    return {
        "test_accuracy": result["test_accuracy"],
        "test_loss": result["test_loss"],
        "model_path": result["model_path"],
        "dataset_fingerprint": splits["fingerprint"],
        "report": str(report),
        "device": result.get("device"),
    }
