"""Where everything lives under the data root; no other module builds a path inside it.

    <data root>/
      raw/                      downloaded archives (and their .part files while downloading)
      extracted/<archive>/      extracted archives, one folder per class
      shards/<archive>/         Parquet shards and a manifest per letter
      splits/<key>/             train/valid/test NPY files and the split manifest
      models/<key>/             trained models, metrics and the record of what produced them
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def archive_stem(archive: str | Path) -> str:
    """`notMNIST_large.tar.gz` -> `notMNIST_large` (the seed's `maybe_extract` naming)."""
    name = Path(archive).name
    for suffix in ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class DataRoot:
    """The data root's layout."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def extracted(self) -> Path:
        return self.root / "extracted"

    def shards(self, archive: str | Path) -> Path:
        """Shards of one archive, named after it (`shards/notMNIST_large`)."""
        return self.root / "shards" / archive_stem(archive)

    @property
    def splits_root(self) -> Path:
        """Where split folders go, one per input and parameter set."""
        return self.root / "splits"

    def splits(self, key: str) -> Path:
        return self.splits_root / key

    def models(self, key: str) -> Path:
        return self.root / "models" / key
