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

from core.errors import PipelineError
from storage.splits import SPLITS, open_split

# (offset, scale) of the seed's normalisation x' = (x - offset) / scale:
# notMNIST's load_letter computed (x - pixel_depth / 2) / pixel_depth; the MNIST script x / 255.
NORMALISATIONS = {"notmnist": (127.5, 255.0), "mnist": (0.0, 255.0)}


def epoch_permutation(rows: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of one epoch: a function of (seed, epoch) alone, so a resumed run repeats it."""
    return np.random.default_rng([seed, epoch]).permutation(rows)


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
    split_dir: Path, manifest: dict, *, experiment: str, batch_size: int, seed: int
) -> dict[str, SplitBatches]:
    """Train (shuffled by `seed`), valid and test (in file order) batches of a split folder, its files verified."""
    if experiment not in NORMALISATIONS:
        raise PipelineError(f"No normalisation for experiment {experiment!r}; known: {', '.join(NORMALISATIONS)}.")
    batches = {}
    for split in SPLITS:
        images, labels = open_split(split_dir, manifest, split)
        batches[split] = SplitBatches(
            images, labels, batch_size=batch_size, classes=len(manifest["class_names"]),
            normalisation=NORMALISATIONS[experiment], shuffle_seed=seed if split == "train" else None,
        )
    return batches
