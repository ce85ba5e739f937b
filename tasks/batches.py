"""Training input read from a split folder's uint8 NPY files, one normalised batch at a time.

The seed turned every split into a float array before training (200k x 28 x 28 float32 is 627 MB,
and its `astype('float')` made that float64). Here the pixels stay uint8 (157 MB for 200k images), in
their file, and each batch is read, normalised to float32 and given its channel axis as it is needed. The
training order is a permutation drawn from (seed, epoch): the same run sees the same batches, and a
run resumed at epoch k sees exactly the batches it would have seen.

`training_input(model, batches)` gives the model `fit`, `evaluate` and `predict` run and what each
split feeds it. With TensorFlow that is the model itself, fed by `SplitBatches.keras_input()`, a
`tf.data` pipeline: every batch's rows are read from the split's file, verified when it was opened
(`storage.arrays.NpyRows`), and normalised in TensorFlow's own threads, ahead of the model. With any
other backend (JAX on a GPU) it is `DeviceSplits`: the uint8 pixels of all three splits live once on
the device, the model is fed row numbers (512 bytes a batch instead of 400 kB of floats) and gathers
and normalises each batch there, many steps per call. Both read each epoch's rows in the same order.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import keras
import numpy as np

from core.errors import CorruptDataError, PipelineError
from core.seed import NORMALISATIONS
from storage.arrays import NpyRows
from storage.splits import SPLITS, open_split

# tf.data's batches: two made at once and four waiting ahead keep the model fed on any core count (a batch is 128
# rows read and a cast; bench/train.py times the input alone at over twenty times the CPU model's speed).
INPUT_THREADS, PREFETCH_BATCHES = 2, 4


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
        self.read_failure: CorruptDataError | None = None  # what stopped TensorFlow's reads of the file, if anything
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
        return pixels[..., np.newaxis], self.targets(rows)

    def targets(self, rows: np.ndarray | slice) -> np.ndarray:
        """The one-hot labels of `rows` (what `batch_rows` gives)."""
        return self._one_hot[self.labels[rows]]

    def _failed(self, error: CorruptDataError) -> None:
        self.read_failure = error

    def keras_input(self):
        """What `fit`, `evaluate` and `predict` read: a `tf.data.Dataset` on TensorFlow, else a `PyDataset`."""
        if self._keras_input is None:
            if keras.backend.backend() == "tensorflow":
                self._keras_input = self._tensorflow_dataset()
            else:
                self._keras_input = _NumpyBatches(self)
        return self._keras_input

    def _tensorflow_dataset(self):
        """Batches gathered and normalised by `tf.data`, in TensorFlow's own threads, ahead of the model.

        Each batch's rows are read from the split's file as the batch is made, or gathered from the split held in
        memory where a GPU is fed (`_tensorflow_reader`). The epoch's order lives in a variable that `set_epoch`
        assigns; Keras starts reading an epoch after `on_epoch_begin`, so every epoch reads its own order.
        """
        import tensorflow as tf

        labels = tf.constant(np.asarray(self.labels, dtype=np.int32))
        offset, scale, size, rows = np.float32(self.offset), np.float32(self.scale), self.batch_size, self.rows
        if self._order is not None:
            self._order_variable = tf.Variable(self._order, trainable=False, dtype=tf.int64)
        order, read = self._order_variable, _tensorflow_reader(self.images, self._failed)

        def batch(index):
            start = index * size
            picked = tf.range(start, tf.minimum(start + size, rows)) if order is None else order[start:start + size]
            pixels = (tf.cast(read(picked), tf.float32) - offset) / scale
            return pixels[..., tf.newaxis], tf.one_hot(tf.gather(labels, picked), self.classes, dtype=tf.float32)

        # Fixed parallelism, no autotuning: a batch is 128 reads of 784 bytes and a cast, and with autotuning the
        # iterator's destructor kept the end of `fit` waiting on one of its threads, 2 to 19 s on 2 cores
        # (BENCHMARKS.md).
        dataset = tf.data.Dataset.range(len(self)).map(batch, num_parallel_calls=INPUT_THREADS, deterministic=True)
        options = tf.data.Options()
        options.autotune.enabled = False
        return dataset.prefetch(PREFETCH_BATCHES).with_options(options)


def training_input(model: keras.Model, batches: dict[str, SplitBatches]) -> tuple[keras.Model, dict[str, object]]:
    """The model that `fit`, `evaluate` and `predict` run (it shares `model`'s weights) and each split's input to it."""
    if keras.backend.backend() == "tensorflow":
        return model, {split: item.keras_input() for split, item in batches.items()}
    device = DeviceSplits(batches)
    return device.model(model), {split: device.keras_input(split) for split in batches}


class DeviceSplits:
    """The uint8 pixels of every split in one array held on the device, read by row number.

    `model(m)` is `m` behind a layer that gathers the rows a batch names from that array and normalises
    them on the device; `keras_input(split)` yields, for batch i, the rows `SplitBatches.batch_rows(i)`
    names (as rows of the joined array) and their one-hot labels, so the order of an epoch, and of a
    resumed one, is the one `SplitBatches` draws. The device array is a non-trainable variable of that
    model only: `m`'s own weights, checkpoints and saved file stay as they are.
    """

    def __init__(self, batches: dict[str, SplitBatches]):
        self.batches = batches
        self.offsets, start = {}, 0
        for split, item in batches.items():
            self.offsets[split], start = start, start + item.rows
        normalisations = {(item.offset, item.scale) for item in batches.values()}
        if len(normalisations) != 1:
            raise PipelineError(f"The splits are normalised differently ({sorted(normalisations)}): one model "
                                "cannot read them all.")
        (self.normalisation,) = normalisations

    def model(self, model: keras.Model) -> keras.Model:
        """`model`, fed by row numbers; its `.trained` attribute is `model`."""
        pixels = np.concatenate([np.asarray(item.images) for item in self.batches.values()])
        rows = keras.Input(shape=(), dtype="int32", name="row")
        reader = keras.Model(rows, model(_DevicePixels(pixels, *self.normalisation, name="device_pixels")(rows)),
                             name=f"{model.name}_on_device_rows")
        reader.trained = model
        return reader

    def keras_input(self, split: str) -> keras.utils.PyDataset:
        return _DeviceRows(self.batches[split], self.offsets[split])


class _DevicePixels(keras.layers.Layer):
    """Row numbers in, normalised images (with their channel axis) out, read from uint8 pixels held on the device."""

    def __init__(self, pixels: np.ndarray, offset: float, scale: float, **kwargs):
        super().__init__(**kwargs)
        self.offset, self.scale = float(offset), float(scale)
        self.pixels = self.add_weight(shape=pixels.shape, dtype="uint8", trainable=False, name="pixels",
                                      initializer=lambda shape, dtype: pixels)

    def call(self, rows):
        images = keras.ops.cast(keras.ops.take(self.pixels, rows, axis=0), "float32")
        return ((images - self.offset) / self.scale)[..., None]

    def compute_output_shape(self, rows_shape):
        return (*rows_shape, *self.pixels.shape[1:], 1)


class _DeviceRows(keras.utils.PyDataset):
    """Batch i of a split as (its rows in the joined device array, their one-hot labels)."""

    def __init__(self, batches: SplitBatches, offset: int):
        super().__init__()
        self.batches, self.offset = batches, offset

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.batches.batch_rows(index)
        if isinstance(rows, slice):
            rows = np.arange(rows.start, rows.stop)
        return (rows + self.offset).astype(np.int32), self.batches.targets(rows)


class _NumpyBatches(keras.utils.PyDataset):
    """A `SplitBatches` as a Keras `PyDataset` (backends other than TensorFlow)."""

    def __init__(self, batches: SplitBatches):
        super().__init__()
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.batches[index]


def _tensorflow_reader(images: np.ndarray | NpyRows, failed: Callable[[CorruptDataError], None]):
    """A function of a tensor of row numbers that gives those rows of `images` as a uint8 tensor.

    On the CPU each batch's rows are read from the file (`NpyRows`, in a NumPy call that drops the GIL while it
    reads): the model takes twenty times longer per batch than the reads, and the split's pages stay out of the
    process. Where TensorFlow feeds a GPU, which reads made from Python would keep waiting, and for an array in
    memory, the rows are gathered from the split held as a tensor. A file that fails a read is told to `failed`
    before TensorFlow turns the error into one of its own.
    """
    import tensorflow as tf

    if not isinstance(images, NpyRows) or _feeds_a_gpu():
        held = _held_in_memory(images)
        return lambda picked: tf.gather(held, picked)
    shape = [None, *images.shape[1:]]

    def rows_of(picked: np.ndarray) -> np.ndarray:
        try:
            return images[picked]
        except CorruptDataError as error:
            failed(error)
            raise

    def read(picked):
        return tf.ensure_shape(tf.numpy_function(rows_of, [picked], tf.uint8, stateful=False, name="read_rows"), shape)

    return read


def _feeds_a_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _held_in_memory(images: np.ndarray | NpyRows):
    """`images` as a TensorFlow tensor, held once.

    A file's rows are read into a NumPy array aligned as TensorFlow wants its buffers, which the tensor then uses
    without a copy, handed over through DLPack: `tf.convert_to_tensor` copies it (TensorFlow 2.21), holding the
    split twice for a moment.
    """
    import tensorflow as tf

    if not isinstance(images, NpyRows):
        return tf.constant(np.asarray(images))
    resident = _aligned_empty(images.shape, images.dtype)
    images.read_into(resident)
    return tf.experimental.dlpack.from_dlpack(resident.__dlpack__())  # the tensor keeps `resident` alive


def _aligned_empty(shape: tuple[int, ...], dtype, alignment: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on an `alignment`-byte boundary (TensorFlow's, for sharing it)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + alignment, dtype=np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + size].view(dtype).reshape(shape)


@contextlib.contextmanager
def read_failures_raised(batches: dict[str, SplitBatches]) -> Iterator[None]:
    """Raise a split file's read failure (CorruptDataError, what to do included) as itself, where TensorFlow's input
    pipeline carried it out of `fit`, `evaluate` or `predict` as an error of its own."""
    try:
        yield
    except Exception as error:
        failure = next((item.read_failure for item in batches.values() if item.read_failure is not None), None)
        if failure is None or failure is error:
            raise
        raise failure from error


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
        images, labels = open_split(split_dir, manifest, split, rows_on_disk=True)
        batches[split] = SplitBatches(
            images, labels, batch_size=batch_size, classes=len(manifest["class_names"]),
            normalisation=NORMALISATIONS[experiment], shuffle_seed=seed if split == "train" else None,
        )
    return batches
