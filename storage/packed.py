"""Packed letters: an archive's PNG files as they were in it, one folder per letter, for the decode tasks.

    packed/<archive>/<letter>/
      png.parquet        rows: file (the member's path in the archive, as bytes), png (its bytes, unchanged)
      _manifest.json     written last (storage/folders.py), with: letter, images (rows), top_folder,
                         archive {name, bytes, mtime_ns, sha256}

The unpack stage (tasks/unpack.py) reads the archive once, with every check of extraction, and writes
all ten; each letter's decode task then reads its own folder alone, checked against the manifest
before a byte is used, on this machine or on another that fetched it from the data root. One file of
uncompressed Parquet per letter, instead of some 53,000 small files: a PNG is already compressed, and
creating and reading back half a million files cost more than decoding them (BENCHMARKS.md).

`file` is binary because a tar member's name need not be UTF-8; the decode stage reports such a
name as a rejected file, as it does for an extracted one.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.folders import FolderWriter, read_manifest, verify_file

KIND, FORMAT = "packed-letter", 1
FILE = "png.parquet"
ROW_GROUP_ROWS = 8192  # the decode stage's batch: one row group is one batch of work
PACKED_SCHEMA = pa.schema([("file", pa.binary()), ("png", pa.binary())])


class PackedLetterWriter(FolderWriter):
    """Writes one letter's packed folder: `add` its members in archive order, then `commit`."""

    def __init__(self, folder: Path, letter: str):
        super().__init__(folder, KIND, FORMAT)
        self.letter, self.images = letter, 0
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
        if len(self._names) == ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._names:
            self._writer.write_table(pa.table([self._names, self._pngs], schema=PACKED_SCHEMA))
            self.images += len(self._names)
            self._names, self._pngs = [], []

    def commit(self, **fields) -> dict:
        """Write the last rows, close the file, and put the folder in place with its manifest."""
        self._flush()
        self._writer.close()
        self._writer = None
        return super().commit(letter=self.letter, images=self.images, **fields)


def find_packed(folder: Path, archive: dict | None = None) -> dict | None:
    """The manifest of a finished packed folder (of that archive, when its identity is given), unverified, or None.

    `archive` is what the manifest's `archive` records: name, bytes, mtime_ns (sha256 need not be given).
    """
    manifest = read_manifest(folder, KIND, FORMAT)
    if manifest is None or FILE not in manifest["files"]:
        return None
    if archive is not None and any(manifest.get("archive", {}).get(key) != value for key, value in archive.items()):
        return None
    return manifest


def checked_groups(folder: Path, manifest: dict, remedy: str) -> tuple[Path, list[int]]:
    """The letter's file, checked against the manifest (CorruptDataError, saying `remedy`, when it differs),
    and the rows of each of its row groups."""
    path = verify_file(folder, manifest, FILE, remedy)
    return path, [group.num_rows for group in _row_groups(path)]


def read_group(path: Path, group: int) -> tuple[list[str], list[bytes]]:
    """One row group of a letter's file, checked beforehand (`checked_groups`): names and PNG bytes, in archive order."""
    with pq.ParquetFile(path) as parquet:
        table = parquet.read_row_group(group)
    names = [name.decode("utf-8", "surrogateescape") for name in table.column("file").to_pylist()]
    return names, table.column("png").to_pylist()


def _row_groups(path: Path) -> list[pq.RowGroupMetaData]:
    with pq.ParquetFile(path) as parquet:
        return [parquet.metadata.row_group(number) for number in range(parquet.num_row_groups)]
