"""The extract stage on real tar archives of small PNGs built in tmp_path, hostile ones included."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import storage.tar_stream as tar_stream
import tasks.extract as extract
from core.errors import ArchiveError, UnsafeArchiveError
from core.seed import LETTERS
from storage.atomic import read_json, temporary_sibling
from storage.extraction import RECORD_NAME, find_extraction, folder_state
from storage.layout import LOCKS
from tasks.extract import extract_archive

TOP = "notMNIST_large"
NAME = "notMNIST_large.tar.gz"


def png(seed: int) -> bytes:
    """A 28x28 grayscale PNG whose pixels depend on `seed`."""
    pixels = bytes((seed * 37 + index * 11) % 256 for index in range(28 * 28))
    buffer = io.BytesIO()
    Image.frombytes("L", (28, 28), pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def notmnist_files(letters: str = LETTERS, per_letter: int = 3, salt: int = 0, top: str = TOP) -> dict[str, bytes]:
    """Member name to PNG bytes, laid out like notMNIST: top folder, one folder per letter."""
    return {f"{top}/{letter}/{letter}{index}.png": png(salt + 10 * ord(letter) + index)
            for letter in letters for index in range(per_letter)}


def member(name: str, kind: bytes = tarfile.REGTYPE, **fields) -> tarfile.TarInfo:
    """A TarInfo for `name` of type `kind` with the given attributes."""
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, 0o755 if kind == tarfile.DIRTYPE else 0o644, 1_300_000_000
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def build(path: Path, files: dict[str, bytes], extra: tuple[tarfile.TarInfo, ...] = (), *,
          mode: str = "w:gz", tar_format: int = tarfile.GNU_FORMAT) -> Path:
    """Write a tar archive of the folders implied by `files`, then `files`, then `extra` members."""
    folders = sorted({name.rsplit("/", depth)[0] for name in files for depth in (1, 2) if "/" in name})
    with tarfile.open(path, mode, format=tar_format) as archive:
        for folder in folders:
            archive.addfile(member(folder, tarfile.DIRTYPE))
        for name, data in files.items():
            archive.addfile(member(name, size=len(data)), io.BytesIO(data))
        for info in extra:
            archive.addfile(info, io.BytesIO(bytes(info.size)) if info.isreg() else None)
    return path


def leftovers(dest: Path) -> list[str]:
    """What is in `dest` apart from the locks' folder."""
    return sorted(entry.name for entry in dest.iterdir() if entry.name != LOCKS)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Relative path to (inode, mtime_ns) of everything under `folder`."""
    return {str(path.relative_to(folder)): (path.stat().st_ino, path.stat().st_mtime_ns)
            for path in folder.rglob("*")}


@pytest.mark.parametrize(
    ("mode", "tar_format"),
    [("w:gz", tarfile.GNU_FORMAT), ("w:gz", tarfile.PAX_FORMAT), ("w", tarfile.USTAR_FORMAT),
     ("w:bz2", tarfile.GNU_FORMAT), ("w:xz", tarfile.PAX_FORMAT)],
    ids=["gzip-gnu", "gzip-pax", "plain-ustar", "bzip2", "xz"],
)
def test_extracts_byte_exact_layout_and_records_the_archive(tmp_path, monkeypatch, mode, tar_format):
    # Small chunks make members straddle chunk boundaries and take the large-member path.
    monkeypatch.setattr(tar_stream, "CHUNK_BYTES", 1000)
    files = notmnist_files()
    files[f"{TOP}/I/large.png"] = os.urandom(5000)
    # Over 100 characters: a GNU long name, a pax path record, or the ustar prefix field.
    files[f"{TOP}/J/{'x' * 90}.png"] = png(999)
    archive = build(tmp_path / NAME, files, mode=mode, tar_format=tar_format)

    top = extract_archive(archive, tmp_path / "dest")

    assert top == tmp_path / "dest" / TOP
    assert sorted(path.name for path in top.iterdir() if path.is_dir()) == list(LETTERS)
    extracted = {str(path.relative_to(tmp_path / "dest")): path.read_bytes()
                 for path in top.rglob("*.png")}
    assert extracted == files
    record = read_json(top / RECORD_NAME)
    status = archive.stat()
    assert set(record.pop("classes")) == set(LETTERS)
    assert record == {
        "format_version": 3, "archive_name": NAME, "archive_size": status.st_size,
        "archive_mtime_ns": status.st_mtime_ns, "archive_sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
        "top_folder": TOP, "member_count": 1 + len(LETTERS) + len(files),
        "total_bytes": sum(len(data) for data in files.values()),
    }
    assert leftovers(tmp_path / "dest") == [TOP]


def test_concatenated_gzip_members_and_zero_padding_are_read_like_gzip_does(tmp_path):
    files = notmnist_files()
    plain = build(tmp_path / "plain.tar", files, mode="w").read_bytes()
    archive = tmp_path / NAME
    archive.write_bytes(gzip.compress(plain[:5000]) + gzip.compress(plain[5000:]) + bytes(100))

    top = extract_archive(archive, tmp_path / "dest")

    assert {str(path.relative_to(tmp_path / "dest")): path.read_bytes() for path in top.rglob("*.png")} == files


def test_rerun_skips_without_touching_anything(tmp_path):
    archive = build(tmp_path / NAME, notmnist_files())
    top = extract_archive(archive, tmp_path / "dest")
    (top / "sentinel").write_text("a replaced folder would not have this")  # beside the class folders
    before = snapshot(top)

    assert extract_archive(archive, tmp_path / "dest") == top
    assert snapshot(top) == before


def test_same_bytes_with_a_new_mtime_are_recognised_by_sha256(tmp_path):
    archive = build(tmp_path / NAME, notmnist_files())
    top = extract_archive(archive, tmp_path / "dest")
    os.utime(archive, ns=(1, 1))  # what a re-download of the same file looks like
    assert find_extraction(archive, tmp_path / "dest") == top


def test_changed_archive_is_extracted_again(tmp_path):
    archive = build(tmp_path / NAME, notmnist_files())
    top = extract_archive(archive, tmp_path / "dest")
    (top / "sentinel").write_text("from the old extraction")
    new_files = notmnist_files(per_letter=2, salt=5)
    build(archive, new_files)

    assert extract_archive(archive, tmp_path / "dest") == top
    assert {str(path.relative_to(tmp_path / "dest")): path.read_bytes() for path in top.rglob("*.png")} == new_files
    assert not (top / "sentinel").exists()
    assert read_json(top / RECORD_NAME)["archive_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()


def test_a_folder_no_extraction_made_is_refused_and_left_as_it_is(tmp_path):
    mine = tmp_path / "dest" / TOP
    mine.mkdir(parents=True)
    (mine / "my_notes.txt").write_text("the user's own file")
    archive = build(tmp_path / NAME, notmnist_files())

    with pytest.raises(ArchiveError, match=rf"{mine} exists and was not made by an extraction .* Move it away"):
        extract_archive(archive, tmp_path / "dest")

    assert sorted(path.name for path in mine.iterdir()) == ["my_notes.txt"]
    assert leftovers(tmp_path / "dest") == [TOP]


def overwrite_later(path: Path, record: Path) -> None:
    """Same size, other bytes, written after the extraction finished (stamped past the record: file
    times have the kernel clock's coarse tick, and a test runs within one)."""
    path.write_bytes(bytes(path.stat().st_size))
    later = record.stat().st_mtime_ns + 1_000_000
    os.utime(path, ns=(later, later))


@pytest.mark.parametrize(
    "change",
    [
        lambda top: (top / "C" / sorted(p.name for p in (top / "C").iterdir())[0]).unlink(),
        lambda top: (top / "D" / "extra.png").write_bytes(b"x"),
        lambda top: overwrite_later(next((top / "E").iterdir()), top / RECORD_NAME),
    ],
    ids=["file-deleted", "file-added", "same-size-overwrite"],
)
def test_an_extraction_changed_afterwards_is_extracted_again(tmp_path, change):
    files = notmnist_files()
    archive = build(tmp_path / NAME, files)
    top = extract_archive(archive, tmp_path / "dest")
    change(top)
    assert find_extraction(archive, tmp_path / "dest") is None
    assert extract_archive(archive, tmp_path / "dest") == top
    assert {str(path.relative_to(tmp_path / "dest")): path.read_bytes() for path in top.rglob("*.png")} == files


OUTSIDE = "outside"  # a folder next to dest; hostile members aim at it


@pytest.mark.parametrize(
    ("hostile", "options", "message"),
    [
        (lambda tmp: member(f"{tmp}/{OUTSIDE}/evil.png", size=3), {}, "absolute path"),
        (lambda tmp: member(f"{TOP}/A/../../../../{OUTSIDE}/evil.png", size=3), {}, "'..' component"),
        (lambda tmp: member(f"{TOP}/A/link.png", tarfile.SYMTYPE, linkname=f"{tmp}/{OUTSIDE}"), {}, "symbolic link"),
        (lambda tmp: member(f"{TOP}/A/hard.png", tarfile.LNKTYPE, linkname=f"{TOP}/A/A0.png"), {}, "hard link"),
        (lambda tmp: member(f"{TOP}/A/tty.png", tarfile.CHRTYPE, devmajor=5, devminor=0), {}, "character device"),
        (lambda tmp: member(f"{TOP}/A/disk.png", tarfile.BLKTYPE, devmajor=8, devminor=0), {}, "block device"),
        (lambda tmp: member(f"{TOP}/A/pipe.png", tarfile.FIFOTYPE), {}, "FIFO"),
        (lambda tmp: member(f"{TOP}/A/one-too-many.png", size=3), {"max_members": 41}, "over the limit of 41"),
        (lambda tmp: member(f"{TOP}/A/too-big.png", size=10_000), {"max_total_bytes": 20_000}, "over the limit"),
        (lambda tmp: member(f"{OUTSIDE}/second-top.png", size=3), {}, r"found \['notMNIST_large', 'outside'\]"),
        (lambda tmp: member(f"{TOP}/A/A0.png", size=3), {}, "repeats or collides"),
        (lambda tmp: member("./", size=3), {}, "file without a name"),
    ],
    ids=["absolute-path", "dot-dot", "symlink", "hardlink", "char-device", "block-device", "fifo",
         "member-count", "total-size", "two-top-folders", "duplicate-name", "file-without-name"],
)
def test_hostile_member_is_refused_by_name_and_nothing_is_written(tmp_path, hostile, options, message):
    files = notmnist_files()  # 1 + 10 folders + 30 files = 41 members before the hostile one
    options = dict(options)
    if "max_total_bytes" in options:  # room for the real files, not for the hostile 10,000 bytes
        options["max_total_bytes"] = sum(len(data) for data in files.values()) + 5_000
    info = hostile(tmp_path)
    archive = build(tmp_path / NAME, files, (info,))

    with pytest.raises(UnsafeArchiveError, match=re.escape(repr(info.name)) + ".*" + message):
        extract_archive(archive, tmp_path / "dest", **options)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["dest", NAME]
    assert leftovers(tmp_path / "dest") == []


def test_wrong_number_of_class_folders_lists_them_and_writes_nothing(tmp_path):
    archive = build(tmp_path / NAME, notmnist_files(letters="ABCDEFGHI"))
    with pytest.raises(ArchiveError, match=r"10 folders.*found 9: \['A', 'B', .*'I'\]"):
        extract_archive(archive, tmp_path / "dest")
    assert leftovers(tmp_path / "dest") == []
    assert extract_archive(archive, tmp_path / "dest", expected_classes=None).is_dir()


@pytest.mark.parametrize(
    ("mode", "damage"),
    [("w:gz", lambda data: data[:2000] + bytes(b ^ 0x55 for b in data[2000:2400]) + data[2400:]),
     ("w:gz", lambda data: data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:]),
     ("w:gz", lambda data: data[: len(data) // 2]),
     ("w", lambda data: data[: len(data) // 2 + 100]),
     ("w", lambda data: data[:1024] + b"X" + data[1025:]),
     ("w:gz", lambda data: b""),
     ("w:gz", lambda data: b"<html>404 Not Found</html>" * 40)],
    ids=["corrupt-gzip", "bad-gzip-crc", "truncated-gzip", "truncated-tar", "corrupt-tar-header", "empty-file",
         "html-page"],
)
def test_corrupt_or_truncated_archive_says_to_download_again_and_writes_nothing(tmp_path, monkeypatch, mode, damage):
    # Small chunks let the end-of-archive marker arrive before a damaged gzip trailer is read.
    monkeypatch.setattr(tar_stream, "CHUNK_BYTES", 4096)
    archive = build(tmp_path / NAME, notmnist_files(per_letter=20), mode=mode)
    archive.write_bytes(damage(archive.read_bytes()))
    with pytest.raises(ArchiveError, match="corrupt or truncated .*delete it and download again"):
        extract_archive(archive, tmp_path / "dest")
    assert leftovers(tmp_path / "dest") == []


def test_crash_mid_extraction_leaves_nothing_finished_and_rerun_succeeds(tmp_path, monkeypatch):
    archive = build(tmp_path / NAME, notmnist_files())
    real_write, calls = extract.write_member, []

    def failing_write(path, pieces):
        calls.append(path)
        if len(calls) == 7:
            raise KeyboardInterrupt("simulated crash")
        return real_write(path, pieces)

    monkeypatch.setattr(extract, "write_member", failing_write)
    with pytest.raises(KeyboardInterrupt):
        extract_archive(archive, tmp_path / "dest")
    assert leftovers(tmp_path / "dest") == []

    monkeypatch.setattr(extract, "write_member", real_write)
    assert (extract_archive(archive, tmp_path / "dest") / RECORD_NAME).exists()


def test_rerun_deletes_leftovers_of_a_killed_run_but_not_other_archives(tmp_path):
    dest = tmp_path / "dest"
    killed = temporary_sibling(dest / NAME) / TOP / "A"
    killed.mkdir(parents=True)
    (killed / "A0.png").write_bytes(b"\x89PNG")
    other = temporary_sibling(dest / "notMNIST_small.tar.gz")
    other.mkdir()
    archive = build(tmp_path / NAME, notmnist_files())

    extract_archive(archive, dest)

    assert leftovers(dest) == sorted([other.name, TOP])


def test_missing_archive_says_to_download_it_first(tmp_path):
    with pytest.raises(ArchiveError, match="does not exist or is not a file; download it first"):
        extract_archive(tmp_path / NAME, tmp_path / "dest")


def test_a_top_folder_named_like_the_aside_name_replaces_an_old_one(tmp_path):
    (tmp_path / "dest" / "replaced" / "A").mkdir(parents=True)
    (tmp_path / "dest" / "replaced" / RECORD_NAME).write_text("{}")  # an earlier extraction's
    archive = build(tmp_path / NAME, notmnist_files(top="replaced"))
    top = extract_archive(archive, tmp_path / "dest")
    assert top == tmp_path / "dest" / "replaced"
    assert sorted(path.name for path in top.iterdir()) == sorted([RECORD_NAME, *LETTERS])


@pytest.mark.parametrize("top_name", [".hidden", LOCKS, f".{NAME}.tmp-0123456789ab"],
                         ids=["hidden", "lock-name", "temporary-name"])
def test_hidden_top_folder_is_refused(tmp_path, top_name):
    archive = build(tmp_path / NAME, notmnist_files(top=top_name))
    with pytest.raises(UnsafeArchiveError, match=re.escape(f"hidden top-level folder {top_name!r}")):
        extract_archive(archive, tmp_path / "dest")
    assert leftovers(tmp_path / "dest") == []


def test_archive_without_members_is_an_error(tmp_path):
    archive = build(tmp_path / NAME, {})
    with pytest.raises(ArchiveError, match="holds no members; expected one top-level folder"):
        extract_archive(archive, tmp_path / "dest")
    assert leftovers(tmp_path / "dest") == []


def test_extraction_logs_the_archive_and_what_it_held_then_the_skip(tmp_path, caplog):
    archive = build(tmp_path / NAME, notmnist_files())
    with caplog.at_level("INFO", logger="tasks.extract"):
        top = extract_archive(archive, tmp_path / "dest")
        assert extract_archive(archive, tmp_path / "dest") == top
    assert re.search(rf"Extracting .*{NAME} \([\d,]+ bytes\)", caplog.text)
    assert re.search(rf"Extracted 41 members \([\d,]+ bytes\) of {NAME}", caplog.text)
    assert "already present - Skipping extraction" in caplog.text


def test_the_record_lists_each_class_folder_as_the_disk_does(tmp_path):
    files = notmnist_files()
    files[f"{TOP}/A/deeper/inside.png"] = png(7)  # a nested folder: listed from the disk instead
    top = extract_archive(build(tmp_path / NAME, files), tmp_path / "dest")
    listed = read_json(top / RECORD_NAME)["classes"]
    assert listed == {name: folder_state(top / name)[0] for name in LETTERS}
