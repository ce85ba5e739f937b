"""The pipeline's data stages under Prefect: cold run, fully cached rerun, and the plain functions.

On generated archives of >= 50,000 images served from 127.0.0.1, in one script:

  plain   download_file x2, extract_archive x2, decode_to_shards x2, build_splits, called directly
  cold    notmnist_pipeline on an empty data root (Prefect's embedded API already started)
  cached  the same flow again: every data stage should come back Cached

The data stages' wall time of a flow run is taken from its task runs (first start to last end), so
training (one short epoch here) is left out. Prints cached/cold (goal <= 0.05) and cold/plain
(goal <= 1.10).

With --s3, it compares instead cold runs with the data root on a local folder and on an S3 server
(SeaweedFS on 127.0.0.1, started by the script: shards, splits and their manifests are published
to it, downloads and extraction stay in the local working copy), alternating for --repeats rounds,
and prints the ratio of the best of each (goal <= 1.5).

    .venv/bin/python bench/pipeline.py [--per-letter 5000] [--workdir .bench] [--s3 [--repeats 2]]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA_TASKS = ("download", "extract", "decode", "splits")  # the first word of each data task run's name


def data_stage_seconds(flow_run_id) -> tuple[float, dict[str, str]]:
    """Wall time from the first data task's start to the last one's end, and each task's final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    runs = [run for run in asyncio.run(read()) if run.name.split()[0] in DATA_TASKS]
    starts = [run.start_time or run.state.timestamp for run in runs]
    ends = [run.end_time or run.state.timestamp for run in runs]
    return (max(ends) - min(starts)).total_seconds(), {run.name: run.state.name for run in runs}


def plain(server, archives: dict, data_dir: Path, sizes: dict, minimums: dict) -> float:
    from storage.layout import DataRoot
    from tasks.decode import decode_to_shards
    from tasks.download import download_file
    from tasks.extract import extract_archive
    from tasks.splits import build_splits

    layout = DataRoot(data_dir)
    start = time.perf_counter()
    shard_dirs = {}
    for name, info in archives.items():
        archive = download_file(server.url(name), layout.raw, expected_bytes=info["bytes"], sha256=info["sha256"])
        top = extract_archive(archive, layout.extracted)
        shard_dirs[name] = layout.shards(name)
        decode_to_shards(top, shard_dirs[name], min_images=minimums[name])
    build_splits(layout.root, **sizes)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-letter", type=int, default=5000, help="images per letter, large archive (x10 in all)")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench")
    parser.add_argument("--s3", action="store_true", help="compare a local data root with one on a loopback S3 server")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the --s3 comparison")
    parser.add_argument("--task-runner", default="processes", choices=("processes", "threads", "dask"),
                        help="where the flow's letter tasks run")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    from prefect import flow

    from demo.loopback import FileServer
    from demo.run import demo_archives, demo_sizes
    from flows.notmnist import notmnist_pipeline

    source = args.workdir / f"pipeline-{args.per_letter}"
    archives = demo_archives(source, args.per_letter)
    small_per_letter = archives["notMNIST_small.tar.gz"]["images"] // 10
    sizes = demo_sizes(args.per_letter, small_per_letter)
    minimums = {"notMNIST_large.tar.gz": args.per_letter * 9 // 10, "notMNIST_small.tar.gz": small_per_letter * 9 // 10}

    @flow
    def start_the_api() -> None:
        """Starts Prefect's embedded API, so its start-up is not counted."""

    start_the_api()

    def cold_run(server, data_dir: str, scratch_dir: str | None = None):
        state = notmnist_pipeline(
            base_url=server.base_url, data_dir=data_dir, scratch_dir=scratch_dir,
            large_bytes=archives["notMNIST_large.tar.gz"]["bytes"], large_sha256=archives["notMNIST_large.tar.gz"]["sha256"],
            small_bytes=archives["notMNIST_small.tar.gz"]["bytes"], small_sha256=archives["notMNIST_small.tar.gz"]["sha256"],
            min_images_large=minimums["notMNIST_large.tar.gz"], min_images_small=minimums["notMNIST_small.tar.gz"],
            epochs=1, task_runner=args.task_runner, return_state=True, **sizes,
        )
        if not state.is_completed():
            raise SystemExit(f"run on {data_dir} failed: {state.message}")
        return data_stage_seconds(state.state_details.flow_run_id)

    if args.s3:
        compare_object_store(args, source, cold_run)
        return
    with FileServer(source) as server:
        runs = {}
        for label in ("cold", "plain", "cached"):  # plain second: the archives are in the page cache for both
            data_dir = args.workdir / f"pipeline-run-{'plain' if label == 'plain' else 'flow'}"
            if label != "cached":
                shutil.rmtree(data_dir, ignore_errors=True)
            if label == "plain":
                runs[label] = (plain(server, archives, data_dir, sizes, minimums), {})
                continue
            runs[label] = cold_run(server, str(data_dir))

    images = sum(info["images"] for info in archives.values())
    print(f"cores: {os.cpu_count()}  images: {images:,} (+ {sum(a['unreadable'] for a in archives.values())} unreadable)")
    for label in ("plain", "cold", "cached"):
        seconds, states = runs[label]
        not_cached = sorted(name for name, state in states.items() if state != "Cached")
        print(f"{label:<7} data stages {seconds:7.2f} s   " + (f"not cached: {not_cached}" if label == "cached" else ""))
    print(f"cached/cold {runs['cached'][0] / runs['cold'][0]:.3f} (goal <= 0.05)   "
          f"cold/plain {runs['cold'][0] / runs['plain'][0]:.3f} (goal <= 1.10)")


def compare_object_store(args: argparse.Namespace, source: Path, cold_run) -> None:
    """Cold runs on a local data root and on an s3:// one (SeaweedFS on 127.0.0.1), alternating."""
    from demo.loopback import FileServer
    from demo.s3server import create_bucket, seaweed_s3

    seconds: dict[str, list[float]] = {"local": [], "s3": []}
    store = args.workdir / "seaweedfs"
    shutil.rmtree(store, ignore_errors=True)
    with seaweed_s3(store) as environment, FileServer(source) as server:
        os.environ.update(environment)
        create_bucket(environment, "bench")
        for round_number in range(args.repeats):
            local, scratch = args.workdir / "pipeline-run-local", args.workdir / "pipeline-run-scratch"
            for path in (local, scratch):
                shutil.rmtree(path, ignore_errors=True)
            seconds["local"].append(cold_run(server, str(local))[0])
            seconds["s3"].append(cold_run(server, f"s3://bench/round-{round_number}", str(scratch))[0])
            print(f"round {round_number + 1}: local data root {seconds['local'][-1]:6.2f} s   "
                  f"s3:// data root {seconds['s3'][-1]:6.2f} s", flush=True)
    print(f"cores: {os.cpu_count()}  per letter: {args.per_letter:,}")
    print(f"best: local {min(seconds['local']):.2f} s, s3 {min(seconds['s3']):.2f} s; "
          f"s3/local {min(seconds['s3']) / min(seconds['local']):.3f} (goal <= 1.5)")


if __name__ == "__main__":
    main()
