"""Unpack stage: read a notMNIST archive once into ten packed letters, the decode tasks' inputs.

Extraction (tasks/extract.py) writes one file per image, some 530,000 for notMNIST_large, and the
decode stage then reads them back; both cost more than decoding itself. The pipeline unpacks
instead: one streaming pass over the archive (storage/tar_stream.py refuses links, devices and
archive bombs, and every header's checksum is checked), the same refusals of names as extraction
(its `member_path` and `top_folder`: absolute, `..`, hidden or second top folders; and repeated
names), a limit on one member's size, and each letter's PNGs written, untouched, into one Parquet
file of its own (storage/packed.py). Nothing is committed until the whole archive has been read and its gzip
checksum has passed; then the ten folders are put in place, each with its manifest.
"""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path

from filelock import FileLock

from core.errors import ArchiveError, UnsafeArchiveError
from core.seed import LETTERS
from storage.atomic import remove_temporaries_of
from storage.layout import DataRoot, file_entry, lock_file
from storage.packed import PackedLetterWriter, archive_identity, find_packed, find_unpacked, is_bound
from storage.tar_stream import MAX_MEMBERS, MAX_TOTAL_BYTES, TarReader
from tasks.decode import start_shared_workers
from tasks.early_decode import EarlyDecode
from tasks.extract import member_path, top_folder
from tasks.reporting import stage_logger
from tasks.stage import Stage, stage_task

# Each member is held in memory while it is packed; notMNIST's PNGs are under 1 KB.
DEFAULT_MAX_MEMBER_BYTES = 16 << 20


def unpack_archive(
    archive: Path,
    dest_dir: Path,
    *,
    max_members: int = MAX_MEMBERS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    shards_dir: Path | None = None,
) -> Path:
    """Unpack `archive` (a tar, plain or compressed) into `dest_dir/<letter>/` for A-J; returns `dest_dir`.

    With `shards_dir`, where the pipeline's shared decode pool is open, the letters are decoded into it while
    the archive is read, and committed after it (tasks/early_decode.py).

    Skips the work when all ten letters of this archive are there. Raises UnsafeArchiveError for
    hostile members or an archive past the limits (a member over `max_member_bytes` too: each is held in
    memory), and ArchiveError for a corrupt archive or one not laid out as <top folder>/<letter A-J>/<file>.
    """
    archive, dest_dir, logger = Path(archive), Path(dest_dir), stage_logger(__name__)
    if not archive.is_file():
        raise ArchiveError(f"{archive} does not exist or is not a file; download it first (the download stage).")
    dest_dir.mkdir(parents=True, exist_ok=True)
    # While this is held, every temporary letter folder here is a leftover of a dead run.
    with FileLock(str(lock_file(dest_dir))):
        if find_unpacked(archive, dest_dir) is not None:
            logger.info("%s already holds the letters of %s - skipping the unpack.", dest_dir, archive.name)
            return dest_dir
        for letter in LETTERS:
            for entry in remove_temporaries_of(dest_dir / letter):
                logger.warning("Deleted %s, left by an interrupted unpack.", entry)
        start_shared_workers()  # the letters will need decoding: their workers start while the archive is read
        identity, started = archive_identity(archive), time.perf_counter()
        logger.info("Unpacking %s (%s bytes) into %s.", archive, f"{identity['bytes']:,}", dest_dir)
        with contextlib.ExitStack() as stack:
            early = stack.enter_context(EarlyDecode(dest_dir, shards_dir)) if shards_dir is not None else None
            writers = {letter: stack.enter_context(PackedLetterWriter(
                dest_dir / letter, letter, functools.partial(early.group, letter) if early else None,
            )) for letter in LETTERS}
            top, sha256, members = _pack_members(archive, writers, max_members, max_total_bytes, max_member_bytes)
            for writer in writers.values():  # all ten sealed before any is put in place: all or nothing
                writer.seal(top_folder=top, archive={**identity, "sha256": sha256})
            for writer in writers.values():
                writer.place()
            if early is not None and (decoded := early.commit()):
                logger.info("Decoded letters %s of %s while unpacking it.", "".join(decoded), archive.name)
    logger.info("Unpacked %s members of %s into ten letters in %.1f s.", f"{members:,}", archive.name,
                time.perf_counter() - started)
    return dest_dir


def _pack_members(
    archive: Path, writers: dict[str, PackedLetterWriter], max_members: int, max_total_bytes: int, max_member_bytes: int
) -> tuple[str, str, int]:
    """Check every member of `archive` and give each file to its letter's writer, in one pass.

    Returns the top folder's name, the archive's sha256 and the member count.
    """
    top, seen, names = None, set(), set()
    # Every tar header's checksum is checked, as extraction does: gzip's CRC only says the bytes are those
    # that were compressed, not that the tar was whole.
    with TarReader(archive, max_members=max_members, max_total_bytes=max_total_bytes) as reader:
        for name, is_directory, size, data in reader.entries(max_member_bytes):
            relative = member_path(archive, name, is_directory)
            if not relative:
                continue  # "./", the archive's root itself
            parts = relative.split("/")
            if parts[0] != top:
                top = top_folder(archive, name, parts[0], top)
            depth = len(parts) - (not is_directory)  # the folders it lies in, itself included
            if depth > 2 or (len(parts) > 1 and parts[1] not in writers) or (not is_directory and depth < 2):
                raise ArchiveError(f"{archive}: member {name!r} is not <top folder>/<letter A-J>/<file>; "
                                   "check that this is a notMNIST archive. Nothing was unpacked.")
            if len(parts) > 1:
                seen.add(parts[1])
            if relative in names:
                raise UnsafeArchiveError(f"{archive}: member {name!r} repeats an earlier member's name; "
                                         "refusing an ambiguous archive. Nothing was unpacked.")
            names.add(relative)
            if is_directory:
                continue
            if data is None:
                raise UnsafeArchiveError(f"{archive}: member {name!r} has {size:,} bytes, over the limit "
                                         f"of {max_member_bytes:,} for one image (a notMNIST PNG is under 1 KB); "
                                         "refusing it. If the archive is genuine, raise max_member_bytes.")
            writers[parts[1]].add(relative, data)
    if top is None:
        raise ArchiveError(f"{archive} holds no members; expected one top-level folder. Delete it and download again.")
    if missing := sorted(set(writers) - seen):
        raise ArchiveError(f"{archive} should hold a folder for each letter A-J under {top}/; {', '.join(missing)} "
                           "missing. Check that this is the right archive; nothing was unpacked.")
    return top, reader.archive_sha256, reader.member_count


def unpack_to_root(root: DataRoot, archive: str) -> dict:
    """Unpack the data root's `raw/<archive>` into `packed/<archive>/<letter>/` (see `unpack_archive`); returns
    where the letters are and how many images each holds."""
    (raw,), letters = _archive(root, {"archive": archive}), _unpacked(root, {"archive": archive})
    packed = unpack_archive(raw, letters[0].parent, shards_dir=root.shards(archive))
    return {"packed": root.relative(packed),
            "images": {letter: find_packed(packed / letter)["images"] for letter in LETTERS}}


def _unpacked(root: DataRoot, parameters: dict) -> list[Path]:
    return [root.packed(parameters["archive"]) / letter for letter in LETTERS]


def _archive(root: DataRoot, parameters: dict) -> list[Path]:
    return [root.raw / parameters["archive"]]


def _unpack_current(root: DataRoot, parameters: dict, manifests: dict[Path, dict]) -> bool:
    """The ten letters were unpacked from the archive the data root holds now (their files are checked already)."""
    if root.store is None:
        archive = root.raw / parameters["archive"]
        return archive.is_file() and all(
            find_packed(folder, archive_identity(archive)) is not None for folder in manifests
        )
    raw = root.committed(root.raw / parameters["archive"])
    if raw is None:
        return False
    sha256 = file_entry(raw)["sha256"]
    return all(manifest.get("archive", {}).get("sha256") == sha256 and is_bound(manifest, folder.name)
               for folder, manifest in manifests.items())


unpack_task = stage_task(
    unpack_to_root,
    stage=Stage(outputs=_unpacked, reads=_archive, current=_unpack_current),
    name="unpack-archive",
    task_run_name=lambda parameters: f"unpack {parameters['archive']}",
)
