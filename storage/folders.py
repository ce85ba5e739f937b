"""Committed folders: a folder of files whose manifest, written last, records each file's size and sha256.

Every output folder of the data root (a letter's shards, a split folder, a model folder) follows one
contract:

    <folder>/
      <files>             written first, inside a temporary folder renamed into place whole
      _manifest.json      written last: {"kind", "format", "files": {name: {"bytes", "sha256"}}, ...}

A folder without a readable manifest of the expected kind and format is not finished; a file whose
size or sha256 differs from the manifest's is corrupt, even when its size is right. Readers check
before they use a byte (`verify_file`, `read_verified`), so damage is an error that names the file,
never a silent input to the next stage. The leading underscore keeps the manifest out of what
pyarrow, pandas and DuckDB read as a Parquet dataset.

Checking that a folder is still intact (the cache check of every rerun) need not hash it again:
beside the manifest, `.identities.json` records what this machine saw of each file when it last hashed
it (size, modification and change times in nanoseconds, inode). A file whose identity is unchanged is
taken as intact (`folder_problem(..., trusting=True)`); any other is hashed, and recorded again when it
matches. Bytes read for use are always hashed (`verify_file`, `read_verified`), so damage that keeps a
file's size, times and inode (which takes more than a write: a write moves the change time) is caught
when the file is used. The record is this machine's: it is not in the manifest, nor on object storage.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from core.errors import CorruptDataError
from storage.arrays import NpyRows
from storage.atomic import read_json, remove, replace, temporary_sibling, write_json
from storage.digests import sha256_of, stat_identity

MANIFEST = "_manifest.json"
IDENTITIES = ".identities.json"


def describe_files(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each named file of `folder`, as a manifest records them (hashed on all cores)."""
    names = list(names)
    with ThreadPoolExecutor(max_workers=_threads(len(names))) as pool:
        digests = list(pool.map(lambda name: sha256_of(folder / name), names))
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": digest} for name, digest in zip(names, digests)}


def files_under(folder: Path) -> list[str]:
    """The files of `folder` and its subfolders, as sorted relative names with forward slashes (the manifest's
    own file left out): what a manifest lists."""
    folder = Path(folder)
    return sorted(
        path.relative_to(folder).as_posix() for path in folder.rglob("*")
        if path.is_file() and path.name not in (MANIFEST, IDENTITIES)
    )


def _threads(files: int) -> int:
    """Threads to hash `files` files with: hashlib and file reads release the GIL, so each core hashes one."""
    return max(1, min(files, os.cpu_count() or 1))


def write_manifest(folder: Path, kind: str, format_version: int, files: dict[str, dict], **fields: Any) -> dict:
    """Write `folder`'s manifest: `files` as `describe_files` gave them, and `fields`. Call it last; returns it."""
    manifest = {"kind": kind, "format": format_version, **fields, "files": files}
    write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path, kind: str, format_version: int) -> dict | None:
    """The manifest of a finished folder of this kind and format, or None (absent, unreadable, other kind)."""
    try:
        manifest = read_json(Path(folder) / MANIFEST)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    if manifest.get("kind") != kind or manifest.get("format") != format_version:
        return None
    return manifest


def file_problem(folder: Path, manifest: dict, name: str) -> str | None:
    """How `folder/name` differs from what the manifest recorded, or None when it matches."""
    recorded = manifest["files"].get(name)
    if recorded is None:
        return f"{name} is not listed in {Path(folder) / MANIFEST}"
    path = Path(folder) / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path} is missing"
    return _difference(path, recorded, size, lambda: sha256_of(path))


def _difference(path: Path, recorded: dict, size: int, sha256: Callable[[], str]) -> str | None:
    """How a file of `size` bytes (and the digest `sha256()` gives, when the size matches) differs from `recorded`."""
    if size != recorded["bytes"]:
        return f"{path} has {size:,} bytes, {recorded['bytes']:,} were recorded"
    if sha256() != recorded["sha256"]:
        return f"{path} does not match the sha256 recorded when it was written"
    return None


def folder_problem(folder: Path, manifest: dict, *, trusting: bool = False) -> str | None:
    """The first file of `folder` that differs from its manifest, or None when all match (checked on all cores).

    With `trusting`, a file whose identity is as recorded when it was last hashed is not hashed again (see the
    module docstring), and the files hashed and found intact are recorded.
    """
    names = list(manifest["files"])
    # Taken before hashing: a file changed while it is hashed must not be recorded as the bytes that were hashed.
    seen = {name: _identity(Path(folder) / name, manifest["files"][name]) for name in names} if trusting else {}
    known = _identities(folder) if trusting else {}
    unknown = [name for name in names if seen.get(name) is None or known.get(name) != seen[name]]
    with ThreadPoolExecutor(max_workers=_threads(len(unknown))) as pool:
        problems = pool.map(lambda name: file_problem(folder, manifest, name), unknown)
        problem = next((problem for problem in problems if problem is not None), None)
    if trusting and problem is None and unknown:
        record_identities(folder, manifest, seen)
    return problem


def record_identities(folder: Path, manifest: dict, seen: dict[str, list | None] | None = None) -> None:
    """Record the identity of each file of `folder`, which its caller has just found intact: as it was when it was
    hashed (`seen`), and only where it has not changed since."""
    identities = {}
    for name, entry in manifest["files"].items():
        now = _identity(Path(folder) / name, entry)
        if now is not None and (seen is None or seen.get(name) == now):
            identities[name] = now
    _write_identities(Path(folder), identities)


def file_sha256(path: Path) -> str:
    """The sha256 of the single file `path` (a download): as recorded when its identity is unchanged since it was
    last hashed, else hashed now (and recorded, when the file did not change while it was read)."""
    path = Path(path)
    recorded = _identities(path.parent).get(path.name)
    if recorded is not None and recorded == _identity(path, {"sha256": recorded[-1]}):
        return recorded[-1]
    seen = _identity(path, {})
    digest = sha256_of(path)
    if seen is not None and seen == _identity(path, {}):
        record_sha256(path, digest)
    return digest


def record_sha256(path: Path, sha256: str) -> None:
    """Record the single file `path`'s identity with the sha256 its caller has just computed."""
    path = Path(path)
    if (identity := _identity(path, {"sha256": sha256})) is not None:
        _write_identities(path.parent, {**_identities(path.parent), path.name: identity})


def _write_identities(folder: Path, identities: dict) -> None:
    if not folder.is_dir():
        return  # replaced or removed meanwhile: nothing to record, and no folder to make again
    try:
        write_json(folder / IDENTITIES, identities)
    except OSError:
        pass  # a folder this process may not write (or a full disk): the next check hashes again


def _identities(folder: Path) -> dict:
    try:
        recorded = read_json(Path(folder) / IDENTITIES)
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _identity(path: Path, entry: dict) -> list | None:
    """What identifies the file's bytes on this machine short of reading them, with the sha256 they had."""
    try:
        status = path.stat()
    except OSError:
        return None
    return [*stat_identity(status), entry.get("sha256")]


def verify_file(folder: Path, manifest: dict, name: str, remedy: str) -> Path:
    """`folder/name`, after checking it against the manifest; CorruptDataError (saying `remedy`) when it differs."""
    if (problem := file_problem(folder, manifest, name)) is not None:
        raise CorruptDataError(f"{problem}: {remedy}")
    return Path(folder) / name


def read_verified(folder: Path, manifest: dict, name: str, remedy: str) -> bytes:
    """The bytes of `folder/name`, read once and checked against the manifest (CorruptDataError when they differ)."""
    path, recorded = Path(folder) / name, manifest["files"].get(name)
    if recorded is None:
        raise CorruptDataError(f"{name} is not listed in {Path(folder) / MANIFEST}: {remedy}")
    try:
        data = path.read_bytes()
    except FileNotFoundError as error:
        raise CorruptDataError(f"{path} is missing: {remedy}") from error
    if len(data) != recorded["bytes"] or hashlib.sha256(data).hexdigest() != recorded["sha256"]:
        raise CorruptDataError(f"{path} does not match the size and sha256 recorded when it was written: {remedy}")
    return data


def open_verified_rows(folder: Path, manifest: dict, name: str, remedy: str) -> NpyRows:
    """The NPY file `folder/name` opened for reading rows on demand, hashed through the handle those reads use and
    checked against the manifest (CorruptDataError when it differs or when it changes later)."""
    path, recorded = Path(folder) / name, manifest["files"].get(name)
    if recorded is None:
        raise CorruptDataError(f"{name} is not listed in {Path(folder) / MANIFEST}: {remedy}")
    try:
        rows = NpyRows(path, remedy=remedy)
    except FileNotFoundError as error:
        raise CorruptDataError(f"{path} is missing: {remedy}") from error
    except ValueError as error:  # a header that does not parse, or a size it does not give
        raise CorruptDataError(f"{file_problem(folder, manifest, name) or error}: {remedy}") from error
    if (problem := _difference(path, recorded, rows.file_bytes, rows.sha256)) is not None:
        raise CorruptDataError(f"{problem}: {remedy}")
    return rows


def manifest_identity(manifest: dict) -> str:
    """A short, stable identity of a committed folder's content: the sha256 of its manifest's files listing."""
    listing = sorted((name, entry["sha256"]) for name, entry in manifest["files"].items())
    return hashlib.sha256(repr(listing).encode()).hexdigest()


def commit_folder(
    work: Path, final: Path, kind: str, format_version: int, names: Iterable[str],
    derived: Callable[[dict[str, dict]], dict[str, Any]] | None = None, **fields: Any,
) -> dict:
    """Describe the `names` files of `work`, write its manifest last (with `fields`, and what `derived(files)`
    adds), and rename it onto `final`; returns the manifest."""
    files = describe_files(work, names)
    manifest = write_manifest(work, kind, format_version, files, **(derived(files) if derived else {}), **fields)
    Path(final).parent.mkdir(parents=True, exist_ok=True)
    replace(work, final)
    record_identities(final, manifest)  # just hashed: the next check need not hash them again
    return manifest


class FolderWriter:
    """Writes a committed folder: files go into a temporary sibling (`work`); `commit` lists them all in the
    manifest, last, and renames the folder into place. Leaving the `with` block without committing (an
    error, a crash) leaves nothing under the final name.
    """

    def __init__(self, folder: Path, kind: str, format_version: int):
        self.folder, self.kind, self.format_version = Path(folder), kind, format_version
        self.work = temporary_sibling(self.folder)

    def __enter__(self):
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.work.mkdir()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        remove(self.work)

    def commit(self, **fields: Any) -> dict:
        """Describe every file written (in subfolders too), write the manifest and put the folder in place;
        returns the manifest."""
        manifest = self.seal(**fields)
        self.place()
        return manifest

    def seal(self, **fields: Any) -> dict:
        """Everything `commit` does but the rename: the folder is finished but not yet in place (`place` puts it
        there). Several folders that belong together are all sealed first, so that a full disk or a bad file
        leaves none of them in place."""
        files = describe_files(self.work, files_under(self.work))
        self._manifest = write_manifest(self.work, self.kind, self.format_version, files, **self.fields(files), **fields)
        return self._manifest

    def place(self) -> None:
        """Rename the sealed folder into place (replacing an earlier one)."""
        replace(self.work, self.folder)
        record_identities(self.folder, self._manifest)  # just hashed: the next check need not hash them again

    def fields(self, files: dict[str, dict]) -> dict[str, Any]:
        """Fields derived from the written files, for a kind of folder to add to its manifest."""
        return {}
