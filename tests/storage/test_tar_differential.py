"""The one-pass tar reader against the standard library's `tarfile`, on seeded random and mutated tar streams.

Whatever both read, they read alike: on every stream `tarfile` reads, the reader reads the same members
or refuses the stream; and on any input the reader either yields members or refuses with the project's
archive errors, never another exception. Its two ways through an archive, members read one by one and
`entries` (each small file's bytes taken from the buffer), give the same members or the same error.
Links, devices and FIFOs, which the reader refuses by design, are left out of the comparison. The reader
may read a stream `tarfile` refuses for a header field it never uses (a damaged mtime, uid or mode whose
checksum still happens to match); the members' bytes are what the pipeline checks.
"""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pytest

from core.errors import ArchiveError
from storage.tar_stream import TarReader

CASES = 3000
LIMITS = {"max_members": 64, "max_total_bytes": 1 << 20}
FORMATS = (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT)


def random_archive(rng: random.Random) -> bytes:
    """A small tar stream: folders and files, some with names past ustar's 100 bytes, in one of three formats."""
    fmt = rng.choice(FORMATS)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        top = rng.choice(["notMNIST_small", "top", "d"])
        for number in range(rng.randint(0, 6)):
            name = f"{top}/{rng.choice('ABJ')}/" + "x" * rng.choice([1, 5, 120, 160]) + f"{number}.png"
            if fmt == tarfile.USTAR_FORMAT and len(name) > 100:
                name = name[-90:].lstrip("/")  # ustar splits long names at a slash; keep it simple
            if rng.random() < 0.2:
                info = tarfile.TarInfo(name.rsplit("/", 1)[0] + f"/dir{number}")
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            data = rng.randbytes(rng.choice([0, 1, 511, 512, 513, 3000]))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One of: unchanged, a few flipped bytes (in a header, often), a truncation, a zeroed block, garbage."""
    data = bytearray(data)
    kind = rng.randrange(5)
    if kind == 1 and data:
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(min(len(data), 512) if rng.random() < 0.6 else len(data))
            data[position] ^= 1 << rng.randrange(8)
    elif kind == 2 and data:
        del data[rng.randrange(len(data)):]
    elif kind == 3 and len(data) >= 1024:
        block = rng.randrange(len(data) // 512)
        data[block * 512:(block + 1) * 512] = bytes(512)
    elif kind == 4:
        data = bytearray(rng.randbytes(rng.choice([0, 100, 512, 1024, 2048])))
    return bytes(data)


def read_with_stdlib(path: Path) -> list[tuple[str, bool, bytes]] | None:
    """(name, is folder, bytes) of every file and folder, as `tarfile` reads them; None when it refuses the stream or
    it holds anything else (a link, a device), which the reader refuses by design."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = []
            for info in tar:
                if not (info.isreg() or info.isdir()):
                    return None
                data = tar.extractfile(info).read() if info.isreg() else b""
                if info.isreg() and len(data) != info.size:
                    return None  # a member cut short: tarfile returns fewer bytes without a word
                members.append((info.name.rstrip("/"), info.isdir(), data))
            return members
    except (tarfile.TarError, EOFError, OSError, ValueError, UnicodeError):
        return None


def read_with_reader(path: Path) -> list[tuple[str, bool, bytes]] | str:
    """The same, as the project's one-pass reader reads them; its error message when it refuses the stream."""
    try:
        with TarReader(path, **LIMITS) as reader:
            return [(member.name.rstrip("/"), member.is_directory, member.read() if not member.is_directory else b"")
                    for member in reader]
    except ArchiveError as error:
        return str(error)


def read_entries(path: Path) -> list[tuple[str, bool, bytes]] | str:
    """The same through `TarReader.entries`."""
    try:
        with TarReader(path, **LIMITS) as reader:
            return [(name.rstrip("/"), is_directory, b"" if is_directory else data)
                    for name, is_directory, _, data in reader.entries(LIMITS["max_total_bytes"])]
    except ArchiveError as error:
        return str(error)


@pytest.mark.parametrize("seed", range(4))
def test_the_reader_reads_what_tarfile_reads_or_refuses_it(tmp_path, seed):
    rng = random.Random(seed)
    path = tmp_path / "case.tar"
    both = 0
    for case in range(CASES // 4):
        original = random_archive(rng)
        path.write_bytes(mutate(original, rng))
        stdlib, ours = read_with_stdlib(path), read_with_reader(path)  # any other exception fails the test
        assert read_entries(path) == ours, f"seed {seed}, case {case}: entries and members disagree"
        if not isinstance(ours, str) and stdlib is not None:
            assert ours == stdlib, f"seed {seed}, case {case}: the reader and tarfile disagree"
            both += 1
    assert both > CASES // 4 // 5  # the comparison ran on many streams, not only on refused ones
