"""MNIST, the seed's second experiment: check a downloaded `mnist.npz` and lay it out as a split folder.

The seed called `keras.datasets.mnist.load_data()`, which downloads the same file and unpickles
nothing but trusts everything. Here the file is verified by the download stage (size and sha256),
opened without pickle, and every array is checked before a byte of it is used. Any `.npz` in Keras'
layout (x_train, y_train, x_test, y_test; 28x28 uint8 images, labels 0-9) is accepted, whatever its
row counts, which the split folder records. The split folder has the notMNIST format
(storage/splits.py), so the same trainer runs on it: train = x_train, valid = test = x_test, since
the seed passed `validation_data=(X_test, Y_test)` and then evaluated on the same arrays.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from core.errors import PipelineError
from storage.digests import sha256_of
from storage.layout import DataRoot, file_entry, mnist_splits_key
from storage.splits import IMAGE_SHAPE, SplitWriter, find_splits
from tasks.reporting import stage_logger
from tasks.stage import Stage, stage_task

ARRAYS = ("x_train", "y_train", "x_test", "y_test")  # what keras.datasets.mnist.load_data reads
DIGITS = tuple("0123456789")
# Which arrays of mnist.npz become which split of the folder.
SPLIT_SOURCES = {"train": ("x_train", "y_train"), "valid": ("x_test", "y_test"), "test": ("x_test", "y_test")}


def load_mnist(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an MNIST .npz, each checked for presence, shape, dtype and label range; never unpickled."""
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise PipelineError(
            f"{path} is not a readable .npz archive ({error}); delete it and rerun to fetch it again."
        ) from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise PipelineError(f"{path} holds a single array, not the .npz archive of {', '.join(ARRAYS)}.")
    with archive:
        missing = [name for name in ARRAYS if name not in archive.files]
        if missing:
            raise PipelineError(
                f"{path} lacks {', '.join(missing)} (it holds {', '.join(archive.files) or 'nothing'}); "
                "it is not Keras' mnist.npz."
            )
        arrays = {name: _read_member(archive, path, name) for name in ARRAYS}
    for images, labels in (("x_train", "y_train"), ("x_test", "y_test")):
        _check_pair(path, images, arrays[images], labels, arrays[labels])
    return arrays


def _check_pair(path: Path, x_name: str, images: np.ndarray, y_name: str, labels: np.ndarray) -> None:
    """Raise PipelineError unless `images` are (N, 28, 28) uint8 and `labels` N integers in 0..9."""
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE or not len(images):
        raise PipelineError(f"{path}: {x_name} has shape {images.shape}, expected (N, 28, 28) with N > 0.")
    if images.dtype != np.uint8:
        raise PipelineError(f"{path}: {x_name} holds {images.dtype}, expected uint8 pixels.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise PipelineError(f"{path}: {y_name} holds {labels.dtype}, expected integer labels.")
    if labels.shape != (len(images),):
        raise PipelineError(f"{path}: {y_name} has shape {labels.shape}, expected ({len(images)},) like {x_name}.")
    if labels.min() < 0 or labels.max() >= len(DIGITS):
        raise PipelineError(
            f"{path}: {y_name} has labels {labels.min()}..{labels.max()}, expected 0..{len(DIGITS) - 1}."
        )


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


def build_mnist_splits(root: DataRoot, npz: str) -> dict:
    """Write (or find) the split folder of the data root's `raw/<npz>` (an MNIST .npz); returns its manifest."""
    root, logger = DataRoot.of(root), stage_logger(__name__)
    npz_path = root.raw / npz
    if not npz_path.is_file():
        raise PipelineError(f"{npz_path} does not exist: download it first (`notmnist mnist`).")
    source_sha256 = sha256_of(npz_path)
    folder = root.splits(mnist_splits_key(source_sha256))
    if (manifest := find_splits(folder)) is not None:
        logger.info("MNIST splits already built from this file: %s", root.url(folder))
        return manifest
    arrays = load_mnist(npz_path)
    with SplitWriter(folder, list(DIGITS)) as writer:
        for split, (x_name, y_name) in SPLIT_SOURCES.items():
            names = [f"{x_name}/{index:05d}" for index in range(len(arrays[y_name]))]
            writer.save(split, arrays[x_name], arrays[y_name], names)
        manifest = writer.commit(
            seed=None, dedup="none", sources={split: list(names) for split, names in SPLIT_SOURCES.items()},
            inputs={"npz": {"name": npz_path.name, "sha256": source_sha256}},
        )
    rows = manifest["splits"]
    logger.info("MNIST splits in %s: train %s, valid = test %s rows", folder, f"{rows['train']['rows']:,}",
                f"{rows['test']['rows']:,}")
    return manifest


def _npz(root: DataRoot, parameters: dict) -> list[Path]:
    return [root.raw / parameters["npz"]]


def _mnist_output(root: DataRoot, parameters: dict) -> list[Path] | None:
    """The split folder of the file the data root holds (its key is the file's sha256)."""
    npz = _npz(root, parameters)[0]
    if root.store is None:
        sha256 = sha256_of(npz) if npz.is_file() else None
    else:
        sha256 = file_entry(raw)["sha256"] if (raw := root.committed(npz)) else None
    return None if sha256 is None else [root.splits(mnist_splits_key(sha256))]


mnist_splits_task = stage_task(
    build_mnist_splits,
    stage=Stage(outputs=_mnist_output, reads=_npz),
    name="mnist-splits",
    task_run_name="splits of {npz}",
)
