"""NPY arrays of the splits: written through memory maps, loaded memory-mapped, never unpickled."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

IMAGE_SHAPE = (28, 28)
HASH_ROWS = 16384


def create_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype | str) -> np.memmap:
    """A new NPY file of `shape`, memory-mapped for writing (its header is valid from the start)."""
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)


def save_npy(path: Path, array: np.ndarray) -> None:
    """Save an array as NPY; object arrays are refused, since they would need pickle to load."""
    if array.dtype.hasobject:
        raise TypeError(f"{path}: object arrays cannot be stored; they would need pickle to load")
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def load_npy(path: Path, *, mmap: bool = True) -> np.ndarray:
    """Load an NPY file, memory-mapped by default; an array of pickled objects raises ValueError."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as error:
        if "object" in str(error) or "pickle" in str(error):
            raise ValueError(f"{path} holds Python objects, which would need pickle to load; refusing it") from error
        raise


def array_digest(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes, read in slices so a memmap is never loaded whole."""
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    for start in range(0, len(array), HASH_ROWS):
        digest.update(np.ascontiguousarray(array[start : start + HASH_ROWS]).data)
    return digest.hexdigest()
