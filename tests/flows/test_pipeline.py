"""The notMNIST pipeline under Prefect, end to end on generated archives from a loopback server."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import glob
import io
import re
import signal
import threading
import time
from collections.abc import Collection
from pathlib import Path

import pytest
from PIL import Image
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import TaskRunSort
from prefect.states import Cancelling

from core.errors import PipelineError
from demo.loopback import Fault, FileServer
from flows.notmnist import archive_url, notmnist_pipeline
from flows.train import train_remotely
from storage.layout import LOCKS, DataRoot
from tasks.download import download_task
from tasks.stage import open_data_root
from tests.flows.conftest import pipeline_parameters

DATA_TASKS = {"download", "unpack", "decode", "splits"}


def picture_links(report: str) -> list[tuple[str, str, str]]:
    """The report artifact's links to the pictures: (text, the UI's address, the artifact key linked)."""
    return re.findall(r"\[([a-z-]+)\]\((http://127\.0\.0\.1:\d+)/artifacts/key/([a-z-]+)\)",
                      report.split("- pictures:")[1])


def task_runs(flow_run_id, expected: Collection[str] = (), seconds: float = 30) -> list:
    """The task runs of one flow run, in the order they were to start, once the API has recorded a run of each
    `expected` task (the first word of its name) and each run's last state: task runs and their states reach
    the API as events, which it writes a moment after the flow has returned. A run whose upstream failed ends
    NotReady, which Prefect does not count as final."""

    def recorded(runs: list) -> bool:
        return (set(expected) <= {run.name.split()[0] for run in runs}
                and all(run.state is not None and (run.state.is_final() or run.state.name == "NotReady")
                        for run in runs))

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), sort=TaskRunSort.EXPECTED_START_TIME_ASC
            )

    deadline = time.monotonic() + seconds
    runs = asyncio.run(read())
    while not recorded(runs) and time.monotonic() < deadline:
        time.sleep(0.2)
        runs = asyncio.run(read())
    return runs


def task_states(flow_run_id, expected: Collection[str] = DATA_TASKS) -> dict[str, list[str]]:
    """Task name -> state names of the task runs of one flow run (once one of each `expected` is recorded)."""
    states: dict[str, list[str]] = {}
    for run in task_runs(flow_run_id, expected):
        states.setdefault(run.name.split()[0], []).append(run.state.name)  # "download notMNIST_large.tar.gz" -> "download"
    return states


@pytest.fixture(scope="module")
def first_run(prefect_api, served_archives, tmp_path_factory):
    """One cold pipeline run: its parameters and final state. The last test of the module damages its outputs."""
    parameters = pipeline_parameters(served_archives, tmp_path_factory.mktemp("first") / "data")
    return parameters, notmnist_pipeline(**parameters, return_state=True)


def test_pipeline_end_to_end_then_cached_rerun(first_run):
    parameters, state = first_run
    assert state.is_completed(), state.message
    result = state.result()
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert Path(result["model_path"]).exists()
    report = Path(result["report"]).read_text()
    assert f"| test_accuracy | {result['test_accuracy']:.4f} | 0.941 |" in report
    assert result["dataset_fingerprint"] in report

    states = task_states(state.state_details.flow_run_id)
    assert all(name == "Completed" for task in DATA_TASKS for name in states[task]), states

    again = notmnist_pipeline(**parameters, return_state=True)
    assert again.is_completed()
    cached = task_states(again.state_details.flow_run_id)
    assert {task: set(cached[task]) for task in DATA_TASKS} == {task: {"Cached"} for task in DATA_TASKS}
    assert again.result()["dataset_fingerprint"] == result["dataset_fingerprint"]
    assert again.result()["test_accuracy"] == result["test_accuracy"]
    assert "train-0" in states and "train-0" not in cached  # the model found first: no training subflow, no Keras import


def test_no_lock_is_left_where_a_glob_of_the_readme_would_meet_it(first_run):
    """Locks live in hidden `.locks/` folders beside what they guard; README's `data/models/notmnist-*` finds models."""
    parameters, state = first_run
    assert state.is_completed(), state.message
    root = Path(parameters["data_dir"])
    stray = [path for path in root.rglob("*.lock") if path.parent.name != LOCKS]
    assert stray == []
    models = glob.glob(str(root / "models" / "notmnist-*"))  # as the shell expands it for `notmnist predict`
    assert models and all(Path(model, "model.keras").is_file() for model in models)
    assert not glob.glob(str(root / "*" / "*.lock")) and not glob.glob(str(root / "*.lock"))


def test_interrupted_download_fails_the_run_and_the_rerun_resumes_from_the_part(prefect_api, served_archives, tmp_path):
    server, name = served_archives.server, "notMNIST_large.tar.gz"
    size = served_archives.sizes[name]
    server.add_faults(name, Fault(drop_after=size // 3), Fault(status=404))  # the transfer breaks, then the host is gone
    parameters = pipeline_parameters(served_archives, tmp_path / "data")
    failed = notmnist_pipeline(**parameters, return_state=True)
    assert failed.is_failed()
    # The failed download and the unpack that never started keep the names they would have had.
    states = {run.name: run.state.name for run in task_runs(failed.state_details.flow_run_id)}
    assert states["download notMNIST_large.tar.gz"] == "Failed"
    assert states["unpack notMNIST_large.tar.gz"] == "NotReady"
    part = tmp_path / "data" / "raw" / (name + ".part")
    assert part.stat().st_size == size // 3

    sent_before = server.body_bytes_sent(name)
    resumed = notmnist_pipeline(**parameters, return_state=True)
    assert resumed.is_completed(), resumed.message
    assert server.body_bytes_sent(name) - sent_before == size - size // 3
    assert server.requests_for(name)[-1].headers["Range"] == f"bytes={size // 3}-"


def test_artifacts_have_stable_keys_and_the_pictures_are_pngs_in_the_ui_and_beside_the_model(first_run):
    state = first_run[1]
    assert state.is_completed()

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )

    by_key = {artifact.key: artifact for artifact in asyncio.run(artifacts()) if artifact.key}
    tables = {"notmnist-large-letters", "notmnist-large-rejected-files", "notmnist-small-letters",
              "notmnist-small-rejected-files", "notmnist-splits", "notmnist-overlap", "notmnist-epochs"}
    pictures = {"notmnist-large-glyphs": (600, 300), "notmnist-small-glyphs": (600, 300),
                "notmnist-confusion-matrix": (400, 300), "notmnist-learning-curves": (600, 250),
                "notmnist-misclassified": (500, 100)}
    assert tables | set(pictures) | {"notmnist-report"} <= set(by_key)
    assert {by_key[key].type for key in tables} == {"table"}
    for key, (least_width, least_height) in pictures.items():
        assert by_key[key].type == "markdown"
        encoded = re.fullmatch(r"!\[[^]]+\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", by_key[key].data).group(1)
        width, height = Image.open(io.BytesIO(base64.b64decode(encoded))).size
        assert width >= least_width and height >= least_height, (key, width, height)

    model_dir = Path(state.result()["model_path"]).parent
    report = (model_dir / "report.md").read_text()
    for name in ("confusion_matrix", "learning_curves", "misclassified", "notMNIST_large_glyphs"):
        assert f"]({name}.png)" in report and Image.open(model_dir / f"{name}.png").format == "PNG"
    assert list((model_dir / "tensorboard" / "train").glob("events.out.tfevents.*"))  # Keras' TensorBoard logs
    # The report links each picture's artifact page in the UI of this session's server, by its real key.
    linked = picture_links(by_key["notmnist-report"].data)
    assert {key for key, _, _ in linked} == set(pictures) and all(key == target for key, _, target in linked), linked
    assert f"`tensorboard --logdir {model_dir / 'tensorboard'}`" in report  # this run's own logs, wherever the root


def test_the_pipelines_log_says_where_training_went_and_carries_its_epochs(first_run):
    state = first_run[1]

    async def messages():
        async with get_client() as client:
            logs = await client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
            )
        return [log.message for log in logs if log.task_run_id is None]

    lines = asyncio.run(messages())
    assert "Training notmnist in this process, as a subflow of this run" in lines
    assert [line.split(":")[0] for line in lines if "Epoch" in line] == ["train notmnist"] * 2


def test_a_missing_training_deployment_is_a_clear_error(prefect_api):
    with pytest.raises(PipelineError, match=r"No deployment named 'train/nowhere': create it with `prefect deploy --all`"):
        train_remotely("train/nowhere", {}, timeout_seconds=5)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only a digest can tell
    path.write_bytes(bytes(data))


def test_the_same_archives_from_another_address_come_from_the_cache(first_run, served_archives):
    """What the demo does on every run: a new loopback port, the same files."""
    parameters, _ = first_run
    with FileServer(served_archives.server.root) as mirror:
        again = notmnist_pipeline(**{**parameters, "base_url": mirror.base_url}, return_state=True)
        assert again.is_completed(), again.message
        assert set(task_states(again.state_details.flow_run_id)["download"]) == {"Cached"}
        assert not mirror.state.requests  # nothing was fetched


def test_a_pipeline_cancelled_mid_training_stops_there_and_its_training_subflow_ends_cancelled(first_run):
    """Cancelled through the API, as the UI and `prefect flow-run cancel` do, while its subflow trains in this
    process: the pipeline stops within seconds, publishes nothing more, and both runs end Cancelled."""
    parameters, _ = first_run
    parameters = {**parameters, "epochs": 1000}  # another model: training starts at once, every data stage Cached
    seen: dict[str, object] = {}
    returned = threading.Event()

    def cancel_once_training() -> None:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and "pipeline" not in seen and not returned.is_set():
                running = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
                training = [run for run in running if run.parameters.get("epochs") == 1000
                            and run.parameters.get("data_dir") == parameters["data_dir"]]
                if len(training) == 2:  # the pipeline and its training subflow
                    seen["training"], seen["pipeline"] = sorted(training, key=lambda run: run.parent_task_run_id is None)
                time.sleep(0.5)
            if "pipeline" not in seen:  # end the 1000 epochs now: the test fails on what it did not see
                if not returned.is_set():
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return
            time.sleep(2)  # a few epochs in
            seen["cancelled at"] = time.monotonic()
            client.set_flow_run_state(seen["pipeline"].id, Cancelling(message="cancelled from the test"))

    canceller = threading.Thread(target=contextvars.copy_context().run, args=(cancel_once_training,), daemon=True)
    canceller.start()
    try:
        state = notmnist_pipeline(**parameters, return_state=True)
    finally:
        returned.set()
    stopped_at = time.monotonic()
    canceller.join(timeout=10)

    assert "pipeline" in seen, "the pipeline and its training subflow were never seen running together"
    assert state.is_cancelled(), state
    assert state.message == f"training run {seen['training'].name} cancelled"
    assert stopped_at - seen["cancelled at"] < 15
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(seen["training"].id).state.name == "Cancelled"
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert not [artifact.key for artifact in artifacts if artifact.key and "report" in artifact.key]
    assert task_states(seen["training"].id, expected={"train"})["train"] == ["Cancelled"]


def test_downloads_without_checks_are_cached_per_file_and_a_base_url_needs_no_last_slash(prefect_api, tmp_path):
    """Two downloads with nothing to check differ by their file name alone: each keeps its own cached result."""
    (tmp_path / "mirror").mkdir()
    for name in ("one.bin", "two.bin"):
        (tmp_path / "mirror" / name).write_text(name)

    @flow
    def fetch_both(base_url: str) -> list[str]:
        root = open_data_root(str(tmp_path / "data"))
        return [download_task(root, archive_url(base_url, name))["file"] for name in ("one.bin", "two.bin")]

    base = (tmp_path / "mirror").as_uri()  # no last slash
    assert fetch_both(base) == fetch_both(base) == ["raw/one.bin", "raw/two.bin"]


def test_a_damaged_stage_output_is_rebuilt_and_the_stages_before_it_come_from_the_cache(first_run):
    """Same-size damage of a packed letter, of one letter's shard (that letter alone is decoded again) and of a
    split file; then a model file deleted."""
    parameters, first = first_run
    assert first.is_completed(), first.message
    layout, fingerprint = DataRoot(parameters["data_dir"]), first.result()["dataset_fingerprint"]
    splits = next(layout.splits_root.glob("train*"))
    order = ["unpack", "decode", "splits"]
    damages = {
        "unpack": lambda: _flip_a_byte(layout.packed("notMNIST_small") / "B" / "png.parquet"),
        "decode": lambda: _flip_a_byte(layout.shards("notMNIST_large") / "C" / "part-00000.parquet"),
        "splits": lambda: _flip_a_byte(splits / "train_x.npy"),
    }
    for stage, damage in damages.items():
        damage()
        again = notmnist_pipeline(**parameters, return_state=True)
        assert again.is_completed(), (stage, again.message)
        assert again.result()["dataset_fingerprint"] == fingerprint
        states = task_states(again.state_details.flow_run_id)
        assert "Completed" in states[stage], (stage, states)
        if stage == "decode":  # the damaged letter alone; the other nineteen come from the cache
            letters = decode_states(again.state_details.flow_run_id)
            assert letters.pop("decode notMNIST_large C") == "Completed"
            assert set(letters.values()) == {"Cached"} and len(letters) == 19
        earlier = ["download", *order[: order.index(stage)]]
        assert all(set(states[name]) == {"Cached"} for name in earlier), (stage, states)

    model = Path(first.result()["model_path"])
    model.unlink()
    again = notmnist_pipeline(**parameters, return_state=True)
    assert again.is_completed() and model.is_file()
    assert {name: set(states) for name, states in task_states(again.state_details.flow_run_id).items()
            if name in DATA_TASKS} == {name: {"Cached"} for name in DATA_TASKS}


def test_task_runs_are_named_for_what_they_do_and_keep_their_names(first_run):
    parameters, state = first_run
    names_of_runs = sorted(run.name for run in task_runs(state.state_details.flow_run_id))
    assert [name for name in names_of_runs if not name.startswith("train-")] == sorted([
        "download notMNIST_large.tar.gz", "download notMNIST_small.tar.gz", "unpack notMNIST_large.tar.gz",
        "unpack notMNIST_small.tar.gz", "splits 250/50/50 seed 133",
        *(f"decode notMNIST_{size} {letter}" for size in ("large", "small") for letter in "ABCDEFGHIJ"),
    ])  # "train-0" stands for the training subflow, whose own task run is "train notmnist"


def test_letters_are_decoded_on_a_dask_cluster(prefect_api, served_archives, dask_address, tmp_path):
    parameters = pipeline_parameters(served_archives, tmp_path / "data", task_runner="dask", dask_address=dask_address)
    state = notmnist_pipeline(**parameters, return_state=True)
    assert state.is_completed(), state.message
    letters = decode_states(state.state_details.flow_run_id)
    assert len(letters) == 20 and set(letters.values()) == {"Completed"}


def decode_states(flow_run_id) -> dict[str, str]:
    """Letter task run name -> state name, of one flow run."""
    return {run.name: run.state.name for run in task_runs(flow_run_id, DATA_TASKS) if run.name.startswith("decode ")}
