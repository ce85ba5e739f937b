"""NPY helpers and the data root layout."""

from __future__ import annotations

import os

import numpy as np
import pytest

from core.errors import CorruptDataError
from storage.arrays import NpyRows, create_npy, load_npy, save_npy
from storage.atomic import atomic_path, is_temporary
from storage.layout import DataRoot, archive_stem, backup_folder, model_key, report_file
from tests.disks import mounted_tmpfs


def test_pickled_object_arrays_are_refused_on_save_and_on_load(tmp_path):
    with pytest.raises(TypeError, match="need pickle"):
        save_npy(tmp_path / "a.npy", np.array([{"a": 1}], dtype=object))
    np.save(tmp_path / "evil.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        load_npy(tmp_path / "evil.npy")


def test_memmap_written_arrays_load_back_memory_mapped(tmp_path):
    array = create_npy(tmp_path / "x.npy", (5, 28, 28), np.uint8)
    array[:] = np.arange(5 * 784, dtype=np.uint32).reshape(5, 28, 28) % 251
    array.flush()
    loaded = load_npy(tmp_path / "x.npy")
    assert isinstance(loaded, np.memmap) and np.array_equal(loaded, array)


@pytest.fixture
def pixels_file(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (300, 28, 28), dtype=np.uint8)
    save_npy(tmp_path / "x.npy", pixels)
    return tmp_path / "x.npy", pixels


@pytest.mark.parametrize(
    "rows",
    [np.sort(np.random.default_rng(4).choice(300, 128, replace=False)), [299, 0, 7, 8, 9, 1], slice(10, 75),
     slice(None), slice(0, 0), np.arange(40, 80), 17],
    ids=["sorted-random", "any-order", "slice", "whole", "none", "consecutive", "one-row"],
)
def test_rows_read_from_the_file_are_the_arrays_rows(pixels_file, rows):
    path, pixels = pixels_file
    reader = NpyRows(path)
    assert (reader.shape, reader.dtype, len(reader)) == (pixels.shape, pixels.dtype, 300)
    read = reader[rows]
    assert read.dtype == np.uint8 and np.array_equal(read, pixels[rows])


def test_rows_of_wider_values_and_the_whole_array(tmp_path):
    labels = np.arange(-5, 95, dtype=np.int64)
    save_npy(tmp_path / "y.npy", labels)
    reader = NpyRows(tmp_path / "y.npy")
    assert np.array_equal(reader[[3, 4, 99]], labels[[3, 4, 99]]) and np.array_equal(np.asarray(reader), labels)


@pytest.mark.parametrize("rows", [[300], [-1], [[1, 2]]], ids=["past-the-end", "negative", "two-dimensional"])
def test_rows_out_of_range_are_an_index_error(pixels_file, rows):
    with pytest.raises(IndexError, match="which has 300"):
        NpyRows(pixels_file[0])[rows]


def test_the_digest_is_the_files_and_is_read_through_the_same_handle(pixels_file):
    import hashlib

    path, _ = pixels_file
    assert NpyRows(path).sha256() == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "change",
    [
        lambda path: _write_at(path, 500, b"\x01"),
        lambda path: os.truncate(path, 1000),
        lambda path: os.utime(path),
    ],
    ids=["written", "truncated", "touched"],
)
def test_a_file_changed_after_it_was_opened_is_never_read_as_verified(pixels_file, change):
    path, pixels = pixels_file
    reader = NpyRows(path, remedy="rebuild it")
    assert np.array_equal(reader[[1, 2]], pixels[[1, 2]])
    change(path)
    with pytest.raises(CorruptDataError, match=r"changed after it was opened and verified .*: rebuild it"):
        reader[[1, 2]]
    with pytest.raises(CorruptDataError, match="changed after"):
        reader.sha256()


def test_a_file_replaced_under_its_name_is_not_read_as_the_one_verified(pixels_file):
    path, pixels = pixels_file
    reader = NpyRows(path)
    save_npy(path.with_name("new.npy"), 255 - pixels)
    os.replace(path.with_name("new.npy"), path)
    with pytest.raises(CorruptDataError, match="removed or replaced"):
        reader[[5, 6]]


def test_what_is_not_plain_rows_is_refused_when_opened(tmp_path):
    np.save(tmp_path / "evil.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "fortran.npy", np.asfortranarray(np.zeros((3, 4), dtype=np.uint8)))
    save_npy(tmp_path / "short.npy", np.zeros((10, 28, 28), dtype=np.uint8))
    os.truncate(tmp_path / "short.npy", 1000)
    (tmp_path / "text.npy").write_text("not an array")
    for name, message in [("evil", "plain values"), ("fortran", "C-ordered"), ("short", "not the size its NPY header"),
                          ("text", "magic string")]:
        with pytest.raises(ValueError, match=message):
            NpyRows(tmp_path / f"{name}.npy")


def _write_at(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def test_atomic_path_leaves_nothing_on_failure_and_replaces_folders(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.mkdir()
            (temporary / "half").write_text("x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    for content in ("first", "second"):
        with atomic_path(target) as temporary:
            temporary.mkdir()
            (temporary / "file").write_text(content)
            assert is_temporary(temporary)
    assert (target / "file").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_layout_names_every_folder_under_the_root(tmp_path):
    layout = DataRoot(tmp_path)
    assert archive_stem("notMNIST_large.tar.gz") == "notMNIST_large"
    assert layout.shards("notMNIST_small.tar.gz") == tmp_path / "shards" / "notMNIST_small"
    assert {layout.raw.parent, layout.extracted.parent, layout.splits("k").parent.parent} == {tmp_path}
    assert layout.relative(layout.splits("k")) == "splits/k"
    model = layout.model(model_key("notmnist", "f" * 64, {"epochs": 2}))
    assert model.parent == layout.models_root and model.name.startswith("notmnist-ffffffffffff-")
    assert backup_folder(model).name == model.name + ".backup" and report_file(model).parent == model


def test_a_moved_data_root_describes_the_same_places(tmp_path):
    first, second = DataRoot(tmp_path / "a"), DataRoot(tmp_path / "b")
    assert first.relative(first.shards("notMNIST_large")) == second.relative(second.shards("notMNIST_large"))


@pytest.fixture
def small_disk(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "4m") as disk:
        yield disk


def test_a_memory_mapped_array_the_disk_cannot_hold_is_an_error_not_a_crash(small_disk):
    from storage.arrays import create_npy
    from storage.disk import out_of_space

    with pytest.raises(OSError, match="No space left on device") as raised:
        create_npy(small_disk / "big.npy", (1000, 8000), np.uint8)  # 8 MB on a 4 MiB disk: SIGBUS when written
    assert out_of_space(raised.value) and raised.value.filename == str(small_disk / "big.npy")
    fits = create_npy(small_disk / "fits.npy", (1000, 1000), np.uint8)
    fits[:] = 7
    fits.flush()
