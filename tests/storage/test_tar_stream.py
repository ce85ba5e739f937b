"""The one-pass tar reader used to decode straight from an archive."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import re
import tarfile
from pathlib import Path

import pytest

import storage.tar_stream as tar_stream
from core.errors import ArchiveError, UnsafeArchiveError
from storage.tar_stream import TarReader, iter_files

LIMITS = {"max_members": 1000, "max_total_bytes": 1 << 20}
LONG = "notMNIST_large/A/" + "Q" * 140 + ".png"  # past ustar's 100-byte name field


def write_tar(path: Path, members: list[tuple[str, bytes]], fmt=tarfile.GNU_FORMAT, mode="w:gz", extra=None) -> Path:
    with tarfile.open(path, mode, format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra is not None:
            tar.addfile(extra)
    return path


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [(tarfile.GNU_FORMAT, "w:gz"), (tarfile.PAX_FORMAT, "w:gz"), (tarfile.USTAR_FORMAT, "w"), (tarfile.GNU_FORMAT, "w")],
    ids=["gnu-gz", "pax-gz", "ustar-plain", "gnu-plain"],
)
def test_reads_every_regular_file_with_its_name_and_bytes(tmp_path, fmt, mode):
    members = [("notMNIST_large/A/a.png", b"x" * 700), ("notMNIST_large/B/b.png", b""), ("notMNIST_large/C/c.png", b"yz")]
    if fmt != tarfile.USTAR_FORMAT:
        members.append((LONG, b"long"))
    archive = write_tar(tmp_path / "a.tar", members, fmt, mode)
    assert list(iter_files(archive, **LIMITS)) == members


@pytest.mark.parametrize(
    ("kind", "label"),
    [(tarfile.SYMTYPE, "symbolic link"), (tarfile.LNKTYPE, "hard link"), (tarfile.CHRTYPE, "character device"),
     (tarfile.BLKTYPE, "block device"), (tarfile.FIFOTYPE, "FIFO")],
    ids=["symlink", "hardlink", "chardev", "blockdev", "fifo"],
)
def test_links_and_devices_are_refused_by_name(tmp_path, kind, label):
    member = tarfile.TarInfo("notMNIST_large/A/evil.png")
    member.type = kind
    member.linkname = "/etc/passwd"
    archive = write_tar(tmp_path / "a.tar.gz", [("notMNIST_large/A/ok.png", b"1")], extra=member)
    with pytest.raises(UnsafeArchiveError, match=f"'notMNIST_large/A/evil.png' is a {label}"):
        list(iter_files(archive, **LIMITS))


@pytest.mark.parametrize(
    ("limits", "message"),
    [({"max_members": 2, "max_total_bytes": 1 << 20}, "more than 2 members"),
     ({"max_members": 100, "max_total_bytes": 1000}, "more than 1,000 bytes")],
    ids=["members", "bytes"],
)
def test_limits_stop_bombs(tmp_path, limits, message):
    archive = write_tar(tmp_path / "a.tar.gz", [(f"t/A/{i}.png", b"z" * 400) for i in range(5)])
    with pytest.raises(UnsafeArchiveError, match=message):
        list(iter_files(archive, **limits))


def test_truncated_gzip_is_a_clear_error(tmp_path):
    archive = write_tar(tmp_path / "a.tar.gz", [(f"t/A/{i}.png", bytes(range(256)) * 8) for i in range(20)])
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ArchiveError, match="corrupt or truncated"):
        list(iter_files(archive, **LIMITS))


def test_corrupt_header_of_a_plain_tar_fails_its_checksum(tmp_path):
    archive = write_tar(tmp_path / "a.tar", [("t/A/a.png", b"abc")], mode="w")
    data = bytearray(archive.read_bytes())
    data[10] ^= 0xFF  # a byte of the first member's name
    archive.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="fails its checksum"):
        list(iter_files(archive, **LIMITS))


def test_truncated_plain_tar_is_a_clear_error(tmp_path):
    archive = write_tar(tmp_path / "a.tar", [("t/A/a.png", b"q" * 5000)], mode="w")
    archive.write_bytes(archive.read_bytes()[:2048])
    with pytest.raises(ArchiveError, match="truncated inside 't/A/a.png'"):
        list(iter_files(archive, **LIMITS))


def test_reader_yields_folders_and_files_with_sizes_counts_and_the_archive_digest(tmp_path):
    folder = tarfile.TarInfo("t/A")
    folder.type = tarfile.DIRTYPE
    archive = write_tar(tmp_path / "a.tar.gz", [("t/A/a.png", b"abc"), ("t/A/b.png", b"")], extra=folder)
    with TarReader(archive, **LIMITS) as reader:
        members = [(member.name, member.is_directory, member.size) for member in reader]
    assert members == [("t/A/a.png", False, 3), ("t/A/b.png", False, 0), ("t/A/", True, 0)]
    assert (reader.member_count, reader.total_bytes) == (3, 3)
    assert reader.archive_sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()


def test_old_style_folder_with_a_trailing_slash_is_not_a_file(tmp_path):
    folder = tarfile.TarInfo("t/A/")
    folder.type = tarfile.AREGTYPE
    archive = write_tar(tmp_path / "a.tar", [("t/A/a.png", b"abc")], mode="w", extra=folder)
    with TarReader(archive, **LIMITS) as reader:
        assert [(member.name, member.is_directory) for member in reader] == [("t/A/a.png", False), ("t/A/", True)]
    assert list(iter_files(archive, **LIMITS)) == [("t/A/a.png", b"abc")]


@pytest.mark.parametrize("taken", [0, 1, 2], ids=["skipped", "first-piece-only", "all-pieces"])
def test_large_member_comes_in_pieces_and_what_is_left_unread_is_skipped(tmp_path, monkeypatch, taken):
    monkeypatch.setattr(tar_stream, "CHUNK_BYTES", 1000)  # members straddle chunks and take the pieces path
    large = bytes(range(256)) * 10
    archive = write_tar(tmp_path / "a.tar.gz", [("t/A/large.png", large), ("t/A/next.png", b"after")])
    with TarReader(archive, **LIMITS) as reader:
        members = iter(reader)
        pieces = list(itertools.islice(next(members).pieces(), taken))
        following = next(members)
        assert (following.name, following.read()) == ("t/A/next.png", b"after")
        assert list(members) == []
    assert [len(piece) for piece in pieces] == [1000, 1000, 560][:taken]
    assert b"".join(pieces) == large[:1000 * taken]


@pytest.mark.parametrize("chunk_bytes", [700, 1 << 20], ids=["members-straddle-chunks", "one-chunk"])
def test_entries_give_each_small_file_its_bytes_and_skip_a_large_one_unread(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(tar_stream, "CHUNK_BYTES", chunk_bytes)
    folder = tarfile.TarInfo("t/A")
    folder.type = tarfile.DIRTYPE
    files = [(f"t/A/{number}.png", bytes([number]) * (number * 97)) for number in range(12)]
    archive = write_tar(tmp_path / "a.tar.gz", [*files[:6], ("t/A/large.png", b"L" * 3000), *files[6:]], extra=folder)
    with TarReader(archive, **LIMITS) as reader:
        entries = list(reader.entries(max_file_bytes=2000))
    read = [(name, False, len(data), data) for name, data in files]
    assert entries == [*read[:6], ("t/A/large.png", False, 3000, None), *read[6:], ("t/A/", True, 0, None)]
    assert (reader.member_count, reader.total_bytes) == (14, 3000 + sum(len(data) for _, data in files))


def test_entries_find_an_archive_truncated_inside_a_file(tmp_path):
    members = [("t/A/a.png", b"x" * 1500), ("t/A/b.png", b"y" * 1500)]
    whole = write_tar(tmp_path / "a.tar", members, mode="w").read_bytes()
    (truncated := tmp_path / "t.tar").write_bytes(whole[:512 * 5 + 100])  # inside b.png's data
    with TarReader(truncated, **LIMITS) as reader, pytest.raises(ArchiveError, match="truncated inside 't/A/b.png'"):
        list(reader.entries(max_file_bytes=2000))


def test_data_can_be_read_once_and_only_while_its_member_is_current(tmp_path):
    archive = write_tar(tmp_path / "a.tar.gz", [("t/A/a.png", b"abc"), ("t/A/b.png", b"de")])
    with TarReader(archive, **LIMITS) as reader:
        members = iter(reader)
        first = next(members)
        assert first.read() == b"abc"
        with pytest.raises(ValueError, match="'t/A/a.png' can only be read once"):
            first.read()
        second = next(members)
        next(members, None)
        with pytest.raises(ValueError, match="'t/A/b.png' can only be read once, before the next member"):
            second.read()


@pytest.mark.parametrize(
    ("kind", "message"),
    [(tarfile.GNUTYPE_SPARSE, "is a sparse file"), (b"Z", "is of unsupported type b'Z'")],
    ids=["sparse", "unknown-type"],
)
def test_sparse_and_unknown_members_are_refused_by_name(tmp_path, kind, message):
    member = tarfile.TarInfo("t/A/odd.png")
    member.type = kind
    archive = write_tar(tmp_path / "a.tar", [("t/A/ok.png", b"1")], mode="w", extra=member)
    with pytest.raises(UnsafeArchiveError, match=f"'t/A/odd.png' {re.escape(message)}; only regular files"):
        list(iter_files(archive, **LIMITS))


def test_oversized_extended_header_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(tar_stream, "MAX_EXTENSION_BYTES", 100)
    archive = write_tar(tmp_path / "a.tar.gz", [("t/A/a.png", b"1"), (LONG, b"long")])
    message = f"extended header after member 't/A/a.png' claims {len(LONG) + 1} bytes"
    with pytest.raises(UnsafeArchiveError, match=message):
        list(iter_files(archive, **LIMITS))


def test_archive_that_decompresses_far_past_its_limits_is_refused(tmp_path):
    plain = write_tar(tmp_path / "a.tar", [("t/A/a.png", b"abc")], mode="w").read_bytes()
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(gzip.compress(plain + bytes(1 << 20)))  # a megabyte of zeros after the tar end
    with pytest.raises(UnsafeArchiveError, match="decompresses to more than 133,130 bytes"):
        list(iter_files(archive, max_members=1, max_total_bytes=10))


@pytest.mark.parametrize("mode", ["w:bz2", "w:xz"], ids=["bzip2", "xz"])
def test_bzip2_and_xz_archives_are_read_too(tmp_path, mode):
    members = [("t/A/a.png", b"x" * 700), (LONG, b"long")]
    assert list(iter_files(write_tar(tmp_path / "a.tar", members, mode=mode), **LIMITS)) == members


def test_damaged_deflate_data_is_a_clear_error(tmp_path):
    archive = write_tar(tmp_path / "a.tar.gz", [(f"t/A/{i}.png", bytes(range(256)) * 8) for i in range(20)])
    data = bytearray(archive.read_bytes())
    data[20:40] = bytes(byte ^ 0x5A for byte in data[20:40])
    archive.write_bytes(data)
    with pytest.raises(ArchiveError, match="corrupt or truncated"):
        list(iter_files(archive, **LIMITS))


def test_bad_gzip_crc_is_found_after_the_last_member(tmp_path, monkeypatch):
    # Small chunks hand over every member before the damaged trailer has been read.
    monkeypatch.setattr(tar_stream, "CHUNK_BYTES", 4096)
    archive = write_tar(tmp_path / "a.tar.gz", [(f"t/A/{i}.png", bytes(range(256)) * 8) for i in range(20)])
    data = archive.read_bytes()
    archive.write_bytes(data[:-8] + bytes(byte ^ 0xFF for byte in data[-8:-4]) + data[-4:])
    files = iter_files(archive, **LIMITS)
    assert len(list(itertools.islice(files, 20))) == 20
    with pytest.raises(ArchiveError, match="corrupt or truncated .*delete it and download again"):
        next(files)


@pytest.mark.parametrize(
    ("verify_gzip_headers", "mode", "checked"),
    [(True, "w:gz", True), (False, "w:gz", False), (False, "w", True)],
    ids=["gzip-verified", "gzip-trusting-its-crc", "plain-always-verified"],
)
def test_header_checksums_are_skipped_only_where_gzip_crc_covers_them(tmp_path, verify_gzip_headers, mode, checked):
    plain = bytearray(write_tar(tmp_path / "a.tar", [("t/A/a.png", b"abc")], mode="w").read_bytes())
    plain[4] ^= 0x01  # "a" becomes "`" before compression, so the gzip CRC cannot see the damage
    archive = tmp_path / "b.tar"
    archive.write_bytes(gzip.compress(bytes(plain)) if mode == "w:gz" else bytes(plain))
    with TarReader(archive, **LIMITS, verify_gzip_headers=verify_gzip_headers) as reader:
        if checked:
            with pytest.raises(ArchiveError, match="the tar header after member '' fails its checksum"):
                list(reader)
        else:
            assert [member.name for member in reader] == ["t/A/`.png"]


def test_a_header_checksum_written_as_a_signed_sum_by_an_old_tar_is_accepted(tmp_path):
    name = "t/A/\u00e9t\u00e9.png"  # bytes over 127, where the signed and unsigned sums differ
    header = bytearray(tarfile.TarInfo(name).tobuf(tarfile.USTAR_FORMAT, encoding="utf-8"))
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(byte - 256 if byte > 127 else byte for byte in header)
    archive = tmp_path / "a.tar"
    archive.write_bytes(bytes(header) + bytes(1024))
    assert list(iter_files(archive, **LIMITS)) == [(name, b"")]


def test_negative_size_is_corrupt(tmp_path):
    header = bytearray(tarfile.TarInfo("t/A/a.png").tobuf(tarfile.USTAR_FORMAT))
    header[124:136] = b"-0000000001\0"
    header[148:156] = b" " * 8  # the checksum is worked out with its own field read as spaces
    header[148:156] = b"%06o\0 " % sum(header)
    archive = tmp_path / "a.tar"
    archive.write_bytes(bytes(header) + bytes(1024))
    with pytest.raises(ArchiveError, match="a negative size in the tar header after member ''"):
        list(iter_files(archive, **LIMITS))


@pytest.mark.parametrize(
    ("damage", "message"),
    [("header-zeroed", r"extended header after member '' is followed by the end of the archive"),
     ("long-name-zeroed", r"extended header after member '' gives the next member an empty name")],
    ids=["member-after-a-long-name-gone", "empty-long-name"],
)
def test_a_long_name_without_its_member_or_with_no_name_is_refused(tmp_path, damage, message):
    """Both were read by the reader and refused or read otherwise by tarfile (found by the differential test)."""
    data = bytearray(write_tar(tmp_path / "a.tar", [(LONG, b"x" * 10)], mode="w").read_bytes())
    zeroed = 1024 if damage == "header-zeroed" else 512  # [long-name header, its name, the member's header, ...]
    data[zeroed:zeroed + 512] = bytes(512)
    (tmp_path / "a.tar").write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match=message), TarReader(tmp_path / "a.tar", **LIMITS) as reader:
        list(reader)
