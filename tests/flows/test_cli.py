"""The `notmnist` command line: help, errors, JSON output, make-archives and the demo end to end."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tarfile
import typing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from prefect.exceptions import ParameterTypeError
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.callables import parameter_docstrings

from flows.cli import build_parser, main
from tests.tasks.synthetic_splits import pattern_images

COMMANDS = ["fetch", "extract", "shards", "splits", "run", "train", "mnist", "iris", "predict", "evaluate", "demo", "make-archives"]


@pytest.mark.parametrize("command", COMMANDS, ids=COMMANDS)
def test_every_command_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    subparser = build_parser()._subparsers._group_actions[0].choices[command]
    for action in subparser._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        if action.option_strings and action.default not in (None, False, "", "==SUPPRESS=="):
            squeezed = "".join(text.split())  # help text wraps lines, even inside a long URL
            assert "".join(f"(default: {action.default})".split()) in squeezed, (command, action.dest)


def test_version_and_top_level_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("notmnist ")
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    assert all(command in listing for command in COMMANDS)


def test_bad_option_exits_2_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["splits", "--dedup", "sometimes"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err


def test_ctrl_c_before_the_command_runs_is_one_line_not_a_traceback(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C does while the command imports what its options need

    monkeypatch.setattr("flows.cli.build_parser", interrupted)
    assert main(["splits", "--data-dir", "nowhere"]) == 130
    assert capsys.readouterr().err == "notmnist: interrupted.\n"


def test_failed_command_exits_1_with_one_line_that_says_what_to_do(file_server, tmp_path, capsys):
    code = main(["fetch", file_server.url("absent.tar.gz"), "--dest", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("notmnist fetch: error: ") and "HTTP 404" in err[-1] and "check the URL" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_json_prints_one_object(tmp_path, capsys):
    source = tmp_path / "mirror" / "file.bin"
    source.parent.mkdir()
    source.write_bytes(b"x" * 1000)
    assert main(["fetch", str(source), "--dest", str(tmp_path / "raw"), "--expected-bytes", "1000", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {"path": str(tmp_path / "raw" / "file.bin"), "bytes": 1000,
                      "sha256": hashlib.sha256(b"x" * 1000).hexdigest()}


def test_a_command_says_what_its_stages_did_outside_a_flow_run(tmp_path):
    """Prefect keeps the root logger at WARNING; the project's INFO lines (`--debug`: DEBUG) still reach the terminal."""
    source = tmp_path / "mirror" / "file.bin"
    source.parent.mkdir()
    source.write_bytes(b"x" * 1000)
    command = [sys.executable, "-m", "flows.cli", "fetch", str(source), "--dest", str(tmp_path / "raw")]
    said = [subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=120).stderr
            for _ in range(2)]
    assert said == [f"INFO Downloaded and verified {tmp_path / 'raw' / 'file.bin'} (1,000 bytes)\n",
                    f"INFO Found and verified {tmp_path / 'raw' / 'file.bin'}\n"]


def test_make_archives_is_deterministic_and_laid_out_like_the_real_ones(tmp_path, capsys):
    arguments = ["make-archives", "--per-letter", "6", "--small-per-letter", "3", "--seed", "5", "--json"]
    assert main([*arguments[:1], str(tmp_path / "one"), *arguments[1:]]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main([*arguments[:1], str(tmp_path / "two"), *arguments[1:]]) == 0
    second = json.loads(capsys.readouterr().out)
    assert [a["sha256"] for a in first.values()] == [a["sha256"] for a in second.values()]
    assert set(first) == {"notMNIST_large.tar.gz", "notMNIST_small.tar.gz"}
    with tarfile.open(first["notMNIST_large.tar.gz"]["path"]) as archive:
        files = [m for m in archive.getmembers() if m.isfile()]
    assert {m.name.split("/")[1] for m in files} == set("ABCDEFGHIJ")
    assert all(m.name.startswith("notMNIST_large/") and m.name.endswith(".png") for m in files)
    assert first["notMNIST_large.tar.gz"]["unreadable"] > 0
    assert len(files) == first["notMNIST_large.tar.gz"]["images"] + first["notMNIST_large.tar.gz"]["unreadable"]


def test_demo_runs_the_whole_pipeline_to_a_model_and_a_report(prefect_api, tmp_path, capsys):
    code = main(["demo", "--data-dir", str(tmp_path / "demo"), "--per-letter", "60", "--epochs", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert Path(result["model_path"]).is_file()
    assert "| test_accuracy |" in Path(result["report"]).read_text()
    assert str(result["flow_run"])


def test_the_demo_draws_its_archives_while_the_embedded_api_starts(monkeypatch, tmp_path, capsys):
    import demo.run

    order = []

    class StartingAPI:
        def wait(self, seconds: float) -> dict[str, str]:
            order.append("the API answered")
            return {"PREFECT_API_URL": "http://127.0.0.1:9/api", "PREFECT_UI_URL": ""}

        def stop(self) -> None:
            order.append("the API stopped")

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr("flows.cli.start_if_unset", StartingAPI)
    monkeypatch.setattr(demo.run, "prepare_demo", lambda layout, per_letter, **_: order.append(f"drawn {per_letter}"))
    monkeypatch.setattr(demo.run, "run_demo", lambda layout, **_: order.append("the flow ran") or {"ran": True})
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no API named, as on a fresh machine
        assert main(["demo", "--data-dir", str(tmp_path / "demo"), "--per-letter", "60", "--json"]) == 0
    assert order == ["drawn 60", "the API answered", "the flow ran", "the API stopped"]
    assert json.loads(capsys.readouterr().out) == {"ran": True}


def test_train_on_an_object_store_needs_the_split_folder_named(capsys):
    assert main(["train", "--data-dir", "s3://notmnist/somewhere"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["notmnist train: error: Name the split folder to train on with --splits: s3://notmnist/somewhere "
                     "is an object store."]


PIPELINE_COMMANDS = [
    ("run", "flows.notmnist", "notmnist_pipeline"),
    ("train", "flows.train", "train_flow"),
    ("mnist", "flows.mnist", "mnist_pipeline"),
    ("iris", "flows.iris", "iris_pipeline"),
]
CLI_ONLY = {"help", "json", "debug", "no_checks", "handler", "command"}  # options no flow parameter stands for


def out_of_range(annotation) -> str | None:
    """A value just outside the range `annotation` declares (core/parameters.py), as text; None if it has none."""
    for part in typing.get_args(annotation)[1:] if typing.get_origin(annotation) is typing.Annotated else ():
        for rule in getattr(part, "metadata", []):
            for bound, outside in (("ge", lambda limit: limit - 1), ("gt", lambda limit: limit),
                                   ("lt", lambda limit: limit)):
                if (limit := getattr(rule, bound, None)) is not None:
                    return str(outside(limit))
            if getattr(rule, "pattern", None):
                return "not-what-the-pattern-asks"
    return None


@pytest.mark.parametrize(("command", "module", "flow"), PIPELINE_COMMANDS, ids=[c[0] for c in PIPELINE_COMMANDS])
def test_a_pipeline_commands_options_are_its_flows_parameters_with_their_defaults_help_and_ranges(
    command, module, flow, capsys
):
    flow = getattr(importlib.import_module(module), flow)
    parser = build_parser({command})
    options = {action.dest: action for action in parser._subparsers._group_actions[0].choices[command]._actions}
    described = parameter_docstrings(inspect.getdoc(flow.fn))
    hints = typing.get_type_hints(flow.fn, include_extras=True)
    extra = {"train_deployment", "train_timeout_seconds"} if command == "train" else set()
    assert set(options) - CLI_ONLY - extra == set(inspect.signature(flow.fn).parameters)
    for name, parameter in inspect.signature(flow.fn).parameters.items():
        assert options[name].default == parameter.default, (command, name)
        assert options[name].help == " ".join(described[name].split()).rstrip("."), (command, name)
        annotation = typing.get_args(hints[name])[0] if typing.get_origin(hints[name]) is typing.Union else hints[name]
        if (value := out_of_range(annotation)) is None:
            continue
        # The flow refuses the value when called (a deployment run, the UI), and the option refuses it when parsed.
        with pytest.raises(ParameterTypeError):
            flow.validate_parameters({name: value})
        with pytest.raises(SystemExit) as exit_info:
            main([command, f"--{name.replace('_', '-')}", value])
        assert exit_info.value.code == 2 and f"{value} is not " in capsys.readouterr().err, (command, name)


def test_run_passes_every_option_to_the_flow_and_no_checks_turns_the_checks_off(monkeypatch):
    import flows.notmnist

    received = {}
    real = flows.notmnist.notmnist_pipeline
    finished = SimpleNamespace(result=dict, is_cancelled=lambda: False)  # a completed run's state: its result

    def call(self, return_state=False, **kwargs):
        received.update(kwargs)
        return finished

    fake = type("Flow", (), {"fn": staticmethod(real.fn), "__call__": call})()
    monkeypatch.setattr(flows.notmnist, "notmnist_pipeline", fake)
    assert main(["run", "--large-bytes", "5", "--small-archive", "other.tar.gz", "--train-timeout-seconds", "9"]) == 0
    assert set(received) == set(inspect.signature(real.fn).parameters)
    assert (received["large_bytes"], received["small_archive"], received["train_timeout_seconds"]) == (
        5, "other.tar.gz", 9.0)
    assert main(["run", "--no-checks"]) == 0
    assert [received[name] for name in ("large_bytes", "large_sha256", "small_bytes", "small_sha256")] == [None] * 4


def test_run_against_a_mirror_of_generated_archives_with_their_sizes(prefect_api, served_archives, tmp_path, capsys):
    sizes = served_archives.sizes
    code = main([
        "run", "--data-dir", str(tmp_path / "data"), "--base-url", served_archives.server.base_url,
        "--large-bytes", str(sizes["notMNIST_large.tar.gz"]), "--small-bytes", str(sizes["notMNIST_small.tar.gz"]),
        "--min-images-large", "30", "--min-images-small", "10", "--train-size", "250", "--valid-size", "50",
        "--test-size", "50", "--epochs", "1", "--workers", "1", "--json",
    ])
    assert code == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert Path(result["model_path"]).is_relative_to(tmp_path / "data" / "models")


def test_mnist_takes_any_keras_layout_npz_with_its_checks_off(prefect_api, tmp_path, capsys):
    rng = np.random.default_rng(0)
    arrays = {}
    for part, rows in (("train", 200), ("test", 40)):
        labels = np.resize(np.arange(10, dtype=np.uint8), rows)
        arrays[f"x_{part}"], arrays[f"y_{part}"] = pattern_images(labels, rng), labels
    np.savez_compressed(tmp_path / "mnist.npz", **arrays)
    code = main(["mnist", "--data-dir", str(tmp_path / "data"), "--url", str(tmp_path / "mnist.npz"), "--no-checks",
                 "--epochs", "1", "--batch-size", "32", "--json"])
    assert code == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    record = json.loads((Path(result["model_path"]).parent / "record.json").read_text())
    assert record["dataset"]["rows"] == {"train": 200, "valid": 40, "test": 40}
    assert main(["mnist", "--data-dir", str(tmp_path / "data"), "--url", str(tmp_path / "mnist.npz")]) == 1
    assert "expected 11,490,434 bytes" in capsys.readouterr().err  # the real file's size is checked by default


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["splits", "--seed", "-1"], "-1 is not a seed (0 to 4294967295)"),
        (["train", "--seed", "4294967296"], "4294967296 is not a seed"),
        (["fetch", "x", "--retries", "-1"], "-1 is not a count (0 or more)"),
        (["fetch", "x", "--expected-bytes", "-5"], "-5 is not a count"),
        (["fetch", "x", "--read-timeout-seconds", "0"], "0 is not a positive number of seconds"),
        (["shards", "x", "--workers", "0"], "0 is not a positive integer"),
        (["shards", "x", "--min-images", "-3"], "-3 is not a count"),
        (["run", "--learning-rate", "-1"], "-1 is not a positive learning rate"),
        (["train", "--learning-rate", "inf"], "inf is not a positive learning rate"),
        (["run", "--epochs", "two"], "two is not a positive integer"),
        (["fetch", "x", "--sha256", "nothex"], "nothex is not a sha256 (64 hexadecimal digits)"),
    ],
    ids=["negative-seed", "seed-too-large", "negative-retries", "negative-bytes", "zero-timeout", "zero-workers",
         "negative-min-images", "negative-rate", "infinite-rate", "not-a-number", "not-a-sha256"],
)
def test_values_out_of_range_are_usage_errors_naming_the_range(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "state", "message"),
    [
        ("splits", "missing", r"--data-dir .* does not exist: give the data root that holds shards/"),
        ("train", "missing", r"--data-dir .* does not exist: give the data root that holds splits/"),
        ("splits", "file", r"--data-dir .* is a file, not a folder"),
        ("shards", "file", r"--data-dir .* is a file, not a folder"),
        ("run", "file", r"--data-dir .* is a file, not a folder"),
        ("fetch", "file", r": File exists$"),
    ],
    ids=["splits-missing", "train-missing", "splits-file", "shards-file", "run-file", "fetch-dest-file"],
)
def test_a_data_dir_that_cannot_serve_is_one_line(tmp_path, capsys, command, state, message):
    data_dir = tmp_path / "data"
    if state == "file":
        data_dir.write_text("not a folder")
    if command == "fetch":
        (tmp_path / "x.bin").write_bytes(b"x")
        arguments = [command, str(tmp_path / "x.bin"), "--dest", str(data_dir)]
    else:
        arguments = [command, "--data-dir", str(data_dir)] + ([str(tmp_path)] if command == "shards" else [])
    assert main(arguments) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.search(message, lines[-1]) and lines[-1].startswith(f"notmnist {command}: error: ")


def test_a_failed_flow_ends_with_one_line_and_the_runs_page_without_a_traceback(prefect_api, tmp_path):
    """The real command line, in its own process, against the session's Prefect server."""
    from prefect.settings import get_current_settings

    env = {**os.environ, "PREFECT_API_URL": get_current_settings().api.url, "TF_CPP_MIN_LOG_LEVEL": "3"}
    completed = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--base-url", "file:///nonexistent/", "--data-dir",
         str(tmp_path / "data")], capture_output=True, text=True, env=env, cwd=Path(__file__).parents[2], timeout=300,
    )
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert re.fullmatch(r"notmnist run: error: file:///nonexistent/notMNIST_\w+\.tar\.gz: no such file\.", lines[-2])
    assert re.fullmatch(r"notmnist run: the run: http://127\.0\.0\.1:\d+/runs/flow-run/[0-9a-f-]{36}", lines[-1])


API_PROBLEMS = {
    "embedded API too slow": ({"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "0"},
                              r"Prefect's embedded API did not start within 0 s \(a busy machine, or a new Prefect home "
                              r"creating its database\): start `prefect server start` .*"
                              r"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS\."),
    "API that does not answer": ({"PREFECT_API_URL": "http://127.0.0.1:{port}/api"},
                                 r"The Prefect API at http://127\.0\.0\.1:\d+/api/ does not answer: start it "
                                 r"\(`prefect server start`\) or correct PREFECT_API_URL"),
}


@pytest.mark.parametrize("problem", list(API_PROBLEMS), ids=list(API_PROBLEMS))
def test_a_prefect_api_that_cannot_be_reached_is_one_line_saying_what_to_do(problem, tmp_path):
    """The real command line, in its own process, in a new Prefect home (its database not yet created)."""
    from tests.flows.conftest import free_port

    variables, message = API_PROBLEMS[problem]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "TF_CPP_MIN_LOG_LEVEL": "3",
           **{name: value.format(port=free_port()) for name, value in variables.items()}}
    if "PREFECT_API_URL" not in variables:
        env.pop("PREFECT_API_URL", None)  # the embedded API, then
    completed = subprocess.run(
        [sys.executable, "-m", "flows.cli", "iris", "--data-dir", str(tmp_path / "data")], capture_output=True,
        text=True, env=env, cwd=Path(__file__).parents[2], timeout=300,
    )
    errors = [line for line in completed.stderr.splitlines() if line.startswith("notmnist")]
    assert completed.returncode == 1
    assert len(errors) == 1 and re.fullmatch(f"notmnist iris: error: {message}.*", errors[0]), completed.stderr[-2000:]


def test_an_api_a_prefect_profile_names_is_the_one_used_not_an_embedded_one(tmp_path):
    """The embedded API starts before Prefect is imported; a profile naming another API still wins over it."""
    from tests.flows.conftest import free_port

    home = tmp_path / "prefect-home"
    home.mkdir()
    url = f"http://127.0.0.1:{free_port()}/api"  # nothing answers there
    (home / "profiles.toml").write_text(f'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "{url}"\n')
    env = {**os.environ, "PREFECT_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("PREFECT_API_URL", None)
    completed = subprocess.run(
        [sys.executable, "-m", "flows.cli", "iris", "--data-dir", str(tmp_path / "data")], capture_output=True,
        text=True, env=env, cwd=Path(__file__).parents[2], timeout=300,
    )
    assert completed.returncode == 1
    assert f"error: The Prefect API at {url}/ does not answer" in completed.stderr, completed.stderr[-2000:]


def test_the_embedded_api_gets_time_to_start_on_a_busy_machine_unless_told_otherwise(monkeypatch):
    """What Prefect itself waits, read while a command runs. Prefect reads its settings when it is imported, as it
    is here (and by the CLI, before a flow's command runs): a variable set after that would change nothing."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP

    from core.defaults import EPHEMERAL_API_STARTUP_SECONDS
    from flows import cli

    seen = []
    monkeypatch.setattr(cli, "COMMANDS", tuple(
        (name, (lambda args: seen.append(STARTUP.value()) or {}) if name == "splits" else handler, text, options)
        for name, handler, text, options in cli.COMMANDS
    ))
    monkeypatch.delenv(STARTUP.name, raising=False)
    assert main(["splits", "--json"]) == 0
    monkeypatch.setenv(STARTUP.name, "7")  # the user's setting stands
    assert main(["splits", "--json"]) == 0
    assert seen == [EPHEMERAL_API_STARTUP_SECONDS, 7]


def test_no_checks_beside_an_explicit_sha256_is_a_contradiction_not_a_silent_choice(capsys):
    assert main(["run", "--no-checks", "--large-sha256", "a" * 64]) == 1
    assert "--no-checks turns off the check --large-sha256 asks for" in capsys.readouterr().err


def test_run_refuses_split_sizes_the_splits_stage_would_refuse_before_anything_starts(file_server, tmp_path, capsys):
    code = main(["run", "--data-dir", str(tmp_path / "data"), "--base-url", file_server.base_url, "--train-size", "15"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("notmnist run: error: split sizes are shared equally by the 10 classes")
    assert file_server.state.requests == [] and not (tmp_path / "data").exists()  # nothing downloaded, nothing made


def test_an_evaluation_prints_per_class_accuracy_a_line_each_and_the_confusion_matrix_as_a_table(capsys):
    from flows.cli import _print_human

    _print_human({"accuracy": 0.75, "per_class_accuracy": {"A": 1.0, "B": 0.5}, "class_names": ["A", "B"],
                  "confusion_matrix": [[10, 0], [5, 5]]})
    assert capsys.readouterr().out.splitlines() == [
        "accuracy            0.75",
        "per_class_accuracy:",
        "  A  1.0000",
        "  B  0.5000",
        "class_names         A B",
        "confusion_matrix (rows: true, columns: predicted):",
        "      A  B",
        "  A  10  0",
        "  B   5  5",
    ]


def test_tensorflows_start_up_lines_stay_off_the_terminal():
    """They reach the process's stderr before TensorFlow's log level applies, twice per command; Python's own
    errors must still show."""
    code = ("from tasks.reporting import import_keras_quietly; import_keras_quietly(); import sys; "
            "print('after', file=sys.stderr); print('jaxlib' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0 and done.stderr.strip().splitlines() == ["after"], done.stderr
    assert done.stdout.strip() == "False"  # JAX, installed here for its tests, stays out of a TensorFlow process
