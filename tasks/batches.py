"""Training input streamed from a split folder's memory-mapped NPY files, one normalised batch at a time.

The seed turned every split into a float array before training (200k x 28 x 28 float32 is 627 MB,
and its `astype('float')` made that float64). Here the uint8 pixels stay on disk, memory-mapped;
each batch gathers its rows, normalises them to float32 and adds the channel axis, so memory holds
a batch, not a split. The training order is a permutation drawn from (seed, epoch): the same run
sees the same batches, and a run resumed at epoch k sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np

from storage.arrays import IMAGE_SHAPE, load_npy
from storage.atomic import read_json
from tasks.errors import PipelineError

SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"

# (offset, scale) of the seed's normalisation x' = (x - offset) / scale:
# notMNIST's load_letter computed (x - pixel_depth / 2) / pixel_depth; the MNIST script x / 255.
NORMALISATIONS = {"notmnist": (127.5, 255.0), "mnist": (0.0, 255.0)}


def epoch_permutation(rows: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of one epoch: a function of (seed, epoch) alone, so a resumed run repeats it."""
    return np.random.default_rng([seed, epoch]).permutation(rows)


def read_split_manifest(split_dir: Path) -> dict:
    """The manifest of a finished split folder; a clear error when the splits stage has not run."""
    path = Path(split_dir) / MANIFEST
    try:
        manifest = read_json(path)
    except FileNotFoundError as error:
        raise PipelineError(f"{path} does not exist: build the splits first (the splits stage writes it last).") from error
    except ValueError as error:
        raise PipelineError(f"{path} is not valid JSON ({error}); rebuild the splits.") from error
    missing = [key for key in ("fingerprint", "splits") if key not in manifest]
    missing += [f"splits.{split}" for split in SPLITS if split not in manifest.get("splits", {})]
    if missing:
        raise PipelineError(f"{path} lacks {', '.join(missing)}; rebuild the splits.")
    return manifest


def load_split(split_dir: Path, split: str, *, classes: int, expected_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The memory-mapped images (N, 28, 28) uint8 and labels (N,) of one split, checked against each other.

    Args:
        split_dir: a folder written by the splits stage (or `tasks.mnist`).
        split: "train", "valid" or "test".
        classes: labels must lie in [0, classes).
        expected_rows: the row count the manifest promises, when known.
    """
    folder = Path(split_dir)
    try:
        images = load_npy(folder / f"{split}_x.npy")
        labels = load_npy(folder / f"{split}_y.npy")
    except (OSError, ValueError) as error:
        raise PipelineError(f"Cannot read the {split} split in {folder} ({error}); rebuild the splits.") from error
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
        raise PipelineError(
            f"{folder / f'{split}_x.npy'}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}."
        )
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise PipelineError(
            f"{folder / f'{split}_y.npy'}: expected {len(images):,} integer labels, got {labels.dtype} {labels.shape}."
        )
    if expected_rows is not None and len(images) != expected_rows:
        raise PipelineError(f"{folder}: the manifest promises {expected_rows:,} {split} rows, the files hold {len(images):,}.")
    if len(labels) == 0:
        raise PipelineError(f"{folder}: the {split} split is empty.")
    # Labels are 8 bytes a row, so checking them all costs little even at 200k rows.
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise PipelineError(f"{folder / f'{split}_y.npy'}: labels span {low}..{high}, outside 0..{classes - 1}.")
    return images, labels


class SplitBatches(keras.utils.PyDataset):
    """Batches of (float32 images with a channel axis, one-hot labels) read from memory-mapped arrays.

    With `shuffle_seed`, batch i of epoch e holds rows `epoch_permutation(N, seed, e)[i*b:(i+1)*b]`
    (sorted, so the reads go forward through the file); without it, rows in file order.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int,
        classes: int,
        normalisation: tuple[float, float],
        shuffle_seed: int | None = None,
        **options,
    ):
        super().__init__(**options)
        if batch_size < 1:
            raise PipelineError(f"batch_size must be at least 1; got {batch_size}.")
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.offset, self.scale = normalisation
        self.shuffle_seed = shuffle_seed
        self._one_hot = np.eye(classes, dtype=np.float32)
        self.epoch = 0
        self._order: np.ndarray | None = None
        self.set_epoch(0)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    @property
    def rows(self) -> int:
        """Rows in the split."""
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Use the training order of `epoch` from now on."""
        self.epoch = epoch
        if self.shuffle_seed is not None:
            self._order = epoch_permutation(len(self.labels), self.shuffle_seed, epoch)

    def batch_rows(self, index: int) -> np.ndarray | slice:
        """The rows that batch `index` reads."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        start, stop = index * self.batch_size, min((index + 1) * self.batch_size, len(self.labels))
        if self._order is None:
            return slice(start, stop)
        return np.sort(self._order[start:stop])

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.batch_rows(index)
        pixels = np.subtract(self.images[rows], np.float32(self.offset), dtype=np.float32)
        pixels /= np.float32(self.scale)
        return pixels[..., np.newaxis], self._one_hot[self.labels[rows]]


class ShuffleEachEpoch(keras.callbacks.Callback):
    """Tells a `SplitBatches` which epoch begins, before Keras starts reading that epoch's batches."""

    def __init__(self, batches: SplitBatches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.batches.set_epoch(epoch)


def open_splits(
    split_dir: Path, manifest: dict, *, experiment: str, classes: int, batch_size: int, seed: int
) -> dict[str, SplitBatches]:
    """Train (shuffled by `seed`), valid and test (in file order) batches of a split folder."""
    if experiment not in NORMALISATIONS:
        raise PipelineError(f"No normalisation for experiment {experiment!r}; known: {', '.join(NORMALISATIONS)}.")
    batches = {}
    for split in SPLITS:
        images, labels = load_split(split_dir, split, classes=classes, expected_rows=manifest["splits"][split].get("rows"))
        batches[split] = SplitBatches(
            images, labels, batch_size=batch_size, classes=classes, normalisation=NORMALISATIONS[experiment],
            shuffle_seed=seed if split == "train" else None,
        )
    return batches
