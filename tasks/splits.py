"""Splits stage: class-balanced train/valid/test with a seeded shuffle and duplicate-leak control.

The seed's `merge_datasets` + `randomize`: per letter, shuffle, take valid (size // 10) then train
from notMNIST_large, test from notMNIST_small, then shuffle each split; `np.random.seed(133)`.
This keeps that shape and call order with a `RandomState(seed)`, over rows sorted by file name (so
neither the file system's listing order nor the decode worker count changes the result).

notMNIST is full of exact duplicates, so a test set drawn that way shares images with train.
`dedup` controls it, using the shards' pixel digests:

    none         the seed's sampling, duplicates and all
    cross-split  no valid or test image equals a train image, no test image a valid one: every group
                 of identical images goes to one split, in either archive (default)
    all          cross-split, and every split unique within itself

Which split each group goes to is tasks/split_groups.py's: the seed's slicing where there are no
repeats, and a letter refused only when no assignment exists. The rows are chosen and written by
tasks/split_rows.py (at the seed's sizes in a process of its own); this module is the stage around it.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock

from core.defaults import DEDUP
from core.errors import PipelineError
from core.parameters import DEDUP_MODES
from core.seed import LARGE_ARCHIVE, LETTERS, SEED, SMALL_ARCHIVE, TEST_SIZE, TRAIN_SIZE, VALID_SIZE
from storage.atomic import remove_leftovers
from storage.layout import DataRoot, archive_stem, lock_file, short_digest, splits_key
from storage.letters import letter_manifest
from storage.splits import SPLITS, find_splits
from tasks.own_process import run_in_own_process
from tasks.reporting import stage_logger
from tasks.split_rows import TooFewUsableImagesError, input_identities, letter_folders, split_sizes, write_splits
from tasks.stage import Stage, stage_task

__all__ = ["SPLITS", "TooFewUsableImagesError", "build_splits", "check_parameters", "split_folder", "splits_task"]

# From this many rows requested, the rows are chosen and written in a process of its own (tasks/split_rows.py): at
# the seed's 220,000 it returns some 120 MB that training would otherwise find still held; below it, the process's
# start (about a second on 2 cores) costs more than the memory it returns.
OWN_PROCESS_MINIMUM_ROWS = 100_000


def split_folder(root: DataRoot, parameters: dict, *, local: bool = False) -> Path | None:
    """The folder that holds the splits of these input shard sets and parameters (one folder per combination), the
    inputs as the data root holds them (with `local`, as the working copy does); None while one is missing."""
    inputs = input_identities(root, parameters["large"], parameters["small"], local=local)
    if inputs is None:
        return None
    fingerprint = short_digest([identity for _, identity in inputs])
    return root.splits(splits_key(split_sizes(parameters), parameters["seed"], parameters["dedup"], fingerprint))


def check_parameters(sizes: dict[str, int], dedup: str) -> None:
    """PipelineError for split sizes or a dedup mode the stage refuses: the pipeline asks before it downloads."""
    if dedup not in DEDUP_MODES:
        raise PipelineError(f"dedup must be one of {', '.join(DEDUP_MODES)}; got {dedup!r}")
    if min(sizes.values()) < len(LETTERS):
        raise PipelineError(f"each split needs at least {len(LETTERS)} rows (one per class); got {sizes}")
    if uneven := {split: size for split, size in sizes.items() if size % len(LETTERS)}:
        raise PipelineError(
            f"split sizes are shared equally by the {len(LETTERS)} classes, so each must be a multiple of "
            f"{len(LETTERS)}; got {uneven}"
        )


def build_splits(
    root: DataRoot,
    *,
    large: str = LARGE_ARCHIVE,
    small: str = SMALL_ARCHIVE,
    train_size: int = TRAIN_SIZE,
    valid_size: int = VALID_SIZE,
    test_size: int = TEST_SIZE,
    seed: int = SEED,
    dedup: str = DEDUP,
) -> dict:
    """Build (or find) the split folder for these inputs and parameters; returns its manifest.

    Args:
        root: the data root; shards are read from shards/<archive>, the folder goes to splits/<key>.
        large: the archive whose shards valid and train are drawn from (notMNIST_large).
        small: the archive whose shards test is drawn from (notMNIST_small).
        train_size, valid_size, test_size: rows per split, multiples of 10: each class gives a tenth.
        seed: the seed of the shuffles (the seed's np.random.seed(133)).
        dedup: "none", "cross-split" or "all" (see the module docstring).
    """
    parameters = dict(large=large, small=small, train_size=train_size, valid_size=valid_size, test_size=test_size,
                      seed=seed, dedup=dedup)
    check_parameters(split_sizes(parameters), dedup)
    root, logger = DataRoot.of(root), stage_logger(__name__)
    folder = split_folder(root, parameters, local=True)  # of the letters read: those the boundary fetched
    if folder is None:
        missing = [f"{archive_stem(archive)} {letter}" for archive in (large, small)
                   for letter, path in letter_folders(root, archive).items() if letter_manifest(path) is None]
        raise PipelineError(f"{root.location} has no decoded letters {', '.join(missing)}: decode them first "
                            "(`notmnist shards`, or rerun the pipeline).")
    if (manifest := find_splits(folder)) is not None:
        logger.info("Splits already built for these inputs and parameters: %s", root.url(folder))
        return manifest
    root.splits_root.mkdir(parents=True, exist_ok=True)
    # One build at a time per splits root: leftovers are then surely a dead run's, and a second
    # process asking for the same folder finds it finished instead of building it again.
    with FileLock(str(lock_file(root.splits_root))):
        if (manifest := find_splits(folder)) is not None:
            return manifest
        remove_leftovers(root.splits_root)
        if sum(split_sizes(parameters).values()) >= OWN_PROCESS_MINIMUM_ROWS:
            manifest = run_in_own_process(write_splits, root, folder, parameters)
        else:
            manifest = write_splits(root, folder, parameters)
    before, after = manifest["overlap"]["seed_sampling"], manifest["overlap"]["after_dedup"]
    logger.info(
        "Splits %s: train %s, valid %s, test %s rows; test images also in train: %d before, %d after dedup",
        folder.name, *(f"{manifest['splits'][s]['rows']:,}" for s in SPLITS), before["test_in_train"],
        after["test_in_train"],
    )
    return manifest


def _split_inputs(root: DataRoot, parameters: dict) -> list[Path]:
    return [folder for archive in (parameters["large"], parameters["small"])
            for folder in letter_folders(root, archive).values()]


def _split_output(root: DataRoot, parameters: dict) -> list[Path] | None:
    folder = split_folder(root, parameters)
    return None if folder is None else [folder]


def _built(root: DataRoot, parameters: dict, manifest: dict) -> list[Path]:
    return [root.splits(manifest["key"])]


splits_task = stage_task(
    build_splits,
    stage=Stage(outputs=_split_output, reads=_split_inputs, built=_built),
    name="splits",
    task_run_name="splits {train_size}/{valid_size}/{test_size} seed {seed}",
)
