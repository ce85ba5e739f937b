"""Small records kept at a location of the data root (Prefect's cache records): read, written whole, removed.

A location is an s3:// URL or a local path, as `DataRoot.record_location` gives it, so that whatever
holds a location alone (a record's key) can reach it from any machine. A record is written in one
request (object stores) or to a temporary name renamed into place (folders): a reader sees the old
record or the new one, never part of one.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from storage.atomic import atomic_path
from storage.objects import SCHEME, ObjectStore, is_object_store

# The variables that choose an S3 client: a client is reused only while they are as they were.
_CLIENT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                     "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")


@functools.lru_cache(maxsize=16)
def _bucket(bucket: str, environment: tuple) -> ObjectStore:
    return ObjectStore(f"{SCHEME}{bucket}")


def _object(location: str) -> tuple[ObjectStore, str]:
    bucket, _, key = location[len(SCHEME):].partition("/")
    return _bucket(bucket, tuple(os.environ.get(name) for name in _CLIENT_VARIABLES)), key


def read_record(location: str) -> bytes | None:
    """The record at `location`, or None when there is none."""
    if is_object_store(location):
        store, key = _object(location)
        return store.read_bytes(key)
    try:
        return Path(location).read_bytes()
    except FileNotFoundError:
        return None


def write_record(location: str, data: bytes) -> None:
    """Write the record at `location` whole."""
    if is_object_store(location):
        store, key = _object(location)
        store.write_bytes(key, data)
        return
    # Renamed into place, not synced: a record lost to a power cut (or torn, and then refused as unreadable) only
    # costs its stage a run, and a sync per task run cost the suite seconds on this machine's disk.
    with atomic_path(Path(location)) as temporary:
        temporary.write_bytes(data)


def delete_record(location: str) -> None:
    """Remove the record at `location`, if there is one."""
    if is_object_store(location):
        store, key = _object(location)
        store.delete_object(key)
    else:
        Path(location).unlink(missing_ok=True)
