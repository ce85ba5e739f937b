"""Where everything lives under the data root; no other module builds a path inside it.

    <data root>/
      raw/<archive>                 downloaded files (and <name>.part while downloading)
      extracted/<top folder>/       extracted archives, one folder per class, and .extracted.json
      shards/<archive>/<letter>/    Parquet shards of one letter and _manifest.json
      splits/<key>/                 train/valid/test NPY files and _manifest.json
      models/<key>/                 the model, metrics.json, record.json, _manifest.json, report.md
      models/<key>.backup/          while training: the last finished epoch's checkpoint
      source/                       the demo's generated archives

Manifests and records name files relative to the data root (or to their own folder), never by
absolute path, so a data root can be moved or copied and still describes itself.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
REPORT_FILE = "report.md"
BACKUP_SUFFIX = ".backup"


def archive_stem(archive: str | Path) -> str:
    """`notMNIST_large.tar.gz` -> `notMNIST_large` (the seed's `maybe_extract` naming)."""
    name = Path(archive).name
    for suffix in ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


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


@dataclass(frozen=True)
class DataRoot:
    """The data root's layout."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

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


def backup_folder(model_dir: Path) -> Path:
    """Where the checkpoint of an unfinished training of `model_dir` lives: a sibling that survives a crash."""
    model_dir = Path(model_dir)
    return model_dir.with_name(model_dir.name + BACKUP_SUFFIX)


def report_file(model_dir: Path) -> Path:
    """The markdown report the flows write beside a finished model."""
    return Path(model_dir) / REPORT_FILE
