"""Archive-to-shards throughput: this project against the seed's way and against a decode-only floor.

Variants, each in a fresh process (so peak RSS is its own), on one generated notMNIST-format archive:

  project-packed   unpack_archive, then decode_to_shards on the packed letters (the pipeline's way)
  project-archive  decode_to_shards reading the .tar.gz directly (no extraction)
  project-folder   extract_archive, then decode_to_shards on the extracted folder
  seed             the seed's maybe_extract + load_letter + maybe_pickle, ported in bench/seed_ingest.py
  floor            every PNG already in memory, decoded by Pillow on all cores, nothing written

Prints images per second, the ratios (goal on 2 cores: project >= 4x seed, project <= 1.3x floor
in time) and peak RSS (the parent's and the largest worker's).

    .venv/bin/python bench/ingest.py [--per-letter 10000] [--workdir .bench] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("project-packed", "project-archive", "project-folder", "seed", "floor")


def _decode_all(blobs: list[bytes]) -> int:
    from tasks.images import decode_png_with_pillow

    return sum(decode_png_with_pillow(blob)[0] is not None for blob in blobs)


def decode_floor(archives: list[Path], workers: int) -> tuple[float, int]:
    """Seconds to decode every PNG of `archives`, already in memory, on `workers` processes; and the images
    decoded. The floor the decode stage is measured against (here and in bench/pipeline.py)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from storage.tar_stream import iter_files

    blobs = [data for archive in archives
             for _, data in iter_files(archive, max_members=10**7, max_total_bytes=1 << 40)]
    chunks = [blobs[i : i + 8192] for i in range(0, len(blobs), 8192)]
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        images = sum(pool.map(_decode_all, chunks))
    return time.perf_counter() - start, images


def _first_step(variant: str, archive: Path, work: Path) -> Path:
    """What a project variant decodes: its packed letters, its extracted folder, or the archive itself."""
    if variant == "project-packed":
        from tasks.unpack import unpack_archive

        return unpack_archive(archive, work / "packed")
    if variant == "project-folder":
        from tasks.extract import extract_archive

        return extract_archive(archive, work / "extracted")
    return archive


def run_variant(variant: str, archive: Path, work: Path, workers: int) -> dict:
    """Run one variant and return its wall time and image count (and the project's first step's time)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if variant == "floor":
        seconds, images = decode_floor([archive], workers)
        return {"seconds": seconds, "images": images}
    start = time.perf_counter()
    if variant == "seed":
        from bench.seed_ingest import seed_ingest

        images = seed_ingest(archive, work)
        return {"seconds": time.perf_counter() - start, "images": images}
    from tasks.decode import decode_to_shards

    source = _first_step(variant, archive, work)
    first_step = time.perf_counter() - start
    manifests = decode_to_shards(source, work / "shards", workers=workers)
    result = {"seconds": time.perf_counter() - start, "images": sum(m["images"] for m in manifests.values())}
    return result if source == archive else {**result, "first_step": first_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-letter", type=int, default=10_000, help="images per letter in the archive")
    parser.add_argument("--archive", type=Path, help="use this notMNIST-format archive instead of generating one")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which to run, comma-separated")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in a child
    args = parser.parse_args()

    if args.variant:
        result = run_variant(args.variant, args.archive, args.workdir / f"run-{args.variant}", args.workers)
        result["parent_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["worker_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(json.dumps(result))
        return

    archive = args.archive
    if archive is None:
        from demo.synthetic import make_archive

        folder = args.workdir / f"ingest-{args.per_letter}"
        archive = folder / "notMNIST_large.tar.gz"
        if not archive.exists():
            print(f"generating {args.per_letter * 10:,} images ...", flush=True)
            make_archive(folder, "notMNIST_large", per_letter=args.per_letter, seed=7)

    results = {}
    for variant in args.variants.split(","):
        child = subprocess.run(
            [sys.executable, __file__, "--variant", variant, "--archive", str(archive),
             "--workdir", str(args.workdir), "--workers", str(args.workers)],
            check=True, capture_output=True, text=True, cwd=ROOT,
        )
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
        shutil.rmtree(args.workdir / f"run-{variant}", ignore_errors=True)

    print(f"cores: {os.cpu_count()}  workers: {args.workers}  archive: {archive.name} "
          f"({archive.stat().st_size / 1e6:.1f} MB, {max(r['images'] for r in results.values()):,} good images)")
    for variant, result in results.items():
        rate = result["images"] / result["seconds"]
        first = f" (unpack or extract {result['first_step']:.2f} s)" if "first_step" in result else ""
        print(f"{variant:<16} {result['seconds']:7.2f} s {rate:10,.0f} images/s   peak RSS "
              f"parent {result['parent_rss_mb']:6.0f} MB, largest worker {result['worker_rss_mb']:6.0f} MB{first}")
    for variant in ("project-packed", "project-archive", "project-folder"):
        if variant not in results:
            continue
        seconds, ratios = results[variant]["seconds"], []
        if "seed" in results:
            ratios.append(f"{results['seed']['seconds'] / seconds:.2f}x the seed's throughput (goal >= 4)")
        if "floor" in results:
            ratios.append(f"{seconds / results['floor']['seconds']:.2f}x the floor's time (goal <= 1.3)")
        print(f"{variant}: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
