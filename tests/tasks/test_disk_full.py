"""A full disk at every stage: one DiskFullError naming the file system and what was being written, never a
crash signal, nothing committed, and the same stage finishing once space is freed.

Each stage runs through its task's function (the stage boundary included, Prefect not) on a data root
that is a small tmpfs; the disk is filled, all but a little, just before the stage runs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.errors import DiskFullError
from core.seed import LETTERS
from demo.synthetic import make_archive
from storage.folders import read_manifest
from storage.layout import DataRoot
from storage.letters import letter_manifest
from storage.packed import FORMAT as PACKED_FORMAT
from storage.packed import KIND as PACKED_KIND
from tasks.decode import letter_task
from tasks.download import download_task
from tasks.splits import splits_task
from tasks.unpack import unpack_task
from tests.disks import fill, free, mounted_tmpfs
from tests.tasks.test_splits import distinct_images, write_shard_set

ARCHIVE = "notMNIST_small.tar.gz"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return make_archive(tmp_path_factory.mktemp("archive"), "notMNIST_small", per_letter=60, seed=3, fonts=()).path


@pytest.fixture
def disk(tmp_path) -> Path:
    with mounted_tmpfs(tmp_path / "disk", "8m") as mounted:
        yield mounted


def full_disk_error(disk: Path, stage: str) -> str:
    """What the error says: the file system's mount point, and the stage whose output was being written."""
    return rf"^No space left on {disk} \(the file system of {disk}/data\) while writing the output of `{stage}`.*rerun"


def committed_letters(root: DataRoot) -> list[str]:
    return [letter for letter in LETTERS if read_manifest(root.packed(ARCHIVE) / letter, PACKED_KIND, PACKED_FORMAT)]


def test_a_download_onto_a_full_disk_keeps_what_it_has_and_resumes_once_there_is_room(disk, file_server):
    body = os.urandom(3 << 20)
    url = file_server.put("big.bin", body)
    root = DataRoot(disk / "data")
    fill(disk, leave=1 << 20)
    with pytest.raises(DiskFullError, match=full_disk_error(disk, "download big.bin")):
        download_task.fn(root, url, expected_bytes=len(body), retries=0)
    assert not (root.raw / "big.bin").exists()
    kept = (root.raw / "big.bin.part").stat().st_size
    assert 0 < kept <= 1 << 20
    free(disk)
    download_task.fn(root, url, expected_bytes=len(body), retries=0)
    assert (root.raw / "big.bin").read_bytes() == body
    assert file_server.requests_for("big.bin")[-1].headers.get("Range") == f"bytes={kept}-"  # resumed, not restarted


def test_an_unpack_onto_a_full_disk_commits_no_letter_at_all(disk, archive):
    """The ten letters are written side by side; with room for some of them, none may be put in place."""
    root = DataRoot(disk / "data")
    root.raw.mkdir(parents=True)
    shutil.copyfile(archive, root.raw / ARCHIVE)
    fill(disk, leave=archive.stat().st_size // 2)
    with pytest.raises(DiskFullError, match=full_disk_error(disk, "unpack notMNIST_small.tar.gz")):
        unpack_task.fn(root, ARCHIVE)
    assert committed_letters(root) == []
    assert not [path for path in root.packed(ARCHIVE).iterdir() if path.name != ".locks"]  # no temporaries either
    free(disk)
    unpack_task.fn(root, ARCHIVE)
    assert committed_letters(root) == list(LETTERS)


def test_a_decode_onto_a_full_disk_commits_no_shards(disk, archive):
    root = DataRoot(disk / "data")
    root.raw.mkdir(parents=True)
    shutil.copyfile(archive, root.raw / ARCHIVE)
    unpack_task.fn(root, ARCHIVE)
    fill(disk, leave=4096)
    with pytest.raises(DiskFullError, match=full_disk_error(disk, "decode notMNIST_small C")):
        letter_task.fn(root, ARCHIVE, "C")
    shards = root.shards(ARCHIVE)
    assert letter_manifest(shards / "C") is None
    free(disk)
    assert letter_task.fn(root, ARCHIVE, "C")["images"] > 0


def test_splits_onto_a_full_disk_commit_nothing(disk):
    """Memory-mapped split files: without their space allocated first, this was a SIGBUS."""
    root = disk / "data"
    rng = np.random.default_rng(1)
    write_shard_set(root, "notMNIST_large", {letter: distinct_images(rng, 300) for letter in LETTERS})
    write_shard_set(root, "notMNIST_small", {letter: distinct_images(rng, 60) for letter in LETTERS})
    fill(disk, leave=64 << 10)
    sizes = {"train_size": 2000, "valid_size": 500, "test_size": 500}
    with pytest.raises(DiskFullError, match=full_disk_error(disk, "splits 2000/500/500 seed 133")):
        splits_task.fn(DataRoot(root), **sizes)
    assert not [path for path in DataRoot(root).splits_root.iterdir() if not path.name.startswith(".")]
    free(disk)
    assert splits_task.fn(DataRoot(root), **sizes)["splits"]["train"]["rows"] == 2000


@pytest.fixture
def roomy_disk(tmp_path) -> Path:
    with mounted_tmpfs(tmp_path / "disk", "24m") as mounted:
        yield mounted


def weights_bytes() -> int:
    """The bytes of the seed's CNN's variables: a model file holds them once, a checkpoint three times (Adam)."""
    from tasks.models import build_one_layer_cnn

    return sum(variable.numpy().nbytes for variable in build_one_layer_cnn().weights)


@pytest.mark.parametrize("writing", ["checkpoint", "model"])
def test_training_onto_a_full_disk_fails_without_a_crash_and_resumes_once_there_is_room(roomy_disk, writing):
    """HDF5 (Keras' .weights.h5) met a full disk with a segmentation fault; the checkpoint is a plain NPZ now,
    and the model file is written by Keras through memory."""
    from tasks.train import train_task
    from tests.tasks.synthetic_splits import write_split_folder

    write_split_folder(roomy_disk / "data")
    root = DataRoot(roomy_disk / "data")
    weights = weights_bytes()
    fill(roomy_disk, leave=weights if writing == "checkpoint" else 3 * weights + weights // 2)
    with pytest.raises(DiskFullError, match=full_disk_error(roomy_disk, "train notmnist")):
        train_task.fn(root, "synthetic", epochs=1, batch_size=32)
    assert not [path for path in root.models_root.glob("[!.]*") if not path.name.endswith(".backup")]  # no model
    checkpoints = list(root.models_root.glob("*.backup/epoch-*"))
    assert [path.name for path in checkpoints] == ([] if writing == "checkpoint" else ["epoch-0001"])
    free(roomy_disk)
    result = train_task.fn(root, "synthetic", epochs=1, batch_size=32)
    assert Path(result["model_path"]).is_file()


def test_an_s3_working_copy_on_a_full_disk_names_the_scratch_folder(disk, archive, s3_root, tmp_path):
    """The boundary fetches what a stage reads into the working copy: there the disk may fill too."""
    publisher = DataRoot(s3_root, tmp_path / "publisher")
    publisher.raw.mkdir(parents=True)
    shutil.copyfile(archive, publisher.raw / ARCHIVE)
    publisher.publish(publisher.raw / ARCHIVE)
    unpack_task.fn(publisher, ARCHIVE)
    worker = DataRoot(s3_root, disk / "scratch")
    fill(disk, leave=4096)
    with pytest.raises(DiskFullError, match=rf"^No space left on {disk} \(the file system of {disk}/scratch\) while "
                                            r"writing the output of `decode notMNIST_small C`"):
        letter_task.fn(worker, ARCHIVE, "C")
    free(disk)
    assert letter_task.fn(worker, ARCHIVE, "C")["images"] > 0
