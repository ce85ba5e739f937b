"""Extract the notMNIST archive in one streaming pass, refusing hostile members, renamed into place whole.

The seed ran `tarfile.extractall` and skipped extraction whenever a folder of the right name existed,
so an interrupted run looked finished forever. Here the archive is unpacked into a temporary folder
inside `dest_dir`, checked, recorded in `.extracted.json` and only then renamed into place.
Headers are parsed here: `tarfile` spends about 27 us a member on parsing alone, more than `tar xzf`
takes for the whole extraction (bench/extract.py). Accepted is what GNU tar and Python write: ustar
headers, GNU long names, pax path and size records.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
import queue
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock
from prefect import task

from storage.atomic import TEMPORARY_MARK, read_json, remove, temporary_sibling, write_json
from tasks.errors import ArchiveError, UnsafeArchiveError
from tasks.reporting import stage_logger

RECORD_NAME = ".extracted.json"
RECORD_FORMAT = 1
# notMNIST_large.tar.gz holds about 529,119 members and a few hundred MB of PNGs; these defaults
# leave several times that room while still stopping an archive bomb.
DEFAULT_MAX_MEMBERS = 2_000_000
DEFAULT_MAX_TOTAL_BYTES = 4 * 2**30

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
CHUNK_BYTES = 1 << 20
QUEUED_CHUNKS = 16
# Long names and pax records take a few hundred bytes; a far larger one only makes us hold it in memory.
MAX_EXTENSION_BYTES = 1 << 20
POSIX_MAGIC = b"ustar\x0000"
REGULAR_TYPES = frozenset(b"0\x007")  # "7" is a contiguous file, an ordinary one everywhere but old Unixes
DIRECTORY_TYPE = ord("5")
LONG_NAME_TYPE, LONG_LINK_TYPE, PAX_TYPE, GLOBAL_PAX_TYPE = b"LKxg"
REFUSED_KINDS = {ord("1"): "a hard link", ord("2"): "a symbolic link", ord("3"): "a character device",
                 ord("4"): "a block device", ord("6"): "a FIFO", ord("S"): "a sparse file"}
# O_EXCL makes a repeated member name an error at no cost; O_NOFOLLOW keeps writes off any link.
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
GZIP_MAGIC, OTHER_DECOMPRESSORS = b"\x1f\x8b", ((b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile))


def finished_extraction(archive: Path, dest_dir: Path) -> Path | None:
    """The top folder of a finished extraction of `archive` in `dest_dir`, or None if it must be extracted."""
    status, archive_sha256 = archive.stat(), None
    for candidate in sorted(dest_dir.iterdir()) if dest_dir.is_dir() else []:
        record = read_record(candidate)
        if record is None or record.get("archive_name") != archive.name:
            continue
        if (record.get("archive_size"), record.get("archive_mtime_ns")) == (status.st_size, status.st_mtime_ns):
            return candidate
        # A re-download of the same bytes gets a new mtime; the digest shows it is the same archive.
        if record.get("archive_size") == status.st_size:
            archive_sha256 = archive_sha256 or _file_sha256(archive)
            if record.get("archive_sha256") == archive_sha256:
                return candidate
    return None


def read_record(folder: Path) -> dict | None:
    """The extraction record of `folder`, or None when missing, unreadable, of another format or folder."""
    if folder.name.startswith(".") or not folder.is_dir():
        return None
    try:
        record = read_json(folder / RECORD_NAME)
    except (OSError, ValueError):
        return None
    valid = isinstance(record, dict) and record.get("format_version") == RECORD_FORMAT
    return record if valid and record.get("top_folder") == folder.name else None


def extract_archive(
    archive: Path,
    dest_dir: Path,
    *,
    expected_classes: int | None = 10,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
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
    with FileLock(dest_dir / f".{archive.name}.lock"):
        found = finished_extraction(archive, dest_dir)
        if found is not None:
            logger.info("%s already present - Skipping extraction of %s.", found, archive)
            return found
        for entry in dest_dir.iterdir():
            if entry.name.startswith(f".{archive.name}{TEMPORARY_MARK}"):
                logger.warning("Deleting %s, left by an interrupted extraction.", entry)
                remove(entry)
        status, started = archive.stat(), time.perf_counter()
        logger.info("Extracting %s (%s bytes) into %s.", archive, f"{status.st_size:,}", dest_dir)
        work = temporary_sibling(dest_dir / archive.name)
        try:
            work.mkdir()
            record = _stream_members(archive, work, max_members=max_members, max_total_bytes=max_total_bytes)
            top, final = work / record["top_folder"], dest_dir / record["top_folder"]
            _check_class_folders(archive, top, expected_classes)
            record.update(archive_name=archive.name, archive_size=status.st_size,
                          archive_mtime_ns=status.st_mtime_ns, format_version=RECORD_FORMAT)
            write_json(top / RECORD_NAME, record)
            if os.path.lexists(final):
                # Moved into `work` (under a name no top folder can have) so the removal below clears it.
                os.replace(final, work / f".{final.name}.replaced")
            os.replace(top, final)
        finally:
            remove(work)
    logger.info("Extracted %s members (%s bytes) of %s into %s in %.1f s.", f"{record['member_count']:,}",
                f"{record['total_bytes']:,}", archive.name, final, time.perf_counter() - started)
    return final


@task(name="extract-archive")
def extract_task(
    archive: Path,
    dest_dir: Path,
    expected_classes: int | None = 10,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
) -> Path:
    """Extract a downloaded notMNIST archive into `dest_dir`, skipping it when already extracted."""
    return extract_archive(archive, dest_dir, expected_classes=expected_classes,
                           max_members=max_members, max_total_bytes=max_total_bytes)


def _check_class_folders(archive: Path, top: Path, expected_classes: int | None) -> None:
    """Raise ArchiveError unless `top` holds `expected_classes` folders, one per class."""
    folders = sorted(entry.name for entry in os.scandir(top) if entry.is_dir())
    if expected_classes is not None and len(folders) != expected_classes:
        raise ArchiveError(f"{archive} should hold {expected_classes} folders, one per class, under {top.name}/; "
                           f"found {len(folders)}: {folders}. Check that this is the right archive; "
                           "nothing was extracted.")


def _stream_members(archive: Path, work: Path, *, max_members: int, max_total_bytes: int) -> dict:
    """Check and write every member of `archive` under `work` in one pass; return counts and digest."""
    # Each member costs at most a header, an extended header and their padding beyond its data.
    stream = _DecompressedStream(archive, budget=max_total_bytes + (max_members + 64) * 4 * BLOCK)
    prefix, top, name, pending = f"{work}{os.sep}", None, "", {}
    member_count = total_bytes = 0
    created, explicit_directories = {""}, set()
    try:
        while (block := stream.read(BLOCK)) != ZERO_BLOCK:
            size, typeflag = _header_number(archive, block[124:136]), block[156]
            if not _checksum_matches(archive, block):
                raise _corrupt(archive, f"header checksum mismatch after member {name!r}")
            if typeflag in (LONG_NAME_TYPE, LONG_LINK_TYPE, PAX_TYPE, GLOBAL_PAX_TYPE):
                if size > MAX_EXTENSION_BYTES:
                    raise UnsafeArchiveError(f"{archive}: an extended header after member {name!r} claims "
                                             f"{size:,} bytes; refusing the archive. Delete it.")
                data = stream.read(size + -size % BLOCK)[:size]
                if typeflag == LONG_NAME_TYPE:
                    pending["path"] = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif typeflag == PAX_TYPE:
                    pending.update(_pax_fields(archive, data))
                continue  # global pax headers hold comments; a long link name only precedes a refused link
            name = pending.pop("path", None) or _header_name(block)
            size = pending.pop("size", size)
            pending.clear()
            member_count += 1
            if member_count > max_members:
                raise UnsafeArchiveError(f"{archive}: member {name!r} is number {member_count:,}, over the limit "
                                         f"of {max_members:,}; refusing a possible archive bomb. If the archive "
                                         "is genuine, raise max_members.")
            if typeflag not in REGULAR_TYPES and typeflag != DIRECTORY_TYPE:
                kind = REFUSED_KINDS.get(typeflag, f"of unsupported type {bytes([typeflag])!r}")
                raise UnsafeArchiveError(f"{archive}: member {name!r} is {kind}; only regular files and folders "
                                         "are accepted. Nothing was extracted.")
            is_directory = typeflag == DIRECTORY_TYPE or (typeflag == 0 and name.endswith("/"))
            relative = name.rstrip("/")
            if not relative or relative[0] in "./" or "/." in relative or "//" in relative:
                relative = "/".join(_checked_parts(archive, name))  # the rare names that need a closer look
                if not relative:
                    if is_directory:
                        continue  # "./", the extraction root itself
                    raise UnsafeArchiveError(f"{archive}: member {name!r} is a file without a name; refusing "
                                             "the archive. Nothing was extracted.")
            first, separator, _ = relative.partition("/")
            if top is None:
                if first.startswith("."):  # hidden names are this stage's own: locks and temporary folders
                    raise UnsafeArchiveError(f"{archive}: member {name!r} is in the hidden top-level folder "
                                             f"{first!r}; expected a visible one such as 'notMNIST_large'.")
                top = first
            if first != top or not (separator or is_directory):
                raise UnsafeArchiveError(f"{archive}: member {name!r} lies outside the single top-level folder; "
                                         f"expected exactly one, found {sorted({top, first})}. "
                                         "Nothing was extracted.")
            if is_directory:
                if relative in explicit_directories:
                    raise FileExistsError(relative)
                explicit_directories.add(relative)
                _make_directories(work, relative, created)
                stream.skip(size + -size % BLOCK)
                continue
            total_bytes += size
            if total_bytes > max_total_bytes:
                raise UnsafeArchiveError(f"{archive}: member {name!r} takes the uncompressed size to "
                                         f"{total_bytes:,} bytes, over the limit of {max_total_bytes:,}; refusing "
                                         "a possible archive bomb. If the archive is genuine, raise max_total_bytes.")
            parent = relative.rpartition("/")[0]
            if parent not in created:
                _make_directories(work, parent, created)
            if size <= CHUNK_BYTES:
                write_member(prefix + relative, (memoryview(stream.read(size + -size % BLOCK))[:size],))
            else:
                write_member(prefix + relative, stream.pieces(size))
                stream.skip(-size % BLOCK)
        stream.drain()  # only zero padding is left, but reading it completes the digest and the CRC check
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as error:
        raise UnsafeArchiveError(f"{archive}: member {name!r} repeats or collides with an earlier member's name; "
                                 "refusing an ambiguous archive. Nothing was extracted.") from error
    finally:
        stream.close()
    if top is None:
        raise ArchiveError(f"{archive} holds no members; expected one top-level folder. Delete it and download again.")
    return {"top_folder": top, "member_count": member_count, "total_bytes": total_bytes,
            "archive_sha256": stream.digest.hexdigest()}


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


def _checked_parts(archive: Path, name: str) -> list[str]:
    """The components of member `name` less "." and empty ones; refuses absolute names and ".."."""
    if name.startswith("/"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to write outside "
                                 "the destination. Nothing was extracted.")
    parts = [part for part in name.split("/") if part and part != "."]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} has a '..' component; refusing to write outside "
                                 "the destination. Nothing was extracted.")
    return parts


def _header_name(block: bytes) -> str:
    """The member name in a tar header, joined to the ustar prefix field where there is one."""
    name = block[:100].split(b"\0", 1)[0]
    if block[257:265] == POSIX_MAGIC and block[345] != 0:
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _header_number(archive: Path, field: bytes) -> int:
    """A numeric header field: octal text, or base-256 when the first byte's top bit is set (GNU)."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.rstrip(b" \0") or b"0", 8)
    except ValueError:
        pass  # text after a NUL, which the standard allows; rare enough for the slower parse below
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError as error:
        raise _corrupt(archive, f"unreadable number {field!r} in a tar header") from error


def _checksum_matches(archive: Path, block: bytes) -> bool:
    """True when the header checksum (its byte sum, the checksum field read as spaces) matches."""
    stored, field_sum = _header_number(archive, block[148:156]), sum(block[148:156])
    # adler32's low half is 1 + the byte sum modulo 65521 and costs a third of sum() in Python;
    # exact sums (unsigned, and the signed one of old tars) are only worked out on a mismatch.
    if (stored - (zlib.adler32(block) & 0xFFFF) + 1 + field_sum - 256) % 65521 == 0:
        return True
    signed = sum(byte - 256 if byte > 127 else byte for byte in block)
    return stored in (sum(block) - field_sum + 256, signed - field_sum + 256)


def _pax_fields(archive: Path, data: bytes) -> dict[str, str | int]:
    """The path and size records of a pax extended header."""
    fields: dict[str, str | int] = {}
    position = 0
    while position < len(data) and data[position] != 0:
        length_text = data[position:position + 20].partition(b" ")[0]
        length = int(length_text) if length_text.isdigit() else 0
        key, _, value = data[position + len(length_text) + 1:position + length - 1].partition(b"=")
        if length <= len(length_text) or b"\0" in value or (key == b"size" and not value.isdigit()):
            raise _corrupt(archive, f"unreadable pax record {data[position:position + 40]!r}")
        if key == b"path":
            fields["path"] = value.decode("utf-8", "surrogateescape")
        elif key == b"size":
            fields["size"] = int(value)
        position += length
    return fields


def _corrupt(archive: Path, detail: str) -> ArchiveError:
    """The error for an archive whose bytes cannot be read as a tar stream."""
    return ArchiveError(f"{archive} is corrupt or truncated ({detail}); delete it and download again. "
                        "Nothing was extracted.")


def _file_sha256(path: Path) -> str:
    """The hex sha256 of the file at `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class _DecompressedStream:
    """The archive's tar bytes, which a background thread reads, hashes and decompresses a few chunks ahead.

    zlib, bz2 and lzma release the GIL, so decompression runs on a second core beside the file writes
    (1.4 s instead of 1.85 s for 100,000 members on tmpfs, measured with bench/extract.py).
    """

    def __init__(self, archive: Path, *, budget: int) -> None:
        self.archive, self.budget, self.digest = archive, budget, hashlib.sha256()
        self.buffer, self.position, self.delivered = b"", 0, 0
        self.chunks: queue.Queue = queue.Queue(maxsize=QUEUED_CHUNKS)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._produce, name=f"decompress {archive.name}", daemon=True)
        self.thread.start()

    def _produce(self) -> None:
        """Queue decompressed chunks, then b"" at the end, or the exception that stopped the thread."""
        try:
            with open(self.archive, "rb") as raw:
                for chunk in _decompressed_chunks(raw.peek(8)[:8], _HashingReader(raw, self.digest)):
                    self._put(chunk)
                    if self.stopping.is_set():
                        return
            self._put(b"")
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as error:
            self._put(_corrupt(self.archive, str(error) or type(error).__name__))
        except BaseException as error:  # handed over so that the extracting thread raises it
            self._put(error)

    def _put(self, item: bytes | BaseException) -> None:
        """Queue `item` unless the reader has stopped listening."""
        while not self.stopping.is_set():
            try:
                return self.chunks.put(item, timeout=0.1)
            except queue.Full:
                continue

    def _next_chunk(self) -> bytes:
        """The next decompressed chunk, or b"" at the end of the file."""
        item = self.chunks.get()
        if isinstance(item, BaseException):
            raise item
        self.delivered += len(item)
        if self.delivered > self.budget:
            raise UnsafeArchiveError(f"{self.archive} decompresses to more than {self.budget:,} bytes, more than "
                                     "its member limits allow; refusing a possible archive bomb.")
        return item

    def read(self, size: int) -> bytes:
        """Exactly `size` bytes; raises ArchiveError when the archive ends first."""
        end = self.position + size
        if end <= len(self.buffer):
            data, self.position = self.buffer[self.position:end], end
            return data
        parts, missing = [self.buffer[self.position:]], end - len(self.buffer)
        while missing > 0:
            chunk = self._next_chunk()
            if not chunk:
                raise _corrupt(self.archive, "the tar stream ends early")
            parts.append(chunk[:missing])
            self.buffer, self.position = chunk, min(missing, len(chunk))
            missing -= self.position
        return b"".join(parts)

    def pieces(self, size: int):
        """Yield the next `size` bytes a chunk at a time, for members too large to hold at once."""
        while size > 0:
            piece = self.read(min(size, CHUNK_BYTES))
            size -= len(piece)
            yield piece

    def skip(self, size: int) -> None:
        """Discard the next `size` bytes."""
        for _ in self.pieces(size):
            pass

    def drain(self) -> None:
        """Read to the end of the file, so the digest covers all of it and the gzip CRC gets checked."""
        self.buffer, self.position = b"", 0
        while self._next_chunk():
            pass

    def close(self) -> None:
        """Stop the background thread and wait for it."""
        self.stopping.set()
        while self.thread.is_alive():
            try:
                self.chunks.get(timeout=0.05)
            except queue.Empty:
                pass


def _decompressed_chunks(magic: bytes, source) -> Iterator[bytes]:
    """The decompressed bytes of `source` in chunks, by the format its first bytes `magic` announce."""
    if magic.startswith(GZIP_MAGIC):
        yield from _gunzip(source)
        return
    opener = next((open_ for prefix, open_ in OTHER_DECOMPRESSORS if magic.startswith(prefix)), None)
    reader = opener(source) if opener else source
    while chunk := reader.read(CHUNK_BYTES):
        yield chunk


def _gunzip(source) -> Iterator[bytes]:
    """The decompressed bytes of the gzip members in `source`, in chunks of at most CHUNK_BYTES."""
    # zlib on large reads rather than gzip.GzipFile, whose 8 KiB reads each take the GIL back from
    # the extracting thread: 20% faster extraction in bench/extract.py.
    decompressor, pending = zlib.decompressobj(wbits=31), b""
    while True:
        if not pending and not (pending := source.read(CHUNK_BYTES)):
            if not decompressor.eof:
                raise EOFError("the gzip stream ends early")
            return
        if decompressor.eof:  # another gzip member follows, or the zero padding gzip allows
            if not (pending := pending.lstrip(b"\0")):
                continue
            decompressor = zlib.decompressobj(wbits=31)
        if chunk := decompressor.decompress(pending, CHUNK_BYTES):
            yield chunk
        pending = decompressor.unconsumed_tail or decompressor.unused_data


class _HashingReader:
    """A read-only file wrapper that feeds every byte read into `digest`."""

    def __init__(self, raw, digest) -> None:
        self.raw, self.digest = raw, digest

    def read(self, size: int = -1) -> bytes:
        """Read like the wrapped file, hashing what was read."""
        data = self.raw.read(size)
        self.digest.update(data)
        return data
