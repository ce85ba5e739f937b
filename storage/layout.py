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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from core.errors import PipelineError
from storage.atomic import read_json
from storage.folders import MANIFEST, describe_files, files_under, folder_problem, manifest_identity
from storage.objects import ObjectStore, is_object_store

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
REPORT_FILE = "report.md"
BACKUP_SUFFIX = ".backup"


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


def default_scratch(location: str) -> Path:
    """The local working copy of an object-store data root: under the user's cache folder, one per location."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "notmnist" / location.replace("://", "/", 1)


@dataclass(frozen=True)
class DataRoot:
    """The data root's layout: a local folder, or an `s3://` location with a local working copy (`scratch`)."""

    root: Path
    scratch: Path | None = None
    store: ObjectStore | None = field(default=None, init=False, compare=False)
    location: str = field(default="", init=False)

    def __post_init__(self) -> None:
        given = str(self.root)
        store = ObjectStore(given) if is_object_store(given) else None
        root = (self.scratch or default_scratch(store.location)) if store else self.root
        object.__setattr__(self, "store", store)
        object.__setattr__(self, "root", Path(root).expanduser().resolve())
        object.__setattr__(self, "location", store.location if store else str(self.root))

    def url(self, path: Path) -> str:
        """Where `path` of the working copy is in the data root: an s3:// URL, or the local path itself."""
        return self.store.url(self.relative(path)) if self.store else str(Path(path).resolve())

    # --- publishing to, and fetching from, an object-store data root ----------------------------

    def publish(self, folder: Path, *, describe: bool = False) -> None:
        """Publish a committed folder of the working copy, unless the data root already holds this very content.

        With `describe`, the folder is one that changes in place (a training's checkpoint): its files
        are described now, for the published manifest, instead of read from a manifest of its own.
        """
        if self.store is None:
            return
        folder = Path(folder)
        if describe:
            manifest = {"kind": "working", "format": 1, "files": describe_files(folder, files_under(folder))}
        else:
            manifest = read_json(folder / MANIFEST)
        published = self.published(folder)
        if published is None or manifest_identity(published) != manifest_identity(manifest):
            self.store.upload(folder, self.relative(folder), manifest)

    def published(self, folder: Path) -> dict | None:
        """The data root's manifest of `folder` when it is published whole (always the local one's for a
        local data root), else None."""
        if self.store is None:
            try:
                return read_json(Path(folder) / MANIFEST)
            except (OSError, ValueError):
                return None
        relative = self.relative(folder)
        manifest = self.store.manifest(relative)
        return manifest if manifest is not None and self.store.problem(relative, manifest) is None else None

    def is_published(self, folder: Path, manifest: dict) -> bool:
        """True when the data root holds exactly the content `manifest` describes at `folder`."""
        if self.store is None:
            return True
        published = self.published(folder)
        return published is not None and manifest_identity(published) == manifest_identity(manifest)

    def fetch(self, folder: Path) -> bool:
        """Make the working copy of `folder` the data root's: downloaded, verified, unless the copy already
        holds that content intact; False when the data root holds no such committed folder. Local data
        roots: True when it exists. One process at a time fetches a folder."""
        folder = Path(folder)
        if self.store is None:
            return folder.is_dir()
        published = self.published(folder)
        if published is None:
            return False
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder.with_name(f".{folder.name}.fetch.lock"))):
            try:
                local = read_json(folder / MANIFEST)
            except (OSError, ValueError):
                local = None
            same = local is not None and manifest_identity(local) == manifest_identity(published)
            if not same or folder_problem(folder, local) is not None:
                self.store.download(self.relative(folder), published, folder)
        return True

    def publish_file(self, path: Path) -> None:
        """Copy one file written beside a committed folder (a report, a picture) to the data root."""
        if self.store is not None:
            self.store.put_file(path, self.relative(path))

    def discard(self, folder: Path) -> None:
        """Remove the data root's copy of a working folder (a training's checkpoint, once the model is in)."""
        if self.store is not None:
            self.store.delete(self.relative(folder))

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


def working_copy(layout: DataRoot) -> str | None:
    """The `scratch_dir` to give a stage or flow so that it works in `layout`'s working copy (None: a local root)."""
    return str(layout.root) if layout.store is not None else None


def backup_folder(model_dir: Path) -> Path:
    """Where the checkpoint of an unfinished training of `model_dir` lives: a sibling that survives a crash."""
    model_dir = Path(model_dir)
    return model_dir.with_name(model_dir.name + BACKUP_SUFFIX)


def report_file(model_dir: Path) -> Path:
    """The markdown report the flows write beside a finished model."""
    return Path(model_dir) / REPORT_FILE
