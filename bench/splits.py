"""Splits at the standard sizes (200k/10k/10k): this project against the seed's merge + randomize.

Generates (once, under --workdir) shards the size of notMNIST_large (52,912 images per letter) and
notMNIST_small (1,873), with about 4% exact duplicates planted as in the real data, plus the same
images as the seed's per-letter float32 pickles. Each variant then runs in a fresh process, so
its peak RSS is its own:

  project  build_splits(..., dedup="cross-split") -> memory-mapped uint8 NPY files
  seed     merge_datasets + randomize from the pickles (ported in bench/seed_splits.py)

    .venv/bin/python bench/splits.py [--workdir .bench] [--large-per-letter 52912]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.seed import LETTERS  # noqa: E402
from storage.layout import DataRoot  # noqa: E402
from storage.letters import commit_letter, letter_folder  # noqa: E402
from storage.shards import write_shard  # noqa: E402


def glyph_like_images(rng: np.random.Generator, count: int) -> np.ndarray:
    """Cheap images with glyph-like statistics: a dark background and a bright blob."""
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    rows = rng.integers(4, 14, size=count)
    cols = rng.integers(4, 14, size=count)
    noise = rng.integers(0, 256, size=(count, 12, 12), dtype=np.uint8)
    for index in range(count):
        images[index, rows[index] : rows[index] + 12, cols[index] : cols[index] + 12] = noise[index]
    duplicates = rng.choice(count, size=count // 25, replace=False)  # ~4% exact copies, as measured on notMNIST
    images[duplicates] = images[rng.choice(count, size=len(duplicates))]
    return images


def generate(folder: Path, large_per_letter: int, small_per_letter: int) -> None:
    """Shards (as the decode stage writes them) and the seed's pickles of the same images."""
    if (folder / "done").exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(133)
    for archive, per_letter in (("notMNIST_large", large_per_letter), ("notMNIST_small", small_per_letter)):
        for label, letter in enumerate(LETTERS):
            images = glyph_like_images(rng, per_letter)
            work = folder / f"work-{archive}-{letter}"
            work.mkdir(parents=True)
            shards = []
            for number, start in enumerate(range(0, per_letter, 8192)):
                name = f"part-{number:05d}.parquet"
                chunk = images[start : start + 8192]
                files = [f"{archive}/{letter}/{start + i:06d}.png" for i in range(len(chunk))]
                write_shard(work / name, files, label, chunk)
                shards.append({"file": name, "rows": len(chunk)})
            commit_letter(
                work, letter_folder(DataRoot(folder).shards(archive), letter), letter=letter, label=label,
                images=per_letter, rejected=[], shards=shards, source={"kind": "generated", "name": archive},
            )
            pickles = folder / "pickles" / archive
            pickles.mkdir(parents=True, exist_ok=True)
            with open(pickles / f"{letter}.pickle", "wb") as handle:
                pickle.dump((images.astype(np.float32) - 127.5) / 255, handle, pickle.HIGHEST_PROTOCOL)
    (folder / "done").write_text("")


def run_variant(variant: str, folder: Path) -> dict:
    from tasks.splits import build_splits  # imported before the clock starts, as the seed's code is

    start = time.perf_counter()
    if variant == "project":
        shutil.rmtree(DataRoot(folder).splits_root, ignore_errors=True)
        manifest = build_splits(folder)
        rows = sum(manifest["splits"][split]["rows"] for split in manifest["splits"])
        extra = {"overlap": manifest["overlap"]}
    else:
        from bench.seed_splits import seed_splits

        rows = seed_splits(folder / "pickles")
        extra = {}
    return {"seconds": time.perf_counter() - start, "rows": rows, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench")
    parser.add_argument("--large-per-letter", type=int, default=52_912)  # notMNIST_large's per-letter count
    parser.add_argument("--small-per-letter", type=int, default=1_873)
    parser.add_argument("--variant", choices=("project", "seed"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.workdir / f"splits-{args.large_per_letter}"

    if args.variant:
        result = run_variant(args.variant, folder)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    print("generating shards and pickles (once) ...", flush=True)
    generate(folder, args.large_per_letter, args.small_per_letter)
    results = {}
    for variant in ("project", "seed"):
        child = subprocess.run(
            [sys.executable, __file__, "--variant", variant, "--workdir", str(args.workdir),
             "--large-per-letter", str(args.large_per_letter), "--small-per-letter", str(args.small_per_letter)],
            check=True, capture_output=True, text=True, cwd=ROOT,
        )
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])

    print(f"cores: {os.cpu_count()}  inputs: {args.large_per_letter:,} + {args.small_per_letter:,} images per letter")
    for variant, result in results.items():
        print(f"{variant:<8} {result['seconds']:7.2f} s   peak RSS {result['peak_rss_mb']:7.0f} MB   rows {result['rows']:,}")
    project, seed = results["project"], results["seed"]
    print(f"time ratio project/seed {project['seconds'] / seed['seconds']:.2f}, "
          f"peak RSS ratio {project['peak_rss_mb'] / seed['peak_rss_mb']:.2f} (goal: project under 1,536 MB)")
    print("overlap:", json.dumps(project["overlap"]))


if __name__ == "__main__":
    main()
