"""The data root as the system of record, on a real S3-compatible server (SeaweedFS on 127.0.0.1): a second
machine reuses every finished stage, damage in the bucket is repaired, nothing piles up, and a data root
that cannot be written fails the run before any download."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from demo.loopback import FileServer
from flows.cli import main
from flows.notmnist import notmnist_pipeline
from storage.folders import MANIFEST
from storage.layout import DataRoot
from storage.letters import letter_folder
from tests.flows.conftest import free_port, objects_under, pipeline_parameters
from tests.flows.test_pipeline import DATA_TASKS, task_states


@pytest.fixture(scope="module")
def first_machine(prefect_api, served_archives, s3_server, tmp_path_factory):
    """One finished pipeline run on an s3:// data root, from a first machine's working copy."""
    parameters = pipeline_parameters(served_archives, "unused", epochs=1)
    parameters.update(data_dir=f"s3://notmnist/system-of-record-{uuid.uuid4().hex[:8]}",
                      scratch_dir=str(tmp_path_factory.mktemp("first-machine")))
    state = notmnist_pipeline(**parameters, return_state=True)
    assert state.is_completed(), state.message
    return parameters, state.result()


def test_the_data_root_holds_every_stage_the_archives_and_the_cache_records(first_machine):
    parameters, result = first_machine
    s3_root = parameters["data_dir"]
    assert result["model_path"].startswith(f"{s3_root}/models/notmnist-") and result["report"].endswith("/report.md")
    layout = DataRoot(s3_root, parameters["scratch_dir"])
    for archive in ("notMNIST_large", "notMNIST_small"):
        assert layout.committed(layout.raw / f"{archive}.tar.gz")["name"] == f"{archive}.tar.gz"
        for letter in "AJ":
            assert layout.committed(letter_folder(layout.shards(archive), letter))["letter"] == letter
            assert layout.committed(layout.packed(archive) / letter)["letter"] == letter
    model = result["model_path"].removeprefix(s3_root + "/").removesuffix("/model.keras")
    assert layout.committed(layout.root / model)["files"]["metrics.json"]
    report = layout.store.read_bytes(f"{model}/report.md").decode()
    assert f"| test_accuracy | {result['test_accuracy']:.4f} | 0.941 |" in report
    assert layout.store.read_bytes(f"{model}/confusion_matrix.png").startswith(b"\x89PNG")
    records = [key for key in objects_under(layout) if "/_prefect/records/" in key]
    assert len(records) >= len(DATA_TASKS)  # Prefect's cache records, where every machine finds them
    assert all(json.loads(layout.store.read_bytes(key.split("/", 2)[2])) for key in records[:3])  # JSON, not pickle


def test_reruns_that_change_nothing_are_cached_and_leave_the_object_count_unchanged(first_machine):
    parameters, result = first_machine
    layout = DataRoot(parameters["data_dir"], parameters["scratch_dir"])
    before = objects_under(layout)
    for _ in range(3):
        again = notmnist_pipeline(**parameters, return_state=True)
        assert again.is_completed(), again.message
        assert again.result()["dataset_fingerprint"] == result["dataset_fingerprint"]
        states = task_states(again.state_details.flow_run_id)
        assert {task: set(states[task]) for task in DATA_TASKS} == {task: {"Cached"} for task in DATA_TASKS}
    assert objects_under(layout) == before


def test_a_second_machine_reuses_every_finished_stage_without_asking_the_origin(first_machine, served_archives,
                                                                                 tmp_path):
    parameters, result = first_machine
    # Another machine: a working copy of its own, and a Prefect home whose local storage holds no record; the
    # Prefect API and the bucket are the ones both machines share.
    with FileServer(served_archives.server.root) as origin, temporary_settings(
        {PREFECT_LOCAL_STORAGE_PATH: tmp_path / "second-home" / "storage"}
    ):
        second = {**parameters, "base_url": origin.base_url, "scratch_dir": str(tmp_path / "second-machine")}
        state = notmnist_pipeline(**second, return_state=True)
        assert state.is_completed(), state.message
        assert not origin.state.requests  # the archives were never asked for
    states = task_states(state.state_details.flow_run_id)
    assert {task: set(states[task]) for task in DATA_TASKS} == {task: {"Cached"} for task in DATA_TASKS}
    assert state.result()["dataset_fingerprint"] == result["dataset_fingerprint"]
    assert state.result()["test_accuracy"] == result["test_accuracy"]


def test_splits_missing_from_the_data_root_are_rebuilt_and_published_again(first_machine):
    parameters, result = first_machine
    layout = DataRoot(parameters["data_dir"], parameters["scratch_dir"])
    model = result["model_path"].removeprefix(parameters["data_dir"] + "/").removesuffix("/model.keras")
    split_key = json.loads((layout.root / model / "record.json").read_text())["dataset"]["splits"]
    layout.discard(layout.root / split_key)  # the data root lost them; the working copy still has them

    again = notmnist_pipeline(**parameters, return_state=True)
    assert again.is_completed(), again.message
    assert task_states(again.state_details.flow_run_id)["splits"] == ["Completed"]  # not served from the cache
    assert layout.committed(layout.root / split_key) is not None
    assert layout.store.read_bytes(f"{split_key}/{MANIFEST}") is not None


FAILURES = {
    "missing bucket": ({}, "s3://no-such-bucket/data", r"The bucket 'no-such-bucket' of s3://no-such-bucket/data "
                                                        r"does not exist.*create it first"),
    "wrong secret": ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, None,
                     r"refused these credentials for s3://notmnist.*check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    "endpoint down": ({"AWS_ENDPOINT_URL": "http://127.0.0.1:{port}"}, None,
                      r"Cannot reach http://127\.0\.0\.1:\d+ for s3://.*check AWS_ENDPOINT_URL and that the server runs"),
}


@pytest.mark.parametrize("failure", list(FAILURES), ids=list(FAILURES))
def test_a_data_root_that_cannot_be_written_fails_the_run_before_any_download(
    failure, prefect_api, served_archives, s3_root, tmp_path, monkeypatch, capsys
):
    environment, data_dir, message = FAILURES[failure]
    for name, value in environment.items():
        monkeypatch.setenv(name, value.format(port=free_port()))
    with FileServer(served_archives.server.root) as origin:
        code = main(["run", "--data-dir", data_dir or s3_root, "--scratch-dir", str(tmp_path / "scratch"),
                     "--base-url", origin.base_url, "--no-checks", "--min-images-large", "30",
                     "--min-images-small", "10", "--train-size", "250", "--valid-size", "50", "--test-size", "50"])
        assert not origin.state.requests  # nothing was downloaded
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("notmnist run: error: ")]
    assert code == 1
    assert len(err) == 1 and re.search(message, err[0]), err  # one line (a second, when kept, is the run's page)
    assert not (tmp_path / "scratch" / "raw").exists()



def test_a_record_this_project_did_not_write_is_ignored(first_machine, tmp_path):
    from tasks.stage import RECORDS

    parameters, _ = first_machine
    layout = DataRoot(parameters["data_dir"], parameters["scratch_dir"])
    key = next(key for key in objects_under(layout) if "/_prefect/records/" in key).split("/", 2)[2]
    record = json.loads(layout.store.read_bytes(key))
    assert RECORDS.read_path(layout.store.url(key))  # a stage's own record reads
    for serializer in ({**record["metadata"]["serializer"], "type": "pickle"},
                       {**record["metadata"]["serializer"], "object_decoder": "os.system"}):
        crafted = {**record, "metadata": {**record["metadata"], "serializer": serializer}}
        location = layout.store.url("_prefect/records/crafted")
        RECORDS.write_path(location, json.dumps(crafted).encode())
        with pytest.raises(ValueError, match="names a serializer or objects no stage writes"):
            RECORDS.read_path(location)  # Prefect takes this as no record: the stage runs
        RECORDS.delete_path(location)


def test_an_archive_missing_from_a_working_copy_comes_from_the_data_root_not_the_origin(
    first_machine, served_archives, tmp_path
):
    from tasks.download import download_task

    parameters, _ = first_machine
    root = DataRoot(parameters["data_dir"], tmp_path / "third-machine")
    name = "notMNIST_small.tar.gz"
    with FileServer(served_archives.server.root) as origin:
        result = download_task.fn(root, f"{origin.base_url}{name}", expected_bytes=served_archives.sizes[name],
                                  sha256=served_archives.sha256[name])
        assert not origin.state.requests
    assert result == {"file": f"raw/{name}", "bytes": served_archives.sizes[name]}
    assert (root.raw / name).read_bytes() == (served_archives.server.root / name).read_bytes()
