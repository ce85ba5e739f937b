"""The training stage on small split folders of separable patterns: input, accuracy, determinism, resume, outputs."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import threading
import tracemalloc
from pathlib import Path

import keras
import numpy as np
import pytest

from core.errors import CorruptDataError, PipelineError
from core.seed import NORMALISATIONS
from storage.arrays import NpyRows, save_npy
from storage.folders import MANIFEST
from storage.layout import LOCKS, DataRoot, backup_folder
from storage.splits import open_split, read_splits_manifest
from tasks import batches as batches_module
from tasks.batches import SplitBatches, epoch_permutation, open_splits
from tasks.models import build_one_layer_cnn
from tasks.reporting import Progress
from tasks.train import train_model, train_task
from tasks.trained import find_trained
from tasks.training_callbacks import BatchProgress, EpochCheckpoint
from tasks.training_record import git_commit
from tests.tasks.synthetic_splits import write_split_folder

FAST = {"epochs": 2, "batch_size": 32}


class Interrupted(Exception):
    """Stands for a killed process: raised from inside `fit`, after a checkpoint has been written."""


class InterruptAfterEpoch(keras.callbacks.Callback):
    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Interrupted(f"stopped after epoch {epoch + 1}")


class EpochsBegun(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs: list[int] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


@pytest.fixture(scope="module")
def reference_root(tmp_path_factory) -> Path:
    """A data root holding one split folder, `splits/synthetic`."""
    root = tmp_path_factory.mktemp("reference")
    write_split_folder(root)
    return root


@pytest.fixture(scope="module")
def split_dir(reference_root) -> Path:
    return DataRoot(reference_root).splits("synthetic")


@pytest.fixture(scope="module")
def reference(reference_root) -> dict:
    """One uninterrupted training run, shared by the tests that only read its outputs."""
    return train_model(reference_root, "synthetic", **FAST)


@pytest.fixture
def data_root(tmp_path) -> Path:
    """A data root of this test's own, with the same split folder as the reference's."""
    write_split_folder(tmp_path / "data")
    return tmp_path / "data"


def model_dir_of(result: dict) -> Path:
    return Path(result["model_path"]).parent


def read(path: str) -> dict:
    return json.loads(Path(path).read_text())


# --- the input pipeline -------------------------------------------------------------------------


def test_batches_are_float32_normalised_with_a_channel_axis_and_one_hot_labels(split_dir):
    manifest = read_splits_manifest(split_dir)
    batches = open_splits(split_dir, manifest, experiment="notmnist", batch_size=32, seed=133)
    train = batches["train"]
    pixels, targets = train[0]
    rows = train.batch_rows(0)
    assert pixels.dtype == np.float32 and pixels.shape == (32, 28, 28, 1)
    assert targets.dtype == np.float32 and targets.shape == (32, 10)
    on_disk = np.load(split_dir / "train_x.npy")[rows]
    np.testing.assert_allclose(pixels[..., 0], (on_disk.astype(np.float32) - 127.5) / 255, rtol=1e-6)
    assert targets.argmax(axis=1).tolist() == train.labels[rows].tolist()
    last_pixels, _ = train[len(train) - 1]
    assert len(last_pixels) == train.rows - (len(train) - 1) * 32  # 300 rows: a last batch of 12


@pytest.mark.parametrize(
    ("experiment", "low", "high"), [("notmnist", -0.5, 0.5), ("mnist", 0.0, 1.0)], ids=["notmnist-centred", "mnist-unit"]
)
def test_each_experiment_uses_the_seeds_normalisation(experiment, low, high):
    images = np.array([[[0] * 28] * 28, [[255] * 28] * 28], dtype=np.uint8)
    batches = SplitBatches(images, np.array([0, 1]), batch_size=2, classes=10, normalisation=NORMALISATIONS[experiment])
    pixels, _ = batches[0]
    assert (pixels[0].min(), pixels[1].max()) == pytest.approx((low, high))


def test_the_dataset_holds_the_memory_map_and_never_a_float_copy_of_the_split(split_dir):
    images, labels = open_split(split_dir, read_splits_manifest(split_dir), "train")
    batches = SplitBatches(images, labels, batch_size=32, classes=10, normalisation=(127.5, 255.0), shuffle_seed=1)
    assert isinstance(batches.images, np.memmap) and isinstance(batches.labels, np.memmap)
    whole_as_float = images.size * 4
    tracemalloc.start()
    try:
        for index in range(len(batches)):
            batches[index]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A batch is 32 x 784 float32 (100 KB); the whole split as float32 would be 940 KB.
    assert peak < whole_as_float / 4, f"peak {peak:,} bytes while a float copy is {whole_as_float:,}"


def test_tensorflow_reads_each_batch_from_the_verified_file_and_never_the_whole_split(split_dir, monkeypatch):
    batches = open_splits(split_dir, read_splits_manifest(split_dir), experiment="notmnist", batch_size=32, seed=5)
    train = batches["train"]
    assert isinstance(train.images, NpyRows)

    def whole(*args, **kwargs):
        raise AssertionError("the whole split was read into memory")

    monkeypatch.setattr(NpyRows, "__array__", whole)
    on_disk = np.load(split_dir / "train_x.npy")
    for index, (pixels, _) in enumerate(train.keras_input()):
        expected = (on_disk[train.batch_rows(index)].astype(np.float32) - 127.5) / 255
        np.testing.assert_allclose(np.asarray(pixels)[..., 0], expected, rtol=1e-6)
    assert index == len(train) - 1


def test_where_tensorflow_feeds_a_gpu_the_split_is_held_once_and_read_the_same(split_dir, monkeypatch):
    monkeypatch.setattr(batches_module, "_feeds_a_gpu", lambda: True)
    filled, aligned_empty = [], batches_module._aligned_empty

    def recorded(*args, **kwargs):
        filled.append(aligned_empty(*args, **kwargs))
        return filled[-1]

    monkeypatch.setattr(batches_module, "_aligned_empty", recorded)
    manifest = read_splits_manifest(split_dir)
    train = open_splits(split_dir, manifest, experiment="notmnist", batch_size=32, seed=5)["train"]
    read = list(train.keras_input())
    on_disk = np.load(split_dir / "train_x.npy")
    for index, (pixels, _) in enumerate(read):
        expected = (on_disk[train.batch_rows(index)].astype(np.float32) - 127.5) / 255
        np.testing.assert_allclose(np.asarray(pixels)[..., 0], expected, rtol=1e-6)
    (resident,) = filled  # the training split, read once
    assert np.array_equal(resident, on_disk)
    tensor = batches_module._held_in_memory(train.images)
    filled[-1][0, 0, 0] ^= 0xFF  # the array the file was read into is the tensor's own buffer
    assert int(tensor[0, 0, 0]) == int(on_disk[0, 0, 0]) ^ 0xFF


def test_a_split_file_written_during_training_stops_it_with_what_to_do(data_root):
    class WriteAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            with open(DataRoot(data_root).splits("synthetic") / "train_x.npy", "r+b") as handle:
                handle.seek(1000)
                handle.write(b"\x01")

    with pytest.raises(CorruptDataError, match=r"train_x\.npy changed after it was opened and verified .*splits"):
        train_model(data_root, "synthetic", **FAST, extra_callbacks=[WriteAfterFirstEpoch()])


def test_each_epoch_has_its_own_order_and_the_same_seed_and_epoch_give_the_same_one(split_dir):
    images, labels = open_split(split_dir, read_splits_manifest(split_dir), "train")
    batches = SplitBatches(images, labels, batch_size=32, classes=10, normalisation=(127.5, 255.0), shuffle_seed=133)
    epoch_zero = [batches.batch_rows(i).tolist() for i in range(len(batches))]
    batches.set_epoch(1)
    epoch_one = [batches.batch_rows(i).tolist() for i in range(len(batches))]
    assert epoch_zero != epoch_one
    assert sorted(sum(epoch_zero, [])) == list(range(300)) == sorted(sum(epoch_one, []))
    assert all(rows == sorted(rows) for rows in epoch_one)  # read forward through the file
    batches.set_epoch(0)
    assert [batches.batch_rows(i).tolist() for i in range(len(batches))] == epoch_zero
    assert epoch_permutation(300, 133, 1).tolist() != epoch_permutation(300, 134, 1).tolist()


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_keras_input_reads_exactly_the_batches_of_each_epoch(split_dir, split):
    batches = open_splits(split_dir, read_splits_manifest(split_dir), experiment="notmnist", batch_size=32, seed=7)[split]
    feed = batches.keras_input()
    for epoch in (0, 1, 0):
        batches.set_epoch(epoch)  # what ShuffleEachEpoch does before Keras reads the epoch
        read = list(feed)
        assert len(read) == len(batches) == math.ceil(batches.rows / 32)
        for index, (pixels, targets) in enumerate(read):
            expected_pixels, expected_targets = batches[index]
            np.testing.assert_array_equal(np.asarray(pixels), expected_pixels)
            np.testing.assert_array_equal(np.asarray(targets), expected_targets)


def test_validation_and_test_batches_keep_file_order(split_dir):
    batches = open_splits(split_dir, read_splits_manifest(split_dir), experiment="notmnist", batch_size=32, seed=1)
    batches["test"].set_epoch(5)
    assert batches["test"].batch_rows(1) == slice(32, 60)
    assert batches["valid"].batch_rows(0) == slice(0, 32)


def _overwrite_rows(folder: Path) -> None:
    """Same size, same header: only a few rows of pixels differ."""
    images = np.load(folder / "train_x.npy", mmap_mode="r+")
    images[:5] = 255 - images[:5]
    images.flush()


def _relabel(folder: Path) -> None:
    save_npy(folder / "train_y.npy", np.full(300, 3, dtype=np.int64))


def _float_images(folder: Path) -> None:
    save_npy(folder / "valid_x.npy", np.zeros((60, 28, 28), dtype=np.float32))


def _missing_labels(folder: Path) -> None:
    (folder / "test_y.npy").unlink()


def _no_manifest(folder: Path) -> None:
    (folder / MANIFEST).unlink()


def _pickled_labels(folder: Path) -> None:
    np.save(folder / "train_y.npy", np.array([object()] * 300, dtype=object), allow_pickle=True)


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        (_overwrite_rows, CorruptDataError, r"train_x\.npy does not match the sha256 recorded.*rebuild the splits"),
        (_relabel, CorruptDataError, r"train_y\.npy does not match the sha256 recorded"),
        (_float_images, CorruptDataError, r"valid_x\.npy has [\d,]+ bytes, [\d,]+ were recorded"),
        (_missing_labels, CorruptDataError, r"test_y\.npy is missing"),
        (_no_manifest, PipelineError, r"holds no finished splits: build them first"),
        (_pickled_labels, CorruptDataError, r"train_y\.npy has [\d,]+ bytes"),
    ],
    ids=["same-size-overwrite", "relabelled", "float-images", "missing-labels", "no-manifest", "pickled-labels"],
)
def test_a_damaged_split_folder_fails_with_an_error_naming_the_file(data_root, damage, error, message):
    damage(DataRoot(data_root).splits("synthetic"))
    with pytest.raises(error, match=message):
        train_model(data_root, "synthetic", **FAST)
    models = DataRoot(data_root).models_root
    assert not [path for path in models.glob("*") if path.is_dir() and path.name != LOCKS]  # no model folder, finished or not


def test_a_copied_data_root_trains_on_its_own_splits(data_root, tmp_path):
    """Manifests and records name nothing outside the data root: a copy is self-contained."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data_root, copy)
    _overwrite_rows(DataRoot(data_root).splits("synthetic"))  # the original is damaged; the copy is not
    result = train_model(copy, "synthetic", **FAST)
    assert Path(result["model_path"]).is_relative_to(copy)
    record = read(result["record_path"])
    assert record["dataset"]["splits"] == "splits/synthetic"
    assert str(data_root) not in Path(result["record_path"]).read_text()


@pytest.mark.parametrize(
    ("options", "message"),
    [({"experiment": "cifar"}, "Unknown experiment"), ({"epochs": 0}, "epochs must be"),
     ({"batch_size": 0}, "batch_size must be"), ({"learning_rate": 0.0}, "learning_rate must be positive")],
    ids=["experiment", "epochs", "batch-size", "learning-rate"],
)
def test_bad_parameters_are_refused(reference_root, options, message):
    with pytest.raises(PipelineError, match=message):
        train_model(reference_root, "synthetic", **{**FAST, **options})


# --- training -----------------------------------------------------------------------------------


def test_the_cnn_learns_the_patterns_well_above_chance(reference):
    assert reference["test_accuracy"] > 0.5  # ten classes: chance is 0.1
    assert reference["val_accuracy"] > 0.5
    assert reference["epochs_run"] == 2


def test_the_same_seed_gives_the_same_metrics_twice(data_root, reference):
    again = train_model(data_root, "synthetic", **FAST)
    first, second = read(reference["metrics_path"]), read(again["metrics_path"])
    assert second["test_loss"] == first["test_loss"]
    for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert second["history"][name] == first["history"][name]
    assert second["confusion_matrix"] == first["confusion_matrix"]


def test_an_interrupted_training_resumes_from_its_last_finished_epoch(data_root, reference):
    model_dir = DataRoot(data_root).root / reference["model"]
    with pytest.raises(Interrupted):
        train_model(data_root, "synthetic", **FAST, extra_callbacks=[InterruptAfterEpoch(0)])
    assert not model_dir.exists()  # nothing that looks finished
    assert (backup_folder(model_dir) / "history.json").exists()

    begun = EpochsBegun()
    resumed = train_model(data_root, "synthetic", **FAST, extra_callbacks=[begun])
    assert begun.epochs == [1]  # epoch 0 came from the checkpoint
    assert resumed["epochs_run"] == 1
    metrics = read(resumed["metrics_path"])
    assert metrics["resumed_from_epoch"] == 1
    assert len(metrics["history"]["val_accuracy"]) == 2  # the epoch run before the interruption is reported too
    # Weights, optimizer state and the epoch's shuffle all came back: the result equals an uninterrupted run.
    expected = read(reference["metrics_path"])
    assert metrics["history"]["loss"] == pytest.approx(expected["history"]["loss"], rel=1e-5)
    assert metrics["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-5)
    assert not backup_folder(model_dir).exists()


def test_a_checkpoint_made_with_other_parameters_is_not_resumed(data_root):
    with pytest.raises(Interrupted):
        train_model(data_root, "synthetic", **FAST, seed=1, extra_callbacks=[InterruptAfterEpoch(0)])
    backups = list(DataRoot(data_root).models_root.glob("*.backup"))
    assert len(backups) == 1
    # Another seed is another model folder, whose backup is its own: the first is left alone.
    begun = EpochsBegun()
    result = train_model(data_root, "synthetic", **FAST, seed=2, extra_callbacks=[begun])
    assert begun.epochs == [0, 1] and result["epochs_run"] == 2
    assert backups[0].exists()


def test_a_finished_model_folder_is_reused_without_training(reference_root, reference):
    begun = EpochsBegun()
    again = train_model(reference_root, "synthetic", **FAST, extra_callbacks=[begun])
    assert begun.epochs == []
    assert again == reference


def test_a_damaged_model_folder_is_trained_again(data_root):
    first = train_model(data_root, "synthetic", **FAST)
    model = Path(first["model_path"])
    model.write_bytes(model.read_bytes()[:-10] + bytes(10))  # same size, different bytes
    begun = EpochsBegun()
    again = train_model(data_root, "synthetic", **FAST, extra_callbacks=[begun])
    assert begun.epochs == [0, 1]
    assert again["test_loss"] == first["test_loss"]
    assert keras.saving.load_model(again["model_path"]).output_shape == (None, 10)


def test_metrics_json_is_complete(reference):
    metrics = read(reference["metrics_path"])
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_loss"] > 0
    assert metrics["test_accuracy"] == reference["test_accuracy"]
    assert set(metrics["history"]) >= {"loss", "accuracy", "val_loss", "val_accuracy", "seconds", "samples_per_second"}
    assert all(len(values) == 2 for values in metrics["history"].values())
    assert metrics["val_accuracy"] == metrics["history"]["val_accuracy"][-1]
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 60
    assert np.trace(matrix) / 60 == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert list(metrics["per_class_accuracy"]) == list("ABCDEFGHIJ")
    assert metrics["per_class_accuracy"]["A"] == pytest.approx(matrix[0, 0] / matrix[0].sum())
    assert metrics["samples_per_second"] > 0 and metrics["training_seconds"] > 0
    assert metrics["device"] == "CPU" or re.fullmatch(r"GPU:0 \(.+\).*", metrics["device"])
    assert Path(reference["model_path"]).is_file()
    assert keras.saving.load_model(reference["model_path"]).output_shape == (None, 10)


def test_record_json_says_what_produced_the_model(split_dir, reference):
    record = read(reference["record_path"])
    assert record["dataset"]["fingerprint"] == read_splits_manifest(split_dir)["fingerprint"] == reference["dataset_fingerprint"]
    assert record["parameters"] == {"experiment": "notmnist", "epochs": 2, "batch_size": 32, "optimizer": "adadelta",
                                    "learning_rate": 1.0, "seed": 133}
    versions = record["versions"]
    assert {"python", "keras", "keras_backend", "numpy", "prefect", "project"} <= set(versions)
    assert versions["keras"] == keras.__version__ and versions[versions["keras_backend"]]
    assert record["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", record["git_commit"])
    assert record["seed_reported"]["test_accuracy"] == 0.941 and record["seed_reported"]["val_accuracy"] == 0.8782
    assert record["device"] == reference["device"]
    assert record["dataset"]["rows"] == {"train": 300, "valid": 60, "test": 60}


def test_each_epoch_reaches_the_log(data_root, caplog):
    with caplog.at_level(logging.INFO, logger="tasks.train"):
        train_model(data_root, "synthetic", **FAST)
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["Epoch 1/2", "Epoch 2/2"]
    assert all("val_accuracy" in line and "samples/s" in line for line in epochs)


@pytest.mark.parametrize("where", ["not-a-checkout", "no-git"], ids=["outside-a-repository", "git-missing"])
def test_the_commit_is_null_rather_than_an_error_when_git_cannot_tell(tmp_path, monkeypatch, where):
    if where == "no-git":
        monkeypatch.setenv("PATH", str(tmp_path))
    assert git_commit(tmp_path) is None


@pytest.mark.parametrize("steps_per_execution", [1, 4], ids=["each-batch", "batches-in-groups"])
def test_progress_counts_every_batch(split_dir, tmp_path, steps_per_execution):
    images, labels = open_split(split_dir, read_splits_manifest(split_dir), "train")
    batches = SplitBatches(images, labels, batch_size=64, classes=10, normalisation=(127.5, 255.0), shuffle_seed=1)
    model = build_one_layer_cnn()
    model.compile(optimizer="sgd", loss="categorical_crossentropy", steps_per_execution=steps_per_execution)
    with Progress("train", 2 * len(batches)) as progress:
        callbacks = [BatchProgress(progress), EpochCheckpoint(tmp_path / "backup", logger=logging.getLogger("t"))]
        model.fit(batches.keras_input(), epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
    assert progress.completed == 2 * len(batches) == 10
    # The last epoch's checkpoint alone is kept after fit, until the outputs are in place.
    assert [path.name for path in (tmp_path / "backup").iterdir()] == ["epoch-0002"]


def _truncate_weights(checkpoint: Path) -> None:
    weights = checkpoint / EpochCheckpoint.WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # what a kill -9 mid-save leaves


def _half_written_state(checkpoint: Path) -> None:
    (checkpoint / EpochCheckpoint.STATE).write_text('{"epo')


@pytest.mark.parametrize("damage", [_truncate_weights, _half_written_state], ids=["truncated-weights", "half-state"])
def test_an_unreadable_checkpoint_is_discarded_with_a_warning_and_training_still_finishes(
    data_root, reference, damage, caplog
):
    with pytest.raises(Interrupted):
        train_model(data_root, "synthetic", **FAST, extra_callbacks=[InterruptAfterEpoch(0)])
    (checkpoint,) = (DataRoot(data_root).root / (reference["model"] + ".backup")).glob("epoch-*")
    damage(checkpoint)
    begun = EpochsBegun()
    with caplog.at_level(logging.WARNING):
        result = train_model(data_root, "synthetic", **FAST, extra_callbacks=[begun])
    assert begun.epochs == [0, 1]  # from scratch: the only checkpoint could not be read
    assert any("Discarding the unreadable checkpoint" in record.getMessage() for record in caplog.records)
    assert read(result["metrics_path"])["test_loss"] == pytest.approx(read(reference["metrics_path"])["test_loss"])


def test_a_checkpoint_a_killed_run_was_writing_is_ignored_and_removed(data_root, reference):
    with pytest.raises(Interrupted):
        train_model(data_root, "synthetic", **FAST, extra_callbacks=[InterruptAfterEpoch(0)])
    backup = DataRoot(data_root).root / (reference["model"] + ".backup")
    half = backup / ".epoch-0002.tmp-0123456789ab"  # the temporary name EpochCheckpoint writes under
    half.mkdir()
    (half / EpochCheckpoint.WEIGHTS).write_bytes(b"half")
    begun = EpochsBegun()
    result = train_model(data_root, "synthetic", **FAST, extra_callbacks=[begun])
    assert begun.epochs == [1] and result["epochs_run"] == 1
    assert read(result["metrics_path"])["test_loss"] == pytest.approx(read(reference["metrics_path"])["test_loss"])
    assert not backup.exists()


def test_two_trainings_of_one_model_take_turns_and_the_second_reuses_the_first(data_root):
    """Two pipelines on one data root ask for the same model: one trains, the other waits, then reuses it."""
    start = threading.Barrier(2)
    results, begun = [], [EpochsBegun(), EpochsBegun()]

    def train(index: int) -> None:
        start.wait()
        results.append(train_model(data_root, "synthetic", **FAST, extra_callbacks=[begun[index]]))

    threads = [threading.Thread(target=train, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(b.epochs for b in begun) == [[], [0, 1]]  # without the lock both would train, in one backup
    assert results[0] == results[1]


def test_a_diverging_training_is_an_error_not_a_model(data_root):
    with pytest.raises(PipelineError, match=r"The training loss became nan in epoch 1: the model diverged\. .*lower"):
        train_model(data_root, "synthetic", **{**FAST, "learning_rate": 1e30})
    models = DataRoot(data_root).models_root
    assert not [path for path in models.glob("*") if path.is_dir() and path.name != LOCKS]  # no model, and no checkpoint to resume from


# --- a data root on object storage (a real S3-compatible server on 127.0.0.1) ---------------------


def test_on_an_object_store_the_splits_are_fetched_and_the_model_published(reference_root, reference, s3_root, tmp_path):
    pipeline = DataRoot(s3_root, tmp_path / "pipeline")
    shutil.copytree(DataRoot(reference_root).splits("synthetic"), pipeline.splits("synthetic"))
    pipeline.publish(pipeline.splits("synthetic"))

    worker = tmp_path / "worker"  # another machine: nothing local but what it fetches
    result = train_task.fn(DataRoot(s3_root, worker), "synthetic", **FAST)
    assert result["model_path"] == f"{s3_root}/{result['model']}/model.keras"
    assert result["test_loss"] == reference["test_loss"]  # the fetched splits are the same splits
    assert (worker / "splits" / "synthetic" / "train_x.npy").exists()
    # The data root holds the whole model folder (TensorBoard logs included) and no checkpoint.
    model_manifest = pipeline.committed(pipeline.root / result["model"])
    assert {"model.keras", "metrics.json", "record.json"} <= set(model_manifest["files"])
    assert any(name.startswith("tensorboard/") for name in model_manifest["files"])
    assert pipeline.committed(backup_folder(pipeline.root / result["model"])) is None
    # Reading it back elsewhere gives what training returned.
    assert find_trained(pipeline, "synthetic", "notmnist", {**FAST, "learning_rate": 1.0, "seed": 133}) == result


def test_a_training_interrupted_on_one_machine_resumes_on_another(reference_root, reference, s3_root, tmp_path):
    first = DataRoot(s3_root, tmp_path / "first")
    shutil.copytree(DataRoot(reference_root).splits("synthetic"), first.splits("synthetic"))
    first.publish(first.splits("synthetic"))
    with pytest.raises(Interrupted):
        train_task.fn(DataRoot(s3_root, first.root), "synthetic", **FAST, extra_callbacks=[InterruptAfterEpoch(0)])

    begun = EpochsBegun()
    resumed = train_task.fn(DataRoot(s3_root, tmp_path / "second"), "synthetic", **FAST, extra_callbacks=[begun])
    assert begun.epochs == [1]  # epoch 0 came from the checkpoint the first machine published
    assert resumed["epochs_run"] == 1
    assert resumed["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-5)


def test_a_machine_with_an_older_checkpoint_resumes_from_the_newer_one_of_the_data_root(reference_root, s3_root, tmp_path):
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    layout = DataRoot(s3_root, a)
    shutil.copytree(DataRoot(reference_root).splits("synthetic"), layout.splits("synthetic"))
    layout.publish(layout.splits("synthetic"))
    three = {"epochs": 3, "batch_size": 32}
    with pytest.raises(Interrupted):  # machine A checkpoints epoch 1
        train_task.fn(DataRoot(s3_root, a), "synthetic", **three, extra_callbacks=[InterruptAfterEpoch(0)])
    with pytest.raises(Interrupted):  # machine B takes it over and checkpoints epoch 2
        train_task.fn(DataRoot(s3_root, b), "synthetic", **three, extra_callbacks=[InterruptAfterEpoch(1)])

    begun = EpochsBegun()
    result = train_task.fn(DataRoot(s3_root, a), "synthetic", **three, extra_callbacks=[begun])
    assert begun.epochs == [2] and result["epochs_run"] == 1  # not epoch 1 again from its own stale checkpoint
