"""The seed's data preparation (maybe_extract, load_letter, maybe_pickle), ported for comparison.

Faithful to the Udacity notebook code in ../shared/seed/keras-getting-started.md, with the one change
that `scipy.ndimage.imread` no longer exists: Pillow reads the file instead (which is what imread
called). Serial, float32, pickled per letter.
"""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

image_size = 28  # Pixel width and height.
pixel_depth = 255.0  # Number of levels per pixel.
num_classes = 10


def imread(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


def maybe_extract(filename: str, dest: str) -> list[str]:
    root = os.path.join(dest, os.path.splitext(os.path.splitext(os.path.basename(filename))[0])[0])
    tar = tarfile.open(filename)
    tar.extractall(dest, filter="fully_trusted")  # the seed's plain extractall()
    tar.close()
    data_folders = [os.path.join(root, d) for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]
    if len(data_folders) != num_classes:
        raise Exception(f"Expected {num_classes} folders, one per class. Found {len(data_folders)} instead.")
    return data_folders


def load_letter(folder: str, min_num_images: int) -> np.ndarray:
    image_files = os.listdir(folder)
    dataset = np.ndarray(shape=(len(image_files), image_size, image_size), dtype=np.float32)
    num_images = 0
    for image in image_files:
        image_file = os.path.join(folder, image)
        try:
            image_data = (imread(image_file).astype(float) - pixel_depth / 2) / pixel_depth
            if image_data.shape != (image_size, image_size):
                raise Exception("Unexpected image shape: %s" % str(image_data.shape))
            dataset[num_images, :, :] = image_data
            num_images = num_images + 1
        except IOError:
            pass  # the seed prints "Could not read: ... - it's ok, skipping."
    dataset = dataset[0:num_images, :, :]
    if num_images < min_num_images:
        raise Exception("Many fewer images than expected: %d < %d" % (num_images, min_num_images))
    return dataset


def maybe_pickle(data_folders: list[str], min_num_images_per_class: int) -> tuple[list[str], int]:
    dataset_names, total = [], 0
    for folder in data_folders:
        set_filename = folder + ".pickle"
        dataset_names.append(set_filename)
        dataset = load_letter(folder, min_num_images_per_class)
        total += len(dataset)
        with open(set_filename, "wb") as f:
            pickle.dump(dataset, f, pickle.HIGHEST_PROTOCOL)
    return dataset_names, total


def seed_ingest(archive: Path, work: Path) -> int:
    """Extract, decode and pickle like the seed; returns the number of images kept."""
    folders = maybe_extract(str(archive), str(work))
    _, total = maybe_pickle(folders, 1)
    return total
