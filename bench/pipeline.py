"""The pipeline's data stages under Prefect: cold run, fully cached rerun, and the plain functions.

On generated archives of >= 50,000 images served from 127.0.0.1, in one script:

  plain   download_file x2, extract_archive x2, decode_to_shards x2, build_splits, called directly
  cold    notmnist_pipeline on an empty data root (Prefect's embedded API already started)
  cached  the same flow again: every data stage should come back Cached

The data stages' wall time of a flow run is taken from its task runs (first start to last end), so
training (one short epoch here) is left out. Prints cached/cold (goal <= 0.05) and cold/plain
(goal <= 1.10).

With --full-size, it runs `notmnist run` as users do, with the seed's defaults (200,000/10,000/10,000
rows, 2 epochs), on generated archives of notMNIST's size (529,120 + 18,730 images; made once, kept in
--workdir), the archives already in the data root's raw/ (download excluded), and prints: the
command's wall time and each stage's (from its task runs), the wall time against the sum of two naive
floors measured in the same run (the decode floor below, plus the seed's plain `model.fit` of the same
epochs on the run's split, bench/train.py --seed-fit; goal <= 1.0), ingest (first unpack start to last decode
end) against the decode floor (every PNG of both archives decoded in memory on all cores, nothing
written, Pillow's; goal <= 1.0x), the peak memory of all the command's processes together, sampled
every 0.2 s (RSS summed, and PSS, which counts a page shared by several processes once; goal < 1.25
GiB), and the same command run again on the same data root, every stage cached (goal <= 0.05x), with its
embedded API and then against a Prefect server already running.

With --s3, it compares instead cold runs with the data root on a local folder and on an S3 server
(SeaweedFS on 127.0.0.1, started by the script: every stage's output, the downloads and Prefect's
cache records are published to it), alternating for --repeats rounds, and prints the ratio of the
best of each (goal <= 1.5). With --baseline REV as well, each round also runs the --s3 comparison
of the code at git revision REV (a worktree under --workdir, this script's own copy there) and
prints this code's s3 cold run against REV's (goal <= 1.1).

With --second-machine, on the S3 server: a first machine's cold run and its fully cached rerun,
then a second machine's first run (a working copy and Prefect home of its own, the same data root
and Prefect API; the archives served from a new address that counts its requests), and prints the
second machine's run against the first machine's cached rerun, whole flow runs (goal <= 1.5).

    .venv/bin/python bench/pipeline.py [--per-letter 5000] [--workdir .bench] [--s3 [--repeats 2] [--baseline REV]]
                                       [--second-machine] [--full-size]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA_TASKS = ("download", "unpack", "decode", "splits")  # the first word of each data task run's name
# notMNIST_large holds 529,119 images and notMNIST_small 18,726: a tenth per letter, rounded up.
FULL_PER_LETTER, FULL_SMALL_PER_LETTER = 52_912, 1_873


def task_runs(flow_run_id) -> list:
    """The task runs of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return asyncio.run(read())


def data_stage_seconds(flow_run_id) -> tuple[float, dict[str, str]]:
    """Wall time from the first data task's start to the last one's end, and each task's final state."""
    runs = [run for run in task_runs(flow_run_id) if run.name.split()[0] in DATA_TASKS]
    starts = [run.start_time or run.state.timestamp for run in runs]
    ends = [run.end_time or run.state.timestamp for run in runs]
    return (max(ends) - min(starts)).total_seconds(), {run.name: run.state.name for run in runs}


def plain(server, archives: dict, data_dir: Path, sizes: dict, minimums: dict) -> float:
    from storage.layout import DataRoot
    from tasks.decode import decode_to_shards
    from tasks.download import download_file
    from tasks.splits import build_splits
    from tasks.unpack import unpack_archive

    layout = DataRoot(data_dir)
    start = time.perf_counter()
    for name, info in archives.items():
        archive = download_file(server.url(name), layout.raw, expected_bytes=info["bytes"], sha256=info["sha256"])
        packed = unpack_archive(archive, layout.packed(name))
        decode_to_shards(packed, layout.shards(name), min_images=minimums[name])
    build_splits(layout.root, **sizes)
    return time.perf_counter() - start


class ProcessTreeMemory:
    """Peak memory of a process and all its descendants together, sampled every 0.2 s in a thread."""

    def __init__(self, pid: int):
        self.pid, self.peak_rss, self.peak_pss, self.at_peak = pid, 0, 0, []
        self.samples: list[tuple[float, int, dict]] = []  # (time.time(), PSS of all, {pid: (role, CPU seconds)})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
            try:
                root = psutil.Process(self.pid)
                processes = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = pss = 0
            sample, cpu = [], {}
            for process in processes:
                try:
                    info, command, times = process.memory_full_info(), " ".join(process.cmdline()), process.cpu_times()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss, pss = rss + info.rss, pss + info.pss
                role = _role(process.pid == self.pid, command)
                sample.append((role, info.pss))
                cpu[process.pid] = (role, times.user + times.system)
            self.peak_rss = max(self.peak_rss, rss)
            self.samples.append((time.time(), pss, cpu))
            if pss > self.peak_pss:
                self.peak_pss, self.at_peak = pss, sample

    def during(self, first: float, last: float) -> tuple[int, dict[str, float]]:
        """Peak PSS between two moments (time.time()), and the CPU seconds each role used then."""
        peak, before, after = 0, {}, {}
        for moment, pss, cpu in self.samples:
            if moment <= first:
                before.update(cpu)
            if moment <= last:
                after.update(cpu)
            if first <= moment <= last:
                peak = max(peak, pss)
        used: dict[str, float] = {}
        for pid, (role, seconds) in after.items():
            used[role] = used.get(role, 0.0) + seconds - before.get(pid, (role, 0.0))[1]
        return peak, used

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _role(is_root: bool, command: str) -> str:
    """What a process of `notmnist run` is, from its command line."""
    if is_root:
        return "notmnist run"
    if "prefect" in command and "server" in command or "uvicorn" in command:
        return "Prefect server"
    return "decode worker" if "multiprocessing" in command else command[:40]


def full_size(args: argparse.Namespace) -> None:
    """`notmnist run` with the seed's defaults on archives of notMNIST's size; see the module docstring."""
    from bench.ingest import decode_floor
    from core.seed import EPOCHS
    from demo.loopback import FileServer
    from demo.run import demo_archives
    from storage.layout import DataRoot
    from storage.splits import newest_splits

    # The command and this script share a Prefect home of their own, so the run's task runs can be read back.
    os.environ["PREFECT_HOME"] = str(args.workdir / "prefect-home")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the temporary server reading them back
    archives = demo_archives(args.workdir / "full", FULL_PER_LETTER, FULL_SMALL_PER_LETTER)
    floor, images = decode_floor([Path(info["path"]) for info in archives.values()], os.cpu_count() or 1)
    data = args.workdir / "full-run"
    shutil.rmtree(data, ignore_errors=True)
    (data / "raw").mkdir(parents=True)
    for name, info in archives.items():  # download excluded: the download stage finds them and checks them
        shutil.copyfile(info["path"], data / "raw" / name)
    large, small = archives["notMNIST_large.tar.gz"], archives["notMNIST_small.tar.gz"]
    with FileServer(args.workdir / "full") as server:
        command = [
            str(Path(sys.executable).with_name("notmnist")), "run", "--json", "--data-dir", str(data),
            "--base-url", server.base_url, "--large-bytes", str(large["bytes"]), "--large-sha256", large["sha256"],
            "--small-bytes", str(small["bytes"]), "--small-sha256", small["sha256"],
            "--task-runner", args.task_runner,
        ]
        cache = args.workdir / "full-run-cache"  # a machine that never drew these pictures
        shutil.rmtree(cache, ignore_errors=True)
        environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "XDG_CACHE_HOME": str(cache)}
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=environment)
        memory = ProcessTreeMemory(child.pid)
        output, _ = child.communicate()
        wall = time.perf_counter() - start
        memory.stop()
        if child.returncode != 0:
            raise SystemExit(f"notmnist run failed ({child.returncode})")
        stages = stage_spans(latest_pipeline_run())
        start = time.perf_counter()  # the same command again: every stage cached, the model reused
        again = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=environment, check=True)
        cached_wall = time.perf_counter() - start
        standing_wall = cached_on_a_standing_server(command, environment)
    result = json.loads(output)
    if json.loads(again.stdout)["test_accuracy"] != result["test_accuracy"]:
        raise SystemExit("the cached rerun reported another test accuracy")
    split_folder = newest_splits(DataRoot(data).splits_root, "train")
    fit = json.loads(subprocess.run(  # the training floor: the seed's plain fit of the same epochs, same split
        [sys.executable, str(ROOT / "bench" / "train.py"), "--seed-fit", str(split_folder), "--epochs", str(EPOCHS)],
        stdout=subprocess.PIPE, text=True, env=environment, check=True,
    ).stdout.strip().splitlines()[-1])
    floors = floor + fit["fit_seconds"]
    ingest = span(stages, "unpack", "decode")
    print(f"cores: {os.cpu_count()}  images: {images:,} good in both archives  test accuracy: {result['test_accuracy']:.4f}")
    print(f"notmnist run, download excluded: {wall:6.1f} s wall (goal < 120 s)")
    for name, (first, last) in sorted(stages.items(), key=lambda item: item[1][0]):
        peak, cpu = memory.during(first.timestamp(), last.timestamp())
        print(f"  {name:<10} {(last - first).total_seconds():6.1f} s   peak PSS {peak / 2**30:.2f} GiB   CPU s: "
              + ", ".join(f"{role} {seconds:.1f}" for role, seconds in sorted(cpu.items()) if seconds >= 0.05))
    print(f"whole run / floors {wall / floors:.2f} (goal <= 1.0): decode floor {floor:.1f} s + the seed's plain fit "
          f"of {EPOCHS} epochs on this run's split {fit['fit_seconds']:.1f} s (test accuracy {fit['test_accuracy']:.4f}) "
          f"= {floors:.1f} s")
    print(f"ingest (unpack + decode, both archives) {ingest:6.1f} s   decode floor {floor:6.1f} s   "
          f"ingest/floor {ingest / floor:.2f} (goal <= 1.0)")
    print(f"peak memory, all processes: RSS summed {memory.peak_rss / 2**30:.2f} GiB, "
          f"PSS {memory.peak_pss / 2**30:.2f} GiB (goal < 1.25 GiB)")
    print(f"the same command again (all cached): {cached_wall:6.1f} s wall, {cached_wall / wall:.3f} of the cold run "
          "(goal <= 0.05)")
    print(f"  with a Prefect server already running (PREFECT_API_URL, as in production): {standing_wall:6.1f} s wall, "
          f"{standing_wall / wall:.3f} of the cold run")
    print("  at the peak (PSS): " + ", ".join(f"{role} {pss / 2**20:.0f} MiB" for role, pss in memory.at_peak))


def cached_on_a_standing_server(command: list[str], environment: dict[str, str]) -> float:
    """Wall time of `command` (a rerun, all cached) against a Prefect server started before it and left running
    after it, as in production; the server is the one the command would embed, here started by this script."""
    from flows.embedded_api import EmbeddedAPI

    server = EmbeddedAPI()
    try:
        api = server.wait(180)
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.PIPE, text=True, env={**environment, **api}, check=True)
        return time.perf_counter() - start
    finally:
        server.stop()


def latest_pipeline_run():
    """The newest notmnist-pipeline flow run of this Prefect home."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    async def read():
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["notmnist-pipeline"])),
                                               sort=FlowRunSort.START_TIME_DESC, limit=1)
            return runs[0]

    return asyncio.run(read())


def stage_spans(flow_run) -> dict:
    """First start and last end of each kind of task run in `flow_run` (named by the first word), and of training."""
    spans: dict = {"flow run": (flow_run.start_time, flow_run.end_time)}
    for run in task_runs(flow_run.id):
        kind = run.name.split()[0].split("-")[0]  # "train-0", the training subflow's task run, counts as "train"
        first, last = spans.get(kind, (run.start_time, run.end_time))
        spans[kind] = (min(first, run.start_time), max(last, run.end_time))
    return spans


def span(spans: dict, first_kind: str, last_kind: str) -> float:
    """Seconds from the first start of `first_kind` to the last end of `last_kind`."""
    return (spans[last_kind][1] - spans[first_kind][0]).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-letter", type=int, default=5000, help="images per letter, large archive (x10 in all)")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench")
    parser.add_argument("--s3", action="store_true", help="compare a local data root with one on a loopback S3 server")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the --s3 comparison")
    parser.add_argument("--task-runner", default="processes", choices=("processes", "threads", "dask"),
                        help="where the flow's letter tasks run")
    parser.add_argument("--full-size", action="store_true", help="notmnist run on archives of notMNIST's size")
    parser.add_argument("--baseline", default=None, metavar="REV", help="with --s3: also time the code at REV")
    parser.add_argument("--second-machine", action="store_true",
                        help="a second working copy's first run against the first's cached rerun, on S3")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.full_size:
        full_size(args)
        return

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
        started = time.perf_counter()
        state = notmnist_pipeline(
            base_url=server.base_url, data_dir=data_dir, scratch_dir=scratch_dir,
            large_bytes=archives["notMNIST_large.tar.gz"]["bytes"], large_sha256=archives["notMNIST_large.tar.gz"]["sha256"],
            small_bytes=archives["notMNIST_small.tar.gz"]["bytes"], small_sha256=archives["notMNIST_small.tar.gz"]["sha256"],
            min_images_large=minimums["notMNIST_large.tar.gz"], min_images_small=minimums["notMNIST_small.tar.gz"],
            epochs=1, task_runner=args.task_runner, return_state=True, **sizes,
        )
        if not state.is_completed():
            raise SystemExit(f"run on {data_dir} failed: {state.message}")
        cold_run.wall = time.perf_counter() - started
        return data_stage_seconds(state.state_details.flow_run_id)

    if args.second_machine:
        second_machine(args, source, cold_run)
        return
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
            if args.baseline:
                seconds.setdefault("baseline s3", []).append(baseline_s3_run(args))
                print(f"round {round_number + 1}: s3:// data root at {args.baseline} "
                      f"{seconds['baseline s3'][-1]:6.2f} s", flush=True)
    print(f"cores: {os.cpu_count()}  per letter: {args.per_letter:,}")
    print(f"best: local {min(seconds['local']):.2f} s, s3 {min(seconds['s3']):.2f} s; "
          f"s3/local {min(seconds['s3']) / min(seconds['local']):.3f} (goal <= 1.5)")
    if args.baseline:
        print(f"best s3 cold run: this code {min(seconds['s3']):.2f} s, {args.baseline} "
              f"{min(seconds['baseline s3']):.2f} s; this/{args.baseline} "
              f"{min(seconds['s3']) / min(seconds['baseline s3']):.3f} (goal <= 1.1)")


def baseline_s3_run(args: argparse.Namespace) -> float:
    """One --s3 round of the code at git revision `args.baseline` (its own script, in a worktree): its s3 cold run."""
    tree = args.workdir / f"baseline-{args.baseline}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.baseline], cwd=ROOT, check=True,
                       capture_output=True)
    finished = subprocess.run(
        [sys.executable, str(tree / "bench" / "pipeline.py"), "--s3", "--repeats", "1", "--per-letter",
         str(args.per_letter), "--workdir", str(args.workdir / "baseline-work"), "--task-runner", args.task_runner],
        cwd=tree, check=True, capture_output=True, text=True,
    )
    best = next(line for line in finished.stdout.splitlines() if line.startswith("best: "))
    return float(best.split("s3 ")[1].split(" s")[0])


def second_machine(args: argparse.Namespace, source: Path, run) -> None:
    """On an S3 server: a first machine's cold run and cached rerun, then a second machine's first run."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from demo.loopback import FileServer
    from demo.s3server import create_bucket, seaweed_s3

    walls: dict[str, list[float]] = {"cold": [], "cached": [], "second machine": []}
    store = args.workdir / "seaweedfs"
    shutil.rmtree(store, ignore_errors=True)
    with seaweed_s3(store) as environment:
        os.environ.update(environment)
        create_bucket(environment, "bench")
        for round_number in range(args.repeats):
            data_root = f"s3://bench/machines-{round_number}"
            first, second = args.workdir / "first-machine", args.workdir / "second-machine"
            for path in (first, second, args.workdir / "second-home"):
                shutil.rmtree(path, ignore_errors=True)
            with FileServer(source) as server:
                for label in ("cold", "cached"):
                    run(server, data_root, str(first))
                    walls[label].append(run.wall)
            with FileServer(source) as origin, temporary_settings(
                {PREFECT_LOCAL_STORAGE_PATH: args.workdir / "second-home" / "storage"}
            ):
                _, states = run(origin, data_root, str(second))
                walls["second machine"].append(run.wall)
                asked = len(origin.state.requests)
            not_cached = sorted(name for name, state in states.items() if state != "Cached")
            print(f"round {round_number + 1}: " + "   ".join(f"{label} {values[-1]:6.2f} s"
                                                        for label, values in walls.items())
                  + f"   second machine: not cached {not_cached or 'none'}, requests to the origin {asked}", flush=True)
    print(f"cores: {os.cpu_count()}  per letter: {args.per_letter:,}  (whole flow runs, Prefect's API already up)")
    best = {label: min(values) for label, values in walls.items()}
    print(f"best: cold {best['cold']:.2f} s, cached rerun {best['cached']:.2f} s, second machine "
          f"{best['second machine']:.2f} s; second/cached {best['second machine'] / best['cached']:.3f} (goal <= 1.5)")


if __name__ == "__main__":
    main()
