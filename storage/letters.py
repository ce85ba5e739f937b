"""Letter folders: one letter's Parquet shards and the manifest that says where they came from.

    shards/<archive>/<letter>/
      part-00000.parquet ...     the letter's rows (format: storage/shards.py)
      _manifest.json             written last (storage/folders.py), with:
                                   letter, label, images, rejected (every file that did not become a
                                   row, and why), rejected_by_reason, mean, std, shards [{file, rows}],
                                   source {kind, name, fingerprint}

A letter is finished for an input when its manifest's source fingerprint is that input's and every
shard matches its recorded sha256; readers check each shard as they read it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from core.errors import PipelineError
from core.seed import IMAGE_SIDE, LETTERS
from storage.folders import commit_folder, folder_problem, read_manifest, read_verified
from storage.shards import pixels_of, read_shard, read_shard_bytes

KIND, FORMAT = "letter", 2


def letter_folder(shards_dir: Path, letter: str) -> Path:
    """The folder of one letter's shards."""
    return Path(shards_dir) / letter


def shard_file(folder: Path, number: int) -> Path:
    """The path of a letter's shard `number` (`part-00000.parquet`, ...) in `folder`."""
    return Path(folder) / f"part-{number:05d}.parquet"


def commit_letter(work: Path, final: Path, **fields) -> dict:
    """Write the manifest of a letter decoded into `work` (listing its shards) and move it to `final`."""
    return commit_folder(work, final, KIND, FORMAT, [shard["file"] for shard in fields["shards"]], **fields)


def letter_manifest(folder: Path) -> dict | None:
    """The manifest of a finished letter folder, unverified, or None."""
    return read_manifest(folder, KIND, FORMAT)


def find_letter(folder: Path, source_fingerprint: str | None = None) -> dict | None:
    """The manifest of a finished, intact letter folder (made from that source, when one is given), or None."""
    manifest = read_manifest(folder, KIND, FORMAT)
    if manifest is None:
        return None
    if source_fingerprint is not None and manifest.get("source", {}).get("fingerprint") != source_fingerprint:
        return None
    return manifest if folder_problem(folder, manifest, trusting=True) is None else None


def read_letter_manifest(shards_dir: Path, letter: str) -> dict:
    """The manifest of a finished letter folder, unverified (reading its shards verifies them); an error if absent."""
    folder = letter_folder(shards_dir, letter)
    manifest = read_manifest(folder, KIND, FORMAT)
    if manifest is None:
        raise PipelineError(f"{folder} holds no finished shards: decode the archive first (`notmnist shards`).")
    return manifest


class LetterShards:
    """The shards of one finished letter folder, each checked against its recorded sha256 the first time it is read.

    A shard read again is read only if its size and modification time are still those it had when it
    was checked, so a stage that reads a shard several times hashes it once.
    """

    def __init__(self, shards_dir: Path, letter: str):
        self.letter, self.folder = letter, letter_folder(shards_dir, letter)
        self.manifest = read_letter_manifest(shards_dir, letter)
        self._checked: dict[str, tuple[int, int]] = {}
        self._remedy = (
            f"the shards of letter {letter} were damaged after decoding; decode the archive again (`notmnist shards`)"
        )

    def __len__(self) -> int:
        return len(self.manifest["shards"])

    def read(self, number: int, columns: Sequence[str] | None = None) -> pa.Table:
        """Shard `number` (optionally only some columns), checked against the manifest."""
        name = self.manifest["shards"][number]["file"]
        path = self.folder / name
        if name in self._checked and _identity(path) == self._checked[name]:
            return read_shard(path, columns)
        data = read_verified(self.folder, self.manifest, name, self._remedy)
        self._checked[name] = _identity(path)
        return read_shard_bytes(data, columns)


    def sample(self, count: int) -> np.ndarray:
        """The first `count` images of the letter, uint8 (n, 28, 28): none for a letter without shards (what pins
        them: `sample_identity`)."""
        if not len(self):
            return np.empty((0, IMAGE_SIDE, IMAGE_SIDE), np.uint8)
        return pixels_of(self.read(0, ["pixels"]).slice(0, count))


def sample_identity(manifest: dict, count: int) -> list:
    """What determines `LetterShards.sample(count)` of a letter with this manifest, without reading a shard: the
    recorded sha256 of its first shard (None for a letter without shards) and how many of its rows."""
    shards = manifest["shards"]
    return [manifest["files"][shards[0]["file"]]["sha256"] if shards else None, "first rows", count]


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_size, status.st_mtime_ns


def shard_set_identity(shards_dir: Path, letters: str = LETTERS) -> str:
    """Fingerprint of an archive's shard set: every letter's shard sha256s, in order."""
    return shard_set_identity_of({letter: read_letter_manifest(shards_dir, letter) for letter in letters})


def shard_set_identity_of(manifests: dict[str, dict]) -> str:
    """`shard_set_identity` from the letters' manifests, wherever they were read (a data root's, a working copy's)."""
    listing = {
        letter: [manifest["files"][shard["file"]]["sha256"] for shard in manifest["shards"]]
        for letter, manifest in manifests.items()
    }
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
