"""MNIST: array checks on small fake .npz files of any size, and the split folder made from them."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.errors import PipelineError
from storage.arrays import load_npy
from storage.folders import MANIFEST
from storage.layout import DataRoot
from tasks.mnist import build_mnist_splits, load_mnist
from tests.tasks.synthetic_splits import pattern_images

SMALL = {"x_train": (300, 28, 28), "y_train": (300,), "x_test": (60, 28, 28), "y_test": (60,)}


def small_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Learnable stand-ins for MNIST's arrays, in its dtypes (uint8 pixels and labels)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for part in ("train", "test"):
        labels = np.resize(np.arange(10, dtype=np.uint8), SMALL[f"y_{part}"][0])
        rng.shuffle(labels)
        arrays[f"x_{part}"], arrays[f"y_{part}"] = pattern_images(labels, rng), labels
    return arrays


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture
def fake_npz(tmp_path) -> Path:
    return write_npz(tmp_path / "source" / "mnist.npz", small_arrays())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_good_arrays_of_any_row_count_load_with_their_shapes(fake_npz):
    arrays = load_mnist(fake_npz)
    assert {name: array.shape for name, array in arrays.items()} == SMALL


def _without_x_test(arrays):
    del arrays["x_test"]


def _wrong_image_shape(arrays):
    arrays["x_train"] = arrays["x_train"][:, :27, :]


def _wrong_count(arrays):
    arrays["y_test"] = arrays["y_test"][:-1]


def _float_pixels(arrays):
    arrays["x_test"] = arrays["x_test"].astype(np.float32)


def _labels_out_of_range(arrays):
    arrays["y_train"] = arrays["y_train"] + 5


def _string_labels(arrays):
    arrays["y_train"] = arrays["y_train"].astype(str)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_without_x_test, r"lacks x_test \(it holds x_train, y_train, y_test\)"),
        (_wrong_image_shape, r"x_train has shape \(300, 27, 28\), expected \(N, 28, 28\) with N > 0"),
        (_wrong_count, r"y_test has shape \(59,\), expected \(60,\) like x_test"),
        (_float_pixels, r"x_test holds float32, expected uint8"),
        (_labels_out_of_range, r"y_train has labels 5\.\.14, expected 0\.\.9"),
        (_string_labels, r"y_train holds <U\d+, expected integer labels"),
    ],
    ids=["missing-array", "wrong-image-shape", "wrong-row-count", "float-pixels", "labels-out-of-range", "string-labels"],
)
def test_wrong_arrays_give_a_clear_error(tmp_path, change, message):
    arrays = small_arrays()
    change(arrays)
    with pytest.raises(PipelineError, match=message):
        load_mnist(write_npz(tmp_path / "mnist.npz", arrays))


def test_pickled_object_arrays_are_refused(tmp_path):
    arrays = {**small_arrays(), "y_train": np.array([{"label": 1}] * 300, dtype=object)}
    path = tmp_path / "mnist.npz"
    np.savez(path, **arrays)  # savez pickles object arrays; loading must not
    with pytest.raises(PipelineError, match="y_train holds pickled Python objects; refusing"):
        load_mnist(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"<html>403 Forbidden</html>", "not a readable .npz archive"), (None, "holds a single array")],
    ids=["html-page", "plain-npy"],
)
def test_a_file_that_is_not_an_npz_archive_is_refused(tmp_path, content, message):
    path = tmp_path / "mnist.npz"
    if content is None:
        with open(path, "wb") as handle:
            np.save(handle, np.zeros(3))
    else:
        path.write_bytes(content)
    with pytest.raises(PipelineError, match=message):
        load_mnist(path)


def splits_of(npz: Path, data: Path) -> dict:
    """The split folder the stage builds from `npz` as the data root's downloaded mnist.npz."""
    (data / "raw").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(npz, data / "raw" / "mnist.npz")
    return build_mnist_splits(data, "mnist.npz")


def test_the_split_folder_has_train_from_x_train_and_valid_and_test_from_x_test(fake_npz, tmp_path):
    arrays = small_arrays()
    manifest = splits_of(fake_npz, tmp_path / "data")
    folder = DataRoot(tmp_path / "data").splits(manifest["key"])
    assert manifest["key"] == f"mnist-{sha256(fake_npz)[:12]}"
    for split, source in (("train", "train"), ("valid", "test"), ("test", "test")):
        assert np.array_equal(load_npy(folder / f"{split}_x.npy"), arrays[f"x_{source}"])
        labels = load_npy(folder / f"{split}_y.npy")
        assert labels.dtype == np.int64 and np.array_equal(labels, arrays[f"y_{source}"])
        assert manifest["splits"][split]["rows"] == len(labels)  # the file's own sizes, recorded
    assert json.loads((folder / MANIFEST).read_text())["fingerprint"] == manifest["fingerprint"]
    assert len(manifest["fingerprint"]) == 64 and manifest["class_names"] == list("0123456789")
    assert manifest["inputs"]["npz"] == {"name": "mnist.npz", "sha256": sha256(fake_npz)}


def test_the_split_folder_is_reused_for_the_same_file_and_rebuilt_for_another(fake_npz, tmp_path):
    first = splits_of(fake_npz, tmp_path / "data")
    train_x = DataRoot(tmp_path / "data").splits(first["key"]) / "train_x.npy"
    stamp = train_x.stat().st_mtime_ns
    assert splits_of(fake_npz, tmp_path / "data") == first
    assert train_x.stat().st_mtime_ns == stamp
    other = write_npz(tmp_path / "other" / "mnist.npz", small_arrays(seed=1))
    assert splits_of(other, tmp_path / "data")["fingerprint"] != first["fingerprint"]
