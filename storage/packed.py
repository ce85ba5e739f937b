"""Packed letters: an archive's PNG files as they were in it, one folder per letter, for the decode tasks.

    packed/<archive>/<letter>/
      png.parquet        rows: file (the member's path in the archive, normalised: no "./" or empty
                         parts; as bytes), png (its bytes, unchanged)
      _manifest.json     written last (storage/folders.py), with: letter, images (rows), top_folder,
                         archive {name, bytes, mtime_ns, sha256}, and binding: the sha256 of the
                         archive's sha256, the letter and the file's sha256 together, which ties the
                         file to this letter of this archive

The unpack stage (tasks/unpack.py) reads the archive once, with the checks of extraction, and writes
all ten; each letter's decode task then reads its own folder alone, the file checked against the
manifest first, on this machine or on another that fetched it from the data root. One file of
uncompressed Parquet per letter, instead of some 53,000 small files: a PNG is already compressed, and
creating and reading back half a million files cost more than decoding them (BENCHMARKS.md).

`file` is binary because a tar member's name need not be UTF-8; the decode stage reports such a
name as a rejected file, as it does for an extracted one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import CorruptDataError
from core.seed import LETTERS
from storage.folders import MANIFEST, FolderWriter, folder_problem, read_manifest, verify_file

KIND, FORMAT = "packed-letter", 2
FILE = "png.parquet"
ROW_GROUP_ROWS = 8192  # one row group is one batch of the decode stage's work
ROW_GROUP_BYTES = 64 << 20  # or fewer rows, so that a writer never holds more than this of one letter
PACKED_SCHEMA = pa.schema([("file", pa.binary()), ("png", pa.binary())])


class PackedLetterWriter(FolderWriter):
    """Writes one letter's packed folder: `add` its members in archive order, then `commit`."""

    def __init__(self, folder: Path, letter: str, on_group: Callable[[int, list[bytes], list[bytes]], None] | None = None):
        super().__init__(folder, KIND, FORMAT)
        self.letter, self.images, self._bytes, self._groups = letter, 0, 0, 0
        self._on_group = on_group  # told each row group written: its number, names and PNG bytes
        self._names: list[bytes] = []
        self._pngs: list[bytes] = []
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self):
        super().__enter__()
        # No compression or dictionary: PNG bytes do not compress, and names are all different.
        self._writer = pq.ParquetWriter(self.work / FILE, PACKED_SCHEMA, compression="none", use_dictionary=False,
                                        write_statistics=False)
        return self

    def __exit__(self, *exception_info) -> None:
        if self._writer is not None:
            self._writer.close()
        super().__exit__(*exception_info)

    def add(self, name: str, png: bytes) -> None:
        """One member of this letter: its name in the archive and its bytes."""
        self._names.append(name.encode("utf-8", "surrogateescape"))
        self._pngs.append(png)
        self._bytes += len(png)
        if len(self._names) == ROW_GROUP_ROWS or self._bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._names:
            self._writer.write_table(pa.table([self._names, self._pngs], schema=PACKED_SCHEMA))  # one row group
            if self._on_group is not None:
                self._on_group(self._groups, self._names, self._pngs)
            self.images += len(self._names)
            self._groups += 1
            self._names, self._pngs, self._bytes = [], [], 0

    def seal(self, **fields) -> dict:
        """Write the last rows, close the file, and write the manifest (`archive` given); `place` puts it in place."""
        self._flush()
        self._writer.close()
        self._writer = None
        self._archive_sha256 = fields["archive"]["sha256"]
        return super().seal(letter=self.letter, images=self.images, **fields)

    def fields(self, files: dict[str, dict]) -> dict:
        """The binding of the file to this letter of this archive."""
        return {"binding": binding(self._archive_sha256, self.letter, files[FILE]["sha256"])}


def binding(archive_sha256: str, letter: str, file_sha256: str) -> str:
    """What ties a packed file to one letter of one archive: the sha256 of the three together."""
    return hashlib.sha256(json.dumps([archive_sha256, letter, file_sha256]).encode()).hexdigest()


def is_bound(manifest: dict, letter: str) -> bool:
    """True when the manifest is of `letter` and its binding is that of its file, letter and archive."""
    try:
        expected = binding(manifest["archive"]["sha256"], letter, manifest["files"][FILE]["sha256"])
    except (KeyError, TypeError):
        return False
    return manifest.get("letter") == letter and manifest.get("binding") == expected


def archive_identity(archive: Path) -> dict:
    """What a packed manifest records of the archive it came from, less its sha256: name, size, mtime."""
    status = Path(archive).stat()
    return {"name": Path(archive).name, "bytes": status.st_size, "mtime_ns": status.st_mtime_ns}


def find_packed(folder: Path, archive: dict | None = None) -> dict | None:
    """The manifest of a finished packed folder bound to its letter (of that archive, when its identity is given),
    its file unverified, or None.

    `archive` is what the manifest's `archive` records: name, bytes, mtime_ns (sha256 need not be given).
    """
    manifest = read_manifest(folder, KIND, FORMAT)
    if manifest is None or FILE not in manifest["files"] or not is_bound(manifest, Path(folder).name):
        return None
    if archive is not None and any(manifest.get("archive", {}).get(key) != value for key, value in archive.items()):
        return None
    return manifest


def find_unpacked(archive: Path, packed_dir: Path) -> dict[str, dict] | None:
    """The ten letters' manifests when all were unpacked from this very archive and are intact, else None."""
    identity = archive_identity(archive)
    manifests = {letter: find_packed(Path(packed_dir) / letter, identity) for letter in LETTERS}
    if None in manifests.values():
        return None
    intact = all(folder_problem(Path(packed_dir) / letter, manifests[letter], trusting=True) is None
                 for letter in LETTERS)
    return manifests if intact else None


def checked_groups(folder: Path, manifest: dict, remedy: str) -> tuple[tuple[str, int, int, str], list[int]]:
    """The letter's file, checked against the manifest (CorruptDataError, saying `remedy`, when it differs):
    what `read_group` needs to find it unchanged and its rows this letter's (path, inode, mtime, name prefix), and
    the rows of each row group."""
    if not is_bound(manifest, Path(folder).name):
        raise CorruptDataError(f"{Path(folder) / MANIFEST} is not bound to letter {Path(folder).name} of the archive "
                               f"it names: {remedy}")
    path = verify_file(folder, manifest, FILE, remedy)
    status = path.stat()
    with pq.ParquetFile(path) as parquet:
        rows = [parquet.metadata.row_group(number).num_rows for number in range(parquet.num_row_groups)]
    prefix = f"{manifest['top_folder']}/{manifest['letter']}/"
    return (str(path), status.st_ino, status.st_mtime_ns, prefix), rows


def read_group(checked: tuple[str, int, int, str], group: int) -> tuple[list[str], list[bytes]]:
    """One row group of a letter's file that `checked_groups` checked: names and PNG bytes, in archive order.

    A file replaced since (a new unpack renamed into place) is an error, not other rows.
    """
    path, inode, mtime_ns, prefix = checked
    with open(path, "rb") as handle:
        status = os.fstat(handle.fileno())
        if (status.st_ino, status.st_mtime_ns) != (inode, mtime_ns):
            raise CorruptDataError(f"{path} was replaced after it was checked: rerun, which reads the new one")
        table = pq.ParquetFile(handle).read_row_group(group)
    names = [name.decode("utf-8", "surrogateescape") for name in table.column("file").to_pylist()]
    if stray := next((name for name in names if not name.startswith(prefix)), None):
        # Another letter's file (or another archive's) under this letter's name: its glyphs would be trained on
        # with this letter's label. Whoever swapped it also rewrote the manifest, so the rows are what tells.
        raise CorruptDataError(f"{path} holds {stray!r}, not a file of {prefix}: this is not the packed letter its "
                               f"manifest names; delete {Path(path).parent.parent} and rerun, which unpacks again")
    return names, table.column("png").to_pylist()
