"""The Prefect API a flow command starts for itself: started only where a flow runs, answering, then gone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from core.errors import PipelineError
from flows.cli import _runs_flows, main
from flows.embedded_api import EmbeddedAPI
from tasks.stage import DataRootRecords, save_records_block
from tests.flows.conftest import servers_started_here
from tests.processes import alive


@pytest.mark.parametrize("argv, runs", [
    (["run", "--data-dir", "d"], True), (["--json", "iris"], True), (["demo"], True), (["train"], True),
    (["run", "--help"], False), (["predict", "m", "x.png"], False), (["make-archives", "d"], False), ([], False),
], ids=["run", "iris", "the demo plugin's", "train", "help", "predict", "make-archives", "none"])
def test_only_commands_that_run_flows_start_an_api(argv, runs):
    command = next((word for word in argv if not word.startswith("-")), None)
    assert _runs_flows(command, argv) is runs


def test_a_command_called_in_a_longer_process_stops_its_api_when_it_returns(monkeypatch, tmp_path):
    """Every test here also checks it after it ran (conftest.py): the commands that ran flows, failed, or ended."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the session's server: restored after the test
    with pytest.raises(SystemExit):  # argparse's way out of a bad option, while the API still starts
        main(["run", "--epochs", "two"])
    assert servers_started_here() == []  # left running, each idles at a few percent of a core
    assert "PREFECT_API_URL" not in os.environ


def test_the_embedded_api_answers_then_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the session's server: restored after the test
    monkeypatch.delenv("PREFECT_UI_URL", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    api = EmbeddedAPI()
    try:
        settings = api.wait(180)
        assert settings == {"PREFECT_API_URL": api.url, "PREFECT_UI_URL": ""}  # no UI served: no page to link
        assert {name: os.environ[name] for name in settings} == settings  # for child processes too
        with urllib.request.urlopen(f"{api.url}/health", timeout=60) as response:  # a loaded machine
            assert response.status == 200
        assert block_types(api.url) == []  # none registered at its start: no collection imported to find them
        with temporary_settings({PREFECT_API_URL: api.url}):  # as a command's settings, read before the API started
            save_records_block()  # what a flow saves registers its own type
        assert block_types(api.url) == [DataRootRecords._block_type_slug]
    finally:
        api.stop()
    assert api.process.poll() is not None
    assert "PREFECT_API_URL" not in os.environ and "PREFECT_UI_URL" not in os.environ


def block_types(api_url: str) -> list[str]:
    request = urllib.request.Request(f"{api_url}/block_types/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return [block_type["slug"] for block_type in json.load(response)]


def test_an_api_that_exits_says_so_and_what_to_do(monkeypatch, tmp_path, capfd):
    home = tmp_path / "prefect-home"
    home.write_text("a file where the Prefect home's folder should be")  # its database cannot be created
    monkeypatch.setenv("PREFECT_HOME", str(home))
    api = EmbeddedAPI()
    try:
        with pytest.raises(PipelineError, match=r"Prefect's embedded API exited with code \d+ before it answered"):
            api.wait(180)
    finally:
        api.stop()
    said = capfd.readouterr().err
    assert "unable to open database file" in said, said[-3000:]  # "its error is above"
    assert said.count("Application startup failed") == 1  # once, though the server is stopped after


def serve_with(monkeypatch, script: str) -> None:
    """Every EmbeddedAPI made from now on runs `script`, by Python, in place of Prefect's server."""
    monkeypatch.setattr(EmbeddedAPI, "server_command", lambda self: [sys.executable, "-c", script])


def fake_server(monkeypatch, script: str) -> EmbeddedAPI:
    """An EmbeddedAPI whose server is `script`, run by Python, in place of Prefect's."""
    serve_with(monkeypatch, script)
    return EmbeddedAPI()


def test_what_the_server_writes_as_it_is_stopped_stays_off_the_terminal_and_what_it_logged_before_does_not(
    monkeypatch, capfd
):
    """A server's services, cancelled as it shuts down, logged tracebacks after the command's result; an error it logs
    while the command runs (a request it failed) is the user's to see."""
    api = fake_server(monkeypatch, "import signal, sys, time\n"
                      "def stop(*_):\n    print('Error flushing 1 events', file=sys.stderr, flush=True)\n    sys.exit(0)\n"
                      "signal.signal(signal.SIGTERM, stop)\n"
                      "print('ERROR | database is locked', file=sys.stderr, flush=True)\ntime.sleep(60)")
    deadline = time.monotonic() + 60
    while not os.fstat(api.output.fileno()).st_size and time.monotonic() < deadline:  # written to its own file
        time.sleep(0.05)
    api.stop()
    assert api.process.returncode == 0  # it wrote its lines, and exited as asked
    said = capfd.readouterr().err
    assert "Error flushing" not in said
    assert said.count("ERROR | database is locked") == 1


def test_a_server_relaunched_on_another_port_shows_only_what_the_last_one_said(monkeypatch, capfd):
    scripts = iter([
        "import sys; print('[Errno 98] address already in use', file=sys.stderr); sys.exit(3)",  # another took the port
        "import sys; print('unable to open database file', file=sys.stderr); sys.exit(1)",
    ])
    monkeypatch.setattr(EmbeddedAPI, "server_command", lambda self: [sys.executable, "-c", next(scripts)])
    api = EmbeddedAPI()
    first_port = api.port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first_port))
        try:
            with pytest.raises(PipelineError, match="exited with code 1 before it answered"):
                api.wait(60)
        finally:
            api.stop()
    assert api.port != first_port
    said = capfd.readouterr().err
    assert "unable to open database file" in said and "address already in use" not in said


def test_a_server_that_ends_during_the_command_shows_what_it_said(monkeypatch, capfd):
    api = fake_server(monkeypatch, "import sys; print('database disk image is malformed', file=sys.stderr); sys.exit(3)")
    api.process.wait(60)
    api.stop()
    api.stop()  # again, as the exit hook does
    assert capfd.readouterr().err.count("database disk image is malformed") == 1


def test_the_server_ends_when_the_command_is_killed(tmp_path):
    """SIGTERM or SIGKILL skips the command's exit handlers: the server must not outlive it all the same."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    command = subprocess.Popen(
        [sys.executable, "-c", "import time; from flows.embedded_api import EmbeddedAPI; "
         "print(EmbeddedAPI().process.pid, flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).parents[2],
    )
    server = int(command.stdout.readline())
    command.kill()
    command.wait()
    deadline = time.monotonic() + 30
    while alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(server)


# A server that answers every GET with 200: as far as a command's wait for its embedded API can tell, Prefect's.
ANSWERING = ("import http.server, sys\n"
             "class Health(http.server.BaseHTTPRequestHandler):\n"
             "    def do_GET(self):\n        self.send_response(200)\n        self.end_headers()\n"
             "    def log_message(self, *args):\n        pass\n"
             "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), Health).serve_forever()")


def command_sees(monkeypatch, setting) -> object:
    """The value of Prefect `setting` that `notmnist iris` would run its flow with."""
    from prefect.settings import get_current_settings

    from flows import cli

    seen = []
    monkeypatch.setattr(cli, "COMMANDS", tuple(
        (name, (lambda args: seen.append(setting.value_from(get_current_settings())) or {}) if name == "iris"
         else handler, text, options)
        for name, handler, text, options in cli.COMMANDS
    ))
    assert main(["--json", "iris"]) == 0
    return seen[0]


def test_flow_runs_send_heartbeats_only_to_an_api_that_outlives_the_command(monkeypatch, tmp_path):
    """Heartbeats serve a standing server's detection of runs whose process died; the embedded API dies with the
    command. Each flow run waited up to a second at its end for its heartbeat thread to stop."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY as HEARTBEAT

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")  # a standing server's (never asked here)
    assert command_sees(monkeypatch, HEARTBEAT) == HEARTBEAT.value() is not None  # Prefect's default
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setattr(EmbeddedAPI, "server_command", lambda self: [sys.executable, "-c", ANSWERING, str(self.port)])
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no API named, as in a new shell
        assert command_sees(monkeypatch, HEARTBEAT) is None


def test_a_command_whose_embedded_api_ends_under_it_says_so_and_what_to_do(monkeypatch, tmp_path, capfd):
    """Killed mid-run (the machine short of memory, say), the API leaves the run's next request refused: the command
    ends with one line naming the cause, not Prefect's connection error."""
    import httpx

    from flows import cli

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the session's server: restored after the test
    started = []
    monkeypatch.setattr(EmbeddedAPI, "server_command",
                        lambda self: started.append(self) or [sys.executable, "-c", ANSWERING, str(self.port)])

    def killed_mid_run(args):
        started[-1].process.kill()
        started[-1].process.wait()
        raise httpx.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(cli, "COMMANDS", tuple(
        (name, killed_mid_run if name == "iris" else handler, text, options)
        for name, handler, text, options in cli.COMMANDS
    ))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no API named, as in a new shell
        assert main(["iris"]) == 1
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("notmnist")]
    assert errors == [
        "notmnist iris: error: Prefect's embedded API ended during the command (exit code -9): rerun the same "
        "command, which resumes from the stages that finished; a server started with `prefect server start` "
        "(PREFECT_API_URL=http://127.0.0.1:4200/api) outlives commands"
    ]


def test_a_command_whose_embedded_api_cannot_start_says_why_not_to_rerun(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the session's server: restored after the test
    serve_with(monkeypatch, "import sys; print('unable to open database file', file=sys.stderr); sys.exit(1)")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["iris"]) == 1
    said = capfd.readouterr().err
    errors = [line for line in said.splitlines() if line.startswith("notmnist")]
    assert "unable to open database file" in said
    assert len(errors) == 1 and errors[0].startswith(
        "notmnist iris: error: Prefect's embedded API exited with code 1 before it answered (its error is above)"
    ), errors

