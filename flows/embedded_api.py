"""The Prefect API a flow command starts for itself when none is configured, started before anything is imported.

Unset, `PREFECT_API_URL` makes Prefect start a temporary server the first time a flow needs its client: the
client's process first imports the whole server package (about 5 s on 2 cores) only to launch it, and the server
then takes 8 s or more to answer, all after the command's own imports (Prefect, the flows: 4 s). Started here,
at the top of `notmnist`, with the command Prefect itself uses, the server starts while the command imports, and
the command only waits for what is left.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from core.errors import PipelineError

# uvicorn's exit code when the app's start-up failed, or its port was taken between choosing it and binding it
EXITED_AT_STARTUP, RELAUNCHES = 3, 2
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
STOP_SECONDS = 5  # what Prefect's own temporary server gets to shut down cleanly before it is killed
SHOWN_BYTES = 20_000  # of the server's own output, where it failed
# Prefect's temporary server's settings, and no block registration at start: that imports every installed Prefect
# collection (prefect-dask imports Dask's distributed) to register block types no command here uses, costing 0.3-1.3 s
# of the command's wait and 25 MiB, every command. A block a flow saves registers its own type; `prefect server start`
# registers them all, for the UI.
SERVER_SETTINGS = {
    "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
    "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "0", "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "0",
}


class EmbeddedAPI:
    """A Prefect server on a free port of 127.0.0.1, serving the API only, for one command."""

    def __init__(self) -> None:
        self.port = free_port()
        self.output, self._shown = None, False
        self.process = self._launch()
        atexit.register(self.stop)  # registered before Prefect's own exit handlers, so it runs after them

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def settings(self) -> dict[str, str]:
        # No UI is served and the server ends with the command: no page of it to link to ("View at ...").
        return {"PREFECT_API_URL": self.url, "PREFECT_UI_URL": ""}

    def server_command(self) -> list[str]:
        """Prefect's own command for its temporary server (SubprocessASGIServer), the API without the UI; the package
        folder found without importing it."""
        package = Path(importlib.util.find_spec("prefect").origin).parent
        return [sys.executable, "-m", "uvicorn", "--app-dir", str(package.parent), "--factory",
                "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "error", "--lifespan", "on"]

    def _launch(self) -> subprocess.Popen:
        # The server's output goes to a file of its own (one per launch), shown where it fails and, at the end, what
        # it wrote while the command ran (`stop`): not what it writes as it is stopped, where its services, cancelled,
        # logged tracebacks after the command's result ("Error flushing 1 events") that nobody could act on.
        if self.output is not None:
            self.output.close()
        self.output = tempfile.TemporaryFile()
        try:
            return subprocess.Popen(
                self.server_command(), env={**os.environ, **SERVER_SETTINGS},
                stdin=subprocess.DEVNULL, stdout=self.output, stderr=subprocess.STDOUT,
                preexec_fn=_ends_with_parent if sys.platform == "linux" else None,  # no thread runs yet: safe
            )
        except BaseException:
            self.output.close()
            raise

    def wait(self, seconds: float) -> dict[str, str]:
        """Wait up to `seconds` for the API to answer; returns the Prefect settings that point at it, also given to
        child processes (training, Dask workers) as variables. Raises RuntimeError in Prefect's words when it does
        not answer in time, so the command line explains it as it explains Prefect's own temporary server, and
        PipelineError when it exits instead."""
        deadline, relaunches = time.monotonic() + seconds, RELAUNCHES
        while time.monotonic() < deadline:
            if self.process.poll() == EXITED_AT_STARTUP and relaunches and _taken(self.port):  # by another, meanwhile
                self.port, relaunches = free_port(), relaunches - 1
                self.process = self._launch()
            elif self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                    if response.status == 200:
                        os.environ.update(self.settings)
                        return self.settings
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self._show_output()
        if self.process.poll() is not None:
            raise PipelineError(
                f"Prefect's embedded API exited with code {self.process.returncode} before it answered (its error is "
                "above): start `prefect server start` in another terminal and export "
                "PREFECT_API_URL=http://127.0.0.1:4200/api, or mend what it reported."
            )
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    def _show_output(self, end: int | None = None) -> None:
        """The last of what the server wrote (up to byte `end`), on this command's stderr, once. Read with `pread`: the
        server writes at the file's shared position, which a seek here would move under it."""
        if self._shown or self.output.closed:
            return
        self._shown = True
        end = os.fstat(self.output.fileno()).st_size if end is None else end
        start = max(0, end - SHOWN_BYTES)
        if said := os.pread(self.output.fileno(), end - start, start).decode(errors="replace"):
            print(said, end="" if said.endswith("\n") else "\n", file=sys.stderr, flush=True)

    def stop(self) -> None:
        """Shut the server down (cleanly when it lets itself be, else killed), after the logs and events Prefect
        still queues for it are sent; the variables go with it. What the server wrote while the command ran (errors
        it logged, why it ended) is shown then; what it writes as it is stopped is not."""
        if self.process.poll() is None:
            send_what_prefect_queued()
        if os.environ.get("PREFECT_API_URL") == self.url:
            for name in self.settings:
                os.environ.pop(name, None)
        written = 0 if self.output.closed else os.fstat(self.output.fileno()).st_size
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if written:
            self._show_output(written)
        self.output.close()


def start_if_unset() -> EmbeddedAPI | None:
    """An embedded API for this command, unless the environment names one (`PREFECT_API_URL`). A Prefect profile
    or settings file that names one is only known once Prefect is imported: the caller then stops this one."""
    return None if os.environ.get("PREFECT_API_URL") else EmbeddedAPI()


def send_what_prefect_queued() -> None:
    """Drain Prefect's log and event queues, as its own exit hook does (a no-op there after it: they are empty), when
    the API is stopped before the process exits (a command's embedded one, a test session's server)."""
    for module, worker in (("prefect.logging.handlers", "APILogWorker"), ("prefect.events.worker", "EventsWorker")):
        if module in sys.modules:  # imported only where a flow ran
            getattr(sys.modules[module], worker).drain_all(timeout=STOP_SECONDS, at_exit=False)


def _ends_with_parent() -> None:
    """In the server's process: be sent SIGTERM when the command's process dies, even killed (atexit never runs)."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _taken(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now, as the system picks one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
