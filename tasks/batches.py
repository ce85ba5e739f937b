"""Training input read from a split folder's uint8 NPY files, one normalised batch at a time.

The seed turned every split into a float array before training (200k x 28 x 28 float32 is 627 MB,
and its `astype('float')` made that float64). Here the pixels stay uint8 (157 MB for 200k images)
and each batch is gathered, normalised to float32 and given its channel axis as it is needed. The
training order is a permutation drawn from (seed, epoch): the same run sees the same batches, and a
run resumed at epoch k sees exactly the batches it would have seen.

`SplitBatches.keras_input()` is what `fit`, `evaluate` and `predict` read. With TensorFlow it is a
`tf.data` pipeline: the uint8 split is held once in memory and every batch is gathered and
normalised in TensorFlow's own threads, ahead of the model (a GPU is fed without waiting on
Python). With any other backend it is a Keras `PyDataset` over the memory-mapped file, which does
the same work in NumPy.
"""

from __future__ import annotations

import math
import os

import keras
import numpy as np

from core.errors import PipelineError
from core.seed import NORMALISATIONS
from storage.splits import SPLITS, open_split

# Rows copied at a time when a split is read into memory for TensorFlow: the copy's only overhead.
_LOAD_CHUNK_ROWS = 16_384


def epoch_permutation(rows: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of one epoch: a function of (seed, epoch) alone, so a resumed run repeats it."""
    return np.random.default_rng([seed, epoch]).permutation(rows)


def batch_order(rows: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """`epoch_permutation`, each batch's rows sorted (so reading a batch goes forward through the file)."""
    order = epoch_permutation(rows, seed, epoch)
    whole = rows - rows % batch_size
    order[:whole] = np.sort(order[:whole].reshape(-1, batch_size), axis=1).ravel()
    order[whole:] = np.sort(order[whole:])
    return order


class SplitBatches:
    """Batches of (float32 images with a channel axis, one-hot labels) of one split.

    With `shuffle_seed`, batch i of epoch e holds rows `batch_order(N, b, seed, e)[i*b:(i+1)*b]`;
    without it, rows in file order. `batches[i]` is batch i as NumPy arrays; `keras_input()` is
    the same batches in the form the Keras backend reads fastest.
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
    ):
        if batch_size < 1:
            raise PipelineError(f"batch_size must be at least 1; got {batch_size}.")
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.classes = classes
        self.offset, self.scale = normalisation
        self.shuffle_seed = shuffle_seed
        self._one_hot = np.eye(classes, dtype=np.float32)
        self._order: np.ndarray | None = None
        self._keras_input = None
        self._order_variable = None  # the TensorFlow pipeline's copy of the epoch's order
        self.epoch = 0
        self.set_epoch(0)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    @property
    def rows(self) -> int:
        """Rows in the split."""
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Use the training order of `epoch` from now on (in `batches[i]` and in the Keras input alike)."""
        self.epoch = epoch
        if self.shuffle_seed is None:
            return
        self._order = batch_order(self.rows, self.batch_size, self.shuffle_seed, epoch)
        if self._order_variable is not None:
            self._order_variable.assign(self._order)

    def batch_rows(self, index: int) -> np.ndarray | slice:
        """The rows that batch `index` reads."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        start, stop = index * self.batch_size, min((index + 1) * self.batch_size, self.rows)
        return slice(start, stop) if self._order is None else self._order[start:stop]

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.batch_rows(index)
        pixels = np.subtract(self.images[rows], np.float32(self.offset), dtype=np.float32)
        pixels /= np.float32(self.scale)
        return pixels[..., np.newaxis], self._one_hot[self.labels[rows]]

    def keras_input(self):
        """What `fit`, `evaluate` and `predict` read: a `tf.data.Dataset` on TensorFlow, else a `PyDataset`."""
        if self._keras_input is None:
            if keras.backend.backend() == "tensorflow":
                self._keras_input = self._tensorflow_dataset()
            else:
                self._keras_input = _NumpyBatches(self)
        return self._keras_input

    def _tensorflow_dataset(self):
        """Batches gathered and normalised by `tf.data` from the uint8 split held in memory.

        The epoch's order lives in a variable that `set_epoch` assigns; Keras starts reading an
        epoch after `on_epoch_begin`, so every epoch reads its own order.
        """
        import tensorflow as tf

        images, labels = _in_memory(self.images), tf.constant(np.asarray(self.labels, dtype=np.int32))
        offset, scale, size, rows = np.float32(self.offset), np.float32(self.scale), self.batch_size, self.rows
        if self._order is not None:
            self._order_variable = tf.Variable(self._order, trainable=False, dtype=tf.int64)
        order = self._order_variable

        def batch(index):
            start = index * size
            stop = tf.minimum(start + size, rows)
            if order is None:
                pixels, targets = images[start:stop], labels[start:stop]
            else:
                picked = order[start:stop]
                pixels, targets = tf.gather(images, picked), tf.gather(labels, picked)
            pixels = (tf.cast(pixels, tf.float32) - offset) / scale
            return pixels[..., tf.newaxis], tf.one_hot(targets, self.classes, dtype=tf.float32)

        dataset = tf.data.Dataset.range(len(self)).map(batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return dataset.prefetch(tf.data.AUTOTUNE)


class _NumpyBatches(keras.utils.PyDataset):
    """A `SplitBatches` as a Keras `PyDataset` (backends other than TensorFlow)."""

    def __init__(self, batches: SplitBatches):
        super().__init__()
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.batches[index]


def _in_memory(images: np.ndarray):
    """`images` as a TensorFlow tensor, held once: a memory-mapped NPY file is read into it in chunks.

    Copying a memory map whole would keep the file's pages mapped (and counted) beside the copy.
    """
    import tensorflow as tf

    if not _whole_file_map(images):
        return tf.constant(np.asarray(images))
    resident = tf.Variable(tf.zeros(images.shape, dtype=images.dtype), trainable=False)
    buffer = np.empty((_LOAD_CHUNK_ROWS, *images.shape[1:]), dtype=images.dtype)
    with open(images.filename, "rb") as handle:
        handle.seek(images.offset)
        for start in range(0, len(images), _LOAD_CHUNK_ROWS):
            chunk = buffer[: min(_LOAD_CHUNK_ROWS, len(images) - start)]
            if handle.readinto(chunk) != chunk.nbytes:
                raise PipelineError(f"{images.filename} ended early while being read into memory")
            resident[start : start + len(chunk)].assign(chunk)
    return resident


def _whole_file_map(images: np.ndarray) -> bool:
    """True for a C-ordered memory map of a whole NPY file (what `open_split` returns), not a view of one."""
    if not isinstance(images, np.memmap) or not images.flags.c_contiguous or images.filename is None:
        return False
    try:
        return os.path.getsize(images.filename) == images.offset + images.nbytes
    except OSError:
        return False


class ShuffleEachEpoch(keras.callbacks.Callback):
    """Tells a `SplitBatches` which epoch begins, before Keras starts reading that epoch's batches."""

    async_safe = True  # nothing per batch

    def __init__(self, batches: SplitBatches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.batches.set_epoch(epoch)


def open_splits(
    split_dir, manifest: dict, *, experiment: str, batch_size: int, seed: int
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
