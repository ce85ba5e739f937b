"""Content digests: of files, and the dataset fingerprint every split folder carries."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

READ_BYTES = 8 << 20


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in large chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_fingerprint(splits: dict[str, dict]) -> str:
    """A split folder's fingerprint: sha256 over each split's x and y array digests, in split order."""
    arrays = {split: [info["x_sha256"], info["y_sha256"]] for split, info in splits.items()}
    return hashlib.sha256(json.dumps(arrays).encode()).hexdigest()
