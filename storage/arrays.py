"""NPY files: written through memory maps or whole, loaded memory-mapped, never unpickled."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
