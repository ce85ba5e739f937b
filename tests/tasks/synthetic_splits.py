"""Small split folders of separable 28x28 patterns, in the format the splits stage writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from storage.arrays import array_digest, save_npy
from storage.atomic import write_json

SPLITS = ("train", "valid", "test")
CELL = 7  # the image is a 4 x 4 grid of 7-pixel cells; class k lights cell k


def pattern_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 28, 28): dim noise everywhere, a bright (but noisy) block in the cell of each label."""
    images = rng.integers(0, 90, size=(len(labels), 28, 28), dtype=np.uint8)
    for index, label in enumerate(labels):
        row, column = divmod(int(label), 4)
        block = rng.integers(170, 256, size=(CELL, CELL), dtype=np.uint8)
        images[index, row * CELL : (row + 1) * CELL, column * CELL : (column + 1) * CELL] = block
    return images


def write_split_folder(folder: Path, *, rows: dict[str, int] | None = None, seed: int = 0, classes: int = 10) -> dict:
    """Write {split}_{x,y,file}.npy and manifest.json for pattern images; returns the manifest."""
    rows = rows or {"train": 300, "valid": 60, "test": 60}
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in SPLITS:
        labels = np.resize(np.arange(classes, dtype=np.int64), rows[split])
        rng.shuffle(labels)
        images = pattern_images(labels, rng)
        save_npy(folder / f"{split}_x.npy", images)
        save_npy(folder / f"{split}_y.npy", labels)
        save_npy(folder / f"{split}_file.npy", np.array([f"{split}/{i}.png".encode() for i in range(len(labels))]))
        written[split] = {
            "rows": int(len(labels)),
            "per_class": {str(k): int(v) for k, v in enumerate(np.bincount(labels, minlength=classes))},
            "x_sha256": array_digest(images),
            "y_sha256": array_digest(labels),
        }
    fingerprint = hashlib.sha256(json.dumps({s: [written[s]["x_sha256"], written[s]["y_sha256"]] for s in SPLITS}).encode()).hexdigest()
    manifest = {"format": 1, "folder": str(folder), "fingerprint": fingerprint, "splits": written, "seed": seed,
                "dedup": "none", "inputs": {"synthetic": {"seed": seed}}}
    write_json(folder / "manifest.json", manifest)
    return manifest
