"""Content digests of files."""

from __future__ import annotations

import hashlib
from pathlib import Path

READ_BYTES = 8 << 20


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in large chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
