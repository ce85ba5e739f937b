"""The record of a finished extraction: which archive made a folder, and the listing of every class folder.

    extracted/<top folder>/
      A/ ... J/                  the archive's files
      .extracted.json            written last: archive name, size, mtime and sha256, member counts,
                                 and each class folder's listing (a digest of its names and sizes)

A folder is a finished extraction of an archive only when its record names that archive, every
class folder still lists the same names and sizes, and no file in them was modified after the record
was written: a file added, deleted or overwritten (even with the same size) after extraction makes
the folder unfinished again. Hashing half a million small files on every check would cost far more
than listing them does; their content is checked by the decode stage, which reads them all.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from storage.atomic import read_json, write_json
from storage.digests import sha256_of

RECORD_NAME = ".extracted.json"
RECORD_FORMAT = 3


def listing_digest(entries: list[tuple[str, int]]) -> str:
    """Identity of a folder from its entries' (name, size), in any order."""
    text = "".join(f"{name}\0{size}\n" for name, size in sorted(entries))
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def folder_state(folder: Path) -> tuple[str, int]:
    """A folder's listing digest (names and sizes) and the newest modification time of its entries, in ns."""
    entries, newest = [], 0
    for entry in os.scandir(folder):
        status = entry.stat(follow_symlinks=False)
        entries.append((entry.name, status.st_size))
        newest = max(newest, status.st_mtime_ns)
    return listing_digest(entries), newest


def class_folders(top: Path) -> list[str]:
    """The names of the class folders in an extracted top folder, sorted."""
    return sorted(entry.name for entry in os.scandir(top) if entry.is_dir() and not entry.name.startswith("."))


def write_record(top: Path, record: dict, listings: dict[str, str] | None = None) -> dict:
    """Add each class folder's listing to `record` and write it into `top`, last; returns it.

    `listings` gives the listings already known (the extraction saw every file it wrote); the other
    class folders are listed here. The record's own modification time marks the end of the extraction.
    """
    record = {**record, "format_version": RECORD_FORMAT, "top_folder": top.name}
    known = listings or {}
    record["classes"] = {name: known.get(name) or folder_state(top / name)[0] for name in class_folders(top)}
    write_json(top / RECORD_NAME, record)
    return record


def read_record(folder: Path) -> dict | None:
    """The extraction record of `folder`, or None when missing, unreadable, of another format or folder."""
    folder = Path(folder)
    if folder.name.startswith(".") or not folder.is_dir():
        return None
    try:
        record = read_json(folder / RECORD_NAME)
    except (OSError, ValueError):
        return None
    valid = isinstance(record, dict) and record.get("format_version") == RECORD_FORMAT
    return record if valid and record.get("top_folder") == folder.name else None


def extraction_problem(top: Path, record: dict, classes: Iterable[str] | None = None) -> str | None:
    """How the extracted folder `top` (or only its `classes` folders) differs from its record, or None when
    it is as extracted."""
    found = class_folders(top)
    if found != sorted(record["classes"]):
        return f"{top} holds class folders {found}, the extraction made {sorted(record['classes'])}"
    finished = (top / RECORD_NAME).stat().st_mtime_ns
    names = list(record["classes"]) if classes is None else [name for name in record["classes"] if name in classes]
    # stat releases the GIL: the class folders are listed on all cores.
    with ThreadPoolExecutor(max_workers=max(1, min(len(names), os.cpu_count() or 1))) as pool:
        states = dict(zip(names, pool.map(lambda name: folder_state(top / name), names)))
    for name, (digest, newest) in states.items():
        if digest != record["classes"][name] or newest > finished:
            return f"files in {top / name} were added, removed or changed after extraction"
    return None


def find_extraction(archive: Path, dest_dir: Path) -> Path | None:
    """The top folder of a finished, unchanged extraction of `archive` in `dest_dir`, or None."""
    archive, dest_dir = Path(archive), Path(dest_dir)
    status, archive_sha256 = archive.stat(), None
    for candidate in sorted(dest_dir.iterdir()) if dest_dir.is_dir() else []:
        record = read_record(candidate)
        if record is None or record.get("archive_name") != archive.name:
            continue
        same = (record.get("archive_size"), record.get("archive_mtime_ns")) == (status.st_size, status.st_mtime_ns)
        # A re-download of the same bytes gets a new mtime; the digest shows it is the same archive.
        if not same and record.get("archive_size") == status.st_size:
            archive_sha256 = archive_sha256 or sha256_of(archive)
            same = record.get("archive_sha256") == archive_sha256
        if same and extraction_problem(candidate, record) is None:
            return candidate
    return None
