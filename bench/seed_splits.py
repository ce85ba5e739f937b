"""The seed's merge_datasets + randomize (Udacity notebook), ported for comparison.

Unchanged but for paths: it loads each letter's float32 pickle, shuffles it with the global numpy
RNG seeded 133, copies size // 10 rows per class into preallocated arrays, then permutes each split.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

image_size = 28


def make_arrays(nb_rows, img_size):
    if nb_rows:
        dataset = np.ndarray((nb_rows, img_size, img_size), dtype=np.float32)
        labels = np.ndarray(nb_rows, dtype=np.int32)
    else:
        dataset, labels = None, None
    return dataset, labels


def merge_datasets(pickle_files, train_size, valid_size=0):
    num_classes = len(pickle_files)
    valid_dataset, valid_labels = make_arrays(valid_size, image_size)
    train_dataset, train_labels = make_arrays(train_size, image_size)
    vsize_per_class = valid_size // num_classes
    tsize_per_class = train_size // num_classes

    start_v, start_t = 0, 0
    end_v, end_t = vsize_per_class, tsize_per_class
    end_l = vsize_per_class + tsize_per_class
    for label, pickle_file in enumerate(pickle_files):
        with open(pickle_file, "rb") as f:
            letter_set = pickle.load(f)
            np.random.shuffle(letter_set)
            if valid_dataset is not None:
                valid_letter = letter_set[:vsize_per_class, :, :]
                valid_dataset[start_v:end_v, :, :] = valid_letter
                valid_labels[start_v:end_v] = label
                start_v += vsize_per_class
                end_v += vsize_per_class
            train_letter = letter_set[vsize_per_class:end_l, :, :]
            train_dataset[start_t:end_t, :, :] = train_letter
            train_labels[start_t:end_t] = label
            start_t += tsize_per_class
            end_t += tsize_per_class
    return valid_dataset, valid_labels, train_dataset, train_labels


def randomize(dataset, labels):
    permutation = np.random.permutation(labels.shape[0])
    shuffled_dataset = dataset[permutation, :, :]
    shuffled_labels = labels[permutation]
    return shuffled_dataset, shuffled_labels


def seed_splits(pickles: Path, train_size=200000, valid_size=10000, test_size=10000) -> int:
    """Run the seed's merge and randomize over the pickles; returns the rows produced."""
    np.random.seed(133)
    letters = "ABCDEFGHIJ"
    train_datasets = [str(pickles / "notMNIST_large" / f"{letter}.pickle") for letter in letters]
    test_datasets = [str(pickles / "notMNIST_small" / f"{letter}.pickle") for letter in letters]
    valid_dataset, valid_labels, train_dataset, train_labels = merge_datasets(train_datasets, train_size, valid_size)
    _, _, test_dataset, test_labels = merge_datasets(test_datasets, test_size)
    train_dataset, train_labels = randomize(train_dataset, train_labels)
    test_dataset, test_labels = randomize(test_dataset, test_labels)
    valid_dataset, valid_labels = randomize(valid_dataset, valid_labels)
    return len(train_labels) + len(valid_labels) + len(test_labels)
