"""Read a tar archive (plain, gzip, bzip2 or xz) in one sequential pass, refusing all but files and folders.

`tarfile` spends about 27 us a member on parsing alone, more than `tar xzf` takes for a whole
extraction and about as long as decoding a 28x28 PNG (bench/extract.py); notMNIST_large has 529,119
members, so headers are parsed here. Accepted is what GNU tar and Python write: ustar headers, GNU long
names, pax path and size records. Links, devices, FIFOs, sparse files and unknown types are refused
and member count and size are bounded before a caller sees a member, whether it extracts the archive
(tasks/extract.py), unpacks it into packed letters (tasks/unpack.py) or decodes straight from it
(tasks/decode.py).
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import lzma
import queue
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

from core.errors import ArchiveError, UnsafeArchiveError

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
CHUNK_BYTES = 1 << 20
QUEUED_CHUNKS = 16
# Long names and pax records take a few hundred bytes; a far larger one only makes us hold it in memory.
MAX_EXTENSION_BYTES = 1 << 20
# The archive limits every reader of a notMNIST archive applies (extract, unpack, decode, predict): a few
# times notMNIST_large (529,119 members, about 1 GB unpacked), so a genuine archive passes and a bomb does not.
MAX_MEMBERS = 2_000_000
MAX_TOTAL_BYTES = 4 << 30
POSIX_MAGIC = b"ustar\x0000"
REGULAR_TYPES = frozenset(b"0\x007")  # "7" is a contiguous file, an ordinary one everywhere but old Unixes
DIRECTORY_TYPE = ord("5")
EXTENSION_TYPES = frozenset(b"LKxg")  # GNU long name, GNU long link name, pax header, global pax header
LONG_NAME_TYPE, PAX_TYPE = b"Lx"
REFUSED_KINDS = {ord("1"): "a hard link", ord("2"): "a symbolic link", ord("3"): "a character device",
                 ord("4"): "a block device", ord("6"): "a FIFO", ord("S"): "a sparse file"}
GZIP_MAGIC, OTHER_DECOMPRESSORS = b"\x1f\x8b", ((b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile))


def iter_files(archive: Path, *, max_members: int, max_total_bytes: int) -> Iterator[tuple[str, bytes]]:
    """Yield `(name, data)` for every regular file of `archive` in order; damage may only show after the last."""
    with TarReader(archive, max_members=max_members, max_total_bytes=max_total_bytes,
                   verify_gzip_headers=False) as reader:
        for name, is_directory, _, data in reader.entries(max_total_bytes):  # no file is over the total
            if not is_directory:
                yield name, data


class TarMember:
    """A file or folder of the archive, whose data can be read once, before the reader moves on."""

    __slots__ = ("name", "is_directory", "size", "_reader")

    def __init__(self, name: str, is_directory: bool, size: int, reader: TarReader) -> None:
        self.name, self.is_directory, self.size, self._reader = name, is_directory, size, reader

    def read(self) -> bytes:
        """The whole data of this member."""
        reader = self._reader._claim(self)
        data = reader._stream.read(reader._unread)
        if len(data) < reader._unread:
            raise reader._truncated(self.name)
        reader._unread = 0
        return data[:self.size]

    def pieces(self) -> Iterator[bytes]:
        """The data of this member in pieces of at most CHUNK_BYTES, for members too large to hold at once."""
        if self.size <= CHUNK_BYTES:
            yield self.read()
            return
        reader, remaining = self._reader._claim(self), self.size
        while remaining > 0:
            piece = reader._stream.read(min(remaining, CHUNK_BYTES))
            if not piece:
                raise reader._truncated(self.name)
            remaining -= len(piece)
            reader._unread -= len(piece)  # what a caller leaves unread is skipped before the next header
            yield piece


class TarReader:
    """The members of a tar archive, checked and counted as they are read; iterate once, inside `with`.

    The iteration reads to the end of the file, so that `archive_sha256` covers all of it and the
    compression's own checksum has been checked before it ends.
    """

    def __init__(self, archive: Path, *, max_members: int, max_total_bytes: int,
                 verify_gzip_headers: bool = True) -> None:
        self.archive, self.max_members, self.max_total_bytes = Path(archive), max_members, max_total_bytes
        # gzip's CRC-32 covers every byte and is checked when the iteration ends, so a caller that commits
        # nothing before then may skip the header checksums: a third of the parsing time (0.18 s instead
        # of 0.27 s for 100,005 members already decompressed).
        self.verify_gzip_headers = verify_gzip_headers
        self.member_count = self.total_bytes = self._unread = 0
        self._current: TarMember | None = None
        # Each member costs at most a header, an extended header and their padding beyond its data.
        self._stream = _DecompressedStream(self.archive, budget=max_total_bytes + (max_members + 64) * 4 * BLOCK)

    def __enter__(self) -> TarReader:
        return self

    def __exit__(self, *exception_info) -> None:
        self._stream.close()

    @property
    def archive_sha256(self) -> str:
        """The hex sha256 of the archive file as read so far: all of it once the iteration has ended."""
        return self._stream.digest.hexdigest()

    def __iter__(self) -> Iterator[TarMember]:
        """Every file and folder in archive order; raises UnsafeArchiveError or ArchiveError at the first bad one."""
        for name, is_directory, size in self._headers():
            self._current = member = TarMember(name, is_directory, size, self)
            yield member
            self._current = None  # its data, read or not, is no longer there to read

    def entries(self, max_file_bytes: int) -> Iterator[tuple[str, bool, int, bytes | None]]:
        """Every member as `(name, is_directory, size, data)` in archive order, with the checks of iterating the
        reader: the quick way through an archive of many small files. `data` is None for a folder and for a file over
        `max_file_bytes`, which is skipped unread."""
        stream = self._stream
        for name, is_directory, size in self._headers():
            if is_directory or size > max_file_bytes:
                yield name, is_directory, size, None
                continue
            data = stream.take(size, self._unread)
            if data is None:
                raise self._truncated(name)
            self._unread = 0
            yield name, False, size, data

    def _headers(self) -> Iterator[tuple[str, bool, int]]:
        """`(name, is_directory, size)` of every member, once its header is checked; the caller reads or leaves
        `self._unread` bytes of data and padding, and what it leaves is skipped before the next header."""
        archive, stream, name, pending = self.archive, self._stream, "", {}
        verify_checksums, adler32 = self.verify_gzip_headers or not stream.is_gzip, zlib.adler32
        while True:
            if self._unread:  # the data of the previous member, or what its reader left of it
                if not stream.skip(self._unread):
                    raise self._truncated(name)
                self._unread = 0
            block = stream.read(BLOCK)
            if block == ZERO_BLOCK:
                if pending:  # an extended header names a member that never comes
                    raise _corrupt(archive, f"the extended header after member {name!r} is followed by the end of "
                                            "the archive, not by the member it describes")
                break
            if len(block) < BLOCK:
                where = f"after member {name!r}" if name else "at its start"
                raise _corrupt(archive, f"the tar stream ends {where}, before its end-of-archive marker")
            # The common cases inline, the rest in the functions below: octal digits ended by NUL or space, and
            # a checksum that matches. adler32's low half is 1 + the byte sum modulo 65521 and costs a third of
            # sum() in Python; exact sums (unsigned, and the signed one of old tars) are only worked out on a
            # mismatch.
            try:
                size = int(block[124:136].rstrip(b" \0"), 8)
            except ValueError:
                size = _header_number(archive, block[124:136])
            if verify_checksums:
                field = block[148:156]
                try:
                    stored = int(field.rstrip(b" \0"), 8)
                except ValueError:
                    stored = _header_number(archive, field)
                if (stored - (adler32(block) & 0xFFFF) + 1 + sum(field) - 256) % 65521 and not _exact_checksum_matches(
                        block, stored):
                    raise _corrupt(archive, f"the tar header after member {name!r} fails its checksum")
            if size < 0:  # int() reads a sign, which no tar writes
                raise _corrupt(archive, f"a negative size in the tar header after member {name!r}")
            typeflag = block[156]
            if typeflag in EXTENSION_TYPES:
                self._read_extension(name, typeflag, size, pending)
                continue  # global pax headers hold comments; a long link name only precedes a refused link
            if pending:
                if pending.get("path", None) == "":
                    raise _corrupt(archive, f"the extended header after member {name!r} gives the next member an "
                                            "empty name")
                name, size = pending.pop("path", None) or _header_name(block), pending.pop("size", size)
                pending.clear()
            else:
                name = _header_name(block)
            self.member_count += 1
            if self.member_count > self.max_members:
                raise UnsafeArchiveError(f"{archive}: member {name!r} is number {self.member_count:,}, over the limit "
                                         f"of {self.max_members:,}; refusing more than {self.max_members:,} members "
                                         "as a possible archive bomb. If the archive is genuine, raise max_members.")
            if typeflag in REGULAR_TYPES:
                is_directory = typeflag == 0 and name.endswith("/")  # how old tars marked a folder
            elif typeflag == DIRECTORY_TYPE:
                is_directory = True
            else:
                kind = REFUSED_KINDS.get(typeflag, f"of unsupported type {bytes([typeflag])!r}")
                raise UnsafeArchiveError(f"{archive}: member {name!r} is {kind}; only regular files and folders "
                                         "are accepted, so the archive is refused.")
            if not is_directory:
                self.total_bytes += size
                if self.total_bytes > self.max_total_bytes:
                    raise UnsafeArchiveError(f"{archive}: member {name!r} takes the uncompressed size to "
                                             f"{self.total_bytes:,} bytes, over the limit of {self.max_total_bytes:,}; "
                                             f"refusing more than {self.max_total_bytes:,} bytes as a possible archive "
                                             "bomb. If the archive is genuine, raise max_total_bytes.")
            self._unread = size + -size % BLOCK
            yield name, is_directory, size
        stream.drain()

    def _claim(self, member: TarMember) -> TarReader:
        """This reader, about to read the data of `member`, which must be the current one and still unread."""
        if member is not self._current:
            raise ValueError(f"the data of member {member.name!r} can only be read once, before the next member")
        self._current = None
        return self

    def _truncated(self, name: str) -> ArchiveError:
        """The error for an archive that ends inside the data of member `name`."""
        return _corrupt(self.archive, f"the tar stream is truncated inside {name!r}")

    def _read_extension(self, name: str, typeflag: int, size: int, pending: dict) -> None:
        """Read an extended header into `pending`: the path and size it sets for the next member."""
        if size > MAX_EXTENSION_BYTES:
            raise UnsafeArchiveError(f"{self.archive}: an extended header after member {name!r} claims "
                                     f"{size:,} bytes; refusing the archive. Delete it.")
        padded = size + -size % BLOCK
        data = self._stream.read(padded)
        if len(data) < padded:
            raise _corrupt(self.archive, f"the tar stream is truncated inside the extended header after {name!r}")
        if typeflag == LONG_NAME_TYPE:
            pending["path"] = data[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif typeflag == PAX_TYPE:
            pending.update(_pax_fields(self.archive, data[:size]))


def _header_name(block: bytes) -> str:
    """The member name in a tar header, joined to the ustar prefix field where there is one."""
    name = block[:100].split(b"\0", 1)[0]
    if block[345] and block[257:265] == POSIX_MAGIC:
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _header_number(archive: Path, field: bytes) -> int:
    """A numeric header field: octal text, or base-256 when the first byte's top bit is set (GNU)."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    try:  # up to the first NUL: the standard allows text after it
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError as error:
        raise _corrupt(archive, f"unreadable number {field!r} in a tar header") from error


def _exact_checksum_matches(block: bytes, stored: int) -> bool:
    """True when `stored` is the header's byte sum, the checksum field read as spaces: unsigned, or signed as old tars
    wrote it. What TarReader._headers checks when its sum modulo 65521 does not match."""
    field_sum = sum(block[148:156])
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
    return ArchiveError(f"{archive} is corrupt or truncated ({detail}); delete it and download again.")


class _DecompressedStream:
    """The archive's tar bytes, which a background thread reads, hashes and decompresses a few chunks ahead.

    zlib, bz2 and lzma release the GIL, so decompression runs on a second core beside the file writes
    (1.4 s instead of 1.85 s for 100,000 members on tmpfs, measured with bench/extract.py).
    """

    def __init__(self, archive: Path, *, budget: int) -> None:
        self.archive, self.budget, self.digest = archive, budget, hashlib.sha256()
        self.buffer, self.position, self.delivered, self.ended = b"", 0, 0, False
        self.raw = open(archive, "rb")  # opened here, so a missing file raises in the caller; the thread closes it
        self.magic = self.raw.peek(8)[:8]
        self.is_gzip = self.magic.startswith(GZIP_MAGIC)
        self.chunks: queue.Queue = queue.Queue(maxsize=QUEUED_CHUNKS)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._produce, name=f"decompress {archive.name}", daemon=True)
        self.thread.start()

    def _produce(self) -> None:
        """Queue decompressed chunks, then b"" at the end, or the exception that stopped the thread."""
        try:
            with self.raw as raw:
                for chunk in _decompressed_chunks(self.magic, _HashingReader(raw, self.digest)):
                    self._put(chunk)
                    if self.stopping.is_set():
                        return
            self._put(b"")
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as error:
            self._put(_corrupt(self.archive, str(error) or type(error).__name__))
        except BaseException as error:  # handed over so that the reading thread raises it
            self._put(error)

    def _put(self, item: bytes | BaseException) -> None:
        """Queue `item` unless the reader has stopped listening."""
        while not self.stopping.is_set():
            with contextlib.suppress(queue.Full):
                return self.chunks.put(item, timeout=0.1)

    def _next_chunk(self) -> bytes:
        """The next decompressed chunk, or b"" at the end of the file."""
        if self.ended:
            return b""
        item = self.chunks.get()
        if isinstance(item, BaseException):
            raise item
        self.delivered += len(item)
        if self.delivered > self.budget:
            raise UnsafeArchiveError(f"{self.archive} decompresses to more than {self.budget:,} bytes, more than "
                                     "its member limits allow; refusing a possible archive bomb.")
        self.ended = not item
        return item

    def read(self, size: int) -> bytes:
        """The next `size` bytes, fewer only where the archive ends first."""
        end = self.position + size
        if end <= len(self.buffer):
            data, self.position = self.buffer[self.position:end], end
            return data
        parts, missing = [self.buffer[self.position:]], end - len(self.buffer)
        while missing > 0 and (chunk := self._next_chunk()):
            parts.append(chunk[:missing])
            self.buffer, self.position = chunk, min(missing, len(chunk))
            missing -= self.position
        if missing > 0:
            self.buffer, self.position = b"", 0
        return b"".join(parts)

    def take(self, size: int, padded: int) -> bytes | None:
        """The next `size` bytes, the rest of `padded` skipped; None when the archive ends first."""
        end = self.position + padded
        if end <= len(self.buffer):  # nearly always: a small member inside the current chunk
            data, self.position = self.buffer[self.position:self.position + size], end
            return data
        data = self.read(size)
        return data if len(data) == size and self.skip(padded - size) else None

    def skip(self, size: int) -> bool:
        """Discard the next `size` bytes; False when the archive ends first."""
        while self.position + size > len(self.buffer):
            size -= len(self.buffer) - self.position
            self.buffer, self.position = self._next_chunk(), 0
            if not self.buffer:
                return False
        self.position += size
        return True

    def drain(self) -> None:
        """Read to the end of the file, so the digest covers all of it and the gzip CRC gets checked."""
        self.buffer, self.position = b"", 0
        while self._next_chunk():
            pass

    def close(self) -> None:
        """Stop the background thread and wait for it."""
        self.stopping.set()
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):  # make room: a producer waiting on a full queue then sees the stop
                while True:
                    self.chunks.get_nowait()
            self.thread.join(timeout=0.005)


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
    # the reading thread: 20% faster extraction in bench/extract.py.
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
