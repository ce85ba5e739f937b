"""Download stage: verified, resumable transfers of the source archives.

The seed's `maybe_download` saved whatever came back (a 422-byte "403 Forbidden" page, a cut-off
transfer) and then failed its size check with no way forward but deleting the file and starting the
247 MB again. Here bytes go to `<name>.part` and every retry or rerun continues from there with an
HTTP Range request; only a file that passes the size and sha256 checks is renamed into place.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import requests
import urllib3
from filelock import FileLock
from prefect.tasks import exponential_backoff
from prefect.utilities.math import clamped_poisson_interval

from core.defaults import READ_TIMEOUT_SECONDS
from core.errors import DownloadError, PermanentDownloadError, VerificationError
from storage.atomic import remove, remove_temporaries_of, write_json
from storage.folders import file_sha256, record_sha256
from storage.layout import DataRoot, file_entry, lock_file, partial_download, partial_download_state
from tasks.reporting import Progress, artifact_key, stage_logger
from tasks.stage import Stage, stage_task

CHUNK_BYTES = 1 << 20
# Bytes before the resume point asked for again when the server gives no validator, and compared with what
# `.part` holds: a changed file differs there unless the change lies wholly after it (the size and sha256
# checks then catch it).
OVERLAP_BYTES = 64 << 10
SYNC_EVERY_BYTES = 32 << 20
# Answers worth another try (RFC 9110: 408 timeout, 429 rate limit, 5xx server trouble).
TRANSIENT_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
JITTER = 0.5  # waits vary by up to half their length, so clients that failed together do not retry together


class Action(enum.Enum):
    """What a call to `download_file` has to do, decided before any request."""

    REUSE = "reuse"  # a verified file is already in place
    RESUME = "resume"  # continue `<name>.part` from its last byte
    START = "start"  # fetch from byte 0


@dataclass(frozen=True)
class PartState:
    """What we knew about the remote file when `<name>.part` was started (its sidecar JSON)."""

    url: str
    etag: str | None = None
    last_modified: str | None = None

    @property
    def validator(self) -> str | None:
        """The If-Range value: the ETag when the server gave a strong one, else Last-Modified."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified


def file_name_from_url(url: str) -> str:
    """The last path component of `url`, e.g. `notMNIST_small.tar.gz`."""
    name = unquote(urlparse(url).path).rstrip("/").rsplit("/", 1)[-1]
    if not name or name in {".", ".."}:
        raise PermanentDownloadError(f"Cannot tell a file name from {url!r}: give a URL that ends in a file name.")
    return name


def verify(path: Path, *, expected_bytes: int | None, sha256: str | None, digest: str | None = None) -> str | None:
    """Return a description of how `path` fails the checks, or None when it passes.

    `digest` is the sha256 already computed while streaming; without it the file is hashed whole.
    """
    size = path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        return f"expected {expected_bytes:,} bytes, got {size:,}"
    if sha256 is not None:
        actual = digest or file_sha256(path)  # as this machine last hashed it, while the file is as it was then
        if actual.lower() != sha256.lower():
            return f"expected sha256 {sha256.lower()}, got {actual}"
    return None


def plan_download(
    target: Path, part: Path, state: PartState | None, url: str, *, expected_bytes: int | None, sha256: str | None
) -> Action:
    """Decide what to do from what is on disk; the only inputs are files, so reruns are safe."""
    if target.exists() and verify(target, expected_bytes=expected_bytes, sha256=sha256) is None:
        return Action.REUSE
    if part.exists() and part.stat().st_size > 0 and state is not None and state.url == url:
        if expected_bytes is None or part.stat().st_size <= expected_bytes:
            return Action.RESUME
    return Action.START


def is_transient(error: BaseException) -> bool:
    """Whether a failed attempt is worth retrying: network trouble, 408, 429 and 5xx, never a 4xx or a bad file."""
    transient = (DownloadError, requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
    return isinstance(error, transient)


class _Transfer:
    """One file's transfer into `<name>.part`, kept across retries so the running hash survives."""

    def __init__(
        self, url: str, target: Path, progress: Progress, timeout: tuple[float, float], hashing: bool,
        expected_bytes: int | None,
    ):
        part = partial_download(target)
        self.url = url
        self.expected_bytes = expected_bytes  # no more than this may be written: a server cannot fill the disk
        self.hashing = hashing  # only worth the CPU when a sha256 is expected
        self.part = part
        self.sidecar = partial_download_state(target)
        self.progress = progress
        self.timeout = timeout
        self.hasher: hashlib._Hash | None = None
        self.hashed_bytes = 0
        self.fetched_bytes = 0

    def load_state(self) -> PartState | None:
        try:
            return PartState(**json.loads(self.sidecar.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def restart(self, state: PartState) -> None:
        """Drop whatever `.part` holds and start at byte 0 with a fresh running hash."""
        self.part.write_bytes(b"")
        write_json(self.sidecar, state.__dict__)
        self.hasher = hashlib.sha256() if self.hashing else None
        self.hashed_bytes = 0
        self.progress.reset(0)

    def digest(self) -> str | None:
        """The streamed sha256 when it covers the whole `.part`, else None (hash the file whole)."""
        if self.hasher is not None and self.hashed_bytes == self.part.stat().st_size:
            return self.hasher.hexdigest()
        return None

    def append(self, chunks) -> None:
        # Two helper threads keep this one free to receive: sha256 (hashlib frees the GIL) and
        # flushing written data to disk as it accumulates, so the final fsync has little left to do.
        # Waiting for the previous chunk's hash keeps at most two chunks in memory.
        pending_hash = pending_sync = None
        unsynced = 0
        with open(self.part, "ab") as handle, ThreadPoolExecutor(2) as helpers:
            try:
                for chunk in chunks:
                    if self.expected_bytes is not None and handle.tell() + len(chunk) > self.expected_bytes:
                        raise self._oversize(f"sent more than the {self.expected_bytes:,} bytes expected")
                    handle.write(chunk)
                    if self.hasher is not None:
                        if pending_hash is not None:
                            pending_hash.result()
                        pending_hash = helpers.submit(self.hasher.update, chunk)
                        self.hashed_bytes += len(chunk)
                    unsynced += len(chunk)
                    if unsynced >= SYNC_EVERY_BYTES and (pending_sync is None or pending_sync.done()):
                        handle.flush()
                        pending_sync = helpers.submit(_data_sync, handle.fileno())
                        unsynced = 0
                    self.fetched_bytes += len(chunk)
                    self.progress.advance(len(chunk))
            finally:
                for pending in (pending_hash, pending_sync):
                    if pending is not None:
                        pending.result()

    def _oversize(self, what: str) -> VerificationError:
        """Delete `.part` and its sidecar; the error for a source that is larger than expected."""
        remove(self.part)
        remove(self.sidecar)
        return VerificationError(
            f"{self.url}: {what}; stopped and deleted the partial download. Check the URL and the expected size."
        )

    def copy_local(self, source: Path) -> None:
        """Copy a local file (a `file://` URL or a path) into `.part`, resuming like HTTP does."""
        if self.expected_bytes is not None and source.stat().st_size > self.expected_bytes:
            raise self._oversize(f"is {source.stat().st_size:,} bytes, more than the {self.expected_bytes:,} expected")
        have = self.part.stat().st_size if self.part.exists() else 0
        if have > source.stat().st_size:
            self.restart(PartState(self.url))
            have = 0
        elif have == 0:
            self.restart(PartState(self.url))
        with open(source, "rb") as handle:
            handle.seek(have)
            self.append(iter(lambda: handle.read(CHUNK_BYTES), b""))

    def fetch(self, session: requests.Session, expected_bytes: int | None) -> None:
        """One HTTP attempt: resume when `.part` and its validator allow it, else start over."""
        state = self.load_state()
        have = self.part.stat().st_size if self.part.exists() else 0
        headers = {"Accept-Encoding": "identity"}  # byte offsets must be those of the file itself
        # Without a validator the server cannot say whether the file changed since `.part` was started: ask again
        # for the bytes before the resume point too, and resume only if they are still the file's.
        overlap = min(OVERLAP_BYTES, have) if have and state is not None and not state.validator else 0
        if have and state is not None:
            headers["Range"] = f"bytes={have - overlap}-"
            if state.validator:
                headers["If-Range"] = state.validator
        with _get(session, self.url, headers, self.timeout) as response:
            status = response.status_code
            if status == 416 and have:
                total = _content_range_total(response.headers.get("Content-Range"))
                if total == have or (total is None and expected_bytes == have):
                    return  # `.part` already holds the whole file: verify it, fetch nothing
                self.restart(state or PartState(self.url))
                raise DownloadError(f"{self.url}: the server refused to resume at byte {have:,}; starting over")
            if status in TRANSIENT_STATUSES:
                raise DownloadError(f"{self.url} answered HTTP {status} {response.reason}")
            if status >= 400:
                raise PermanentDownloadError(
                    f"{self.url} answered HTTP {status} {response.reason}: check the URL "
                    "(and that the file is still published there)."
                )
            remote = PartState(self.url, response.headers.get("ETag"), response.headers.get("Last-Modified"))
            offered = _content_range_total(response.headers.get("Content-Range"))
            if status == 200 and response.headers.get("Content-Length", "").isdigit():
                offered = int(response.headers["Content-Length"])
            if expected_bytes is not None and offered is not None and offered > expected_bytes:
                raise self._oversize(f"offers {offered:,} bytes, more than the {expected_bytes:,} expected")
            if status == 206:
                start = _content_range_start(response.headers.get("Content-Range"))
                changed = state is not None and state.validator and remote.validator not in (None, state.validator)
                if start != have - overlap or changed:
                    # Appending this body would splice two different files or duplicate bytes.
                    self.restart(remote)
                    raise DownloadError(f"{self.url}: the server's partial answer does not continue byte {have:,}")
                if self.hashed_bytes != have:
                    self.hasher = None  # resumed from an earlier process: hash the whole file at the end
                self.progress.reset(have)
                chunks = self._after_overlap(_body_chunks(response), overlap, have, remote)
            else:  # 200: the whole body, even if we asked for a range
                self.restart(remote)
                chunks = _body_chunks(response)
            self.append(chunks)
            total = _content_range_total(response.headers.get("Content-Range"))
            if status == 200 and response.headers.get("Content-Length", "").isdigit():
                total = int(response.headers["Content-Length"])
            if total is not None and self.part.stat().st_size < total:
                raise DownloadError(f"{self.url}: the connection ended at byte {self.part.stat().st_size:,} of {total:,}")


    def _after_overlap(self, chunks: Iterator[bytes], overlap: int, have: int, remote: PartState) -> Iterator[bytes]:
        """The body after its first `overlap` bytes, once those are found equal to the end of `.part`; a file that
        changed on the server restarts from byte 0 instead (never spliced)."""
        if not overlap:
            yield from chunks
            return
        with open(self.part, "rb") as handle:
            handle.seek(have - overlap)
            kept = handle.read(overlap)
        head = b""
        for chunk in chunks:
            if len(head) < overlap:
                head += chunk
                if len(head) < overlap:
                    continue
                head, chunk = head[:overlap], head[overlap:]
                if head != kept:
                    self.restart(remote)
                    raise DownloadError(
                        f"{self.url}: the file changed on the server since byte {have:,} was received (it sends no "
                        "validator to resume by); starting over"
                    )
                if not chunk:
                    continue
            yield chunk


# fdatasync skips the metadata flush; macOS and Windows only have fsync.
_data_sync = getattr(os, "fdatasync", os.fsync)


def _get(session: requests.Session, url: str, headers: dict, timeout: tuple[float, float]) -> requests.Response:
    """The streamed answer to a GET; redirects this client must not follow are a one-line permanent error."""
    try:
        return session.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.TooManyRedirects as error:
        raise PermanentDownloadError(
            f"{url}: more than {session.max_redirects} redirects (a redirect loop?); check the URL."
        ) from error
    except (requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL,
            requests.exceptions.MissingSchema) as error:
        raise PermanentDownloadError(
            f"{url}: redirected to an address this client does not fetch ({error}); "
            "download the file yourself and give its path or a file:// URL."
        ) from error
    except requests.Timeout as error:
        raise DownloadError(f"{url}: no answer within {timeout[1]:g} s") from error
    except requests.ConnectionError as error:
        raise DownloadError(f"{url}: cannot connect ({_reason(error)})") from error


def _reason(error: BaseException) -> str:
    """The innermost cause of a requests error, without the pool and adapter wrapping."""
    while error.__context__ is not None and error.__context__ is not error:
        error = error.__context__
    return str(error).rsplit(": ", 1)[-1] or type(error).__name__


def _body_chunks(response: requests.Response):
    """The body as it arrives: `read1` hands over what came before a dropped connection, so no byte is lost."""
    try:
        while chunk := response.raw.read1(CHUNK_BYTES):
            yield chunk
    except urllib3.exceptions.ReadTimeoutError as error:
        raise DownloadError(f"{response.url}: the transfer stalled (no data within the read timeout)") from error
    except (urllib3.exceptions.HTTPError, OSError) as error:
        raise DownloadError(f"{response.url}: the transfer broke off ({error})") from error


def _content_range_start(header: str | None) -> int | None:
    try:
        return int(header.split()[1].split("-")[0])  # "bytes 100-199/200"
    except (AttributeError, IndexError, ValueError):
        return None


def _content_range_total(header: str | None) -> int | None:
    try:
        return int(header.rsplit("/", 1)[1])  # "bytes */200"
    except (AttributeError, IndexError, ValueError):
        return None


def _local_source(url: str) -> Path | None:
    """The local file behind a `file://` URL or a plain path; None for http(s)."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if len(parsed.scheme) <= 1:  # no scheme, or a Windows drive letter
        return Path(url)
    raise PermanentDownloadError(f"{url}: unsupported URL scheme {parsed.scheme!r}; use http(s), file:// or a path.")


def download_file(
    url: str,
    dest_dir: Path,
    *,
    expected_bytes: int | None = None,
    sha256: str | None = None,
    retries: int = 5,
    backoff_base_seconds: float = 1.0,
    connect_timeout: float = 10.0,
    read_timeout: float = READ_TIMEOUT_SECONDS,
    session: requests.Session | None = None,
) -> Path:
    """Fetch `url` into `dest_dir/<file name>` verified by size and sha256, resuming any `.part`.

    The only retry layer of a download, in the command line and in the flows alike: each attempt
    continues the `.part` (and its running sha256) where the last one stopped.

    Args:
        url: http(s) or file:// URL, or a local path (copied with the same checks).
        dest_dir: folder for the file, its `.part` and its lock.
        expected_bytes: the exact size the file must have (the seed's check).
        sha256: the hex digest the file must have.
        retries: further attempts after a transient failure (connection, timeout, 408, 429, 5xx).
        backoff_base_seconds: first wait between attempts; doubles each time, with Prefect's jitter.
        connect_timeout, read_timeout: seconds to wait for a connection, and for each piece of the body.

    Returns:
        The path of the verified file.
    """
    logger = stage_logger(__name__)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / file_name_from_url(url)
    part = partial_download(target)
    source = _local_source(url)
    if source is not None and not source.is_file():
        raise PermanentDownloadError(f"{url}: no such file.")

    # Two processes fetching into one folder: the second waits here, then finds the verified file.
    with FileLock(str(lock_file(part))):
        for path in (target, part, partial_download_state(target)):
            remove_temporaries_of(path)  # what a killed run was writing
        key = artifact_key("download", target.name)
        with Progress(f"download {target.name}", expected_bytes, key=key, unit="bytes") as progress:
            transfer = _Transfer(
                url, target, progress, (connect_timeout, read_timeout), hashing=sha256 is not None,
                expected_bytes=expected_bytes,
            )
            state = transfer.load_state()
            action = plan_download(target, part, state, url, expected_bytes=expected_bytes, sha256=sha256)
            if action is Action.REUSE:
                logger.info("Found and verified %s", target)
                return target
            if target.exists():
                logger.warning("%s is in place but fails verification; fetching it again", target)
            if action is Action.START:
                remove(part)
            else:
                logger.info("Resuming %s from byte %s", target.name, f"{part.stat().st_size:,}")
            attempt = functools.partial(transfer.copy_local, source) if source else functools.partial(
                transfer.fetch, session or _session(), expected_bytes
            )
            _with_retries(attempt, url, part, retries, backoff_base_seconds, logger)
            return _verify_and_commit(transfer, target, expected_bytes=expected_bytes, sha256=sha256, logger=logger)


def _with_retries(attempt, url: str, part: Path, retries: int, backoff_base_seconds: float, logger) -> None:
    """Call `attempt` until it succeeds, retrying transient failures after exponential, jittered waits."""
    delays = exponential_backoff(backoff_factor=backoff_base_seconds)(retries)
    for number in range(retries + 1):
        try:
            return attempt()
        except Exception as error:
            if not is_transient(error):
                raise
            if number == retries:
                kept = part.stat().st_size if part.exists() else 0
                attempts = f"{retries + 1} attempt{'s' if retries else ''}"
                resume = f"{part.name} keeps the {kept:,} bytes received; rerun to resume." if kept else "Rerun to try again."
                raise DownloadError(f"{url}: still failing after {attempts} ({error}). {resume}") from error
            wait = clamped_poisson_interval(delays[number], clamping_factor=JITTER) if delays[number] else 0.0
            logger.warning("Attempt %d for %s failed (%s); retrying in %.1f s", number + 1, url, error, wait)
            time.sleep(wait)


def _verify_and_commit(transfer: _Transfer, target: Path, *, expected_bytes, sha256, logger) -> Path:
    """Check the finished `.part`, make it durable and rename it into place; delete it when it fails."""
    part = transfer.part
    digest = transfer.digest()
    problem = verify(part, expected_bytes=expected_bytes, sha256=sha256, digest=digest)
    if problem is not None:
        remove(part)
        remove(transfer.sidecar)
        raise VerificationError(
            f"{transfer.url}: {problem}. Deleted the bad download; check the URL and the expected "
            "size/sha256, then rerun."
        )
    with open(part, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(part, target)
    if digest is not None:
        record_sha256(target, digest)  # after the rename, which moves the file's change time
    remove(transfer.sidecar)
    logger.info("Downloaded and verified %s (%s bytes)", target, f"{target.stat().st_size:,}")
    return target


def _session() -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = "notmnist-pipeline"
    return session


def download_to_root(
    root: DataRoot, url: str, *, expected_bytes: int | None = None, sha256: str | None = None,
    retries: int = 5, backoff_base_seconds: float = 1.0, read_timeout: float = READ_TIMEOUT_SECONDS,
) -> dict:
    """Download `url` into the data root's `raw/` (verified, resumed); returns the file's place, size and sha256.

    Where the data root already holds the file, the stage boundary has fetched it into the working
    copy (checked against the data root's sha256), and this finds it in place: the origin is not asked.
    """
    (target,) = _downloaded(root, {"url": url})
    target = download_file(url, target.parent, expected_bytes=expected_bytes, sha256=sha256, retries=retries,
                           backoff_base_seconds=backoff_base_seconds, read_timeout=read_timeout)
    return {"file": root.relative(target), "bytes": target.stat().st_size}


def _downloaded(root: DataRoot, parameters: dict) -> list[Path]:
    return [root.raw / file_name_from_url(parameters["url"])]


def _download_current(root: DataRoot, parameters: dict, manifests: dict[Path, dict]) -> bool:
    """The data root's file passes the expected size and sha256 (hashed here for a local data root)."""
    ((path, manifest),) = manifests.items()
    expected_bytes, sha256 = parameters["expected_bytes"], parameters["sha256"]
    if root.store is None:
        return verify(path, expected_bytes=expected_bytes, sha256=sha256) is None
    entry = file_entry(manifest)
    return (expected_bytes is None or entry["bytes"] == expected_bytes) and (
        sha256 is None or entry["sha256"] == sha256.lower())


# No Prefect retries on top: `download_file` retries itself, keeping the running hash across attempts.
# How a file is fetched does not change what is fetched: retries and timeouts stay out of the key, and
# so does the URL, for its file name alone: the file in the data root, checked against the expected
# size and sha256, is the output whichever mirror served it (as `download_file` itself reuses it), so a
# demo served from a new loopback port each run still finds its downloads cached.
UNKEYED = ("url", "retries", "backoff_base_seconds", "read_timeout")
download_task = stage_task(
    download_to_root,
    stage=Stage(outputs=_downloaded, current=_download_current),
    name="download",
    task_run_name=lambda parameters: f"download {file_name_from_url(parameters['url'])}",
    ignore=UNKEYED,
    keyed_on=lambda parameters: file_name_from_url(parameters["url"]),
)
