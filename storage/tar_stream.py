"""Read the regular files of a .tar or .tar.gz in one sequential pass, without extracting.

Python's `tarfile` spends about as long per member as decoding a 28x28 PNG takes; notMNIST_large
has 529,119 members, so the decode stage reads headers itself. The format handled is what GNU tar
and Python write: ustar headers, GNU long names ('L'), pax path/size records ('x'). Nothing is
written to disk here, but members are still checked: links, devices and FIFOs are refused as in
extraction, and member count and total size are bounded.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

from tasks.errors import ArchiveError, UnsafeArchiveError

BLOCK = 512
READ_BYTES = 4 << 20
REGULAR, DIRECTORY = (b"0", b"\0", b"7"), b"5"
REFUSED = {b"1": "hard link", b"2": "symbolic link", b"3": "character device", b"4": "block device", b"6": "FIFO"}


class _Stream:
    """A forward-only byte reader over the (decompressed) archive."""

    def __init__(self, handle):
        self.handle = handle
        self.buffer = b""
        self.position = 0

    def read(self, count: int) -> bytes:
        while len(self.buffer) - self.position < count:
            chunk = self.handle.read(max(READ_BYTES, count))
            if not chunk:
                break
            self.buffer = self.buffer[self.position :] + chunk
            self.position = 0
        data = self.buffer[self.position : self.position + count]
        self.position += len(data)
        return data


def _octal(field: bytes, member: str) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError as error:
        raise ArchiveError(f"tar header of {member!r} is corrupt (bad number {text!r})") from error


def _pax_records(data: bytes) -> dict[str, str]:
    records, position = {}, 0
    while position < len(data) and data[position:position + 1] != b"\0":
        length_text, _, rest = data[position:].partition(b" ")
        length = int(length_text)
        key, _, value = rest[: length - len(length_text) - 2].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def iter_files(archive: Path, *, max_members: int, max_total_bytes: int) -> Iterator[tuple[str, bytes]]:
    """Yield `(name, data)` for every regular file of `archive`, in archive order."""
    archive = Path(archive)
    with open(archive, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(archive, "rb") if compressed else open(archive, "rb")) as handle:
            # gzip's CRC-32 covers every byte (checked at the end, before a caller commits anything),
            # so per-header checksums are only worth their cost for an uncompressed tar.
            yield from _members(_Stream(handle), archive, max_members, max_total_bytes, check_headers=not compressed)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise ArchiveError(f"{archive} is corrupt or truncated ({error}); delete it and download it again") from error


def _members(
    stream: _Stream, archive: Path, max_members: int, max_total_bytes: int, check_headers: bool
) -> Iterator[tuple[str, bytes]]:
    members = total_bytes = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            raise ArchiveError(f"{archive} ends in the middle of a tar header; delete it and download it again")
        if header == bytes(BLOCK):
            return  # end-of-archive marker
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345:346] != b"\0":
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        member = long_name or pax.get("path") or name.decode("utf-8", "surrogateescape")
        if check_headers and _octal(header[148:156], member) != sum(header[:148]) + 256 + sum(header[156:]):
            # (the checksum field itself counts as eight spaces)
            raise ArchiveError(f"{archive}: tar header of {member!r} fails its checksum; the archive is corrupt")
        size = int(pax["size"]) if "size" in pax else _octal(header[124:136], member)
        kind = header[156:157]
        padded = stream.read(size + (-size % BLOCK))
        if len(padded) < size:
            raise ArchiveError(f"{archive} is truncated inside {member!r}; delete it and download it again")
        data = padded[:size]

        if kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind == b"x":
            pax = _pax_records(data)
            continue
        if kind in (b"g", b"K"):
            continue
        long_name, pax = None, {}
        members += 1
        total_bytes += size
        if members > max_members:
            raise UnsafeArchiveError(f"{archive}: more than {max_members:,} members (at {member!r}); refusing it")
        if total_bytes > max_total_bytes:
            raise UnsafeArchiveError(f"{archive}: more than {max_total_bytes:,} bytes (at {member!r}); refusing it")
        if kind in REFUSED:
            raise UnsafeArchiveError(f"{archive}: member {member!r} is a {REFUSED[kind]}; refusing the archive")
        if kind == DIRECTORY:
            continue
        if kind not in REGULAR:
            raise ArchiveError(f"{archive}: member {member!r} has unsupported tar type {kind!r}")
        yield member, data
