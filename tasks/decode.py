"""Decode stage: every letter's PNGs into Parquet shards, in parallel, every reject accounted for.

The seed's `load_letter`/`maybe_pickle` decoded each folder serially into float32 pickles and
stopped on any error but IOError. Here batches of a letter's images go to a process pool; each
worker writes one shard and returns only counts, rejects and a pixel histogram, so the parent holds
a bounded number of images. A letter's shards and manifest are written into a temporary folder and
renamed into place together (storage/letters.py); the manifest records the input's fingerprint and
each shard's sha256, so a rerun skips letters that are done and intact and redoes the rest.

Input is the archive's packed letters (the unpack stage's output, storage/packed.py), the folder
the extraction stage made, or the archive itself (read in one pass; see `storage.tar_stream`). Rows
come out in archive order from an archive or its packed letters, in name order from a folder.

The pipeline decodes each letter of the packed input as a Prefect task of its own (`letter_task`,
fanned out by flows/letters.py); `notmnist shards` decodes a whole archive or folder with the process
pool here.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

from filelock import FileLock

from core.errors import ArchiveError, CorruptDataError, PipelineError
from core.seed import LETTERS, NORMALISATIONS
from storage.atomic import remove, remove_temporaries_of, temporary_sibling
from storage.digests import sha256_of
from storage.extraction import extraction_problem, folder_state, read_record
from storage.folders import manifest_identity
from storage.layout import DataRoot, archive_stem, lock_file
from storage.letters import commit_letter, find_letter, letter_folder, read_letter_manifest, shard_file
from storage.packed import ROW_GROUP_ROWS, checked_groups, find_packed
from storage.tar_stream import MAX_MEMBERS, MAX_TOTAL_BYTES, iter_files
from tasks.images import BatchJob, BatchResult, decode_batch, start_worker
from tasks.reporting import Progress, artifact_key, stage_logger
from tasks.stage import Stage, retry_unless_pipeline_error, stage_task

BATCH_ROWS = ROW_GROUP_ROWS  # a batch of an archive or folder is as large as a packed letter's row group


class TooFewImagesError(PipelineError):
    """A letter has fewer usable images than `min_images`."""


def letter_fields(letter: str, source: dict, results: list[BatchResult]) -> dict:
    """Summarise a letter's batches for its manifest; statistics are exact, from the pixel histograms."""
    counts = [sum(column) for column in zip(*(r.histogram for r in results))] or [0] * 256
    pixels = sum(counts)
    offset, scale = NORMALISATIONS["notmnist"]  # the seed's (x - 127.5) / 255
    normalised = [(value - offset) / scale for value in range(256)]
    mean = sum(c * v for c, v in zip(counts, normalised)) / pixels if pixels else math.nan
    variance = sum(c * (v - mean) ** 2 for c, v in zip(counts, normalised)) / pixels if pixels else math.nan
    rejected = [asdict(item) for result in results for item in result.rejected]
    reasons: dict[str, int] = {}
    for item in rejected:
        reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
    return {
        "letter": letter,
        "label": LETTERS.index(letter),
        "source": {key: value for key, value in source.items() if key != "manifest"},
        "images": sum(r.rows for r in results),
        "rejected": rejected,
        "rejected_by_reason": reasons,
        "mean": mean,
        "std": math.sqrt(variance),
        "shards": [{"file": Path(r.shard_path).name, "rows": r.rows} for r in results if r.shard_path],
    }


def _batches(members: Iterable[tuple[str, str, bytes | Path]], folders: dict[str, Path]) -> Iterator[BatchJob]:
    """Group `(letter, name, payload)` members into per-letter jobs of up to BATCH_ROWS, in order.

    Every letter yields at least one job, so a letter with no member still gets a manifest.
    """
    pending: dict[str, list] = {letter: [] for letter in folders}
    numbers = dict.fromkeys(folders, 0)

    def job(letter: str) -> BatchJob:
        items = pending[letter]
        shard = str(shard_file(folders[letter], numbers[letter]))
        numbers[letter] += 1
        pending[letter] = []
        files = [name for name, _ in items]
        if items and isinstance(items[0][1], bytes):
            return BatchJob(LETTERS.index(letter), shard, files, blobs=[data for _, data in items])
        return BatchJob(LETTERS.index(letter), shard, files, paths=[str(path) for _, path in items])

    for letter, name, payload in members:
        pending[letter].append((name, payload))
        if len(pending[letter]) == BATCH_ROWS:
            yield job(letter)
    for letter in folders:
        if pending[letter] or numbers[letter] == 0:
            yield job(letter)


def _folder_members(top: Path, letters: Iterable[str]) -> Iterator[tuple[str, str, Path]]:
    for letter in letters:
        for name in sorted(entry.name for entry in os.scandir(top / letter)):
            yield letter, f"{top.name}/{letter}/{name}", top / letter / name


def _packed_jobs(
    top: Path, letters: Iterable[str], sources: dict[str, dict], folders: dict[str, Path]
) -> Iterator[BatchJob]:
    """A job per row group of each packed letter, whose file is checked against its manifest first; the
    workers read the names and bytes themselves."""
    remedy = "the packed letter was damaged after the unpack; rerun the pipeline, which unpacks the archive again"
    for letter in letters:
        checked, groups = checked_groups(top / letter, sources[letter]["manifest"], remedy)
        for number, rows in enumerate(groups or [0]):  # a letter without rows still gets a manifest
            shard = str(shard_file(folders[letter], number))
            yield BatchJob(LETTERS.index(letter), shard, [], packed=(checked, number, rows) if rows else None)


def _archive_members(archive: Path, wanted: Iterable[str]) -> Iterator[tuple[str, str, bytes]]:
    """Members of the wanted letters, in archive order."""
    wanted = set(wanted)
    for name, data in iter_files(archive, max_members=MAX_MEMBERS, max_total_bytes=MAX_TOTAL_BYTES):
        parts = name.strip("/").split("/")
        if len(parts) != 3 or parts[1] not in LETTERS:
            raise ArchiveError(f"{archive}: member {name!r} is not <top>/<letter A-J>/<file>")
        if parts[1] in wanted:
            yield parts[1], name, data


def _new_pool(workers: int) -> ProcessPoolExecutor:
    # spawn: the parent may run Prefect's threads, which fork() would copy in unknown states.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=start_worker, initargs=(os.getpid(),))
    pool.in_flight = 2 * workers  # jobs queued at once per caller: bounds the images the parent holds
    return pool


class _SharedPool:
    """One process pool for every letter decoded in this process, started when the first batch needs it."""

    def __init__(self, workers: int):
        self.workers, self._pool, self._lock = workers, None, threading.Lock()

    def get(self) -> ProcessPoolExecutor:
        """The pool, started on first use, and started again if a worker died (the letter's retry then works)."""
        with self._lock:
            if self._pool is not None and self._pool._broken:  # a dead worker breaks a ProcessPoolExecutor for good
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            if self._pool is None:
                self._pool = _new_pool(self.workers)
            return self._pool

    def start(self) -> None:
        """Start the workers now (a second of imports each), without waiting for them."""
        pool = self.get()
        for _ in range(self.workers):
            pool.submit(int)  # ProcessPoolExecutor starts its processes as work arrives

    def shutdown(self) -> None:
        """Stop the workers, once the letters in flight are done."""
        if self._pool is not None:
            self._pool.shutdown()


_shared: _SharedPool | None = None


@contextlib.contextmanager
def shared_worker_pool(workers: int | None = None) -> Iterator[None]:
    """Decode the batches of every letter task that runs in this process, in threads, on one process pool
    (started only if some letter needs decoding: a fully cached run starts no process)."""
    global _shared
    _shared = _SharedPool(workers or os.cpu_count() or 1)
    try:
        yield
    finally:
        pool, _shared = _shared, None
        pool.shutdown()


def shared_pool() -> ProcessPoolExecutor | None:
    """The pool `shared_worker_pool` opened (started on first use), or None when none is open."""
    return _shared.get() if _shared is not None else None


def start_shared_workers() -> None:
    """Start the shared pool's workers now, if `shared_worker_pool` opened one: a stage that knows decoding
    will follow (the unpack) calls it, so the workers start while it reads the archive."""
    if _shared is not None:
        _shared.start()


@contextlib.contextmanager
def _worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """The shared pool when one is open, else a process pool of `workers`, or None (decode here) for one worker."""
    if _shared is not None:
        yield _shared.get()
        return
    if workers <= 1:
        yield None
        return
    with _new_pool(workers) as pool:
        yield pool


def _run_jobs(jobs: Iterable[BatchJob], pool: ProcessPoolExecutor | None, progress: Progress) -> dict[str, BatchResult]:
    """Run decode jobs on `pool` (or here when None); returns their results keyed by shard path."""
    results: dict[str, BatchResult] = {}
    pending: dict[Future, BatchJob] = {}

    def collect(futures: Iterable[Future]) -> None:
        for future in futures:
            job = pending.pop(future)
            results[job.shard_path] = future.result()
            progress.advance(job.rows)

    for job in jobs:
        if pool is None:
            results[job.shard_path] = decode_batch(job)
            progress.advance(job.rows)
            continue
        if len(pending) >= pool.in_flight:
            collect(wait(pending, return_when=FIRST_COMPLETED).done)
        pending[pool.submit(decode_batch, job)] = job
    collect(list(pending))
    return results


def _decode_group(
    source: Path, group: list[str], out_dir: Path, sources: dict[str, dict], min_images: int,
    pool: ProcessPoolExecutor | None, progress: Progress,
) -> list[dict]:
    """Decode some letters and put each one passing `min_images` in place; returns those that fall short."""
    logger = stage_logger(__name__)
    temporary = {letter: temporary_sibling(letter_folder(out_dir, letter)) for letter in group}
    short = []
    try:
        for folder in temporary.values():
            folder.mkdir()
        kind = sources[group[0]]["kind"]
        if kind == "archive":
            jobs = _batches(_archive_members(source, group), temporary)
        elif kind == "packed":
            jobs = _packed_jobs(source, group, sources, temporary)
        else:
            jobs = _batches(_folder_members(source, group), temporary)
        by_shard = _run_jobs(jobs, pool, progress)
        for letter, folder in temporary.items():
            results = [by_shard[key] for key in sorted(by_shard) if Path(key).parent == folder]
            fields = letter_fields(letter, sources[letter], results)
            logger.info("Letter %s: %s images, %d rejected", letter, f"{fields['images']:,}", len(fields["rejected"]))
            if fields["images"] < min_images:
                short.append(fields)
                continue
            commit_letter(folder, letter_folder(out_dir, letter), **fields)
    finally:
        for folder in temporary.values():
            remove(folder)
    return short


def _sources(source: Path, letters: str) -> dict[str, dict]:
    """Each letter's input identity: the archive's sha256, its packed letter's listing, or its extracted folder's.

    An extracted folder must still be as its extraction recorded it, and stands for its archive's
    content; a folder made some other way is identified by its listing and newest file as they are now.
    """
    if source.is_file():
        fingerprint = sha256_of(source)
        return {letter: {"kind": "archive", "name": source.name, "fingerprint": fingerprint} for letter in letters}
    if _is_packed(source):
        return {letter: packed_source(source, letter) for letter in letters}
    record = read_record(source)
    if record is not None and (problem := extraction_problem(source, record, letters)) is not None:
        raise CorruptDataError(f"{problem}: extract the archive again (`notmnist extract`, or rerun the pipeline).")
    if record is not None:  # the archive's content and the folder's listing
        fingerprints = {letter: f"{record['archive_sha256']}-{record['classes'][letter]}" for letter in letters}
    else:  # the listing and the newest modification time
        fingerprints = {letter: "{}-{}".format(*folder_state(source / letter)) for letter in letters}
    return {letter: {"kind": "folder", "name": f"{source.name}/{letter}", "fingerprint": fingerprints[letter]}
            for letter in letters}


def _is_packed(source: Path) -> bool:
    """True for a folder of packed letters (the unpack stage's output)."""
    return any(find_packed(source / letter) is not None for letter in LETTERS)


def packed_source(source: Path, letter: str) -> dict:
    """A packed letter as an input: identified by its manifest's listing (unverified: it is checked as it is read)."""
    manifest = find_packed(source / letter)
    if manifest is None:
        raise PipelineError(f"{source / letter} holds no packed letter: unpack the archive first (rerun the pipeline).")
    return {"kind": "packed", "name": f"{source.name}/{letter}", "fingerprint": manifest_identity(manifest),
            "manifest": manifest}


def decode_to_shards(
    source: Path, out_dir: Path, *, min_images: int = 0, workers: int | None = None, letters: str = LETTERS
) -> dict[str, dict]:
    """Decode an archive's packed letters, its extracted folder, or a .tar.gz read directly, into `out_dir/<letter>/`.

    Args:
        source: the packed folder (packed/notMNIST_large), the extracted top folder
            (e.g. extracted/notMNIST_large), or the archive itself.
        out_dir: where each letter's folder of shards and manifest goes.
        min_images: fewest usable images a letter may have (the seed: 45,000 large, 1,800 small).
        workers: decode processes; default one per core.
        letters: which letters to decode (all ten by default).

    Returns:
        Each letter's manifest.
    """
    logger = stage_logger(__name__)
    source, out_dir = Path(source), Path(out_dir)
    if not source.exists():
        raise PipelineError(f"{source} does not exist: give a notMNIST .tar.gz, or its packed or extracted folder")
    if source.is_dir():
        found = sorted(p.name for p in source.iterdir() if p.is_dir())
        if set(letters) - set(found):
            raise ArchiveError(f"{source} should hold folders {', '.join(letters)}; found {found or 'none'}")
    out_dir.mkdir(parents=True, exist_ok=True)

    # One decode of a letter at a time (letters may be decoded by tasks of their own, in parallel);
    # leftovers of a letter are then surely a dead run's.
    with contextlib.ExitStack() as locks:
        for letter in sorted(set(letters)):
            locks.enter_context(FileLock(str(lock_file(letter_folder(out_dir, letter)))))
            remove_temporaries_of(letter_folder(out_dir, letter))
        sources = _sources(source, letters)
        todo = [letter for letter in letters if find_letter(letter_folder(out_dir, letter), sources[letter]["fingerprint"]) is None]
        if len(todo) < len(letters):
            logger.info("Already decoded from this input, skipped: %s", "".join(sorted(set(letters) - set(todo))))
        # From a folder each letter is put in place as soon as it is done, so a crash keeps the
        # finished ones; an archive is read once for all letters.
        groups = [todo] if source.is_file() else [[letter] for letter in todo]
        kind = sources[letters[0]]["kind"]
        if kind == "archive":
            total = None
        elif kind == "packed":
            total = sum(sources[letter]["manifest"]["images"] for letter in todo)
        else:
            total = sum(len(os.listdir(source / letter)) for letter in todo)
        short: list[dict] = []
        name = source.name if set(letters) == set(LETTERS) else f"{source.name} {''.join(letters)}"
        with contextlib.ExitStack() as stack:
            if todo:  # no worker is started for letters already done
                pool = stack.enter_context(_worker_pool(workers or os.cpu_count() or 1))
                progress = stack.enter_context(
                    Progress(f"decode {name}", total, key=artifact_key("decode", name), unit="images")
                )
            for group in filter(None, groups):
                short += _decode_group(source, group, out_dir, sources, min_images, pool, progress)

    left_out = {manifest["letter"] for manifest in short}  # too short to be put in place
    manifests = {letter: read_letter_manifest(out_dir, letter) for letter in letters if letter not in left_out}
    # Letters decoded by an earlier run count too: a higher min_images applies to them as well.
    short += [manifest for manifest in manifests.values() if manifest["images"] < min_images]
    if short:
        details = "; ".join(f"letter {m['letter']} has {m['images']:,}" for m in sorted(short, key=lambda m: m["letter"]))
        raise TooFewImagesError(
            f"{details} usable images, fewer than min_images={min_images:,} (rejected files: "
            f"{sum(len(m['rejected']) for m in short):,}). Check the archive, or lower min_images."
        )
    return manifests


def decode_letter(root: DataRoot, archive: str, letter: str, *, min_images: int = 0) -> dict:
    """Decode one packed letter of `archive` into its folder of shards (the seed's `load_letter`); returns its manifest.

    Reads packed/<archive>/<letter> of the working copy and writes shards/<archive>/<letter> (the stage
    boundary fetches the one and publishes the other); decodes in this process, or on the pool
    `shared_worker_pool` opened.
    """
    which = {"archive": archive, "letter": letter}
    (packed,), (shards,) = _packed_letter(root, which), _letter_shards(root, which)
    manifest = decode_to_shards(packed.parent, shards.parent, min_images=min_images, workers=1, letters=letter)
    return manifest[letter]


def _packed_letter(root: DataRoot, parameters: dict) -> list[Path]:
    return [root.packed(parameters["archive"]) / parameters["letter"]]


def _letter_shards(root: DataRoot, parameters: dict) -> list[Path]:
    return [letter_folder(root.shards(parameters["archive"]), parameters["letter"])]


def _letter_current(root: DataRoot, parameters: dict, manifests: dict[Path, dict]) -> bool:
    """The letter was decoded from the packed letter the data root holds now (a worker's copy may be older)."""
    (manifest,) = manifests.values()
    packed = _packed_identity(root, parameters)
    return packed is not None and manifest.get("source", {}).get("fingerprint") == packed


def _packed_identity(root: DataRoot, parameters: dict) -> str | None:
    """The identity of the packed letter the data root holds now (None: it holds none)."""
    packed = root.committed(_packed_letter(root, parameters)[0], verify=False)
    return None if packed is None else manifest_identity(packed)


LETTER_STAGE = Stage(outputs=_letter_shards, reads=_packed_letter, current=_letter_current)
letter_task = stage_task(
    decode_letter,
    stage=LETTER_STAGE,
    name="decode-letter",
    task_run_name=lambda parameters: f"decode {archive_stem(parameters['archive'])} {parameters['letter']}",
    # The packed letter it reads, as the data root holds it, is in the key: the unpack may have decoded the letter
    # already (tasks/early_decode.py), so a new archive's letters must not find the old archive's record.
    keyed_on=lambda parameters: str(_packed_identity(parameters["root"], parameters)),
    retries=1,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_pipeline_error,
)
