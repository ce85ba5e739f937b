"""What produced a trained model and how it scored: versions, commit, device, and per-class results."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import keras
import numpy as np

PROJECT_FOLDER = Path(__file__).resolve().parents[1]
PROJECT_DISTRIBUTION = "notmnist-pipeline"

def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str | None]:
    """Versions of Python, the backend and the libraries that shape a result (None when not installed)."""
    backend = keras.backend.backend()
    versions = {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "keras_backend": backend,
        "numpy": np.__version__,
        "prefect": _version("prefect"),
        "project": _version(PROJECT_DISTRIBUTION),
    }
    backend_distribution = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(backend)
    if backend_distribution:
        versions[backend_distribution] = _version(backend_distribution)
    return versions


def git_commit(folder: Path = PROJECT_FOLDER) -> str | None:
    """The commit checked out in `folder`, or None (no git, not a checkout, an installed copy): never fails."""
    try:
        completed = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = completed.stdout.strip()
    return commit or None


def training_device() -> str:
    """The device the backend trains on: "GPU:0 (<name>)" when it sees a GPU, else "CPU"."""
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "unknown")
                return f"GPU:0 ({name})" + (f" of {len(gpus)} GPUs" if len(gpus) > 1 else "")
        elif backend == "jax":
            import jax

            devices = [device for device in jax.devices() if device.platform == "gpu"]
            if devices:
                return f"GPU:0 ({devices[0].device_kind})"
        elif backend == "torch":
            import torch

            if torch.cuda.is_available():
                return f"GPU:0 ({torch.cuda.get_device_name(0)})"
    except (ImportError, RuntimeError, ValueError):
        # Asking about devices must never fail a training that already ran; CPU is the honest fallback.
        return "CPU"
    return "CPU"


def machine() -> dict:
    """The host's processor count and platform, which explain the samples per second."""
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.machine()}


def confusion_matrix(true_labels: np.ndarray, predicted_labels: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) counts: row = true class, column = predicted class."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(true_labels, dtype=np.int64), np.asarray(predicted_labels, dtype=np.int64)), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray, class_names: list[str]) -> dict[str, float | None]:
    """Recall of each class (correct / rows of that class); None for a class absent from the data."""
    totals = matrix.sum(axis=1)
    return {
        name: (float(matrix[index, index] / totals[index]) if totals[index] else None)
        for index, name in enumerate(class_names)
    }


def provenance() -> dict:
    """Everything about the software and machine that a record of a result should carry."""
    return {
        "versions": package_versions(),
        "git_commit": git_commit(),
        "device": training_device(),
        "machine": machine(),
    }
