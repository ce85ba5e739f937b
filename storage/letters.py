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
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa

from core.errors import PipelineError
from core.seed import LETTERS
from storage.atomic import replace
from storage.folders import describe_files, folder_problem, read_manifest, read_verified, write_manifest
from storage.shards import read_shard_bytes

KIND, FORMAT = "letter", 2


def letter_folder(shards_dir: Path, letter: str) -> Path:
    """The folder of one letter's shards."""
    return Path(shards_dir) / letter


def commit_letter(work: Path, final: Path, **fields) -> dict:
    """Write the manifest of a letter decoded into `work` (listing its shards) and move it to `final`."""
    files = describe_files(work, [shard["file"] for shard in fields["shards"]])
    manifest = write_manifest(work, KIND, FORMAT, files, **fields)
    Path(final).parent.mkdir(parents=True, exist_ok=True)
    replace(work, final)
    return manifest


def find_letter(folder: Path, source_fingerprint: str | None = None) -> dict | None:
    """The manifest of a finished, intact letter folder (made from that source, when one is given), or None."""
    manifest = read_manifest(folder, KIND, FORMAT)
    if manifest is None:
        return None
    if source_fingerprint is not None and manifest.get("source", {}).get("fingerprint") != source_fingerprint:
        return None
    return manifest if folder_problem(folder, manifest) is None else None


def read_letter_manifest(shards_dir: Path, letter: str) -> dict:
    """The manifest of a finished letter folder, unverified (reading its shards verifies them); an error if absent."""
    folder = letter_folder(shards_dir, letter)
    manifest = read_manifest(folder, KIND, FORMAT)
    if manifest is None:
        raise PipelineError(f"{folder} holds no finished shards: decode the archive first (`notmnist shards`).")
    return manifest


def read_letter_shards(
    shards_dir: Path, letter: str, manifest: dict, columns: Sequence[str] | None = None, only: set[int] | None = None
) -> Iterator[tuple[int, pa.Table]]:
    """(shard number, table) of each shard of a letter (or those in `only`), each checked against its sha256."""
    folder = letter_folder(shards_dir, letter)
    remedy = f"the shards of letter {letter} were damaged after decoding; decode the archive again (`notmnist shards`)"
    for number, shard in enumerate(manifest["shards"]):
        if only is None or number in only:
            yield number, read_shard_bytes(read_verified(folder, manifest, shard["file"], remedy), columns)


def shard_set_identity(shards_dir: Path, letters: str = LETTERS) -> str:
    """Fingerprint of an archive's shard set: every letter's shard sha256s, in order."""
    listing = {}
    for letter in letters:
        manifest = read_letter_manifest(shards_dir, letter)
        listing[letter] = [manifest["files"][shard["file"]]["sha256"] for shard in manifest["shards"]]
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
