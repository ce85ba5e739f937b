"""A data root on object storage (S3 or any S3-compatible service): committed folders without rename.

Object stores cannot rename, so a folder is published in generations:

    <prefix>/<folder>/
      _v-<token>/<files>     one generation: every file of the folder, uploaded first
      _manifest.json         written last, in one PUT: the folder's manifest plus "generation": "_v-<token>"

A reader trusts only what a manifest names: a generation no manifest points to (an upload that was
interrupted, or one replaced since) is ignored. The manifest also records what the store's listing said of
each object right after the upload (size and modification time, `"listed"`), so a listing alone tells
whether an object was deleted, truncated or written again since: a folder is intact by listing when
every object is there with the size and time it had when the folder was committed; its bytes are
checked against the sha256 whenever they are fetched. The next publish of that folder removes the
generation it replaced, and others once they are older than `ABANDONED_AFTER_SECONDS` (so that an
upload another machine is making at the same time is not cut from under it); it never removes the
generation the manifest names. Publishing a new version replaces the manifest in one request, so a
reader sees the old folder or the new one, never a mix; files are checked against the manifest's sizes and sha256 as they are
fetched, exactly as local folders are when read. Files written beside a committed folder (a
model's report and pictures) are single objects under the folder's own prefix.

Endpoint and credentials come from the standard AWS variables: AWS_ENDPOINT_URL (e.g.
http://127.0.0.1:8333 for a local SeaweedFS or MinIO), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN and AWS_REGION; without them, the AWS SDK's usual chain (profiles, instance roles).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
from pyarrow import fs as arrow_fs

from core.errors import CorruptDataError, PipelineError
from storage.atomic import remove, replace, temporary_sibling, write_json
from storage.disk import out_of_space
from storage.folders import MANIFEST

SCHEME = "s3://"
GENERATION_PREFIX = "_v-"
CHUNK_BYTES = 8 << 20
TRANSFER_THREADS = 8  # uploads and downloads wait on the network, not the CPU
ABANDONED_AFTER_SECONDS = 3600.0  # an unnamed generation this old is no upload in progress


class DamagedObjectError(CorruptDataError):
    """An object whose bytes differ from the size and sha256 its manifest recorded."""


def is_object_store(location: str | os.PathLike) -> bool:
    """True for an `s3://bucket/prefix` data root."""
    return str(location).startswith(SCHEME)


def s3_filesystem(environment: Mapping[str, str] | None = None, **options: Any) -> arrow_fs.S3FileSystem:
    """pyarrow's S3 client, configured from the standard AWS variables of `environment` (default: this
    process's), with `options` added."""
    environment = os.environ if environment is None else environment
    if region := environment.get("AWS_REGION") or environment.get("AWS_DEFAULT_REGION"):
        options["region"] = region  # else the AWS SDK's own lookup (profile, instance metadata)
    if endpoint := environment.get("AWS_ENDPOINT_URL_S3") or environment.get("AWS_ENDPOINT_URL"):
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    if (key := environment.get("AWS_ACCESS_KEY_ID")) and (secret := environment.get("AWS_SECRET_ACCESS_KEY")):
        options.update(access_key=key, secret_key=secret, session_token=environment.get("AWS_SESSION_TOKEN"))
    return arrow_fs.S3FileSystem(**options)


class ObjectStore:
    """Committed folders and single files under one `s3://bucket/prefix`."""

    def __init__(
        self, location: str, filesystem: arrow_fs.FileSystem | None = None,
        abandoned_after_seconds: float = ABANDONED_AFTER_SECONDS,
    ):
        if not is_object_store(location):
            raise PipelineError(f"{location!r} is not an s3:// location")
        self.location = location.rstrip("/")
        self.base = self.location[len(SCHEME):]  # bucket/prefix, as pyarrow names it
        if not self.base or self.base.startswith("/"):
            raise PipelineError(f"{location!r} names no bucket: use s3://BUCKET/PREFIX")
        self.fs = filesystem or s3_filesystem()
        self.abandoned_after_seconds = abandoned_after_seconds
        self._bucket_seen = False

    def __reduce__(self):
        # Rebuilt from its location where it is unpickled: the client (and the keys it holds) is not pickled.
        return (type(self), (self.location, None, self.abandoned_after_seconds))

    def url(self, relative: str) -> str:
        """The s3:// URL of a path relative to the data root."""
        return f"{self.location}/{relative}".rstrip("/")

    def _key(self, relative: str) -> str:
        return f"{self.base}/{relative}".rstrip("/")

    # --- reading -------------------------------------------------------------------------------

    def read_bytes(self, relative: str) -> bytes | None:
        """One object's bytes, or None when there is no such object."""
        try:
            with self.fs.open_input_stream(self._key(relative)) as stream:
                return stream.read()
        except FileNotFoundError:
            self._check_bucket()
            return None
        except (OSError, pa.ArrowException) as error:
            raise _access_error(self.url(relative), error) from error

    def _check_bucket(self) -> None:
        """A missing bucket is an error of its own, not an empty data root."""
        if self._bucket_seen:
            return
        bucket = self.base.split("/", 1)[0]
        try:
            found = self.fs.get_file_info(bucket).type != arrow_fs.FileType.NotFound
        except (OSError, pa.ArrowException) as error:
            raise _access_error(f"{SCHEME}{bucket}", error) from error
        if not found:
            raise PipelineError(
                f"The bucket {bucket!r} of {self.location} does not exist, or these credentials cannot see it: "
                "create it first (e.g. `aws s3 mb s3://" + bucket + "`)."
            )
        self._bucket_seen = True

    def manifest(self, folder: str) -> dict | None:
        """The manifest of the committed folder `folder` (relative to the data root), or None."""
        data = self.read_bytes(f"{folder}/{MANIFEST}")
        if data is None:
            return None
        try:
            manifest = json.loads(data)
        except ValueError:
            return None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            return None
        if not str(manifest.get("generation", "")).startswith(GENERATION_PREFIX):
            return None
        return manifest

    def problem(self, folder: str, manifest: dict) -> str | None:
        """The first object of a committed folder that is missing, of another size, or written again since the
        folder was committed (by the listing), or None."""
        found = self._listing(folder, manifest["generation"])
        listed = manifest.get("listed", {})
        for name, entry in manifest["files"].items():
            url = f"{self.url(folder)}/{manifest['generation']}/{name}"
            if name not in found:
                return f"{url} is missing"
            size, mtime = found[name]
            if size != entry["bytes"]:
                return f"{url} has {size:,} bytes, {entry['bytes']:,} were recorded"
            if name in listed and mtime != listed[name]:
                return f"{url} was written again after its folder was committed"
        return None

    def _listing(self, folder: str, generation: str) -> dict[str, tuple[int, float | None]]:
        """Size and modification time of every object of one generation of `folder`, by relative name."""
        prefix = self._key(f"{folder}/{generation}")
        try:
            infos = self.fs.get_file_info(arrow_fs.FileSelector(prefix, recursive=True, allow_not_found=True))
        except (OSError, pa.ArrowException) as error:
            raise _access_error(self.url(folder), error) from error
        return {
            info.path[len(prefix) + 1:]: (info.size, info.mtime.timestamp() if info.mtime is not None else None)
            for info in infos if info.type == arrow_fs.FileType.File
        }

    def download(self, folder: str, manifest: dict, local: Path) -> dict:
        """Copy the committed `folder`, as its `manifest` describes it, into the local folder `local`, every file
        checked as it arrives.

        The copy is written beside `local` and renamed into place with its manifest (without the
        generation), so a local folder is complete or absent; returns that manifest.
        """
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        work = temporary_sibling(local)
        try:
            work.mkdir()
            source = self._key(f"{folder}/{manifest['generation']}")
            self._transfer(lambda name: self._get(f"{source}/{name}", work / name, manifest["files"][name], folder),
                           manifest["files"])
            local_manifest = {key: value for key, value in manifest.items() if key not in ("generation", "listed")}
            write_json(work / MANIFEST, local_manifest)
            replace(work, local)
        finally:
            remove(work)
        return local_manifest

    def download_file(self, folder: str, manifest: dict, local: Path) -> None:
        """Copy the one file of the committed `folder` (a download, published on its own) to the local path
        `local`, checked as it arrives and renamed into place."""
        (name,) = manifest["files"]
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        work = temporary_sibling(local)
        try:
            self._get(self._key(f"{folder}/{manifest['generation']}/{name}"), work, manifest["files"][name], folder)
            replace(work, local)
        finally:
            remove(work)

    def _get(self, key: str, path: Path, entry: dict, folder: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        try:
            with self.fs.open_input_stream(key) as stream, open(path, "wb") as out:
                while chunk := stream.read(CHUNK_BYTES):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
        except FileNotFoundError as error:
            raise CorruptDataError(f"{SCHEME}{key} is missing: {folder} changed while it was read, or was damaged; "
                                   "run again") from error
        except (OSError, pa.ArrowException) as error:
            if out_of_space(error):  # this machine's disk, not the store: the stage boundary names it
                raise
            raise _access_error(f"{SCHEME}{key}", error) from error
        if size != entry["bytes"] or digest.hexdigest() != entry["sha256"]:
            raise DamagedObjectError(f"{SCHEME}{key} does not match the size and sha256 recorded when it was written")

    # --- writing -------------------------------------------------------------------------------

    def upload(self, local: Path, folder: str, manifest: dict, sources: Mapping[str, Path] | None = None) -> dict:
        """Publish the committed local folder `local` as `folder`: a new generation, then its manifest.

        `sources` names the local file of a listed name where it is not `local/<name>`. Generations no
        manifest names any more (older versions, interrupted uploads) are removed afterwards; returns
        the published manifest.
        """
        replaced = (self.manifest(folder) or {}).get("generation")
        generation = f"{GENERATION_PREFIX}{uuid.uuid4().hex[:16]}"
        target = self._key(f"{folder}/{generation}")
        sources = sources or {}
        self._transfer(lambda name: self._put(sources.get(name, Path(local) / name), f"{target}/{name}"),
                       manifest["files"])
        listed = {name: mtime for name, (_, mtime) in self._listing(folder, generation).items()}
        published = {**manifest, "generation": generation, "listed": listed}
        self.write_bytes(f"{folder}/{MANIFEST}", json.dumps(published, indent=1, sort_keys=True).encode())
        self._remove_generations(folder, replaced=replaced)
        return published

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write one object (a single PUT: readers see the old bytes or the new, never part)."""
        try:
            with self.fs.open_output_stream(self._key(relative)) as stream:
                stream.write(data)
        except (OSError, pa.ArrowException) as error:
            raise _access_error(self.url(relative), error) from error

    def put_file(self, path: Path, relative: str) -> None:
        """Upload one local file as the object `relative`."""
        self._put(Path(path), self._key(relative))

    def _put(self, path: Path, key: str) -> None:
        try:
            source = open(path, "rb")  # a local file that cannot be read is the caller's error, not the store's
        except OSError as error:
            raise PipelineError(f"Cannot publish {path}: {error.strerror or error}") from error
        try:
            with source, self.fs.open_output_stream(key) as stream:
                while chunk := source.read(CHUNK_BYTES):
                    stream.write(chunk)
        except (OSError, pa.ArrowException) as error:
            raise _access_error(f"{SCHEME}{key}", error) from error

    def delete_object(self, relative: str) -> None:
        """Remove one object, if it is there."""
        try:
            self.fs.delete_file(self._key(relative))
        except FileNotFoundError:
            pass
        except (OSError, pa.ArrowException) as error:
            raise _access_error(self.url(relative), error) from error

    def sweep(self) -> list[str]:
        """Remove the generations no manifest names that nobody has written to for `abandoned_after_seconds` (uploads
        cut short, anywhere under the data root, also of folders no stage publishes again); returns their URLs.

        One listing of the data root; a manifest is read only for a folder holding such a generation.
        """
        try:
            infos = self.fs.get_file_info(arrow_fs.FileSelector(self.base, recursive=True, allow_not_found=True))
        except (OSError, pa.ArrowException) as error:
            raise _access_error(self.location, error) from error
        newest: dict[tuple[str, str], float] = {}  # (folder, generation) -> the newest write under it
        for info in infos:
            if info.type != arrow_fs.FileType.File:
                continue
            parts = info.path[len(self.base) + 1:].split("/")
            at = next((number for number, part in enumerate(parts) if part.startswith(GENERATION_PREFIX)), None)
            if at is None:
                continue
            key = ("/".join(parts[:at]), parts[at])
            written = info.mtime.timestamp() if info.mtime is not None else time.time()
            newest[key] = max(newest.get(key, 0.0), written)
        removed = []
        for (folder, generation), written in sorted(newest.items()):
            if time.time() - written < self.abandoned_after_seconds:
                continue
            if (self.manifest(folder) or {}).get("generation") == generation:
                continue
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_dir(self._key(f"{folder}/{generation}"))
            removed.append(self.url(f"{folder}/{generation}"))
        return removed

    def check_writable(self) -> None:
        """Raise PipelineError, in one line saying what to do, unless the bucket exists and takes a write here."""
        self._bucket_seen = False
        self._check_bucket()
        probe = f"_prefect/probe-{uuid.uuid4().hex}"
        self.write_bytes(probe, b"")
        self.delete_object(probe)

    def delete(self, folder: str) -> None:
        """Remove a folder: its manifest first (so it stops being committed), then every object under it."""
        replaced = (self.manifest(folder) or {}).get("generation")
        self.delete_object(f"{folder}/{MANIFEST}")
        self._remove_generations(folder, replaced=replaced)

    def _remove_generations(self, folder: str, replaced: str | None) -> None:
        """Remove `replaced` and generations left long enough to be abandoned, never the one the manifest names."""
        named = (self.manifest(folder) or {}).get("generation")  # read again: another writer may have committed
        prefix = self._key(folder)
        try:
            for info in self.fs.get_file_info(arrow_fs.FileSelector(prefix, recursive=False, allow_not_found=True)):
                name = info.path[len(prefix) + 1:]
                if not name.startswith(GENERATION_PREFIX) or name == named or info.type != arrow_fs.FileType.Directory:
                    continue
                if name == replaced or self._untouched_for(info.path, self.abandoned_after_seconds):
                    with contextlib.suppress(FileNotFoundError):  # some stores list a prefix emptied a moment ago
                        self.fs.delete_dir(info.path)
        except (OSError, pa.ArrowException) as error:
            raise _access_error(self.url(folder), error) from error

    def _untouched_for(self, prefix: str, seconds: float) -> bool:
        """True when no object under `prefix` was written in the last `seconds`."""
        newest = max(
            (info.mtime.timestamp() for info in self.fs.get_file_info(
                arrow_fs.FileSelector(prefix, recursive=True, allow_not_found=True)
            ) if info.type == arrow_fs.FileType.File and info.mtime is not None),
            default=0.0,
        )
        return time.time() - newest >= seconds

    @staticmethod
    def _transfer(action, names: Iterable[str]) -> None:
        names = list(names)
        with ThreadPoolExecutor(max_workers=max(1, min(TRANSFER_THREADS, len(names)))) as pool:
            for _ in pool.map(action, names):
                pass


# What the AWS SDK's error names mean for the person running the pipeline.
_REFUSED_KEYS = ("SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId", "ACCESS_DENIED",
                 "AccessDenied", "HTTP status 403")
_UNREACHABLE = ("NETWORK_CONNECTION", "Could not connect", "Couldn't resolve host", "Timeout was reached")


def _access_error(url: str, error: OSError) -> PipelineError:
    """One line for a failed request: what failed, why as far as the SDK says, and what to check."""
    text = str(error)
    detail = next(iter(text.strip().splitlines()), type(error).__name__)
    if any(marker in text for marker in _UNREACHABLE):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS endpoint"
        return PipelineError(f"Cannot reach {endpoint} for {url}: check AWS_ENDPOINT_URL and that the server runs "
                             f"({detail})")
    if any(marker in text for marker in _REFUSED_KEYS):
        return PipelineError(f"The object store refused these credentials for {url}: check AWS_ACCESS_KEY_ID and "
                             f"AWS_SECRET_ACCESS_KEY ({detail})")
    return PipelineError(
        f"Cannot access {url}: {detail} (check AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and "
        "that the bucket exists)"
    )
