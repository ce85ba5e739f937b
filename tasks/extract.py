"""Extract the notMNIST archive in one streaming pass, refusing hostile members, renamed into place whole.

The seed ran `tarfile.extractall` and skipped extraction whenever a folder of the right name existed,
so an interrupted run looked finished forever. Here the archive is unpacked into a temporary folder
inside `dest_dir`, checked, recorded (storage/extraction.py) and only then renamed into place.
`storage.tar_stream` reads the archive and refuses what is not a file or folder; this stage refuses
names that would land outside one top-level folder under `dest_dir`.
"""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path

from filelock import FileLock

from core.errors import ArchiveError, UnsafeArchiveError
from storage.atomic import remove, remove_temporaries_of, temporary_sibling
from storage.extraction import RECORD_NAME, class_folders, find_extraction, listing_digest, write_record
from storage.layout import lock_file
from storage.tar_stream import MAX_MEMBERS, MAX_TOTAL_BYTES, TarReader
from tasks.reporting import stage_logger

# notMNIST_large.tar.gz holds about 529,119 members and a few hundred MB of PNGs; these defaults
# leave several times that room while still stopping an archive bomb.

# O_EXCL makes a repeated member name an error at no cost; O_NOFOLLOW keeps writes off any link.
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def extract_archive(
    archive: Path,
    dest_dir: Path,
    *,
    expected_classes: int | None = 10,
    max_members: int = MAX_MEMBERS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> Path:
    """Extract `archive` (a tar, plain or gzip/bzip2/xz) into `dest_dir` and return its top-level folder.

    Skips the work when a finished extraction of the same archive is there. Raises
    UnsafeArchiveError for hostile members or an archive past the limits, and ArchiveError for a
    corrupt archive or a class-folder count other than `expected_classes` (None skips that check).
    """
    archive, dest_dir, logger = Path(archive), Path(dest_dir), stage_logger(__name__)
    if not archive.is_file():
        raise ArchiveError(f"{archive} does not exist or is not a file; download it first (the download stage).")
    dest_dir.mkdir(parents=True, exist_ok=True)
    # While this is held, every temporary folder of this archive is a leftover of a dead run.
    with FileLock(str(lock_file(dest_dir / archive.name))):
        found = find_extraction(archive, dest_dir)
        if found is not None:
            logger.info("%s already present - Skipping extraction of %s.", found, archive)
            return found
        for entry in remove_temporaries_of(dest_dir / archive.name):
            logger.warning("Deleted %s, left by an interrupted extraction.", entry)
        status, started = archive.stat(), time.perf_counter()
        logger.info("Extracting %s (%s bytes) into %s.", archive, f"{status.st_size:,}", dest_dir)
        work = temporary_sibling(dest_dir / archive.name)
        try:
            work.mkdir()
            record, listings = _stream_members(
                archive, work, max_members=max_members, max_total_bytes=max_total_bytes
            )
            top, final = work / record["top_folder"], dest_dir / record["top_folder"]
            _check_class_folders(archive, top, expected_classes)
            identity = {"archive_name": archive.name, "archive_size": status.st_size,
                        "archive_mtime_ns": status.st_mtime_ns}
            record = write_record(top, {**record, **identity}, listings)
            _make_room(final)
            # Moved into `work` (under a name no top folder can have) so the removal below clears it.
            if os.path.lexists(final):
                os.replace(final, work / f".{final.name}.replaced")
            os.replace(top, final)
        finally:
            remove(work)
    logger.info("Extracted %s members (%s bytes) of %s into %s in %.1f s.", f"{record['member_count']:,}",
                f"{record['total_bytes']:,}", archive.name, final, time.perf_counter() - started)
    return final


def _make_room(final: Path) -> None:
    """Refuse to replace a folder at `final` that no extraction made: it may hold the user's files."""
    if os.path.lexists(final) and not (final / RECORD_NAME).is_file():
        raise ArchiveError(
            f"{final} exists and was not made by an extraction (it has no {RECORD_NAME}); it is left as it is. "
            "Move it away, or extract into another --dest."
        )


def _check_class_folders(archive: Path, top: Path, expected_classes: int | None) -> None:
    """Raise ArchiveError unless `top` holds `expected_classes` folders, one per class."""
    folders = class_folders(top)
    if expected_classes is not None and len(folders) != expected_classes:
        raise ArchiveError(f"{archive} should hold {expected_classes} folders, one per class, under {top.name}/; "
                           f"found {len(folders)}: {folders}. Check that this is the right archive; "
                           "nothing was extracted.")


def _stream_members(
    archive: Path, work: Path, *, max_members: int, max_total_bytes: int
) -> tuple[dict, dict[str, str]]:
    """Check and write every member of `archive` under `work` in one pass.

    Returns counts and digest, and the listing of each class folder that holds only files.
    """
    prefix, top, name = f"{work}{os.sep}", None, ""
    created, explicit_directories = {""}, set()
    entries: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    nested: set[str] = set()  # class folders with folders inside: listed from the disk instead
    with TarReader(archive, max_members=max_members, max_total_bytes=max_total_bytes) as reader:
        try:
            for member in reader:
                name, is_directory = member.name, member.is_directory
                relative = member_path(archive, name, is_directory)
                if not relative:
                    continue  # "./", the extraction root itself
                first, separator, _ = relative.partition("/")
                top = top_folder(archive, name, first, top)
                if not (separator or is_directory):  # a file where the top folder should be
                    raise UnsafeArchiveError(f"{archive}: member {name!r} lies outside the single top-level "
                                             f"folder; expected exactly one, found {[first]}. Nothing was written.")
                if is_directory:
                    if relative in explicit_directories:
                        raise FileExistsError(relative)
                    explicit_directories.add(relative)
                    _make_directories(work, relative, created)
                    if relative.count("/") > 1:
                        nested.add(relative.split("/")[1])
                    continue
                parent, _, file_name = relative.rpartition("/")
                if parent not in created:
                    _make_directories(work, parent, created)
                write_member(prefix + relative, member.pieces())
                depth = parent.count("/")
                if depth == 1:
                    entries[parent.partition("/")[2]].append((file_name, member.size))
                elif depth > 1:
                    nested.add(parent.split("/")[1])
        except (FileExistsError, IsADirectoryError, NotADirectoryError) as error:
            raise UnsafeArchiveError(f"{archive}: member {name!r} repeats or collides with an earlier member's "
                                     "name; refusing an ambiguous archive. Nothing was extracted.") from error
    if top is None:
        raise ArchiveError(f"{archive} holds no members; expected one top-level folder. Delete it and download again.")
    counts = {"top_folder": top, "member_count": reader.member_count, "total_bytes": reader.total_bytes,
              "archive_sha256": reader.archive_sha256}
    return counts, {folder: listing_digest(files) for folder, files in entries.items() if folder not in nested}


def write_member(path: str, pieces) -> None:
    """Create the file `path`, which must not exist yet, holding the concatenated `pieces`."""
    # No chmod, chown or utime: each is a syscall per file, and nothing downstream reads them.
    descriptor = os.open(path, CREATE_FLAGS, 0o644)
    try:
        for piece in pieces:
            view = memoryview(piece)
            while view:
                view = view[os.write(descriptor, view):]
    finally:
        os.close(descriptor)


def _make_directories(work: Path, relative: str, created: set[str]) -> None:
    """Create `work/relative` and its parents unless `created` says they exist; record them there."""
    if relative in created:
        return
    os.makedirs(work / relative, exist_ok=True)
    while relative not in created:
        created.add(relative)
        relative = relative.rpartition("/")[0]


def top_folder(archive: Path, name: str, first: str, top: str | None) -> str:
    """The archive's single top folder, from member `name`'s first path component and the top folder seen
    so far (None before the first member); refuses a hidden one or a second one (UnsafeArchiveError).
    Shared with the unpack stage (tasks/unpack.py)."""
    if top is None:
        if first.startswith("."):  # hidden names are the stages' own: locks and temporary folders
            raise UnsafeArchiveError(f"{archive}: member {name!r} is in the hidden top-level folder {first!r}; "
                                     "expected a visible one such as 'notMNIST_large'.")
        return first
    if first != top:
        raise UnsafeArchiveError(f"{archive}: member {name!r} lies outside the single top-level folder; expected "
                                 f"exactly one, found {sorted({top, first})}. Nothing was written.")
    return top


def member_path(archive: Path, name: str, is_directory: bool) -> str:
    """Member `name` less "." and empty components, "" for the root folder; refuses names that leave it
    (UnsafeArchiveError). Shared with the unpack stage (tasks/unpack.py)."""
    relative = name.rstrip("/")
    if relative and relative[0] not in "./" and "/." not in relative and "//" not in relative:
        return relative  # nearly every name; only the rest needs the closer look below
    if name.startswith("/"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to write outside "
                                 "the destination. Nothing was written.")
    parts = [part for part in name.split("/") if part and part != "."]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} has a '..' component; refusing to write outside "
                                 "the destination. Nothing was written.")
    if not parts and not is_directory:
        raise UnsafeArchiveError(f"{archive}: member {name!r} is a file without a name; refusing the archive. "
                                 "Nothing was written.")
    return "/".join(parts)
