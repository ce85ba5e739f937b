"""NPY files: written through memory maps or whole, loaded memory-mapped, never unpickled."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import numpy as np

from core.errors import CorruptDataError
from storage.digests import READ_BYTES, stat_identity
from storage.disk import out_of_space

# The NPY header formats rows are read from: 2.0 only widens the header's length field.
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def create_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype | str) -> np.memmap:
    """A new NPY file of `shape`, memory-mapped for writing (its header is valid from the start).

    Its whole size is allocated before it is mapped: a write through a map into a file the file system
    cannot back is a SIGBUS that kills the process without a word, where a full disk is an error here.
    """
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)
    try:
        with open(path, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
    except OSError as error:
        del array
        if out_of_space(error):  # with the file named, for the error that the stage boundary makes of it
            raise OSError(error.errno, error.strerror, str(path)) from error
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot preallocate: map as is
            raise
    return array


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


class NpyRows:
    """The rows of a C-ordered NPY file, read from the file as they are asked for (`rows[indices]`), never held whole.

    A training split read this way leaves its pages in the system's file cache, shared and reclaimable, instead of
    a copy of the whole split held by the process for all of training (157 MB at the seed's sizes).

    The file is opened once and every read goes through that handle, after checking that the file is still what it
    was when it was opened: size, modification and change times, inode. A write, a truncation, a `touch`, and the
    file's removal or replacement under its name all move the change time, so once `sha256()` has matched what was
    recorded, every later read returns the bytes that were hashed, or raises CorruptDataError (its message ending
    with `remedy`).
    """

    def __init__(self, path: Path, *, remedy: str = ""):
        """Opens `path` and reads its header: ValueError when it is not an NPY file of plain C-ordered values."""
        self.path, self.remedy = Path(path), remedy
        self._file = open(self.path, "rb", buffering=0)  # closes itself when this object goes
        self._identity = stat_identity(os.fstat(self._file.fileno()))
        version = np.lib.format.read_magic(self._file)
        if version not in _HEADER_READERS:
            raise ValueError(f"{self.path} is an NPY file of format {version}, which rows are not read from")
        shape, fortran_order, dtype = _HEADER_READERS[version](self._file)
        if fortran_order or dtype.hasobject or not shape:
            raise ValueError(f"{self.path} is not a C-ordered array of plain values, which rows are read from")
        self.shape, self.dtype, self.offset = tuple(shape), dtype, self._file.tell()
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * dtype.itemsize
        self.file_bytes = self._identity[0]
        self._rows_per_read = max(1, READ_BYTES // max(self.row_bytes, 1))  # one `pread` of a run stays this short
        if self.offset + len(self) * self.row_bytes != self.file_bytes:
            raise ValueError(f"{self.path} has {self.file_bytes:,} bytes, not the size its NPY header gives")

    def __len__(self) -> int:
        return self.shape[0]

    def sha256(self) -> str:
        """The sha256 of the whole file, read through the handle every later read uses."""
        digest, offset, descriptor = hashlib.sha256(), 0, self._file.fileno()
        while chunk := os.pread(descriptor, READ_BYTES, offset):
            digest.update(chunk)
            offset += len(chunk)
        self._check_unchanged()
        return digest.hexdigest()

    def __getitem__(self, rows) -> np.ndarray:
        """Rows `rows` (an integer, a slice or an array of row numbers, in any order) as a new read-only array."""
        if isinstance(rows, (int, np.integer)):
            return self[np.array([rows])][0]
        numbers = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        if numbers.ndim != 1 or numbers.size and (numbers.min() < 0 or numbers.max() >= len(self)):
            raise IndexError(f"rows {rows!r} of {self.path}, which has {len(self)}")
        # One read per run of consecutive rows (a batch in file order is one read); rows spread over the file are one
        # `pread` each, which in Python costs less than reading each into a slice of an array.
        follows = numbers[1:] - numbers[:-1] == 1  # row i + 1 comes right after row i in the file
        descriptor, size, pread = self._file.fileno(), self.row_bytes, os.pread
        if not follows.any():
            data = b"".join([pread(descriptor, size, at) for at in (numbers * size + self.offset).tolist()])
        else:
            starts = np.flatnonzero(np.concatenate(([True], ~follows)))
            counts, most = np.diff(starts, append=len(numbers)).tolist(), self._rows_per_read
            data = b"".join([
                pread(descriptor, min(count - done, most) * size, self.offset + (first + done) * size)
                for first, count in zip(numbers[starts].tolist(), counts) for done in range(0, count, most)
            ])
        if len(data) != len(numbers) * size:
            raise self._ended_early()
        self._check_unchanged()  # after reading: unchanged since it was opened, so these are the bytes verified
        return np.frombuffer(data, dtype=self.dtype).reshape(len(numbers), *self.shape[1:])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.empty(self.shape, dtype=self.dtype)
        self.read_into(whole)
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def read_into(self, whole: np.ndarray) -> None:
        """Read every row into `whole`, a C-contiguous array of this shape and type, a few megabytes at a time."""
        if whole.shape != self.shape or whole.dtype != self.dtype or not whole.flags.c_contiguous:
            raise ValueError(f"rows of {self.path} are read into a C-contiguous {self.dtype} array of {self.shape}")
        flat, descriptor = whole.reshape(-1).view(np.uint8), self._file.fileno()
        for start in range(0, flat.size, READ_BYTES):
            piece = flat[start : start + READ_BYTES]
            if os.preadv(descriptor, [piece], self.offset + start) != piece.nbytes:
                raise self._ended_early()
        self._check_unchanged()

    def _ended_early(self) -> CorruptDataError:
        """The error of a read that came back short (raising instead that the file changed, the likelier cause)."""
        self._check_unchanged()
        return CorruptDataError(f"{self.path} ended early: {self.remedy}")

    def _check_unchanged(self) -> None:
        if stat_identity(os.fstat(self._file.fileno())) != self._identity:
            raise CorruptDataError(f"{self.path} changed after it was opened and verified (written, truncated, "
                                   f"touched, removed or replaced): {self.remedy}")
