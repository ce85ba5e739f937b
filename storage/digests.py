"""Content digests of files, and what identifies a file's bytes short of reading them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

READ_BYTES = 8 << 20


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in large chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def stat_identity(status: os.stat_result) -> tuple[int, int, int, int]:
    """Size, modification and change times (ns) and inode: a write, a truncation, a `touch`, or the file's removal or
    replacement under its name changes at least one of them."""
    return status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino
