"""The splits stage on small shard sets with planted duplicates."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from storage.arrays import load_npy
from storage.atomic import write_json
from storage.shards import write_shard
from tasks.splits import SPLITS, TooFewUsableImagesError, build_splits

LETTERS = "ABCDEFGHIJ"


def write_shard_set(root: Path, archive: str, images: dict[str, np.ndarray]) -> Path:
    """Shards and manifests as the decode stage lays them out, from arrays of (n, 28, 28) uint8."""
    for label, letter in enumerate(LETTERS):
        folder = root / archive / letter
        folder.mkdir(parents=True)
        files = [f"{archive}/{letter}/{index:05d}.png" for index in range(len(images[letter]))]
        write_shard(folder / "part-00000.parquet", files, label, images[letter])
        sha = hashlib.sha256((folder / "part-00000.parquet").read_bytes()).hexdigest()
        write_json(folder / "manifest.json", {"shards": [{"file": "part-00000.parquet", "rows": len(files), "sha256": sha}]})
    return root / archive


def distinct_images(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)


@pytest.fixture
def shard_sets(tmp_path):
    """Large: 60 per letter, each letter's first 20 copies of 4 images (so duplicates abound).
    Small: 12 per letter, 6 of them copies of large images of the same letter (leaks across archives)."""
    rng = np.random.default_rng(0)
    large, small = {}, {}
    for letter in LETTERS:
        images = distinct_images(rng, 60)
        images[:20] = images[20:24][np.arange(20) % 4]
        large[letter] = images
        test = distinct_images(rng, 12)
        test[:6] = images[[20, 21, 22, 30, 31, 32]]
        small[letter] = test
    return write_shard_set(tmp_path, "notMNIST_large", large), write_shard_set(tmp_path, "notMNIST_small", small)


def build(shard_sets, root: Path, **options):
    options = {"train_size": 200, "valid_size": 50, "test_size": 50, **options}
    return build_splits(*shard_sets, root, **options)


def split_arrays(manifest: dict, split: str):
    folder = Path(manifest["folder"])
    return tuple(load_npy(folder / f"{split}_{name}.npy") for name in ("x", "y", "file"))


def digests(x: np.ndarray) -> set:
    return {row.tobytes() for row in x}


@pytest.mark.parametrize("dedup", ["none", "cross-split", "all"])
def test_classes_are_balanced_and_rows_match_their_source_files(shard_sets, tmp_path, dedup):
    manifest = build(shard_sets, tmp_path / "splits", dedup=dedup)
    for split, per_class in (("train", 20), ("valid", 5), ("test", 5)):
        x, y, files = split_arrays(manifest, split)
        assert x.dtype == np.uint8 and x.shape == (per_class * 10, 28, 28)
        assert np.bincount(y, minlength=10).tolist() == [per_class] * 10
        assert manifest["splits"][split]["per_class"] == dict.fromkeys(LETTERS, per_class)
        for name, label in zip(files[:25], y[:25]):
            assert name.decode().split("/")[1] == LETTERS[label]


def test_same_seed_gives_identical_bytes_and_another_seed_another_order(shard_sets, tmp_path):
    first = build(shard_sets, tmp_path / "one")
    again = build(shard_sets, tmp_path / "two")
    other = build(shard_sets, tmp_path / "three", seed=7)
    for split in SPLITS:
        for name in ("x", "y", "file"):
            a = (Path(first["folder"]) / f"{split}_{name}.npy").read_bytes()
            assert a == (Path(again["folder"]) / f"{split}_{name}.npy").read_bytes()
        assert not np.array_equal(split_arrays(first, split)[0], split_arrays(other, split)[0])
    assert first["fingerprint"] == again["fingerprint"] != other["fingerprint"]


def test_no_dedup_keeps_the_seeds_sampling_and_its_leaks(shard_sets, tmp_path):
    manifest = build(shard_sets, tmp_path / "splits", dedup="none")
    assert manifest["overlap"]["after_dedup"] == manifest["overlap"]["seed_sampling"]
    train, valid, test = (digests(split_arrays(manifest, s)[0]) for s in SPLITS)
    assert test & train  # planted cross-archive duplicates leak into test


@pytest.mark.parametrize("dedup", ["cross-split", "all"])
def test_dedup_leaves_no_valid_or_test_image_in_train_and_no_test_image_in_valid(shard_sets, tmp_path, dedup):
    manifest = build(shard_sets, tmp_path / "splits", dedup=dedup)
    train, valid, test = (split_arrays(manifest, s)[0] for s in SPLITS)
    assert not digests(valid) & digests(train)
    assert not digests(test) & digests(train)
    assert not digests(test) & digests(valid)
    after = manifest["overlap"]["after_dedup"]
    assert (after["valid_in_train"], after["test_in_train"], after["test_in_valid"]) == (0, 0, 0)
    assert manifest["overlap"]["seed_sampling"]["test_in_train"] > 0  # there was something to remove


def test_cross_split_keeps_the_seeds_train_rows(shard_sets, tmp_path):
    plain = build(shard_sets, tmp_path / "a", dedup="none")
    cross = build(shard_sets, tmp_path / "b", dedup="cross-split")
    assert (Path(plain["folder"]) / "train_x.npy").read_bytes() == (Path(cross["folder"]) / "train_x.npy").read_bytes()


def test_all_makes_every_split_unique_within_itself(shard_sets, tmp_path):
    manifest = build(shard_sets, tmp_path / "splits", dedup="all")
    for split in SPLITS:
        x = split_arrays(manifest, split)[0]
        assert len(digests(x)) == len(x)
    assert manifest["overlap"]["seed_sampling"]["train_unique"] < manifest["overlap"]["seed_sampling"]["train_rows"]


def test_a_letter_without_enough_usable_images_names_what_it_has_and_needs(shard_sets, tmp_path):
    with pytest.raises(TooFewUsableImagesError, match=r"letter A of notMNIST_small has 7 usable images for test \(dedup='cross-split'\), which needs 8 per class"):
        build(shard_sets, tmp_path / "splits", test_size=80, dedup="cross-split")
    with pytest.raises(TooFewUsableImagesError, match=r"letter A of notMNIST_large has 60 usable images for valid and train, which needs 70"):
        build(shard_sets, tmp_path / "splits", train_size=600, valid_size=100)
    assert not list((tmp_path / "splits").glob("train*"))


def test_rerun_is_skipped_and_other_parameters_get_their_own_folder(shard_sets, tmp_path):
    first = build(shard_sets, tmp_path / "splits")
    stamp = (Path(first["folder"]) / "train_x.npy").stat().st_mtime_ns
    assert build(shard_sets, tmp_path / "splits") == first
    assert (Path(first["folder"]) / "train_x.npy").stat().st_mtime_ns == stamp
    other = build(shard_sets, tmp_path / "splits", train_size=100)
    assert other["folder"] != first["folder"]
    assert (Path(first["folder"]) / "manifest.json").exists()


def test_unknown_dedup_mode_is_refused(shard_sets, tmp_path):
    with pytest.raises(Exception, match="dedup must be one of none, cross-split, all"):
        build(shard_sets, tmp_path / "splits", dedup="some")


def test_arrays_load_memory_mapped_without_pickle(shard_sets, tmp_path):
    manifest = build(shard_sets, tmp_path / "splits")
    x, y, files = split_arrays(manifest, "train")
    assert isinstance(x, np.memmap) and y.dtype == np.int64 and files.dtype.kind == "S"
