"""Throughput of `download_file` against a plain `requests` streaming loop, over loopback.

Both fetch the same file from the same in-process server on 127.0.0.1, alternating, best of N.
Prints the throughput ratio (project / plain; the goal is >= 0.9).

    .venv/bin/python bench/download.py [--megabytes 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo.loopback import FileServer  # noqa: E402
from tasks.download import download_file  # noqa: E402


def plain_requests(url: str, dest: Path, durable: bool = False) -> None:
    """The usual streaming loop: no resume, no verification; `durable` adds the final fsync."""
    with requests.get(url, stream=True, timeout=(10, 60)) as response:
        response.raise_for_status()
        with open(dest / "plain.bin", "wb") as handle:
            for chunk in response.iter_content(1 << 20):
                handle.write(chunk)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())


def timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    size = args.megabytes * 1_000_000
    with tempfile.TemporaryDirectory() as work, FileServer(Path(work) / "served") as server:
        content = os.urandom(size)
        url = server.put("archive.bin", content)
        sha256 = hashlib.sha256(content).hexdigest()
        del content
        labels = ["plain requests", "plain requests + fsync", "download_file (size)", "download_file (size+sha256)"]
        results: dict[str, list[float]] = {label: [] for label in labels}
        for _ in range(args.repeats):
            for label in results:
                dest = Path(tempfile.mkdtemp(dir=work))
                if label.startswith("plain"):
                    results[label].append(timed(plain_requests, url, dest, label.endswith("fsync")))
                else:
                    digest = sha256 if "sha256" in label else None
                    results[label].append(timed(lambda: download_file(url, dest, expected_bytes=size, sha256=digest)))
                shutil.rmtree(dest)

    print(f"cores: {os.cpu_count()}  file: {args.megabytes} MB over 127.0.0.1  best of {args.repeats}")
    baseline = size / min(results["plain requests"])
    for label, seconds in results.items():
        rate = size / min(seconds)
        print(f"{label:<30} {rate / 1e6:8.1f} MB/s   ratio {rate / baseline:.2f}")


if __name__ == "__main__":
    main()
