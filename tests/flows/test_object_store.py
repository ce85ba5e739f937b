"""The notMNIST pipeline with its data root on a real S3-compatible server (SeaweedFS on 127.0.0.1)."""

from __future__ import annotations

import json

from flows.notmnist import notmnist_pipeline
from storage.layout import DataRoot
from storage.letters import letter_folder
from tests.flows.conftest import pipeline_parameters
from tests.flows.test_pipeline import DATA_TASKS, task_states


def test_the_pipeline_runs_on_an_object_store_and_a_rerun_is_cached(prefect_api, served_archives, s3_root, tmp_path):
    scratch = tmp_path / "scratch"
    parameters = pipeline_parameters(served_archives, tmp_path / "unused", epochs=1)
    parameters.update(data_dir=s3_root, scratch_dir=str(scratch))
    state = notmnist_pipeline(**parameters, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["model_path"].startswith(f"{s3_root}/models/notmnist-") and result["report"].endswith("/report.md")

    # Everything the data root should hold is there, committed, and reads back as it was written.
    layout, store = DataRoot(s3_root, scratch), DataRoot(s3_root, scratch).store
    for archive in ("notMNIST_large", "notMNIST_small"):
        for letter in "AJ":
            folder = letter_folder(layout.shards(archive), letter)
            assert layout.published(folder)["letter"] == letter
    model = result["model_path"].removeprefix(s3_root + "/").removesuffix("/model.keras")
    assert layout.published(layout.root / model)["files"]["metrics.json"]
    report = store.read_bytes(f"{model}/report.md").decode()
    assert f"| test_accuracy | {result['test_accuracy']:.4f} | 0.941 |" in report
    assert store.read_bytes(f"{model}/confusion_matrix.png").startswith(b"\x89PNG")
    # Downloads and extraction stay in the working copy: the data root has none of them.
    assert store.read_bytes("raw/notMNIST_large.tar.gz") is None
    assert (scratch / "raw" / "notMNIST_large.tar.gz").exists()

    again = notmnist_pipeline(**parameters, return_state=True)
    assert again.is_completed(), again.message
    cached = task_states(again.state_details.flow_run_id)
    assert {task: set(cached[task]) for task in DATA_TASKS} == {task: {"Cached"} for task in DATA_TASKS}


def test_splits_missing_from_the_data_root_are_rebuilt_and_published_again(
    prefect_api, served_archives, s3_root, tmp_path
):
    scratch = tmp_path / "scratch"
    parameters = pipeline_parameters(served_archives, tmp_path / "unused", epochs=1)
    parameters.update(data_dir=s3_root, scratch_dir=str(scratch))
    first = notmnist_pipeline(**parameters, return_state=True)
    assert first.is_completed(), first.message
    layout = DataRoot(s3_root, scratch)
    model = first.result()["model_path"].removeprefix(s3_root + "/").removesuffix("/model.keras")
    split_key = json.loads((scratch / model / "record.json").read_text())["dataset"]["splits"]
    layout.discard(layout.root / split_key)  # the data root lost them; the working copy still has them

    again = notmnist_pipeline(**parameters, return_state=True)
    assert again.is_completed(), again.message
    assert task_states(again.state_details.flow_run_id)["splits"] == ["Completed"]  # not served from the cache
    assert layout.published(layout.root / split_key) is not None
