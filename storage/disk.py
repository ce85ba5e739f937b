"""A full file system as the error it is: which file system, and what was being written.

A write into a file system with no room left fails in as many ways as there are writers: Python's
`OSError(ENOSPC)`, pyarrow's and h5py's OSErrors with the errno only in their message, and, through a
memory map, a SIGBUS (storage/arrays.py allocates before it maps). The stage boundary and the flows
turn each of them into one `DiskFullError` whose message names the file system's mount point and what
was being written, so the command line prints one line instead of a traceback or a crash.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from core.errors import DiskFullError, PipelineError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = tuple(os.strerror(number) for number in NO_SPACE)  # "No space left on device", "Disk quota exceeded"


def out_of_space(error: BaseException | None) -> bool:
    """True when `error`, or an error it was raised from, is a file system out of room (or over a quota)."""
    return any(isinstance(e, OSError) and (e.errno in NO_SPACE or any(text in str(e) for text in _NO_SPACE_TEXT))
               for e in _chain(error))


def mount_point(path: Path) -> Path:
    """The mount point of the file system that holds `path` (or would, for a path not yet made); as far up as
    this process may look."""
    path = Path(path).absolute()
    try:
        while not path.exists() and path != path.parent:
            path = path.parent
        device = path.stat().st_dev
        while path != path.parent and path.parent.stat().st_dev == device:
            path = path.parent
    except OSError:
        pass  # a folder this process may not stat: the last one it could is named
    return path


def disk_full(error: BaseException, where: Path, what: str) -> DiskFullError:
    """The DiskFullError for `error`, met while writing `what` under `where`."""
    named = next((Path(os.fsdecode(e.filename)) for e in _chain(error)
                  if isinstance(e, OSError) and isinstance(e.filename, (str, bytes)) and e.filename), None)
    holder = mount_point(named or where)
    written = f"{what} ({named.name})" if named else what
    holds = f" (the file system of {where})" if Path(where).absolute() != holder else ""
    return DiskFullError(
        f"No space left on {holder}{holds} while writing {written}: free space there, or use a data root (or "
        "--scratch-dir) on a larger file system, and rerun; nothing half-written was committed."
    )


@contextlib.contextmanager
def writing(what: str, where: Path):
    """Within the block, a file system out of room is a DiskFullError naming it and `what` was being written."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as error:
        if not out_of_space(error):
            raise
        raise disk_full(error, where, what) from error


def _chain(error: BaseException | None):
    seen = set()
    while error is not None and id(error) not in seen:  # `raise error from error` makes a loop
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__
