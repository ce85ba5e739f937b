"""`notmnist stack up` / `notmnist stack down`: the production topology on one machine, for a trial.

`up` starts, each in a process group of its own and logging under the stack's folder: a Prefect server
(the UI's API URL set, so the UI works on any port), SeaweedFS with the bucket `notmnist`, the work
pools `prefect.yaml` names, the deployments (`prefect deploy --all` from the checkout), and a `cpu` and
a `gpu` worker, each in a folder and HOME of its own, getting the code through `git_clone` of the
checkout at its current commit. It prints the UI's address and the variables to export.
`down` stops what `up` recorded in `stack.json`, and only that: a process whose start time differs
from the recorded one is someone else's (its number was reused) and is left alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from core.errors import PipelineError
from demo.s3server import create_bucket, start_seaweed, stop_seaweed

BUCKET = "notmnist"
POOLS = ("cpu", "gpu", "gpu-checkout")  # every pool prefect.yaml names: `prefect deploy --all` needs them all
# What README's "Training on another machine" tells an operator to run; the stack runs exactly these.
POOL_COMMANDS = tuple(f"prefect work-pool create {pool} --type process" for pool in POOLS)
DEPLOY_COMMAND = "prefect deploy --all"  # with NOTMNIST_REPOSITORY set to where workers clone from
WORKERS = ("cpu", "gpu")
STATE = "stack.json"
PREFECT = str(Path(sys.executable).with_name("prefect"))


def stack_up(
    folder: Path, checkout: Path, port: int, repository: str | None = None, startup_seconds: float = 180
) -> dict[str, Any]:
    """Start the stack under `folder`, deploying `checkout`'s commit, which workers clone from `repository` (default:
    the checkout itself); returns where the UI is and what to export."""
    folder = folder.resolve()
    if (folder / STATE).exists() and _alive(json.loads((folder / STATE).read_text())):
        raise PipelineError(f"A stack is already up from {folder}: `notmnist stack down --folder {folder}` first.")
    checkout = _committed_checkout(checkout)
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    api = f"http://127.0.0.1:{port}/api"
    prefect_env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "PREFECT_LOGGING_LEVEL": "INFO"}
    prefect_env.pop("PREFECT_API_KEY", None)
    prefect_env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the command line's own setting: a worker started by hand has none
    processes: dict[str, dict[str, Any]] = {}
    state = {"folder": str(folder), "ui": f"http://127.0.0.1:{port}", "processes": processes}
    try:
        server_env = {**prefect_env, "PREFECT_HOME": str(folder / "prefect-server"), "PREFECT_UI_API_URL": api}
        processes["prefect server"] = _start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                             server_env, folder, logs / "prefect-server.log")
        _save(folder, state)
        seaweed, s3_env = start_seaweed(folder / "seaweedfs")
        processes["seaweedfs"] = _record(seaweed.pid, folder / "seaweedfs" / "weed.log")
        _save(folder, state)
        create_bucket(s3_env, BUCKET)
        server = processes["prefect server"]
        wait_for_api(api, lambda: _is_ours(server), server["log"], startup_seconds)
        client_env = {**prefect_env, **s3_env, "PREFECT_HOME": str(folder / "prefect-client")}
        with ThreadPoolExecutor(len(POOL_COMMANDS)) as creating:  # each a Prefect CLI process: 2-3 s, mostly imports
            # A stack folder used before keeps its pools.
            list(creating.map(lambda command: _prefect(command, client_env, folder, unless="already exists"),
                              POOL_COMMANDS))
        _prefect(DEPLOY_COMMAND, {**client_env, "NOTMNIST_REPOSITORY": repository or checkout.as_uri()}, checkout)
        for pool in WORKERS:
            home = folder / "workers" / pool  # a machine of its own: its HOME, Prefect home and working folder
            home.mkdir(parents=True, exist_ok=True)
            worker_env = {**client_env, "HOME": str(home), "PREFECT_HOME": str(home / ".prefect"),
                          "XDG_CACHE_HOME": str(home / ".cache"),  # its working copies too, not this machine's
                          "PREFECT_WORKER_QUERY_SECONDS": "2"}  # a trial: a run starts within seconds, not ten
            processes[f"{pool} worker"] = _start([PREFECT, "worker", "start", "--pool", pool], worker_env, home,
                                                 logs / f"{pool}-worker.log")
            _save(folder, state)
    except BaseException:
        stack_down(folder)
        raise
    state["environment"] = {"PREFECT_API_URL": api, **s3_env}
    _save(folder, state)
    return {"ui": state["ui"], "export": " ".join(f"{k}={v}" for k, v in state["environment"].items()),
            "deployments": "notmnist-pipeline/weekly train/gpu train/gpu-checkout mnist-pipeline/mnist iris-pipeline/iris",
            "logs": str(logs), "down": f"notmnist stack down --folder {folder}"}


def stack_down(folder: Path, grace_seconds: float = 15) -> dict[str, Any]:
    """Stop every process `stack up` recorded under `folder` (workers first, the server last)."""
    folder = folder.resolve()
    path = folder / STATE
    if not path.exists():
        raise PipelineError(f"No stack was started from {folder} ({STATE} is missing): nothing to stop.")
    state = json.loads(path.read_text())
    stopped, gone = [], []
    for name, process in reversed(list(state["processes"].items())):
        if not _is_ours(process):
            gone.append(name)
        elif name == "seaweedfs":
            stop_seaweed(process["pid"])  # throwaway data: killed, as the tests do
            stopped.append(name)
        else:
            stop_group(process["pid"], grace_seconds)
            stopped.append(name)
    path.unlink()
    return {"stopped": ", ".join(stopped) or "nothing", "already_gone": ", ".join(gone) or "nothing",
            "folder": str(folder)}


def _committed_checkout(checkout: Path) -> Path:
    """The git work tree at `checkout`, whose HEAD is what workers will clone; uncommitted changes are not deployed."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=checkout, check=True, capture_output=True,
                             text=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        raise PipelineError(f"{checkout} is not a git checkout: workers clone the deployed commit from it.") from error
    return Path(top)


def _start(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> dict[str, Any]:
    with open(log, "ab") as output:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return _record(process.pid, log)


def _record(pid: int, log: Path) -> dict[str, Any]:
    return {"pid": pid, "started": _start_time(pid), "log": str(log)}


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat, field 22): a pid with another is not ours."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _is_ours(process: dict[str, Any]) -> bool:
    return process["started"] is not None and _start_time(process["pid"]) == process["started"]


def _alive(state: dict[str, Any]) -> bool:
    return any(_is_ours(process) for process in state.get("processes", {}).values())


def stop_group(pid: int, grace_seconds: float) -> None:
    """SIGTERM to the process group `pid` leads (a worker's flow runs too), SIGKILL after `grace_seconds`."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        if not group_members(pid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def group_members(group: int) -> list[str]:
    """The names of the processes of group `group` that still run (a zombie waiting to be reaped has stopped)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, fields = stat.read_text().rsplit(")", 1)
            state, _, process_group = fields.split()[:3]
        except (OSError, ValueError):  # gone meanwhile
            continue
        if int(process_group) == group and state != "Z":
            members.append(name.split("(", 1)[1])
    return members


def _save(folder: Path, state: dict[str, Any]) -> None:
    temporary = folder / (STATE + ".tmp")
    temporary.write_text(json.dumps(state, indent=2))
    temporary.replace(folder / STATE)


def wait_for_api(api: str, running: Callable[[], bool], log: str | Path, seconds: float) -> None:
    """Wait until the Prefect server at `api` answers; PipelineError once `running()` is false, or after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{api}/health", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        if not running():
            raise PipelineError(f"The Prefect server exited: see {log}")
        time.sleep(0.2)
    raise PipelineError(f"The Prefect server did not answer within {seconds:.0f} s: see {log}")


def _prefect(command: str, env: dict[str, str], cwd: Path, unless: str | None = None) -> None:
    """Run a `prefect ...` command line as an operator would (no terminal: nothing is asked)."""
    done = subprocess.run([PREFECT, *command.split()[1:]], env=env, cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    said = done.stdout + done.stderr
    if done.returncode != 0 and not (unless and unless in said):
        raise PipelineError(f"`{command}` failed:\n{said[-2000:]}")

