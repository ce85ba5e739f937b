"""NPY helpers and the data root layout."""

from __future__ import annotations

import numpy as np
import pytest

from storage.arrays import create_npy, load_npy, save_npy
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
