"""Iris: the shipped table, the stratified held-out split, and both of the seed's fits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.errors import PipelineError
from tasks.iris import SPECIES, held_out_split, iris_text, parse_iris, run_iris


@pytest.fixture(scope="module")
def iris_run(tmp_path_factory) -> dict:
    return run_iris(tmp_path_factory.mktemp("iris"))


def test_the_shipped_table_is_fishers():
    features, labels = parse_iris(iris_text())
    assert features.shape == (150, 4) and features.dtype == np.float32
    assert np.bincount(labels).tolist() == [50, 50, 50]
    # Column sums of Fisher's table (R's datasets::iris): they catch a changed or missing value.
    np.testing.assert_allclose(features.sum(axis=0), [876.5, 458.6, 563.7, 179.9], atol=1e-3)
    # Rows 35 and 38, which the UCI copy gets wrong.
    np.testing.assert_allclose(features[[34, 37]], [[4.9, 3.1, 1.5, 0.2], [4.9, 3.6, 1.4, 0.1]], atol=1e-6)


def _drop_last_row(text: str) -> str:
    return "\n".join(text.strip().split("\n")[:-1]) + "\n"


def _unknown_species(text: str) -> str:
    return text.replace("virginica", "pallida", 1)


def _not_a_number(text: str) -> str:
    return text.replace("5.1,3.5,1.4,0.2", "5.1,three,1.4,0.2", 1)


def _other_header(text: str) -> str:
    return text.replace("sepal_length_cm", "sepal_length", 1)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_drop_last_row, r"\[50, 50, 49\] rows per species"),
        (_unknown_species, r"line \d+: expected four numbers and a species"),
        (_not_a_number, r"line 2: could not convert string to float"),
        (_other_header, r"header is \['sepal_length',"),
    ],
    ids=["missing-row", "unknown-species", "not-a-number", "header"],
)
def test_a_damaged_table_is_refused(damage, message):
    with pytest.raises(PipelineError, match=message):
        parse_iris(damage(iris_text()))


def test_the_held_out_split_is_stratified_disjoint_and_seeded():
    _, labels = parse_iris(iris_text())
    train, held_out = held_out_split(labels, seed=133)
    assert (len(train), len(held_out)) == (120, 30)
    assert np.bincount(labels[held_out]).tolist() == [10, 10, 10]
    assert not set(train) & set(held_out)
    assert np.array_equal(held_out_split(labels, seed=133)[1], held_out)
    assert not np.array_equal(held_out_split(labels, seed=134)[1], held_out)


@pytest.mark.parametrize("variant", ["sparse", "onehot"], ids=["sparse-labels", "one-hot-labels"])
def test_both_fits_beat_chance_on_training_and_held_out_rows(iris_run, variant):
    assert iris_run[f"{variant}_train_accuracy"] > 0.6  # three species: chance is 1/3
    assert iris_run[f"{variant}_held_out_accuracy"] > 0.6


def test_iris_writes_models_metrics_and_record(iris_run):
    metrics = json.loads(Path(iris_run["metrics_path"]).read_text())
    record = json.loads(Path(iris_run["record_path"]).read_text())
    for variant in ("sparse", "onehot"):
        result = metrics["variants"][variant]
        assert result["seed_protocol"]["rows"] == 150 and len(result["seed_protocol"]["history"]["loss"]) == 15
        assert result["held_out"]["rows"] == 30 and result["held_out"]["train_rows"] == 120
        assert np.array(result["held_out"]["confusion_matrix"]).sum() == 30
        assert list(result["held_out"]["per_class_accuracy"]) == list(SPECIES)
        assert Path(iris_run["model_paths"][variant]).is_file()
    assert record["seed_reported"] == {"sparse_train_accuracy": 0.89, "onehot_train_accuracy": 0.87}
    assert record["parameters"] == {"epochs": 15, "batch_size": 5, "optimizer": "sgd", "learning_rate": 0.01, "seed": 133}
    assert record["dataset"]["rows"] == 150 and len(record["dataset"]["fingerprint"]) == 64
    assert "tensorflow" in record["versions"] or record["versions"]["keras_backend"] != "tensorflow"


def test_a_finished_iris_run_is_reused(iris_run):
    metrics_path = Path(iris_run["metrics_path"])
    stamp = metrics_path.stat().st_mtime_ns
    assert run_iris(metrics_path.parents[2]) == iris_run  # the same data root
    assert metrics_path.stat().st_mtime_ns == stamp
