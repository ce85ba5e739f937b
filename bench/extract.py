"""Time `extract_archive` against `tar xzf` on a notMNIST-shaped archive of small PNGs.

    .venv/bin/python bench/extract.py --members 100000

The goal is a ratio (project time / tar time) of at most 1.5 on 2 cores. The archive is built once
and cached under the work folder, keyed by member count.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.seed import LETTERS  # noqa: E402
from tasks.extract import extract_archive  # noqa: E402

TOP_FOLDER = "notMNIST_large"


def encode_png(pixels: np.ndarray) -> bytes:
    """A grayscale PNG of `pixels` as bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def build_archive(path: Path, member_count: int) -> None:
    """Write a .tar.gz of `member_count` distinct 28x28 PNGs laid out like notMNIST_large."""
    generator = np.random.default_rng(seed=0)
    image_count = member_count - 1 - len(LETTERS)
    temporary = path.with_name(path.name + ".partial")
    # Compression level 6 is what `gzip` and `tar czf` use by default.
    with tarfile.open(temporary, "w:gz", compresslevel=6, format=tarfile.GNU_FORMAT) as archive:
        for folder in [TOP_FOLDER] + [f"{TOP_FOLDER}/{letter}" for letter in LETTERS]:
            entry = tarfile.TarInfo(folder)
            entry.type, entry.mode, entry.mtime = tarfile.DIRTYPE, 0o755, 1_300_000_000
            archive.addfile(entry)
        for index in range(image_count):
            # Smooth blobs (noise upscaled from 7x7) compress about as well as notMNIST glyphs,
            # whose PNGs average a few hundred bytes.
            coarse = generator.integers(0, 256, size=(7, 7), dtype=np.uint8)
            pixels = np.asarray(Image.fromarray(coarse, mode="L").resize((28, 28), Image.BILINEAR))
            data = encode_png(pixels)
            letter = LETTERS[index % len(LETTERS)]
            entry = tarfile.TarInfo(f"{TOP_FOLDER}/{letter}/{index:08x}bm90TU5JU1Q.png")
            entry.size, entry.mode, entry.mtime = len(data), 0o644, 1_300_000_000
            archive.addfile(entry, io.BytesIO(data))
    os.replace(temporary, path)


def fresh(destination: Path) -> None:
    """Delete `destination` and flush the deletion, so its disk work is not billed to the next run."""
    shutil.rmtree(destination, ignore_errors=True)
    os.sync()


def time_tar(archive: Path, destination: Path) -> float:
    """Seconds `tar xzf` takes to extract `archive` into a fresh `destination`."""
    fresh(destination)
    destination.mkdir(parents=True)
    start = time.perf_counter()
    subprocess.run(["tar", "xzf", str(archive), "-C", str(destination)], check=True)
    return time.perf_counter() - start


def time_project(archive: Path, destination: Path) -> float:
    """Seconds `extract_archive` takes to extract `archive` into a fresh `destination`."""
    fresh(destination)
    start = time.perf_counter()
    extract_archive(archive, destination)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Build (or reuse) the archive, time both tools alternately and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=100_000, help="archive members (default 100000)")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench", help="cache and scratch folder")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each tool; the best counts")
    arguments = parser.parse_args(argv)

    arguments.workdir.mkdir(parents=True, exist_ok=True)
    archive = arguments.workdir / f"{TOP_FOLDER}-{arguments.members}.tar.gz"
    if not archive.exists():
        print(f"Building {archive} ...", flush=True)
        start = time.perf_counter()
        build_archive(archive, arguments.members)
        print(f"  built in {time.perf_counter() - start:.1f} s", flush=True)
    print(f"archive: {archive} ({archive.stat().st_size / 2**20:.1f} MiB, {arguments.members} members)")
    print(f"os.cpu_count(): {os.cpu_count()}")

    tar_times, project_times = [], []
    tar_destination = arguments.workdir / "tar-out"
    project_destination = arguments.workdir / "project-out"
    # Alternating the two keeps drift in disk cache or machine load from favouring either side.
    for repeat in range(arguments.repeats):
        tar_times.append(time_tar(archive, tar_destination))
        project_times.append(time_project(archive, project_destination))
        print(f"  run {repeat + 1}: tar {tar_times[-1]:.2f} s, extract_archive {project_times[-1]:.2f} s")
    fresh(tar_destination)
    fresh(project_destination)

    best_tar, best_project = min(tar_times), min(project_times)
    print(f"tar xzf:         best {best_tar:.2f} s ({arguments.members / best_tar:,.0f} members/s)")
    print(f"extract_archive: best {best_project:.2f} s ({arguments.members / best_project:,.0f} members/s)")
    print(f"ratio (extract_archive / tar): {best_project / best_tar:.2f} (goal <= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
