"""The splits stage's work: choose each split's rows and write them, with no Prefect imported.

The seed's `merge_datasets` + `randomize`: per letter, shuffle, take valid (size // 10) then train
from notMNIST_large, test from notMNIST_small, then shuffle each split; `np.random.seed(133)`.
This keeps that shape and call order with a `RandomState(seed)`, over rows sorted by file name (so
neither the file system's listing order nor the decode worker count changes the result). Which
split each group of identical images goes to is tasks/split_groups.py's (dedup modes: tasks/splits.py).

Only file names and digests are held for selection; pixels are copied letter by letter into
memory-mapped NPY files, so memory stays far below the splits' size. Every shard is checked against
the sha256 its letter's manifest recorded as it is read (storage/letters.py), and the folder is
committed with its own manifest (storage/splits.py).

At the seed's sizes the stage runs `write_splits` in a process of its own (tasks/own_process.py): the
half-million file names and digests it holds would otherwise leave the pipeline's process with a
fragmented heap, some 120 MB still resident when training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import PipelineError
from core.seed import LETTERS
from storage.layout import DataRoot, archive_stem
from storage.letters import LetterShards, letter_folder, letter_manifest, shard_set_identity_of
from storage.shards import pixels_of
from storage.splits import SPLITS, SplitWriter
from tasks.split_groups import assign


class TooFewUsableImagesError(PipelineError):
    """A letter cannot fill its share of the splits."""


@dataclass
class _Letter:
    """One letter of one archive: rows sorted by file name, with where each row's pixels live."""

    letter: str
    files: np.ndarray  # object array of str
    digests: np.ndarray  # (n,) of 16-byte strings
    shard: np.ndarray  # index into the letter's shards
    row: np.ndarray  # row inside that shard
    shards: LetterShards  # every shard read is checked against the letter's manifest


def _read_letter(shards_dir: Path, letter: str) -> _Letter:
    shards = LetterShards(shards_dir, letter)
    files, digests, shard_ids, rows = [], [], [], []
    for number in range(len(shards)):
        table = shards.read(number, ["file", "digest"])
        files.extend(table.column("file").to_pylist())
        digests.append(np.frombuffer(table.column("digest").combine_chunks().buffers()[1], dtype="S16")[: len(table)])
        shard_ids.append(np.full(len(table), number, dtype=np.int32))
        rows.append(np.arange(len(table), dtype=np.int32))
    order = np.argsort(np.array(files, dtype=object), kind="stable")
    concat = lambda parts, dtype: np.concatenate(parts) if parts else np.empty(0, dtype)  # noqa: E731
    return _Letter(
        letter,
        np.array(files, dtype=object)[order],
        concat(digests, "S16")[order],
        concat(shard_ids, np.int32)[order],
        concat(rows, np.int32)[order],
        shards,
    )


def _shuffled(count: int, rng: np.random.RandomState) -> np.ndarray:
    order = np.arange(count)
    rng.shuffle(order)
    return order


def _require(letter: _Letter, archive: str, have: int, need: int, what: str) -> None:
    if have < need:
        distinct = len(np.unique(letter.digests))
        raise TooFewUsableImagesError(
            f"letter {letter.letter} of {archive} has {have:,} usable images for {what}, which needs {need:,} "
            f"per class ({len(letter.files):,} decoded, {distinct:,} of them distinct); use smaller split sizes "
            "or a weaker dedup mode"
        )


Chosen = dict[str, list[tuple[_Letter, np.ndarray]]]


def choose_rows(
    large: list[_Letter], small: list[_Letter], per_class: dict[str, int], dedup: str, rng: np.random.RandomState
) -> Chosen:
    """Each split's rows as (letter, row indices in pick order), letters in label order.

    With dedup, whole groups of identical images go to one split, decided for both archives at once
    (tasks/split_groups.py), so a letter is refused only when no assignment exists.
    """
    # The seed's call order: shuffle each large letter, then each small one, then each split.
    large_orders = [_shuffled(len(letter.files), rng) for letter in large]
    small_orders = [_shuffled(len(letter.files), rng) for letter in small]
    valid_n, train_n, test_n = per_class["valid"], per_class["train"], per_class["test"]
    chosen: Chosen = {split: [] for split in SPLITS}

    for letter in large:
        _require(letter, "notMNIST_large", len(letter.files), valid_n + train_n, "valid and train")
    for letter in small:
        _require(letter, "notMNIST_small", len(letter.files), test_n, "test")

    placed: dict[bytes, str] = {}  # shared by the letters, so an image drawn by two letters cannot leak either
    for large_letter, large_order, small_letter, small_order in zip(large, large_orders, small, small_orders):
        if dedup == "none":  # the seed's slices, repeats and all
            rows = {"valid": large_order[:valid_n], "train": large_order[valid_n : valid_n + train_n],
                    "test": small_order[:test_n]}
        else:
            positions = assign(large_letter.digests[large_order], small_letter.digests[small_order], per_class,
                               unique=dedup == "all", placed=placed)
            if positions is None:
                raise TooFewUsableImagesError(_refusal(large_letter, small_letter, per_class, dedup, placed))
            rows = {split: (small_order if split == "test" else large_order)[positions[split]] for split in SPLITS}
        chosen["valid"].append((large_letter, rows["valid"]))
        chosen["train"].append((large_letter, rows["train"]))
        chosen["test"].append((small_letter, rows["test"]))
    return chosen


def _refusal(large: _Letter, small: _Letter, per_class: dict[str, int], dedup: str, placed: dict) -> str:
    in_large = set(large.digests.tolist())
    unseen = set(small.digests.tolist()) - in_large
    elsewhere = len((in_large | unseen) & placed.keys())
    return (
        f"letter {large.letter}: no way to give valid {per_class['valid']:,}, train {per_class['train']:,} and test "
        f"{per_class['test']:,} images per class with every group of identical images in one split "
        f"(dedup={dedup!r}); notMNIST_large has {len(large.files):,} decoded, {len(in_large):,} of them distinct, "
        f"notMNIST_small {len(small.files):,}, {len(unseen):,} of them distinct and not in notMNIST_large"
        + (f", and {elsewhere:,} of these images are already in another letter's split" if elsewhere else "")
        + "; use smaller split sizes or a weaker dedup mode"
    )


def overlap_report(chosen: Chosen) -> dict[str, int]:
    """Duplicate counts within each split and across splits (rows of the later split found in the earlier)."""
    digests = {split: np.concatenate([l.digests[r] for l, r in parts]) for split, parts in chosen.items()}
    report = {}
    for split, values in digests.items():
        report[f"{split}_rows"] = len(values)
        report[f"{split}_unique"] = len(np.unique(values))
    for earlier, later in (("train", "valid"), ("train", "test"), ("valid", "test")):
        report[f"{later}_in_{earlier}"] = int(np.isin(digests[later], digests[earlier]).sum())
    return report


def _write_split(
    writer: SplitWriter, split: str, parts: list[tuple[_Letter, np.ndarray]], rng: np.random.RandomState
) -> None:
    """Write one split in the seed's shuffled order, copying pixels shard by shard, each shard verified."""
    total = sum(len(rows) for _, rows in parts)
    permutation = rng.permutation(total)  # the seed's randomize(): row i of the output is input row permutation[i]
    position = np.empty(total, dtype=np.int64)
    position[permutation] = np.arange(total)
    x, y = writer.create(split, total)
    files = np.empty(total, dtype=object)
    start = 0
    for letter, rows in parts:
        targets = position[start : start + len(rows)]
        y[targets] = LETTERS.index(letter.letter)
        files[targets] = letter.files[rows]
        shard_of_row = letter.shard[rows]
        for number in np.unique(shard_of_row).tolist():
            in_shard = shard_of_row == number
            x[targets[in_shard]] = pixels_of(letter.shards.read(number, ["pixels"]))[letter.row[rows][in_shard]]
        start += len(rows)
    x.flush(), y.flush()
    writer.save_files(split, files.tolist())


def input_identities(root: DataRoot, large: str, small: str, *, local: bool = False) -> list[tuple[str, str]] | None:
    """(archive name, shard-set fingerprint) of the large input, then of the small one, from the letters the data
    root holds (with `local`, those of this machine's working copy); None while a letter is missing."""
    identities = []
    for archive in (large, small):
        manifests = {letter: letter_manifest(folder) if local else root.committed(folder, verify=False)
                     for letter, folder in letter_folders(root, archive).items()}
        if None in manifests.values():
            return None
        identities.append((archive, shard_set_identity_of(manifests)))
    return identities


def letter_folders(root: DataRoot, archive: str) -> dict[str, Path]:
    """Each letter's shard folder of `archive` in the working copy."""
    return {letter: letter_folder(root.shards(archive), letter) for letter in LETTERS}


def split_sizes(parameters: dict) -> dict[str, int]:
    """Rows per split from the stage's parameters."""
    return {split: parameters[f"{split}_size"] for split in SPLITS}


def write_splits(root: DataRoot, folder: Path, parameters: dict) -> dict:
    """Choose each split's rows, write them into `folder` and commit it; returns the manifest. The caller holds the
    splits root's lock."""
    large, small, sizes, seed, dedup = (parameters["large"], parameters["small"], split_sizes(parameters),
                                        parameters["seed"], parameters["dedup"])
    inputs = input_identities(root, large, small, local=True)
    large_letters = [_read_letter(root.shards(large), letter) for letter in LETTERS]
    small_letters = [_read_letter(root.shards(small), letter) for letter in LETTERS]
    per_class = {split: size // len(LETTERS) for split, size in sizes.items()}
    rng = np.random.RandomState(seed)
    chosen = choose_rows(large_letters, small_letters, per_class, dedup, rng)
    before = overlap_report(choose_rows(large_letters, small_letters, per_class, "none", np.random.RandomState(seed)))
    with SplitWriter(folder, list(LETTERS)) as writer:
        for split in ("train", "test", "valid"):  # the seed's randomize() order
            _write_split(writer, split, chosen[split], rng)
        return writer.commit(
            seed=seed,
            dedup=dedup,
            requested_sizes=sizes,
            inputs={
                archive_stem(name): {"shards": root.relative(root.shards(name)), "fingerprint": fingerprint}
                for name, fingerprint in inputs
            },
            overlap={"seed_sampling": before, "after_dedup": overlap_report(chosen)},
        )
