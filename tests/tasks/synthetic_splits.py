"""Small split folders of separable 28x28 patterns, written with the splits stage's own writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from storage.layout import DataRoot
from storage.splits import SPLITS, SplitWriter

CELL = 7  # the image is a 4 x 4 grid of 7-pixel cells; class k lights cell k


def pattern_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 28, 28): dim noise everywhere, a bright (but noisy) block in the cell of each label."""
    images = rng.integers(0, 90, size=(len(labels), 28, 28), dtype=np.uint8)
    for index, label in enumerate(labels):
        row, column = divmod(int(label), 4)
        block = rng.integers(170, 256, size=(CELL, CELL), dtype=np.uint8)
        images[index, row * CELL : (row + 1) * CELL, column * CELL : (column + 1) * CELL] = block
    return images


def write_split_folder(
    data_root: Path, key: str = "synthetic", *, rows: dict[str, int] | None = None, seed: int = 0, classes: int = 10
) -> dict:
    """Write the split folder `splits/<key>` of pattern images under `data_root`; returns its manifest."""
    rows = rows or {"train": 300, "valid": 60, "test": 60}
    rng = np.random.default_rng(seed)
    with SplitWriter(DataRoot(data_root).splits(key), list("ABCDEFGHIJ"[:classes])) as writer:
        for split in SPLITS:
            labels = np.resize(np.arange(classes, dtype=np.int64), rows[split])
            rng.shuffle(labels)
            writer.save(split, pattern_images(labels, rng), labels, [f"{split}/{i}.png" for i in range(len(labels))])
        return writer.commit(seed=seed, dedup="none", inputs={"synthetic": {"seed": seed}})
