"""Decoding a large archive's letters while the unpack still reads it.

The unpack is one serial stream (a gzip file is read in order), and the decode of the large archive's
letters used to wait for its end. Where the pipeline has opened its shared decode pool, the unpack
hands each row group it packs to the pool as well: the workers decode while the main thread reads the
tar. The shards are written to temporary folders and committed, exactly as the decode stage would have
made them (the same batches, the same files, the same manifest naming the packed letter as the
source), only after the whole archive has been read, its checksum has passed and the packed letters
are in place: nothing is trusted early. The decode tasks then find their letters done and skip them;
caching, retries and the per-letter tasks stay as they are.

This is an optimisation only: a letter whose lock another process holds, or any failure of the pool,
leaves that letter to its decode task.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path

from filelock import FileLock, Timeout

from core.seed import LETTERS
from storage.atomic import remove, remove_temporaries_of, temporary_sibling
from storage.layout import lock_file
from storage.letters import commit_letter, letter_folder, shard_file
from tasks.decode import letter_fields, packed_source, shared_pool
from tasks.images import BatchJob, decode_batch
from tasks.reporting import stage_logger


class EarlyDecode:
    """Decode each packed row group of `packed_dir`'s letters into `shards_dir` as it is written; `commit` after."""

    def __init__(self, packed_dir: Path, shards_dir: Path):
        self.packed_dir, self.shards_dir = Path(packed_dir), Path(shards_dir)
        self.pool = shared_pool()
        self.folders: dict[str, Path] = {}
        self.jobs: dict[str, list[Future]] = {}
        self._in_flight: list[Future] = []
        self._locks = contextlib.ExitStack()

    def __enter__(self) -> EarlyDecode:
        if self.pool is None:
            return self
        try:
            self._prepare()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _prepare(self) -> None:
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        for letter in LETTERS:
            final = letter_folder(self.shards_dir, letter)
            try:  # the decode stage's own lock: a letter being decoded elsewhere is left alone
                self._locks.enter_context(FileLock(str(lock_file(final)), timeout=0))
            except Timeout:
                continue
            remove_temporaries_of(final)
            self.folders[letter] = temporary_sibling(final)
            self.folders[letter].mkdir()
            self.jobs[letter] = []

    def __exit__(self, *exception_info) -> None:
        futures = [future for letter_futures in self.jobs.values() for future in letter_futures]
        for future in futures:
            future.cancel()
        wait(futures)  # those already running finish writing before their folders go
        for folder in self.folders.values():
            remove(folder)
        self._locks.close()

    def group(self, letter: str, number: int, names: list[bytes], pngs: list[bytes]) -> None:
        """Decode row group `number` of `letter` (its names as packed, and PNG bytes) on the pool."""
        if letter not in self.jobs:
            return
        job = BatchJob(LETTERS.index(letter), str(shard_file(self.folders[letter], number)),
                       [name.decode("utf-8", "surrogateescape") for name in names], blobs=pngs)
        # The unpack reads faster than the workers decode: past a few batches in flight, it waits for them, so the
        # process holds a few batches of PNG bytes, not the archive's backlog.
        self._in_flight = [future for future in self._in_flight if not future.done()]
        if len(self._in_flight) >= self.pool.in_flight:
            wait(self._in_flight, return_when=FIRST_COMPLETED)
        try:
            future = self.pool.submit(decode_batch, job)
        except RuntimeError:  # a broken or stopped pool: the decode task does this letter
            self._drop(letter)
            return
        self.jobs[letter].append(future)
        self._in_flight.append(future)

    def commit(self) -> list[str]:
        """Put each letter decoded in full in place (the packed letters must be in place); returns those letters."""
        committed = []
        for letter in list(self.jobs):
            try:
                results = [future.result() for future in self.jobs[letter]]
            except Exception as error:  # noqa: BLE001 - a worker that died: the decode task redoes the letter
                stage_logger(__name__).warning("Letter %s was not decoded during the unpack (%s)", letter, error)
                self._drop(letter)
                continue
            try:
                commit_letter(self.folders[letter], letter_folder(self.shards_dir, letter),
                              **letter_fields(letter, packed_source(self.packed_dir, letter), results))
            except Exception as error:  # noqa: BLE001 - the packed letters are in place: their decode tasks do it
                stage_logger(__name__).warning("Letter %s decoded during the unpack was not kept (%s)", letter, error)
                continue
            committed.append(letter)
        return committed

    def _drop(self, letter: str) -> None:
        futures = self.jobs.pop(letter, [])
        for future in futures:
            future.cancel()
        wait(futures)
