"""Atomic writes: write to a temporary sibling, then rename into place.

A crash leaves at most a file whose name says it is temporary (`.tmp-*`), never one that looks
finished; a rerun ignores and replaces such leftovers.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMPORARY_MARK = ".tmp-"


def temporary_sibling(path: Path) -> Path:
    """A unique name in the same folder as `path` (so the final rename stays on one file system)."""
    return path.with_name(f".{path.name}{TEMPORARY_MARK}{uuid.uuid4().hex[:12]}")


def is_temporary(path: Path) -> bool:
    """True for names made by `temporary_sibling`."""
    return path.name.startswith(".") and TEMPORARY_MARK in path.name


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it onto `path`, on error delete it.

    Works for files and folders. An existing folder at `path` is replaced: it is moved aside
    first, since `os.replace` cannot overwrite a non-empty directory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path)
    try:
        yield temporary
        replace(temporary, path)
    except BaseException:
        remove(temporary)
        raise


def replace(temporary: Path, path: Path) -> None:
    """Rename a finished file or folder onto `path`, replacing what is there."""
    if path.is_dir() and not path.is_symlink():
        aside = temporary_sibling(path)
        os.replace(path, aside)
        os.replace(temporary, path)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(temporary, path)


def remove_leftovers(folder: Path) -> None:
    """Delete temporary files and folders that an interrupted run left in `folder`."""
    if folder.is_dir():
        for entry in folder.iterdir():
            if is_temporary(entry):
                remove(entry)


def remove_temporaries_of(path: Path) -> list[Path]:
    """Delete the temporary siblings `temporary_sibling(path)` made for `path` that an interrupted run left.

    Returns what was deleted.
    """
    path = Path(path)
    leftovers = sorted(path.parent.glob(f".{glob.escape(path.name)}{TEMPORARY_MARK}*"))
    for entry in leftovers:
        remove(entry)
    return leftovers


def remove(path: Path) -> None:
    """Delete a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` atomically and durably."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return path


def write_json(path: Path, document: Any) -> Path:
    """Write `document` as indented JSON to `path` atomically."""
    return write_bytes(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    """Read a JSON document written by `write_json`."""
    return json.loads(Path(path).read_text())
