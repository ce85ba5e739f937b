"""Decoding while the unpack reads the archive: the same letters as the decode stage makes, committed only after."""

from __future__ import annotations

import gzip

import pytest

import storage.packed as packed
from core.errors import ArchiveError
from core.seed import LETTERS
from demo.synthetic import make_archive
from storage.folders import MANIFEST
from storage.letters import find_letter, letter_folder
from tasks.decode import decode_to_shards, shared_worker_pool
from tasks.unpack import unpack_archive


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """40 images per letter and one of each bad file; row groups of 16 rows, so each letter has several."""
    return make_archive(tmp_path_factory.mktemp("archive"), "notMNIST_small", per_letter=40, seed=8, fonts=()).path


def folder_bytes(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if not path.name.startswith(".")}


def test_letters_decoded_during_the_unpack_are_those_the_decode_stage_makes(archive, tmp_path, monkeypatch):
    monkeypatch.setattr(packed, "ROW_GROUP_ROWS", 16)
    with shared_worker_pool(2):
        unpack_archive(archive, tmp_path / "packed", shards_dir=tmp_path / "shards")
    reference = tmp_path / "reference"
    decode_to_shards(tmp_path / "packed", reference, workers=1)
    for letter in LETTERS:
        early, made = letter_folder(tmp_path / "shards", letter), letter_folder(reference, letter)
        assert len([name for name in folder_bytes(made) if name.startswith("part-")]) >= 3  # several row groups
        assert folder_bytes(early) == folder_bytes(made), letter  # shards and manifest, byte for byte
    stamps = {path: path.stat().st_mtime_ns for path in (tmp_path / "shards").rglob(MANIFEST)}
    decode_to_shards(tmp_path / "packed", tmp_path / "shards", workers=1)  # the decode stage finds them done
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "shards").rglob(MANIFEST)} == stamps


def test_nothing_is_committed_from_an_archive_that_fails_at_its_end(archive, tmp_path):
    data = gzip.decompress(archive.read_bytes())
    truncated = tmp_path / "notMNIST_small.tar.gz"
    truncated.write_bytes(gzip.compress(data[: len(data) - 4096]))  # the end-of-archive marker and more cut off
    with shared_worker_pool(2), pytest.raises(ArchiveError):
        unpack_archive(truncated, tmp_path / "packed", shards_dir=tmp_path / "shards")
    assert all(find_letter(letter_folder(tmp_path / "shards", letter)) is None for letter in LETTERS)
    assert [path.name for path in (tmp_path / "shards").iterdir() if not path.name.startswith(".locks")] == []


def test_without_the_shared_pool_the_unpack_decodes_nothing(archive, tmp_path):
    unpack_archive(archive, tmp_path / "packed", shards_dir=tmp_path / "shards")
    assert not (tmp_path / "shards").exists()


def test_the_decode_tasks_key_holds_the_packed_letter_it_reads(archive, tmp_path):
    """The unpack commits letters the decode task has not run for: a new archive's letters must not be served the
    old archive's record, so the packed letter's identity is in the task's cache key."""
    from storage.layout import DataRoot
    from tasks.decode import letter_task

    root = DataRoot(tmp_path / "data")
    parameters = {"root": root, "archive": "notMNIST_small.tar.gz", "letter": "C"}
    keyed_on = letter_task.cache_policy.keyed_on
    before = keyed_on(parameters)
    unpack_archive(archive, root.packed("notMNIST_small.tar.gz"))
    first = keyed_on(parameters)
    other = make_archive(tmp_path / "other", "notMNIST_small", per_letter=20, seed=9, fonts=()).path
    unpack_archive(other, root.packed("notMNIST_small.tar.gz"))
    assert len({before, first, keyed_on(parameters)}) == 3
