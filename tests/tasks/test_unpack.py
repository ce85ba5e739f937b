"""The unpack stage: an archive read once into ten packed letters, hostile archives refused, damage noticed."""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import tarfile
from concurrent.futures.process import BrokenProcessPool

import pytest

import storage.packed as packed
import storage.tar_stream as tar_stream
from core.errors import ArchiveError, CorruptDataError, PipelineError, UnsafeArchiveError
from core.seed import LETTERS
from demo.synthetic import make_archive
from storage.folders import MANIFEST
from storage.packed import FILE, checked_groups, find_packed, find_unpacked, read_group
from storage.shards import read_shard
from tasks.decode import decode_to_shards
from tasks.unpack import unpack_archive
from tests.tasks.test_extract import NAME, OUTSIDE, TOP, build, member, notmnist_files, snapshot


def unpacked_files(dest) -> dict[str, bytes]:
    """Member name to bytes, every letter's packed rows in order."""
    files = {}
    for letter in LETTERS:
        checked, groups = checked_groups(dest / letter, find_packed(dest / letter), "")
        for number in range(len(groups)):
            files.update(zip(*read_group(checked, number)))
    return files


def leftovers(dest) -> list[str]:
    return sorted(entry.name for entry in dest.iterdir()) if dest.exists() else []


@pytest.mark.parametrize(
    ("mode", "tar_format"),
    [("w:gz", tarfile.GNU_FORMAT), ("w", tarfile.USTAR_FORMAT), ("w:xz", tarfile.PAX_FORMAT)],
    ids=["gzip-gnu", "plain-ustar", "xz-pax"],
)
def test_every_file_is_packed_byte_exact_in_archive_order_with_the_archive_recorded(
    tmp_path, monkeypatch, mode, tar_format
):
    monkeypatch.setattr(tar_stream, "CHUNK_BYTES", 1000)  # members straddle chunk boundaries
    monkeypatch.setattr(packed, "ROW_GROUP_ROWS", 2)  # several row groups per letter
    files = notmnist_files(per_letter=5)
    files[f"{TOP}/J/{'x' * 90}.png"] = b"a long name"  # a GNU long name, a pax path, or the ustar prefix
    archive = build(tmp_path / NAME, files, mode=mode, tar_format=tar_format)

    dest = unpack_archive(archive, tmp_path / "packed" / "notMNIST_large")

    assert list(unpacked_files(dest).items()) == list(files.items())
    manifest = find_packed(dest / "J")
    status = archive.stat()
    assert manifest["images"] == 6 and manifest["letter"] == "J" and manifest["top_folder"] == TOP
    assert manifest["archive"] == {"name": NAME, "bytes": status.st_size, "mtime_ns": status.st_mtime_ns,
                                   "sha256": hashlib.sha256(archive.read_bytes()).hexdigest()}
    assert leftovers(dest) == list(LETTERS)


def test_rerun_skips_and_a_damaged_or_changed_input_is_unpacked_again(tmp_path):
    archive = build(tmp_path / NAME, notmnist_files())
    dest = unpack_archive(archive, tmp_path / "packed")
    before = snapshot(dest)
    assert unpack_archive(archive, dest) == dest and snapshot(dest) == before

    letter_file = dest / "D" / FILE
    data = bytearray(letter_file.read_bytes())
    data[len(data) // 2] ^= 1
    letter_file.write_bytes(bytes(data))  # same size, other bytes
    assert find_unpacked(archive, dest) is None
    unpack_archive(archive, dest)
    assert find_unpacked(archive, dest) is not None and unpacked_files(dest) == notmnist_files()

    archive = build(tmp_path / NAME, notmnist_files(salt=1))  # a new download of other content
    assert find_unpacked(archive, dest) is None
    unpack_archive(archive, dest)
    assert unpacked_files(dest) == notmnist_files(salt=1)


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        (member(f"/{OUTSIDE}/evil.png", size=3), UnsafeArchiveError, "absolute path"),
        (member(f"{TOP}/A/../../{OUTSIDE}/evil.png", size=3), UnsafeArchiveError, "'..' component"),
        (member(f"{TOP}/A/link.png", tarfile.SYMTYPE, linkname="/etc/passwd"), UnsafeArchiveError, "symbolic link"),
        (member(f"{TOP}/A/pipe.png", tarfile.FIFOTYPE), UnsafeArchiveError, "FIFO"),
        (member(f"{OUTSIDE}/second-top.png", size=3), UnsafeArchiveError, "single top-level folder"),
        (member(f"{TOP}/A/A0.png", size=3), UnsafeArchiveError, "repeats an earlier member"),
        (member(f"{TOP}/readme.txt", size=3), ArchiveError, "not <top folder>/<letter A-J>/<file>"),
        (member(f"{TOP}/K/K0.png", size=3), ArchiveError, "not <top folder>/<letter A-J>/<file>"),
        (member(f"{TOP}/A/deeper/A0.png", size=3), ArchiveError, "not <top folder>/<letter A-J>/<file>"),
    ],
    ids=["absolute-path", "dot-dot", "symlink", "fifo", "two-top-folders", "duplicate-name", "file-beside-letters",
         "letter-k", "nested-folder"],
)
def test_a_hostile_or_misshapen_archive_is_refused_by_member_name_and_nothing_is_unpacked(
    tmp_path, extra, error, message
):
    archive = build(tmp_path / NAME, notmnist_files(), (extra,))
    with pytest.raises(error, match=re.escape(repr(extra.name)) + ".*" + re.escape(message)):
        unpack_archive(archive, tmp_path / "packed")
    assert leftovers(tmp_path / "packed") == []


def test_a_repeated_folder_and_an_oversized_member_are_refused(tmp_path):
    archive = build(tmp_path / NAME, notmnist_files(), (member(f"{TOP}/A", tarfile.DIRTYPE),))
    with pytest.raises(UnsafeArchiveError, match="'notMNIST_large/A/' repeats an earlier member"):
        unpack_archive(archive, tmp_path / "packed")
    archive = build(tmp_path / NAME, notmnist_files(), (member(f"{TOP}/B/big.png", size=5000),))
    with pytest.raises(UnsafeArchiveError, match="'notMNIST_large/B/big.png' has 5,000 bytes, over the limit of 4,096"):
        unpack_archive(archive, tmp_path / "packed", max_member_bytes=4096)
    assert leftovers(tmp_path / "packed") == []


def test_a_tar_header_that_fails_its_checksum_is_refused_inside_a_sound_gzip(tmp_path):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in notmnist_files().items():
            tar.addfile(member(name, size=len(data)), io.BytesIO(data))
    damaged = bytearray(raw.getvalue())
    damaged[148:156] = b"0000000\0"  # the first header's checksum field
    (tmp_path / NAME).write_bytes(gzip.compress(bytes(damaged)))
    with pytest.raises(ArchiveError, match="fails its checksum"):
        unpack_archive(tmp_path / NAME, tmp_path / "packed")
    assert leftovers(tmp_path / "packed") == []


@pytest.mark.parametrize(
    "damage", [lambda data: data[: len(data) // 2], lambda data: data[:-8] + bytes(4) + data[-4:]],
    ids=["truncated", "bad-gzip-crc"],
)
def test_a_corrupt_archive_is_refused_and_nothing_is_unpacked(tmp_path, monkeypatch, damage):
    monkeypatch.setattr(tar_stream, "CHUNK_BYTES", 4096)
    archive = build(tmp_path / NAME, notmnist_files(per_letter=20))
    archive.write_bytes(damage(archive.read_bytes()))
    with pytest.raises(ArchiveError, match="corrupt or truncated"):
        unpack_archive(archive, tmp_path / "packed")
    assert leftovers(tmp_path / "packed") == []


def test_a_missing_letter_is_named(tmp_path):
    archive = build(tmp_path / NAME, notmnist_files(letters="ABCDEFGHI"))
    with pytest.raises(ArchiveError, match="a folder for each letter A-J under notMNIST_large/; J missing"):
        unpack_archive(archive, tmp_path / "packed")
    assert leftovers(tmp_path / "packed") == []


def test_a_crash_leaves_nothing_finished_and_the_rerun_removes_its_leftovers(tmp_path, monkeypatch):
    archive = build(tmp_path / NAME, notmnist_files())
    dest = tmp_path / "packed"
    real_add, calls = packed.PackedLetterWriter.add, []

    def crashing_add(self, name, png):
        calls.append(name)
        if len(calls) == 12:
            raise KeyboardInterrupt("simulated crash")
        real_add(self, name, png)

    monkeypatch.setattr(packed.PackedLetterWriter, "add", crashing_add)
    with pytest.raises(KeyboardInterrupt):
        unpack_archive(archive, dest)
    assert leftovers(dest) == []

    (dest / ".B.tmp-0123456789ab").mkdir()  # what a killed run (no clean-up at all) leaves
    monkeypatch.setattr(packed.PackedLetterWriter, "add", real_add)
    unpack_archive(archive, dest)
    assert leftovers(dest) == list(LETTERS)


def test_decoding_packed_letters_gives_the_rows_of_the_archive_and_checks_them_first(tmp_path):
    archive = make_archive(tmp_path, "notMNIST_small", per_letter=8, seed=5)
    dest = unpack_archive(archive.path, tmp_path / "packed")
    from_packed = decode_to_shards(dest, tmp_path / "p", workers=1)
    from_archive = decode_to_shards(archive.path, tmp_path / "a", workers=1)
    for letter in LETTERS:
        assert from_packed[letter]["rejected"] == from_archive[letter]["rejected"]
        assert read_shard(tmp_path / "p" / letter / "part-00000.parquet").equals(
            read_shard(tmp_path / "a" / letter / "part-00000.parquet"))
    assert from_packed["A"]["source"]["kind"] == "packed" and "manifest" not in from_packed["A"]["source"]

    letter_file = dest / "C" / FILE
    letter_file.write_bytes(letter_file.read_bytes()[:-1] + b"\0")
    with pytest.raises(CorruptDataError, match="png.parquet does not match.*rerun the pipeline"):
        decode_to_shards(dest, tmp_path / "again", workers=1, letters="C")
    assert not (tmp_path / "again" / "C" / MANIFEST).exists()


def test_a_letter_task_without_its_packed_letter_says_to_rerun(tmp_path):
    from storage.layout import DataRoot
    from tasks.decode import letter_task

    with pytest.raises(PipelineError, match=r"packed/notMNIST_large/C is not in the data root: rerun the pipeline"):
        letter_task.fn(DataRoot(tmp_path / "data"), "notMNIST_large.tar.gz", "C")


def test_decoding_goes_on_after_a_worker_died_on_a_new_pool(tmp_path):
    import os

    from tasks import decode

    archive = make_archive(tmp_path, "notMNIST_small", per_letter=8, seed=5)
    dest = unpack_archive(archive.path, tmp_path / "packed")
    with decode.shared_worker_pool(1):
        pool = decode._shared.get()
        with pytest.raises(BrokenProcessPool):
            pool.submit(os._exit, 1).result()  # a worker killed (out of memory, kill -9)
        manifest = decode_to_shards(dest, tmp_path / "shards", workers=1, letters="C")["C"]
    assert manifest["images"] == 8 and decode._shared is None


@pytest.mark.parametrize("forger", ["manifest-files-only", "binding-too"])
def test_a_packed_letter_swapped_for_another_letters_is_never_decoded_as_this_letter(tmp_path, forger):
    """Replace E's file with F's and update E's manifest to match: as issue-tracked, this was decoded as E."""
    import json
    import shutil

    from storage.packed import binding

    archive = make_archive(tmp_path, "notMNIST_small", per_letter=6, seed=4)
    dest = unpack_archive(archive.path, tmp_path / "packed" / "notMNIST_small")
    shutil.copyfile(dest / "F" / FILE, dest / "E" / FILE)
    manifest = json.loads((dest / "E" / MANIFEST).read_text())
    manifest["files"][FILE] = json.loads((dest / "F" / MANIFEST).read_text())["files"][FILE]
    if forger == "binding-too":
        manifest["binding"] = binding(manifest["archive"]["sha256"], "E", manifest["files"][FILE]["sha256"])
    (dest / "E" / MANIFEST).write_text(json.dumps(manifest))

    assert find_unpacked(archive.path, dest) is None or forger == "binding-too"
    message = (r"packed/notMNIST_small/E holds no packed letter" if forger == "manifest-files-only"
               else r"E/png\.parquet holds 'notMNIST_small/F/.*', not a file of notMNIST_small/E/")
    with pytest.raises(PipelineError, match=message):
        decode_to_shards(dest, tmp_path / "shards", workers=1, letters="E")
    assert not (tmp_path / "shards" / "E").exists()

