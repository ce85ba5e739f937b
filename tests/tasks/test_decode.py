"""The decode stage on generated letter folders and archives with every kind of bad image."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

import tasks.decode as decode
from demo.synthetic import make_archive, write_letter_folders
from storage.folders import MANIFEST
from storage.shards import pixels_of, read_shard
from tasks.decode import TooFewImagesError, decode_to_shards
from tasks.extract import extract_archive
from tests.processes import children_of

REASON_OF_KIND = {
    "empty": "empty",
    "truncated": "unreadable",
    "not-an-image": "unreadable",
    "wrong-size": "wrong size",
    "rgb": "wrong mode",
    "rgba": "wrong mode",
    "palette": "wrong mode",
    "gray16": "wrong mode",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("extracted") / "notMNIST_small"
    return write_letter_folders(root, per_letter=12, seed=3, bad_files={kind: 1 for kind in REASON_OF_KIND})


def test_every_bad_image_is_rejected_with_its_reason(folders, tmp_path):
    manifests = decode_to_shards(folders.root, tmp_path, workers=1)
    rejected = {item["file"]: item["reason"] for m in manifests.values() for item in m["rejected"]}
    expected = {f"notMNIST_small/{bad.path}": REASON_OF_KIND[bad.kind] for bad in folders.bad_files}
    assert rejected == expected
    assert {letter: m["images"] for letter, m in manifests.items()} == folders.good_per_letter


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "two-processes"])
def test_shards_round_trip_to_the_exact_pixels_of_the_pngs(folders, tmp_path, workers):
    manifests = decode_to_shards(folders.root, tmp_path, workers=workers)
    for letter, manifest in manifests.items():
        (shard,) = manifest["shards"]
        table = read_shard(tmp_path / letter / shard["file"])
        assert table.column("label").to_pylist() == [manifest["label"]] * len(table)
        pixels = pixels_of(table)
        for row, name in enumerate(table.column("file").to_pylist()):
            png = folders.root.parent / name
            assert np.array_equal(pixels[row], np.asarray(Image.open(png))), name


def test_manifest_statistics_match_the_seeds_normalisation(folders, tmp_path):
    manifests = decode_to_shards(folders.root, tmp_path, workers=1)
    table = read_shard(tmp_path / "C" / manifests["C"]["shards"][0]["file"])
    normalised = (pixels_of(table).astype(np.float64) - 127.5) / 255
    assert manifests["C"]["mean"] == pytest.approx(normalised.mean(), abs=1e-12)
    assert manifests["C"]["std"] == pytest.approx(normalised.std(), abs=1e-12)


def test_shards_are_plain_parquet_with_zstd_and_a_digest_per_row(folders, tmp_path):
    decode_to_shards(folders.root, tmp_path, workers=1, letters="A")
    (path,) = (tmp_path / "A").glob("*.parquet")
    metadata = pq.ParquetFile(path).metadata
    assert metadata.row_group(0).column(0).compression == "ZSTD"
    frame = pd.read_parquet(path)
    assert list(frame.columns) == ["file", "label", "pixels", "digest"]
    assert len(frame.iloc[0]["pixels"]) == 784 and len(frame.iloc[0]["digest"]) == 16
    ((rows, labels, width),) = duckdb.sql(
        f"SELECT count(*), count(DISTINCT label), max(octet_length(pixels)) FROM read_parquet('{path}')"
    ).fetchall()
    assert (rows, labels, width) == (len(frame), 1, 784)


def test_reading_the_archive_directly_gives_the_same_rows_as_the_extracted_folder(tmp_path):
    archive = make_archive(tmp_path, "notMNIST_small", per_letter=8, seed=5)
    with tarfile.open(archive.path) as handle:
        handle.extractall(tmp_path / "extracted", filter="data")
    from_archive = decode_to_shards(archive.path, tmp_path / "a", workers=1)
    from_folder = decode_to_shards(tmp_path / "extracted" / "notMNIST_small", tmp_path / "f", workers=1)
    for letter in "ABCDEFGHIJ":
        assert from_archive[letter]["rejected"] == from_folder[letter]["rejected"]
        a = read_shard(tmp_path / "a" / letter / "part-00000.parquet")
        f = read_shard(tmp_path / "f" / letter / "part-00000.parquet")
        assert a.equals(f)


def test_too_few_images_names_letter_count_and_threshold(tmp_path):
    root = write_letter_folders(tmp_path / "x" / "notMNIST_small", per_letter=4, seed=1, bad_files={}).root
    (root / "C" / sorted((root / "C").iterdir())[0].name).unlink()
    with pytest.raises(TooFewImagesError, match=r"^letter C has 3 usable images, fewer than min_images=4"):
        decode_to_shards(root, tmp_path / "out", workers=1, min_images=4)
    assert not (tmp_path / "out" / "C").exists()  # the short letter is not put in place
    assert (tmp_path / "out" / "D" / MANIFEST).exists()  # letters that pass are


def test_rerun_skips_letters_that_match_their_input(folders, tmp_path, monkeypatch):
    decode_to_shards(folders.root, tmp_path, workers=1)
    calls = []
    monkeypatch.setattr(decode, "decode_batch", lambda job: calls.append(job) or pytest.fail("decoded again"))
    decode_to_shards(folders.root, tmp_path, workers=1)
    assert calls == []


def test_changed_input_is_decoded_again(tmp_path):
    root = write_letter_folders(tmp_path / "x" / "notMNIST_small", per_letter=3, seed=1, bad_files={}).root
    first = decode_to_shards(root, tmp_path / "shards", workers=1)
    extra = root / "B" / "extra.png"
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(extra)
    second = decode_to_shards(root, tmp_path / "shards", workers=1)
    assert second["B"]["images"] == first["B"]["images"] + 1
    assert second["A"] == first["A"]


def test_crash_mid_run_keeps_finished_letters_and_rerun_redoes_the_rest(folders, tmp_path, monkeypatch):
    real = decode.decode_batch

    def crash_on_d(job):
        if job.label == 3:
            raise KeyboardInterrupt  # what a killed run looks like from inside
        return real(job)

    monkeypatch.setattr(decode, "decode_batch", crash_on_d)
    with pytest.raises(KeyboardInterrupt):
        decode_to_shards(folders.root, tmp_path, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["A", "B", "C"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    monkeypatch.setattr(decode, "decode_batch", real)
    done_before = {p.name: (p / MANIFEST).stat().st_mtime_ns for p in tmp_path.iterdir()
                   if p.is_dir() and not p.name.startswith(".")}
    manifests = decode_to_shards(folders.root, tmp_path, workers=1)
    assert {letter: m["images"] for letter, m in manifests.items()} == folders.good_per_letter
    assert {name: (tmp_path / name / MANIFEST).stat().st_mtime_ns for name in done_before} == done_before


def test_leftovers_of_a_killed_run_never_pass_for_output(folders, tmp_path):
    (tmp_path / ".E.tmp-0123456789ab").mkdir(parents=True)  # a killed run's temporary folder
    (tmp_path / "F").mkdir()
    (tmp_path / "F" / "part-00000.parquet").write_bytes(b"half a shard")  # no manifest: not done
    manifests = decode_to_shards(folders.root, tmp_path, workers=1)
    assert not (tmp_path / ".E.tmp-0123456789ab").exists()
    assert read_shard(tmp_path / "F" / "part-00000.parquet").num_rows == manifests["F"]["images"]


@pytest.mark.parametrize(
    "damage", [lambda data: data[:-10], lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:]],
    ids=["truncated", "same-size-byte-flip"],
)
def test_corrupted_shard_makes_its_letter_redo(folders, tmp_path, damage):
    first = decode_to_shards(folders.root, tmp_path, workers=1)
    shard = tmp_path / "G" / "part-00000.parquet"
    shard.write_bytes(damage(shard.read_bytes()))
    again = decode_to_shards(folders.root, tmp_path, workers=1)
    assert read_shard(shard).num_rows == folders.good_per_letter["G"]
    assert again["G"]["files"] == first["G"]["files"]  # the same bytes as before the damage


def test_a_manifest_names_its_input_by_name_not_by_absolute_path(folders, tmp_path):
    manifests = decode_to_shards(folders.root, tmp_path, workers=1)
    assert manifests["A"]["source"]["name"] == "notMNIST_small/A"
    assert str(folders.root) not in (tmp_path / "A" / MANIFEST).read_text()


def test_folder_without_the_letters_is_a_clear_error(tmp_path):
    (tmp_path / "notMNIST_small" / "A").mkdir(parents=True)
    with pytest.raises(Exception, match=r"should hold folders A, B, .*found \['A'\]"):
        decode_to_shards(tmp_path / "notMNIST_small", tmp_path / "out")


@pytest.mark.parametrize("mode", ["folder", "archive", "extract-then-decode"])
def test_a_file_name_that_is_not_utf8_is_rejected_with_a_reason_in_every_mode(tmp_path, mode):
    root = write_letter_folders(tmp_path / "x" / "notMNIST_small", per_letter=3, seed=1, bad_files={}).root
    good = next((root / "A").iterdir()).read_bytes()
    with open(os.fsencode(root / "A") + b"/caf\xe9.png", "wb") as handle:  # Latin-1, not UTF-8: legal on Linux
        handle.write(good)
    source = root
    if mode != "folder":
        source = tmp_path / "notMNIST_small.tar.gz"
        with tarfile.open(source, "w:gz", encoding="utf-8", errors="surrogateescape") as archive:
            archive.add(root, arcname="notMNIST_small")
    if mode == "extract-then-decode":
        source = extract_archive(source, tmp_path / "extracted")
    manifests = decode_to_shards(source, tmp_path / "shards", workers=1)
    assert manifests["A"]["rejected"] == [
        {"file": "notMNIST_small/A/caf\\xe9.png", "reason": "bad name", "detail": "the file name is not valid UTF-8"}
    ]
    assert manifests["A"]["images"] == 3


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_workers_and_the_resource_tracker_end_when_the_parent_is_killed(tmp_path):
    root = write_letter_folders(tmp_path / "x" / "notMNIST_large", per_letter=800, seed=2, bad_files={}, fonts=()).root
    script = f"from tasks.decode import decode_to_shards\ndecode_to_shards({str(root)!r}, {str(tmp_path / 'out')!r}, workers=2)\n"
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    try:
        assert wait_until(lambda: any("spawn_main" in c for c in children_of(parent.pid).values()), 60)
        spawned = children_of(parent.pid)
    finally:
        parent.kill()
        parent.wait()
    assert any("resource_tracker" in command for command in spawned.values())
    assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in spawned), 10), spawned


def test_a_higher_min_images_applies_to_letters_decoded_before(folders, tmp_path):
    decode_to_shards(folders.root, tmp_path, workers=1)
    fewest = min(folders.good_per_letter.values())
    with pytest.raises(TooFewImagesError, match=rf"fewer than min_images={fewest + 1}"):
        decode_to_shards(folders.root, tmp_path, workers=1, min_images=fewest + 1)
