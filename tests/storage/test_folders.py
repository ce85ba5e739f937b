"""Committed folders: the manifest comes last, and every file is checked against it when read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from core.errors import CorruptDataError
from storage.arrays import save_npy
from storage.folders import (
    IDENTITIES,
    MANIFEST,
    FolderWriter,
    folder_problem,
    manifest_identity,
    open_verified_rows,
    read_manifest,
    read_verified,
    verify_file,
)


@pytest.fixture
def committed(tmp_path):
    with FolderWriter(tmp_path / "folder", "example", 1) as writer:
        (writer.work / "a.bin").write_bytes(b"a" * 100)
        (writer.work / "b.json").write_text('{"b": 1}')
        manifest = writer.commit(note="kept")
    return tmp_path / "folder", manifest


def test_the_manifest_lists_every_file_with_size_and_sha256_and_the_fields(committed):
    folder, manifest = committed
    assert sorted(path.name for path in folder.iterdir()) == [IDENTITIES, MANIFEST, "a.bin", "b.json"]
    assert manifest["files"]["a.bin"]["bytes"] == 100 and len(manifest["files"]["a.bin"]["sha256"]) == 64
    assert read_manifest(folder, "example", 1) == manifest == json.loads((folder / MANIFEST).read_text())
    assert manifest["note"] == "kept" and folder_problem(folder, manifest) is None


def test_a_trusting_check_hashes_only_the_files_whose_identity_changed(committed, monkeypatch):
    """The cache check of a rerun: a file as this machine recorded it (size, times, inode) is not read again; one
    written since is, even at the same size and with its modification time put back."""
    import storage.folders as folders

    folder, manifest = committed
    hashed = []
    real_sha256 = folders.sha256_of
    monkeypatch.setattr(folders, "sha256_of", lambda path: hashed.append(Path(path).name) or real_sha256(path))
    assert folder_problem(folder, manifest, trusting=True) is None and hashed == []  # recorded at commit
    stamp = (folder / "a.bin").stat()
    (folder / "a.bin").write_bytes(b"b" + b"a" * 99)
    os.utime(folder / "a.bin", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # size and mtime as they were
    assert folder_problem(folder, manifest, trusting=True) == f"{folder / 'a.bin'} does not match the sha256 recorded when it was written"
    assert hashed == ["a.bin"]
    (folder / "a.bin").write_bytes(b"a" * 100)  # put right: hashed once more, then trusted again
    assert folder_problem(folder, manifest, trusting=True) is None
    assert folder_problem(folder, manifest, trusting=True) is None and hashed == ["a.bin", "a.bin"]
    (folder / IDENTITIES).write_text("not json")  # a damaged record costs a hash, never a wrong answer
    assert folder_problem(folder, manifest, trusting=True) is None and len(hashed) == 4


@pytest.mark.parametrize("trusting", [True, False], ids=["trusting", "hashing"])
def test_a_missing_file_is_missing_with_or_without_a_record(committed, trusting):
    folder, manifest = committed
    (folder / IDENTITIES).unlink()  # a folder committed before records existed, or whose record was lost
    (folder / "a.bin").unlink()
    assert folder_problem(folder, manifest, trusting=trusting) == f"{folder / 'a.bin'} is missing"
    assert folder_problem(folder, manifest, trusting=trusting) == f"{folder / 'a.bin'} is missing"  # and stays so


def test_a_writer_that_does_not_commit_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with FolderWriter(tmp_path / "folder", "example", 1) as writer:
            (writer.work / "a.bin").write_bytes(b"half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kind", "format_version"), [("other", 1), ("example", 2)], ids=["other-kind", "other-format"]
)
def test_a_manifest_of_another_kind_or_format_is_not_finished(committed, kind, format_version):
    assert read_manifest(committed[0], kind, format_version) is None


def test_a_same_size_overwrite_is_found_and_named(committed):
    folder, manifest = committed
    (folder / "a.bin").write_bytes(b"b" + b"a" * 99)
    assert folder_problem(folder, manifest) == f"{folder / 'a.bin'} does not match the sha256 recorded when it was written"
    with pytest.raises(CorruptDataError, match=r"a\.bin does not match the size and sha256 .*: rebuild it"):
        read_verified(folder, manifest, "a.bin", "rebuild it")
    with pytest.raises(CorruptDataError, match=r"a\.bin does not match the sha256 recorded .*: rebuild it"):
        verify_file(folder, manifest, "a.bin", "rebuild it")
    assert read_verified(folder, manifest, "b.json", "-") == b'{"b": 1}'


def test_missing_and_resized_files_are_named(committed):
    folder, manifest = committed
    (folder / "b.json").unlink()
    (folder / "a.bin").write_bytes(b"a")
    assert folder_problem(folder, manifest) == f"{folder / 'a.bin'} has 1 bytes, 100 were recorded"
    with pytest.raises(CorruptDataError, match=r"b\.json is missing: do this"):
        read_verified(folder, manifest, "b.json", "do this")


def test_the_identity_follows_the_content(tmp_path, committed):
    with FolderWriter(tmp_path / "copy", "example", 1) as writer:
        (writer.work / "a.bin").write_bytes(b"a" * 100)
        (writer.work / "b.json").write_text('{"b": 1}')
        same = writer.commit(note="another note")
    with FolderWriter(tmp_path / "other", "example", 1) as writer:
        (writer.work / "a.bin").write_bytes(b"c" * 100)
        other = writer.commit()
    assert manifest_identity(same) == manifest_identity(committed[1]) != manifest_identity(other)


@pytest.fixture
def rows_folder(tmp_path):
    pixels = np.arange(50 * 784, dtype=np.uint32).reshape(50, 28, 28).astype(np.uint8)
    with FolderWriter(tmp_path / "rows", "example", 1) as writer:
        save_npy(writer.work / "x.npy", pixels)
        manifest = writer.commit()
    return tmp_path / "rows", manifest, pixels


def test_rows_opened_verified_read_what_was_recorded(rows_folder):
    folder, manifest, pixels = rows_folder
    assert np.array_equal(open_verified_rows(folder, manifest, "x.npy", "redo it")[[3, 9]], pixels[[3, 9]])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda path: _flip_byte(path, 1000), "does not match the sha256 recorded"),
        (lambda path: _flip_byte(path, 8), "does not match the sha256 recorded"),  # inside the NPY header
        (lambda path: path.unlink(), "is missing"),
        (lambda path: os.truncate(path, 500), "has 500 bytes"),
    ],
    ids=["same-size-overwrite", "damaged-header", "missing", "truncated"],
)
def test_rows_of_a_damaged_file_are_refused_with_what_to_do(rows_folder, damage, message):
    folder, manifest, _ = rows_folder
    damage(folder / "x.npy")
    with pytest.raises(CorruptDataError, match=f"{message}.*: redo it"):
        open_verified_rows(folder, manifest, "x.npy", "redo it")


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
