"""An HTTP file server on 127.0.0.1 with byte ranges, validators and injectable faults.

Serves the files of one folder, as the archive host would: `notmnist demo` serves its generated
archives with it, and the tests and benchmarks use it as the far end of every download. Each
request may consume one scripted `Fault` for its path ("drop the connection after 1,000 bytes,
then answer 503 twice, then behave"), and every request is recorded (headers, status, body bytes
sent). It binds to loopback only.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Fault:
    """One misbehaviour, applied to one request."""

    status: int | None = None  # answer with this status (e.g. 500, 503, 404) and a short body
    drop_after: int | None = None  # send this many body bytes, then close the connection
    ignore_range: bool = False  # answer 200 with the whole body even to a Range request
    replace_with: bytes | None = None  # the file changes (new ETag/Last-Modified) before this answer
    body: bytes | None = None  # with `status`: the body to send (e.g. a 403 page)
    redirect_to: str | None = None  # answer 302 with this Location (a path on this server, or any URL)
    stall_after: int | None = None  # send this many body bytes, then nothing for `stall_seconds`
    stall_seconds: float = 0.0
    no_length: bool = False  # send the body without a Content-Length, ending it by closing the connection
    no_validators: bool = False  # send neither ETag nor Last-Modified (and honour any Range as it comes)


@dataclass
class Request:
    """What the server saw and did for one request."""

    path: str
    headers: dict[str, str]
    status: int
    body_bytes: int = 0
    answered: threading.Event = field(default_factory=threading.Event, repr=False)


@dataclass
class _Served:
    faults: collections.defaultdict = field(default_factory=lambda: collections.defaultdict(collections.deque))
    requests: list[Request] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FileServer:
    """Serves `root` on a free loopback port until `close()`; usable as a context manager."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.state = _Served()
        handler = type("Handler", (_Handler,), {"server_root": self.root, "state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def url(self, name: str) -> str:
        return self.base_url + name

    def put(self, name: str, content: bytes) -> str:
        """Publish (or change) a file; a change gives it a new ETag and Last-Modified. Returns its URL."""
        with self.state.lock:
            (self.root / name).write_bytes(content)
            self.state.versions[name] = self.state.versions.get(name, 0) + 1
        return self.url(name)

    def add_faults(self, name: str, *faults: Fault) -> None:
        """Queue faults for the next requests of `name`, one per request, in order."""
        with self.state.lock:
            self.state.faults[name].extend(faults)

    def requests_for(self, name: str) -> list[Request]:
        return [request for request in self.state.requests if request.path == name]

    def body_bytes_sent(self, name: str, wait: float = 10.0) -> int:
        """Body bytes sent for `name`, once each request has been answered in full.

        A client can hold every byte before the server's thread has counted them, so this waits
        (up to `wait` seconds per request) for each answer to end.
        """
        requests = self.requests_for(name)
        for request in requests:
            request.answered.wait(wait)
        return sum(request.body_bytes for request in requests)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FileServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_root: Path
    state: _Served

    def log_message(self, format, *args) -> None:  # keep test output quiet
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionError:  # the client left (a killed run, a cancelled download): not the server's error
            pass

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def _answer(self, send_body: bool) -> None:
        name = self.path.lstrip("/").split("?", 1)[0]
        with self.state.lock:
            fault = self.state.faults[name].popleft() if self.state.faults[name] else Fault()
            if fault.replace_with is not None:
                (self.server_root / name).write_bytes(fault.replace_with)
                self.state.versions[name] = self.state.versions.get(name, 0) + 1
        record = Request(name, dict(self.headers.items()), 0)
        self.state.requests.append(record)
        try:
            self._answer_with(record, name, fault, send_body)
        finally:
            record.answered.set()

    def _answer_with(self, record: Request, name: str, fault: Fault, send_body: bool) -> None:
        path = self.server_root / name
        if fault.redirect_to is not None:
            record.status = 302
            self.send_response(302)
            self.send_header("Location", fault.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if fault.status is not None or not path.is_file():
            status = fault.status or 404
            self._send_simple(record, status, fault.body or f"{status}\n".encode(), send_body)
            return

        content_length = path.stat().st_size
        version = self.state.versions.get(name, 0)
        mtime = path.stat().st_mtime
        etag = '"' + hashlib.sha256(f"{name}:{version}:{content_length}:{mtime}".encode()).hexdigest()[:16] + '"'
        last_modified = formatdate(mtime, usegmt=True)

        start, end, status = 0, content_length - 1, 200
        wanted = self.headers.get("Range")
        if wanted and not fault.ignore_range and (fault.no_validators or self._if_range_holds(etag, mtime)):
            parsed = _parse_range(wanted, content_length)
            if parsed is None:
                record.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{content_length}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = parsed
            status = 206

        record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        if not fault.no_validators:
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", last_modified)
        if fault.no_length:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{content_length}")
        self.end_headers()
        if not send_body:
            return
        count = end - start + 1
        if fault.drop_after is not None:
            count = min(count, fault.drop_after)
        if fault.stall_after is not None:
            count = min(count, fault.stall_after)
        record.body_bytes = self._send_file(path, start, count)
        if fault.stall_after is not None:
            record.answered.set()  # all it will send is counted; the stall that follows sends nothing
            time.sleep(fault.stall_seconds)  # the client's read timeout is what ends this
            self.close_connection = True
            return
        if fault.drop_after is not None:
            self.close_connection = True
            self.connection.shutdown(2)

    def _send_file(self, path: Path, start: int, count: int) -> int:
        """Send `count` bytes of `path` from `start` (zero-copy); returns how many went out before any hang-up."""
        sent = 0
        self.wfile.flush()
        with open(path, "rb") as handle:
            try:
                while sent < count:
                    piece = os.sendfile(self.connection.fileno(), handle.fileno(), start + sent, min(count - sent, 1 << 20))
                    if piece == 0:
                        break
                    sent += piece
            except OSError:  # the client hung up first (it may stop reading on purpose)
                pass
        return sent

    def _if_range_holds(self, etag: str, mtime: float) -> bool:
        validator = self.headers.get("If-Range")
        if validator is None:
            return True
        if validator.startswith('"') or validator.startswith("W/"):
            return validator == etag
        try:
            return int(parsedate_to_datetime(validator).timestamp()) == int(mtime)
        except (TypeError, ValueError):
            return False

    def _send_simple(self, record: Request, status: int, body: bytes, send_body: bool) -> None:
        record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)
            record.body_bytes = len(body)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The (start, end) of a single `bytes=` range, or None when it cannot be satisfied."""
    try:
        unit, spec = header.split("=", 1)
        first, last = spec.split(",")[0].strip().split("-")
        if unit.strip() != "bytes":
            return None
        if first == "":  # suffix range: the last N bytes
            length = int(last)
            return (max(0, size - length), size - 1) if length > 0 and size else None
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    except ValueError:
        return None
    return (start, end) if start < size and start <= end else None
