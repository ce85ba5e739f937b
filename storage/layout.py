"""Where everything lives under the data root; no other module builds a path inside it.

    <data root>/
      raw/<archive>                 downloaded files (and <name>.part while downloading)
      extracted/<top folder>/       extracted archives, one folder per class, and .extracted.json
      packed/<archive>/<letter>/    one letter's PNG files, as the archive held them, and _manifest.json
      shards/<archive>/<letter>/    Parquet shards of one letter and _manifest.json
      splits/<key>/                 train/valid/test NPY files and _manifest.json
      models/<key>/                 the model, metrics.json, record.json, _manifest.json, report.md
      models/<key>.backup/          while training: the last finished epoch's checkpoint
      source/                       the demo's generated archives

Manifests and records name files relative to the data root (or to their own folder), never by
absolute path, so a data root can be moved or copied and still describes itself.

A data root may also be an object store (`s3://bucket/prefix`, storage/objects.py). Stages then
work in a local working copy with the same layout (the scratch folder: downloads, extraction and
everything being written), and each committed folder is published to the store once it is
finished; a machine that needs a folder it did not make (a GPU worker, its splits) fetches it from
the store, every file checked against the manifest. For a local data root, publishing and fetching
do nothing: the working copy is the data root.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from filelock import FileLock

from core.errors import CorruptDataError, PipelineError
from storage.atomic import read_json
from storage.folders import MANIFEST, describe_files, file_sha256, files_under, folder_problem
from storage.objects import DamagedObjectError, ObjectStore, is_object_store

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
REPORT_FILE = "report.md"
BACKUP_SUFFIX = ".backup"
PART_SUFFIX = ".part"
FETCH_ATTEMPTS = 3  # a folder published again while it is fetched is fetched again, up to this often
SINGLE_FILE = "file"  # the object of a file published on its own (a download), in its generation
RECORDS = "_prefect/records"  # Prefect's cache records of the stages that wrote this data root
LOCKS = ".locks"  # lock files, one folder beside what they guard, never a data file


def file_manifest(path: Path, entry: dict) -> dict:
    """The manifest of a file published on its own (a download): its one object, under a name of its own."""
    return {"kind": "file", "format": 1, "single_file": True, "name": Path(path).name, "files": {SINGLE_FILE: entry}}


def file_entry(manifest: dict) -> dict:
    """The size and sha256 of the file a `file_manifest` describes (sha256 None: a local file, not hashed here)."""
    return manifest["files"][SINGLE_FILE]


def same_manifest(first: dict, second: dict) -> bool:
    """True when two manifests of a folder describe the same thing (what only the store adds left out)."""
    def own(manifest: dict) -> dict:
        return {key: value for key, value in manifest.items() if key not in ("generation", "listed")}

    return own(first) == own(second)


def lock_file(path: Path, purpose: str = "") -> Path:
    """The lock guarding `path` (for `purpose`, when one path has several), in the `.locks` folder beside it."""
    path = Path(path)
    folder = path.parent / LOCKS
    folder.mkdir(parents=True, exist_ok=True)
    return folder / (f"{path.name}.{purpose}.lock" if purpose else f"{path.name}.lock")


def archive_stem(archive: str | Path) -> str:
    """`notMNIST_large.tar.gz` -> `notMNIST_large` (the seed's `maybe_extract` naming)."""
    name = Path(archive).name
    stem = next((name[: -len(suffix)] for suffix in ARCHIVE_SUFFIXES if name.endswith(suffix)), name)
    if stem in ("", ".", ".."):  # it would name the folder above, not one of its own
        raise PipelineError(f"{name!r} cannot name an archive's folders: rename it, e.g. notMNIST_large.tar.gz")
    return stem


def short_digest(document: Any, length: int = 12) -> str:
    """The first `length` hex digits of the sha256 of `document` as sorted JSON."""
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:length]


def splits_key(sizes: dict[str, int], seed: int, dedup: str, inputs_identity: str) -> str:
    """The name of the split folder of these sizes, seed, dedup mode and input shards."""
    return (
        f"train{sizes['train']}-valid{sizes['valid']}-test{sizes['test']}-seed{seed}-{dedup}-{inputs_identity[:12]}"
    )


def mnist_splits_key(npz_sha256: str) -> str:
    """The name of the split folder made from one `mnist.npz`."""
    return f"mnist-{npz_sha256[:12]}"


def model_key(experiment: str, dataset_fingerprint: str, training: dict[str, Any]) -> str:
    """The name of the model folder of one experiment, dataset and set of training parameters."""
    return f"{experiment}-{dataset_fingerprint[:12]}-{short_digest(training, 8)}"


def user_cache() -> Path:
    """This machine's folder for what the project keeps only to save work: working copies, drawn pictures."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "notmnist"


def default_scratch(location: str) -> Path:
    """The local working copy of an object-store data root: under the user's cache folder, one per location."""
    return user_cache() / location.replace("://", "/", 1)


class DataRoot:
    """The data root, the system of record: a local folder, or an `s3://` location with a local working copy.

    It travels as one value: pickled, it is its location and the scratch folder as given (none: each
    machine that unpickles it works in its own default working copy; a given one is that folder on
    every machine); `location` alone is its identity in cache keys (for a local data root, its
    absolute path). Stages work in `root` (the working copy; for a local data root, the
    data root itself) and go through `fetch` and `publish` for everything the data root holds.
    """

    def __init__(self, location: str | os.PathLike, scratch: str | os.PathLike | None = None):
        given = str(location)
        self.store = ObjectStore(given) if is_object_store(given) else None
        self.scratch = None if scratch is None else str(scratch)
        if self.store is not None:
            self.location = self.store.location
            self.root = Path(self.scratch or default_scratch(self.location)).expanduser().resolve()
        else:
            self.root = Path(given).expanduser().resolve()
            self.location = str(self.root)

    @classmethod
    def of(cls, value: DataRoot | str | os.PathLike, scratch: str | os.PathLike | None = None) -> DataRoot:
        """`value` itself when it is a DataRoot, else the data root it names."""
        return value if isinstance(value, DataRoot) else cls(value, scratch)

    def __reduce__(self):
        return (type(self), (self.location, self.scratch))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DataRoot) and (self.location, self.root) == (other.location, other.root)

    def __hash__(self) -> int:
        return hash((self.location, self.root))

    def __repr__(self) -> str:
        return f"DataRoot({self.location!r})" + (f" working in {self.root}" if self.store else "")

    def url(self, path: Path) -> str:
        """Where `path` of the working copy is in the data root: an s3:// URL, or the local path itself."""
        return self.store.url(self.relative(path)) if self.store else str(Path(path).resolve())

    def check_writable(self) -> None:
        """Raise PipelineError, in one line saying what to do, unless this machine can write to the data root."""
        if self.store is not None:
            self.store.check_writable()
            return
        probe = self.root / f".probe-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise PipelineError(
                f"Cannot write to the data root {self.root}: {error.strerror or error}. Choose a folder you can write "
                "to (--data-dir), or fix its permissions."
            ) from error

    # --- the data root's committed folders, and this machine's working copy of them ------------------

    def committed(self, path: Path, *, verify: bool = True) -> dict | None:
        """The data root's manifest of `path` (a committed folder, or a download published on its own) when it is
        intact (see `commit_state`; `verify=False` skips hashing a local folder's files), else None."""
        return self.commit_state(path, verify=verify)[0]

    def commit_state(self, path: Path, *, verify: bool = True) -> tuple[dict | None, str | None]:
        """(the manifest of `path` in the data root when it is intact, what is damaged when it is not).

        Intact: on an object store, every object is there as it was committed (by the listing; bytes are
        checked when fetched); in a local data root, every file matches its sha256 (with `verify`), or is as
        this machine recorded it when it last did (storage/folders.py: its size, times and inode). A
        local file without a manifest (a download) is described by its size alone; its stage checks it.
        """
        path = Path(path)
        if self.store is None:
            if path.is_file():
                return file_manifest(path, {"bytes": path.stat().st_size, "sha256": None}), None
            try:
                manifest = read_json(path / MANIFEST)
            except (OSError, ValueError):
                return None, None
            if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
                return None, None
            problem = folder_problem(path, manifest, trusting=True) if verify else None
            return (manifest, None) if problem is None else (None, problem)
        relative = self.relative(path)
        manifest = self.store.manifest(relative)
        if manifest is None:
            return None, None
        problem = self.store.problem(relative, manifest)
        return (manifest, None) if problem is None else (None, problem)

    def fetch(self, path: Path) -> bool:
        """Make the working copy of `path` (a committed folder, or a download published on its own) the data root's:
        downloaded and verified, unless the copy already holds that content intact; False when the data root
        holds no such thing. Local data roots: True when it exists. One process at a time fetches a path.

        An object whose bytes differ from its manifest is damage: the folder is taken out of the data root
        (its manifest removed), so that the stage that writes it runs again, and the error says so.
        """
        path = Path(path)
        if self.store is None:
            return path.exists()
        published = self.committed(path)
        if published is None:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        relative = self.relative(path)
        with FileLock(str(lock_file(path, "fetch"))):
            for _ in range(FETCH_ATTEMPTS):
                single = published.get("single_file", False)
                if self._holds(path, published, single):
                    return True
                try:
                    if single:
                        self.store.download_file(relative, published, path)
                    else:
                        self.store.download(relative, published, path)
                    return True
                except CorruptDataError as error:
                    now = self.store.manifest(relative)
                    if now is not None and now["generation"] != published["generation"]:
                        published = now  # published again while it was read: fetch the new generation
                        continue
                    if not isinstance(error, DamagedObjectError):
                        raise
                    # Still the named generation, and its bytes are not those recorded: damage, not a race.
                    self.store.delete(relative)
                    raise CorruptDataError(
                        f"{error}: {self.url(path)} was damaged in the data root and has been taken out of it; "
                        "rerun, and the stage that writes it runs again"
                    ) from error
        raise CorruptDataError(f"{self.url(path)} changed {FETCH_ATTEMPTS} times while it was read: rerun")

    def _holds(self, path: Path, published: dict, single: bool) -> bool:
        """True when the working copy at `path` already holds exactly what `published` describes, intact."""
        if single:
            entry = file_entry(published)
            return path.is_file() and path.stat().st_size == entry["bytes"] and file_sha256(path) == entry["sha256"]
        try:
            local = read_json(path / MANIFEST)
        except (OSError, ValueError):
            return False
        return same_manifest(local, published) and folder_problem(path, local, trusting=True) is None

    def publish(self, path: Path, *, describe: bool = False) -> str | None:
        """Publish a committed folder of the working copy (or, for a file such as a download, the file on its own),
        unless the data root already holds this very content intact; returns what was damaged in the data root
        when the upload replaced a damaged copy, else None.

        With `describe`, the folder is one that changes in place (a training's checkpoint): its files
        are described now, for the published manifest, instead of read from a manifest of its own.
        """
        if self.store is None:
            return None
        path, sources = Path(path), None
        if path.is_file():
            # One object under a name of its own: some stores list a `.gz` object by its stored size.
            local, sources = path.parent, {SINGLE_FILE: path}
            (entry,) = describe_files(path.parent, [path.name]).values()
            manifest = file_manifest(path, entry)
        else:
            local = path
            manifest = (
                {"kind": "working", "format": 1, "files": describe_files(path, files_under(path))}
                if describe else read_json(path / MANIFEST)
            )
        published, damage = self.commit_state(path)
        if published is not None and same_manifest(published, manifest):
            return None
        self.store.upload(local, self.relative(path), manifest, sources)
        return damage

    def attach(self, path: Path) -> None:
        """Copy one file written beside a committed folder (a report, a picture) to the data root."""
        if self.store is not None:
            self.store.put_file(path, self.relative(path))

    def discard(self, folder: Path) -> None:
        """Remove the data root's copy of a working folder (a training's checkpoint, once the model is in)."""
        if self.store is not None:
            self.store.delete(self.relative(folder))

    # --- Prefect's cache records, kept in the data root so that every machine finds them ---------------

    def record_location(self, key: str) -> str:
        """Where the cache record stored under `key` lives: an s3:// URL or a local path."""
        return self.url(self.root / RECORDS / key)

    @property
    def raw(self) -> Path:
        """Downloaded files."""
        return self.root / "raw"

    @property
    def extracted(self) -> Path:
        """Extracted archives, each in the top folder its archive holds."""
        return self.root / "extracted"

    @property
    def source(self) -> Path:
        """The demo's generated archives, served from here."""
        return self.root / "source"

    def packed(self, archive: str | Path) -> Path:
        """One archive's packed letters, named after it (`packed/notMNIST_large`): the decode tasks' inputs."""
        return self.root / "packed" / archive_stem(archive)

    def shards(self, archive: str | Path) -> Path:
        """Shards of one archive, named after it (`shards/notMNIST_large`)."""
        return self.root / "shards" / archive_stem(archive)

    @property
    def splits_root(self) -> Path:
        """Where split folders go, one per input and parameter set."""
        return self.root / "splits"

    def splits(self, key: str) -> Path:
        """One split folder."""
        return self.splits_root / key

    @property
    def models_root(self) -> Path:
        """Where model folders go."""
        return self.root / "models"

    def model(self, key: str) -> Path:
        """One model folder."""
        return self.models_root / key

    def relative(self, path: Path) -> str:
        """`path` relative to the data root, with forward slashes, as manifests and records store it."""
        return Path(path).resolve().relative_to(self.root).as_posix()


def partial_download(target: Path) -> Path:
    """Where the bytes of `target` go while it downloads (`<name>.part`), resumed by the next attempt."""
    target = Path(target)
    return target.with_name(target.name + PART_SUFFIX)


def partial_download_state(target: Path) -> Path:
    """What was known of the remote file when `<name>.part` was started (its validators), beside it."""
    part = partial_download(target)
    return part.with_name(part.name + ".json")


def backup_folder(model_dir: Path) -> Path:
    """Where the checkpoint of an unfinished training of `model_dir` lives: a sibling that survives a crash."""
    model_dir = Path(model_dir)
    return model_dir.with_name(model_dir.name + BACKUP_SUFFIX)


def report_file(model_dir: Path) -> Path:
    """The markdown report the flows write beside a finished model."""
    return Path(model_dir) / REPORT_FILE
