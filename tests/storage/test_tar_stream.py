"""The one-pass tar reader used to decode straight from an archive."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from storage.tar_stream import iter_files
from tasks.errors import ArchiveError, UnsafeArchiveError

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
