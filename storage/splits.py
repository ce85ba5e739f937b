"""Split folders: the train/valid/test arrays that training reads, and the fingerprint that names the dataset.

    splits/<key>/
      {train,valid,test}_x.npy      uint8 (N, 28, 28): the images, memory-mappable
      {train,valid,test}_y.npy      int64 (N,): the labels
      {train,valid,test}_file.npy   bytes (N,): where each row came from
      _manifest.json                written last (storage/folders.py), with: key, fingerprint, splits
                                    {rows, per_class}, class_names, and what the writer adds (seed,
                                    dedup, inputs, overlap report, ...)

The dataset fingerprint is the sha256 over each split's image and label file digests, so it names
exactly the bytes a model was trained on. Opening a split checks its files against the manifest
first: a same-size overwrite of a single row is an error, not a silent change of the data.
NPY files are loaded with `allow_pickle=False` only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from core.errors import CorruptDataError, PipelineError
from core.seed import IMAGE_SIDE
from storage.arrays import NpyRows, create_npy, load_npy, save_npy
from storage.folders import FolderWriter, folder_problem, open_verified_rows, read_manifest, verify_file

SPLITS = ("train", "valid", "test")
ARRAYS = ("x", "y", "file")
KIND, FORMAT = "splits", 2
IMAGE_SHAPE = (IMAGE_SIDE, IMAGE_SIDE)
REBUILD = "rebuild the splits (`notmnist splits`, or rerun the pipeline)"


def array_file(split: str, array: str) -> str:
    """The file name of one array ("x", "y" or "file") of one split."""
    return f"{split}_{array}.npy"


def dataset_fingerprint(files: dict[str, dict]) -> str:
    """sha256 over each split's image and label file digests, in split order."""
    digests = {split: [files[array_file(split, a)]["sha256"] for a in ("x", "y")] for split in SPLITS}
    return hashlib.sha256(json.dumps(digests).encode()).hexdigest()


class SplitWriter(FolderWriter):
    """Writes a split folder: fill each split (`create` or `save`), then `commit`."""

    def __init__(self, folder: Path, class_names: list[str]):
        super().__init__(folder, KIND, FORMAT)
        self.class_names = list(class_names)

    def create(self, split: str, rows: int) -> tuple[np.memmap, np.memmap]:
        """Memory-mapped image and label arrays of `rows` rows to fill in place."""
        images = create_npy(self.work / array_file(split, "x"), (rows, *IMAGE_SHAPE), np.uint8)
        labels = create_npy(self.work / array_file(split, "y"), (rows,), np.int64)
        return images, labels

    def save_files(self, split: str, names: list[str]) -> None:
        """Where each row of `split` came from, as bytes (NPY stores them without pickle)."""
        save_npy(self.work / array_file(split, "file"), np.array([name.encode() for name in names], dtype=bytes))

    def save(self, split: str, images: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
        """Write a whole split from arrays in memory."""
        save_npy(self.work / array_file(split, "x"), np.ascontiguousarray(images, dtype=np.uint8))
        save_npy(self.work / array_file(split, "y"), np.asarray(labels, dtype=np.int64))
        self.save_files(split, names)

    def fields(self, files: dict[str, dict]) -> dict:
        """The folder's key, the dataset fingerprint, and each split's rows and per-class counts."""
        splits = {}
        for split in SPLITS:
            labels = load_npy(self.work / array_file(split, "y"))
            counts = np.bincount(labels, minlength=len(self.class_names))
            splits[split] = {"rows": len(labels), "per_class": dict(zip(self.class_names, counts.tolist()))}
        return {
            "key": self.folder.name,
            "fingerprint": dataset_fingerprint(files),
            "splits": splits,
            "class_names": self.class_names,
        }


def find_splits(folder: Path) -> dict | None:
    """The manifest of a finished split folder whose every file matches its digest (or is as this machine recorded it
    when it last hashed it: storage/folders.py), else None."""
    manifest = read_manifest(folder, KIND, FORMAT)
    if manifest is None or folder_problem(folder, manifest, trusting=True) is not None:
        return None
    return manifest


def read_splits_manifest(folder: Path) -> dict:
    """The manifest of a finished split folder (its files are checked when opened); a clear error if unfinished."""
    manifest = read_manifest(folder, KIND, FORMAT)
    if manifest is None:
        raise PipelineError(f"{folder} holds no finished splits: build them first (`notmnist splits`).")
    return manifest


def open_split(
    folder: Path, manifest: dict, split: str, *, rows_on_disk: bool = False
) -> tuple[np.ndarray | NpyRows, np.ndarray]:
    """The images (N, 28, 28) uint8 and labels (N,) of one split, checked against the manifest.

    The images are memory-mapped, or with `rows_on_disk` an `NpyRows` that reads them from the file as they are
    asked for (training: the split's pages stay out of the process), verified through the handle it reads with.
    """
    folder, classes, name = Path(folder), len(manifest["class_names"]), array_file(split, "x")
    if rows_on_disk:
        images = open_verified_rows(folder, manifest, name, REBUILD)
    else:
        images = load_npy(verify_file(folder, manifest, name, REBUILD))
    labels = load_npy(verify_file(folder, manifest, array_file(split, "y"), REBUILD))
    rows = manifest["splits"][split]["rows"]
    # The digests match what the writer recorded, so these only fail for a folder written wrongly.
    if images.dtype != np.uint8 or images.shape != (rows, *IMAGE_SHAPE):
        raise CorruptDataError(f"{folder}: {split} images are {images.dtype} {images.shape}, not uint8 ({rows}, 28, 28)")
    if labels.shape != (rows,) or not np.issubdtype(labels.dtype, np.integer):
        raise CorruptDataError(f"{folder}: {split} labels are {labels.dtype} {labels.shape}, not {rows:,} integers")
    if rows == 0:
        raise PipelineError(f"{folder}: the {split} split is empty; {REBUILD} with larger sizes.")
    if int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise CorruptDataError(f"{folder}: {split} labels span {labels.min()}..{labels.max()}, not 0..{classes - 1}")
    return images, labels


def newest_splits(splits_root: Path, prefix: str) -> Path:
    """The most recently finished split folder under `splits_root` whose name starts with `prefix`."""
    folders = [path for path in Path(splits_root).glob(f"{prefix}*") if read_manifest(path, KIND, FORMAT)]
    if not folders:
        raise PipelineError(f"No finished splits under {splits_root}: run `notmnist splits` (or `notmnist run`) first.")
    return max(folders, key=lambda path: path.stat().st_mtime)
