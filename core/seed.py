"""The seed recipe's facts: where its data is published, what it checks, the values it used, what it reported.

Every default that means "what the seed did" comes from here (../shared/seed/README.md and
keras-getting-started.md), so flows, the command line, the stages and the reports cannot disagree.
"""

from __future__ import annotations

from types import MappingProxyType

# notMNIST as the Udacity notebook fetched it: its maybe_download checks exactly these sizes.
NOTMNIST_BASE_URL = "https://commondatastorage.googleapis.com/books1000/"
LARGE_ARCHIVE, LARGE_BYTES = "notMNIST_large.tar.gz", 247_336_696
SMALL_ARCHIVE, SMALL_BYTES = "notMNIST_small.tar.gz", 8_458_043
LETTERS = "ABCDEFGHIJ"  # the classes; label = position (the seed enumerates the sorted folders)
IMAGE_SIDE = 28  # the notebook's image_size
PIXEL_DEPTH = 255.0  # the notebook's pixel_depth: it normalises (x - depth / 2) / depth
# (offset, scale) of each experiment's normalisation x' = (x - offset) / scale: notMNIST's load_letter
# computed (x - pixel_depth / 2) / pixel_depth; the MNIST script x / 255.
NORMALISATIONS = MappingProxyType({"notmnist": (PIXEL_DEPTH / 2, PIXEL_DEPTH), "mnist": (0.0, PIXEL_DEPTH)})
# The notebook's load_letter minimums: fewer usable images than this in a letter is an error.
MIN_IMAGES_LARGE, MIN_IMAGES_SMALL = 45_000, 1_800
TRAIN_SIZE, VALID_SIZE, TEST_SIZE = 200_000, 10_000, 10_000
SEED = 133  # np.random.seed(133) before merging and shuffling; we also seed the weights with it

# Keras' own MNIST source (keras.datasets.mnist.load_data); size and sha256 of that file as Keras checks it.
MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
MNIST_BYTES = 11_490_434
MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"

# The CNN's training, for MNIST and notMNIST alike. Keras 1's Adadelta defaulted to lr=1.0 (Zeiler's
# paper); Keras 3's defaults to 0.001, which barely moves the CNN in two epochs, so 1.0 is passed.
EPOCHS, BATCH_SIZE, LEARNING_RATE = 2, 128, 1.0
# Iris: SGD at Keras 1's default step (0.01, as Keras 3's still is), batch 5, 15 epochs.
IRIS_EPOCHS, IRIS_BATCH_SIZE, IRIS_LEARNING_RATE = 15, 5, 0.01

# What the seed reports, set beside every result of ours. MNIST validated on its test set, so its
# validation and test accuracy are one number. Iris was scored on its 150 training rows.
REPORTED = MappingProxyType(
    {
        "notmnist": MappingProxyType({"test_accuracy": 0.941, "val_accuracy": 0.8782, "test_loss": 0.238625081217}),
        "mnist": MappingProxyType({"test_accuracy": 0.9555, "val_accuracy": 0.9555, "test_loss": 0.153921858574}),
        "iris": MappingProxyType({"sparse_train_accuracy": 0.89, "onehot_train_accuracy": 0.87}),
    }
)


def reported(experiment: str) -> dict[str, float]:
    """The seed's reported numbers for one experiment, as a plain dict (empty for an unknown one)."""
    return dict(REPORTED.get(experiment, {}))
