"""Small real file systems for the disk-full tests: a tmpfs mounted by the test (CI runs as root)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

FILLER = "filler"


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """`folder` as a tmpfs of `size` ("4m") while the block runs; the test is skipped where mounting is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"mounting a tmpfs needs root ({mounted.stderr.decode().strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Take all of `disk`'s free space but `leave` bytes, with one file that `free` removes; called again, it takes
    what was freed since."""
    status = os.statvfs(disk)
    more = status.f_bavail * status.f_frsize - leave
    filler = disk / FILLER
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        if more > 0:
            os.posix_fallocate(descriptor, os.fstat(descriptor).st_size, more)
    finally:
        os.close(descriptor)
    return filler


def free(disk: Path) -> None:
    (disk / FILLER).unlink()
