"""Splits stage: class-balanced train/valid/test with a seeded shuffle and duplicate-leak control.

The seed's `merge_datasets` + `randomize`: per letter, shuffle, take valid (size // 10) then train
from notMNIST_large, test from notMNIST_small, then shuffle each split; `np.random.seed(133)`.
This keeps that shape and call order with a `RandomState(seed)`, over rows sorted by file name (so
neither the file system's listing order nor the decode worker count changes the result).

notMNIST is full of exact duplicates, so a test set drawn that way shares images with train.
`dedup` controls it, using the shards' pixel digests:

    none         the seed's sampling, duplicates and all
    cross-split  no valid or test image equals a train image, no test image a valid one; leaking
                 picks are replaced by the next candidates of the same letter (default)
    all          cross-split, and every split unique within itself

Only file names and digests are held for selection; pixels are copied letter by letter into
memory-mapped NPY files, so memory stays far below the splits' size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from prefect import task

from storage.arrays import IMAGE_SHAPE, array_digest, create_npy, load_npy
from storage.atomic import atomic_path, read_json, remove_leftovers, write_json
from storage.digests import dataset_fingerprint
from storage.shards import pixels_of, read_shard
from tasks.caching import stage_cache
from tasks.decode import LETTERS, MANIFEST
from tasks.errors import PipelineError
from tasks.reporting import stage_logger

DEDUP_MODES = ("none", "cross-split", "all")
SPLITS = ("train", "valid", "test")
SPLIT_FORMAT = 1


class TooFewUsableImagesError(PipelineError):
    """A letter cannot fill its share of the splits."""


@dataclass
class _Letter:
    """One letter of one archive: rows sorted by file name, with where each row's pixels live."""

    letter: str
    files: np.ndarray  # object array of str
    digests: np.ndarray  # (n,) of 16-byte strings
    shard: np.ndarray  # index into `shard_paths`
    row: np.ndarray  # row inside that shard
    shard_paths: list[Path]


def _read_letter(shards_dir: Path, letter: str) -> _Letter:
    manifest = read_json(shards_dir / letter / MANIFEST)
    files, digests, shard_ids, rows, paths = [], [], [], [], []
    for number, shard in enumerate(manifest["shards"]):
        path = shards_dir / letter / shard["file"]
        table = read_shard(path, columns=["file", "digest"])
        files.extend(table.column("file").to_pylist())
        digests.append(np.frombuffer(table.column("digest").combine_chunks().buffers()[1], dtype="S16")[: len(table)])
        shard_ids.append(np.full(len(table), number, dtype=np.int32))
        rows.append(np.arange(len(table), dtype=np.int32))
        paths.append(path)
    order = np.argsort(np.array(files, dtype=object), kind="stable")
    concat = lambda parts, dtype: np.concatenate(parts) if parts else np.empty(0, dtype)  # noqa: E731
    return _Letter(
        letter,
        np.array(files, dtype=object)[order],
        concat(digests, "S16")[order],
        concat(shard_ids, np.int32)[order],
        concat(rows, np.int32)[order],
        paths,
    )


def input_identity(shards_dir: Path) -> str:
    """Fingerprint of a shard set: every letter's shard sha256s, in order."""
    listing = {letter: [s["sha256"] for s in read_json(shards_dir / letter / MANIFEST)["shards"]] for letter in LETTERS}
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def _pick(candidates: np.ndarray, digests: np.ndarray, count: int, avoid: set, unique: bool) -> tuple[np.ndarray, int]:
    """The first `count` candidates whose digest is not in `avoid`, and how many candidates were examined.

    With `unique`, each pick's digest joins `avoid`, so a split never holds the same image twice.
    """
    picked: list[int] = []
    examined = 0
    for examined, index in enumerate(candidates, start=1):
        digest = digests[index]
        if digest in avoid:
            continue
        picked.append(index)
        if unique:
            avoid.add(digest)
        if len(picked) == count:
            break
    return np.array(picked, dtype=np.int64), examined


def _shuffled(count: int, rng: np.random.RandomState) -> np.ndarray:
    order = np.arange(count)
    rng.shuffle(order)
    return order


def _require(letter: _Letter, archive: str, have: int, need: int, what: str) -> None:
    if have < need:
        raise TooFewUsableImagesError(
            f"letter {letter.letter} of {archive} has {have:,} usable images for {what}, which needs {need:,} "
            f"per class ({len(letter.files):,} decoded); use smaller split sizes or a weaker dedup mode"
        )


Chosen = dict[str, list[tuple[_Letter, np.ndarray]]]


def choose_rows(
    large: list[_Letter], small: list[_Letter], per_class: dict[str, int], dedup: str, rng: np.random.RandomState
) -> Chosen:
    """Each split's rows as (letter, row indices in pick order), letters in label order."""
    # The seed's call order: shuffle each large letter, then each small one, then each split.
    large_orders = [_shuffled(len(letter.files), rng) for letter in large]
    small_orders = [_shuffled(len(letter.files), rng) for letter in small]
    valid_n, train_n, test_n = per_class["valid"], per_class["train"], per_class["test"]
    chosen: Chosen = {split: [] for split in SPLITS}
    unique = dedup == "all"

    for letter in large:
        _require(letter, "notMNIST_large", len(letter.files), valid_n + train_n, "valid and train")
    for letter in small:
        _require(letter, "notMNIST_small", len(letter.files), test_n, "test")

    train_digests: set = set()
    valid_candidates = []
    for letter, order in zip(large, large_orders):
        if dedup == "all":
            rows, examined = _pick(order[valid_n:], letter.digests, train_n, train_digests, unique=True)
        else:  # the seed's train rows exactly
            rows, examined = order[valid_n : valid_n + train_n], train_n
        _require(letter, "notMNIST_large", len(rows), train_n, "train once repeats are skipped")
        chosen["train"].append((letter, rows))
        train_digests.update(letter.digests[rows].tolist())
        # valid draws from the seed's valid rows first, then from what train left unused
        valid_candidates.append(np.concatenate([order[:valid_n], order[valid_n + examined :]]))

    avoid_in_valid = set() if dedup == "none" else set(train_digests)
    for letter, candidates in zip(large, valid_candidates):
        rows, _ = _pick(candidates, letter.digests, valid_n, avoid_in_valid, unique)
        _require(letter, "notMNIST_large", len(rows), valid_n, f"valid (dedup={dedup!r})")
        chosen["valid"].append((letter, rows))

    valid_digests = {d for letter, rows in chosen["valid"] for d in letter.digests[rows].tolist()}
    avoid_in_test = set() if dedup == "none" else train_digests | valid_digests
    for letter, order in zip(small, small_orders):
        rows, _ = _pick(order, letter.digests, test_n, avoid_in_test, unique)
        _require(letter, "notMNIST_small", len(rows), test_n, f"test (dedup={dedup!r})")
        chosen["test"].append((letter, rows))
    return chosen


def overlap_report(chosen: Chosen) -> dict[str, int]:
    """Duplicate counts within each split and across splits (rows of the later split found in the earlier)."""
    digests = {split: np.concatenate([l.digests[r] for l, r in parts]) for split, parts in chosen.items()}
    report = {}
    for split, values in digests.items():
        report[f"{split}_rows"] = int(len(values))
        report[f"{split}_unique"] = int(len(np.unique(values)))
    for earlier, later in (("train", "valid"), ("train", "test"), ("valid", "test")):
        report[f"{later}_in_{earlier}"] = int(np.isin(digests[later], digests[earlier]).sum())
    return report


def _write_split(folder: Path, split: str, parts: list[tuple[_Letter, np.ndarray]], rng: np.random.RandomState) -> dict:
    """Write x/y/file NPY files of one split in the seed's shuffled order, copying pixels letter by letter."""
    total = sum(len(rows) for _, rows in parts)
    permutation = rng.permutation(total)  # the seed's randomize(): row i of the output is input row permutation[i]
    position = np.empty(total, dtype=np.int64)
    position[permutation] = np.arange(total)
    x = create_npy(folder / f"{split}_x.npy", (total, *IMAGE_SHAPE), np.uint8)
    y = create_npy(folder / f"{split}_y.npy", (total,), np.int64)
    files = np.empty(total, dtype=object)
    start = 0
    for letter, rows in parts:
        targets = position[start : start + len(rows)]
        y[targets] = LETTERS.index(letter.letter)
        files[targets] = letter.files[rows]
        for shard_number, path in enumerate(letter.shard_paths):
            in_shard = letter.shard[rows] == shard_number
            if in_shard.any():
                pixels = pixels_of(read_shard(path, columns=["pixels"]))
                x[targets[in_shard]] = pixels[letter.row[rows][in_shard]]
        start += len(rows)
    names = np.array([name.encode() for name in files], dtype=bytes)
    np.save(folder / f"{split}_file.npy", names, allow_pickle=False)
    x.flush(), y.flush()
    counts = np.bincount(y, minlength=len(LETTERS))
    return {
        "rows": int(total),
        "per_class": {letter: int(count) for letter, count in zip(LETTERS, counts)},
        "x_sha256": array_digest(x),
        "y_sha256": array_digest(y),
    }


def split_folder(
    large_shards: Path, small_shards: Path, splits_root: Path, *, train_size: int, valid_size: int,
    test_size: int, seed: int, dedup: str,
) -> Path:
    """The folder that holds the splits of these inputs and parameters (one folder per combination)."""
    fingerprints = [input_identity(Path(large_shards)), input_identity(Path(small_shards))]
    inputs_key = hashlib.sha256(json.dumps(fingerprints).encode()).hexdigest()[:12]
    return Path(splits_root) / f"train{train_size}-valid{valid_size}-test{test_size}-seed{seed}-{dedup}-{inputs_key}"


def splits_are_there(**parameters) -> bool:
    """Whether the split folder for these parameters (those of `split_folder`) is complete on disk."""
    try:
        return _is_complete(split_folder(**parameters)) is not None
    except (OSError, ValueError, KeyError):
        return False


def _is_complete(folder: Path) -> dict | None:
    """The manifest of a finished split folder whose arrays are all there, else None."""
    try:
        manifest = read_json(folder / "manifest.json")
    except (OSError, ValueError):
        return None
    if manifest.get("format") != SPLIT_FORMAT:
        return None
    for split in SPLITS:
        rows = manifest["splits"][split]["rows"]
        for name, shape in (("x", (rows, *IMAGE_SHAPE)), ("y", (rows,)), ("file", (rows,))):
            try:
                if load_npy(folder / f"{split}_{name}.npy").shape != shape:
                    return None
            except (OSError, ValueError):
                return None
    return manifest


def build_splits(
    large_shards: Path,
    small_shards: Path,
    splits_root: Path,
    *,
    train_size: int = 200_000,
    valid_size: int = 10_000,
    test_size: int = 10_000,
    seed: int = 133,
    dedup: str = "cross-split",
) -> dict:
    """Build (or find) the split folder for these inputs and parameters; returns its manifest.

    Args:
        large_shards: shards of notMNIST_large (valid and train are drawn from it).
        small_shards: shards of notMNIST_small (test is drawn from it).
        splits_root: where split folders go; each parameter set gets its own folder.
        train_size, valid_size, test_size: rows per split; each class gives size // 10.
        seed: the seed of the shuffles (the seed's np.random.seed(133)).
        dedup: "none", "cross-split" or "all" (see the module docstring).
    """
    if dedup not in DEDUP_MODES:
        raise PipelineError(f"dedup must be one of {', '.join(DEDUP_MODES)}; got {dedup!r}")
    sizes = {"train": train_size, "valid": valid_size, "test": test_size}
    if min(sizes.values()) < len(LETTERS):
        raise PipelineError(f"each split needs at least {len(LETTERS)} rows (one per class); got {sizes}")
    logger = stage_logger(__name__)
    per_class = {split: size // len(LETTERS) for split, size in sizes.items()}
    inputs = {
        "notMNIST_large": {"shards": str(large_shards), "fingerprint": input_identity(large_shards)},
        "notMNIST_small": {"shards": str(small_shards), "fingerprint": input_identity(small_shards)},
    }
    folder = split_folder(
        large_shards, small_shards, splits_root, train_size=train_size, valid_size=valid_size,
        test_size=test_size, seed=seed, dedup=dedup,
    )
    if (manifest := _is_complete(folder)) is not None:
        logger.info("Splits already built for these inputs and parameters: %s", folder)
        return manifest

    Path(splits_root).mkdir(parents=True, exist_ok=True)
    # One build at a time per splits root: leftovers are then surely a dead run's, and a second
    # process asking for the same folder finds it finished instead of building it again.
    with FileLock(str(Path(splits_root) / ".lock")):
        if (manifest := _is_complete(folder)) is not None:
            return manifest
        remove_leftovers(Path(splits_root))
        large = [_read_letter(Path(large_shards), letter) for letter in LETTERS]
        small = [_read_letter(Path(small_shards), letter) for letter in LETTERS]
        rng = np.random.RandomState(seed)
        chosen = choose_rows(large, small, per_class, dedup, rng)
        after = overlap_report(chosen)
        before = overlap_report(choose_rows(large, small, per_class, "none", np.random.RandomState(seed)))
        with atomic_path(folder) as temporary:
            temporary.mkdir()
            written = {split: _write_split(temporary, split, chosen[split], rng) for split in ("train", "test", "valid")}
            fingerprint = dataset_fingerprint({split: written[split] for split in SPLITS})
            manifest = {
                "format": SPLIT_FORMAT,
                "folder": str(folder),
                "fingerprint": fingerprint,
                "seed": seed,
                "dedup": dedup,
                "requested_sizes": sizes,
                "splits": {split: written[split] for split in SPLITS},
                "inputs": inputs,
                "overlap": {"seed_sampling": before, "after_dedup": after},
            }
            write_json(temporary / "manifest.json", manifest)
    logger.info(
        "Splits %s: train %s, valid %s, test %s rows; test images also in train: %d before, %d after dedup",
        folder.name, *(f"{written[s]['rows']:,}" for s in SPLITS), before["test_in_train"], after["test_in_train"],
    )
    return manifest


def _splits_inputs(parameters: dict) -> list[Path]:
    """The letter manifests of both shard sets: rewritten whenever their shards are."""
    return [Path(parameters[name]) / letter / MANIFEST for name in ("large_shards", "small_shards") for letter in LETTERS]


@task(name="splits", cache_policy=stage_cache(reads=_splits_inputs), persist_result=True)
def splits_task(
    large_shards: Path, small_shards: Path, splits_root: Path, train_size: int = 200_000,
    valid_size: int = 10_000, test_size: int = 10_000, seed: int = 133, dedup: str = "cross-split",
) -> dict:
    """Prefect task: `build_splits`."""
    return build_splits(
        large_shards, small_shards, splits_root, train_size=train_size, valid_size=valid_size,
        test_size=test_size, seed=seed, dedup=dedup,
    )
