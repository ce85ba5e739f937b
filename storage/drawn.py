"""Pictures drawn before, kept on this machine by what they show, so that a rerun does not draw them again.

A picture is filed under a key naming everything it was drawn from (the caller's digest) and carries the sha256
of its bytes in its file name, checked whenever it is read back: a damaged one is drawn again. Only the newest
`KEPT` pictures filed here stay; nothing else in the folder is touched.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from storage.atomic import write_bytes
from storage.layout import user_cache

KEPT = 200  # a run draws 4-6; this keeps every picture of the last few dozen runs
SUFFIX = ".png"
FILED = re.compile(rf"[0-9a-f]{{32}}-[0-9a-f]{{64}}{re.escape(SUFFIX)}")  # a key (flows/pictures.py), then the sha256


def picture_cache() -> Path:
    """This machine's folder of drawn pictures (under the user's cache folder, beside the working copies)."""
    return user_cache() / "pictures"


def recall(key: str, folder: Path | None = None) -> bytes | None:
    """The picture filed under `key`, when one is there and its bytes are the ones recorded in its name."""
    for path in (folder or picture_cache()).glob(f"{key}-*{SUFFIX}"):
        recorded = path.name.removeprefix(f"{key}-").removesuffix(SUFFIX)
        try:
            png = path.read_bytes()
        except OSError:
            continue
        if hashlib.sha256(png).hexdigest() == recorded:
            return png
    return None


def remember(key: str, png: bytes, folder: Path | None = None) -> None:
    """File `png` under `key` (written to a temporary name, then renamed), replacing what was filed there; the
    oldest pictures beyond `KEPT` go. A folder that cannot be written only means drawing again next time."""
    folder = folder or picture_cache()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = write_bytes(folder / f"{key}-{hashlib.sha256(png).hexdigest()}{SUFFIX}", png)
        for stale in folder.glob(f"{key}-*{SUFFIX}"):
            if stale != path and FILED.fullmatch(stale.name):
                stale.unlink(missing_ok=True)
        kept = sorted((filed for filed in folder.glob(f"*-*{SUFFIX}") if FILED.fullmatch(filed.name)), key=_modified,
                      reverse=True)  # only what `remember` filed: a picture someone put here stays
        for old in kept[KEPT:]:
            old.unlink(missing_ok=True)
    except OSError:
        return


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
