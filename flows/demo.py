"""`notmnist demo`: the pipeline end to end on generated archives, served from 127.0.0.1.

Nothing leaves the machine: two notMNIST-format archives are generated once (cached under the data
root's `source/` folder), served by a loopback HTTP server as the real host would serve them, and
every stage runs on them for real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flows.loopback import FileServer
from storage.layout import DataRoot
from tasks.decode import decode_to_shards
from tasks.download import download_file
from tasks.extract import extract_archive
from tasks.synthetic import make_archive

DEMO_SEED = 2024


def generated_archives(source_dir: Path, per_letter: int) -> dict[str, dict]:
    """Generate the large and small demo archives once; returns name -> {bytes, sha256}."""
    catalogue = source_dir / "archives.json"
    if catalogue.exists():
        known = json.loads(catalogue.read_text())
        if known.get("per_letter") == per_letter and all((source_dir / name).exists() for name in known["files"]):
            return known["files"]
    files = {}
    for name, count, seed in (
        ("notMNIST_large", per_letter, DEMO_SEED),
        ("notMNIST_small", max(per_letter // 10, 20), DEMO_SEED + 1),
    ):
        archive = make_archive(source_dir, name, per_letter=count, seed=seed)
        files[archive.path.name] = {"bytes": archive.size_bytes, "sha256": archive.sha256}
    catalogue.write_text(json.dumps({"per_letter": per_letter, "files": files}, indent=2))
    return files


def run_demo(data_dir: Path, *, per_letter: int = 200, workers: int | None = None) -> dict[str, Any]:
    """Generate, serve, download, extract and decode both archives; returns where everything is."""
    layout = DataRoot(data_dir)
    archives = generated_archives(layout.root / "source", per_letter)
    result: dict[str, Any] = {"data_dir": str(layout.root)}
    with FileServer(layout.root / "source") as server:
        for name, expected in archives.items():
            archive = download_file(
                server.url(name), layout.raw, expected_bytes=expected["bytes"], sha256=expected["sha256"]
            )
            top = extract_archive(archive, layout.extracted)
            manifests = decode_to_shards(top, layout.shards(name), workers=workers)
            result[top.name] = {
                "images": sum(m["images"] for m in manifests.values()),
                "rejected": sum(len(m["rejected"]) for m in manifests.values()),
                "shards": str(layout.shards(name)),
            }
    return result
