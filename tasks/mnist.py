"""MNIST, the seed's second experiment: fetch `mnist.npz`, check it, and lay it out as a split folder.

The seed called `keras.datasets.mnist.load_data()`, which downloads the same file and unpickles
nothing but trusts everything. Here the file is verified by size and sha256, opened without pickle,
and every array is checked before a byte of it is used. The split folder has the notMNIST format,
so the same trainer runs on it: train = x_train (60,000), valid = test = x_test (10,000), since
the seed passed `validation_data=(X_test, Y_test)` and then evaluated on the same arrays.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from storage.arrays import IMAGE_SHAPE, array_digest, load_npy, save_npy
from storage.atomic import atomic_path, read_json, write_json
from storage.digests import dataset_fingerprint, sha256_of
from storage.layout import DataRoot
from tasks.download import download_file
from tasks.errors import PipelineError
from tasks.reporting import stage_logger
from tasks.splits import SPLIT_FORMAT, SPLITS
from tasks.train import train_model

# Keras' own MNIST source (keras.datasets.mnist.load_data); size and sha256 of that file as Keras checks it.
MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
MNIST_BYTES = 11_490_434
MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
# The arrays mnist.npz holds and their shapes (LeCun et al.: 60,000 training and 10,000 test digits).
MNIST_SHAPES = {
    "x_train": (60_000, *IMAGE_SHAPE),
    "y_train": (60_000,),
    "x_test": (10_000, *IMAGE_SHAPE),
    "y_test": (10_000,),
}
CLASSES = 10
# Which array of mnist.npz becomes which split of the folder.
SPLIT_SOURCES = {"train": ("x_train", "y_train"), "valid": ("x_test", "y_test"), "test": ("x_test", "y_test")}


def fetch_mnist(
    dest_dir: Path, *, url: str = MNIST_URL, expected_bytes: int | None = MNIST_BYTES, sha256: str | None = MNIST_SHA256
) -> Path:
    """Download (or find) mnist.npz in `dest_dir`, verified; a wrong size or hash raises VerificationError."""
    return download_file(url, dest_dir, expected_bytes=expected_bytes, sha256=sha256)


def load_mnist(path: Path, shapes: dict[str, tuple[int, ...]] = MNIST_SHAPES) -> dict[str, np.ndarray]:
    """The arrays of an MNIST .npz, each checked for presence, shape, dtype and label range; never unpickled.

    Args:
        path: the .npz file.
        shapes: array name -> expected shape; names starting with "x" must be uint8 images,
            names starting with "y" integer labels in 0..9.
    """
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise PipelineError(f"{path} is not a readable .npz archive ({error}); delete it and rerun to fetch it again.") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise PipelineError(f"{path} holds a single array, not the .npz archive of {', '.join(shapes)}.")
    with archive:
        missing = [name for name in shapes if name not in archive.files]
        if missing:
            raise PipelineError(
                f"{path} lacks {', '.join(missing)} (it holds {', '.join(archive.files) or 'nothing'}); "
                "it is not Keras' mnist.npz."
            )
        arrays = {name: _read_member(archive, path, name) for name in shapes}
    for name, expected in shapes.items():
        array = arrays[name]
        if array.shape != tuple(expected):
            raise PipelineError(f"{path}: {name} has shape {array.shape}, expected {tuple(expected)}.")
        if name.startswith("x") and array.dtype != np.uint8:
            raise PipelineError(f"{path}: {name} holds {array.dtype}, expected uint8 pixels.")
        if name.startswith("y"):
            if not np.issubdtype(array.dtype, np.integer):
                raise PipelineError(f"{path}: {name} holds {array.dtype}, expected integer labels.")
            if array.size and (array.min() < 0 or array.max() >= CLASSES):
                raise PipelineError(f"{path}: {name} has labels {array.min()}..{array.max()}, expected 0..{CLASSES - 1}.")
    return arrays


def _read_member(archive: np.lib.npyio.NpzFile, path: Path, name: str) -> np.ndarray:
    try:
        return archive[name]
    except ValueError as error:
        if "pickle" in str(error) or "object" in str(error):
            raise PipelineError(
                f"{path}: {name} holds pickled Python objects; refusing to load it (unpickling runs code)."
            ) from error
        raise PipelineError(f"{path}: {name} cannot be read ({error}).") from error
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise PipelineError(f"{path}: {name} is damaged ({error}); delete the file and rerun.") from error


def _existing_splits(folder: Path, source_sha256: str) -> dict | None:
    """The manifest of a finished MNIST split folder made from this very file, else None."""
    try:
        manifest = read_json(folder / "manifest.json")
        if manifest.get("format") != SPLIT_FORMAT or manifest["inputs"]["mnist.npz"]["sha256"] != source_sha256:
            return None
        for split in SPLITS:
            rows = manifest["splits"][split]["rows"]
            if load_npy(folder / f"{split}_x.npy").shape != (rows, *IMAGE_SHAPE):
                return None
            if load_npy(folder / f"{split}_y.npy").shape != (rows,):
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def build_mnist_splits(npz_path: Path, folder: Path, *, shapes: dict[str, tuple[int, ...]] = MNIST_SHAPES) -> dict:
    """Write (or find) the split folder of an MNIST .npz; returns its manifest (with a fingerprint)."""
    logger = stage_logger(__name__)
    npz_path, folder = Path(npz_path), Path(folder)
    source_sha256 = sha256_of(npz_path)
    if (manifest := _existing_splits(folder, source_sha256)) is not None:
        logger.info("MNIST splits already built from this file: %s", folder)
        return manifest
    arrays = load_mnist(npz_path, shapes)
    written = {}
    with atomic_path(folder) as temporary:
        temporary.mkdir()
        for split, (x_name, y_name) in SPLIT_SOURCES.items():
            images, labels = arrays[x_name], arrays[y_name].astype(np.int64)
            save_npy(temporary / f"{split}_x.npy", images)
            save_npy(temporary / f"{split}_y.npy", labels)
            names = np.array([f"{x_name}/{index:05d}".encode() for index in range(len(labels))])
            save_npy(temporary / f"{split}_file.npy", names)
            counts = np.bincount(labels, minlength=CLASSES)
            written[split] = {
                "rows": int(len(labels)),
                "per_class": {str(digit): int(count) for digit, count in enumerate(counts)},
                "x_sha256": array_digest(images),
                "y_sha256": array_digest(labels),
            }
        fingerprint = dataset_fingerprint({split: written[split] for split in SPLITS})
        manifest = {
            "format": SPLIT_FORMAT,
            "folder": str(folder),
            "fingerprint": fingerprint,
            "seed": None,
            "dedup": "none",
            "splits": written,
            "sources": {split: list(names) for split, names in SPLIT_SOURCES.items()},
            "inputs": {"mnist.npz": {"path": str(npz_path), "sha256": source_sha256}},
        }
        write_json(temporary / "manifest.json", manifest)
    logger.info("MNIST splits in %s: train %s, valid = test %s rows", folder, f"{written['train']['rows']:,}",
                f"{written['test']['rows']:,}")
    return manifest


def run_mnist(
    data_root: Path,
    *,
    url: str = MNIST_URL,
    epochs: int = 2,
    batch_size: int = 128,
    learning_rate: float = 1.0,
    seed: int = 133,
    expected_bytes: int | None = MNIST_BYTES,
    sha256: str | None = MNIST_SHA256,
    shapes: dict[str, tuple[int, ...]] = MNIST_SHAPES,
) -> dict[str, Any]:
    """The seed's MNIST experiment end to end: fetch, check and convert mnist.npz, then train the CNN.

    Returns `train_model`'s summary plus the split folder.
    """
    layout = DataRoot(Path(data_root))
    npz_path = fetch_mnist(layout.raw, url=url, expected_bytes=expected_bytes, sha256=sha256)
    manifest = build_mnist_splits(npz_path, layout.splits(f"mnist-{sha256_of(npz_path)[:12]}"), shapes=shapes)
    training = {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed}
    key = hashlib.sha256(json.dumps(training, sort_keys=True).encode()).hexdigest()[:8]
    model_dir = layout.models(f"mnist-{manifest['fingerprint'][:12]}-{key}")
    result = train_model(manifest["folder"], model_dir, experiment="mnist", optimizer="adadelta", **training)
    return {**result, "split_dir": manifest["folder"]}


@task(name="mnist-splits", persist_result=True)
def mnist_splits_task(npz_path: Path, folder: Path) -> dict:
    """Prefect task: `build_mnist_splits` (it finds a finished folder itself, so no cache is needed)."""
    return build_mnist_splits(npz_path, folder)
