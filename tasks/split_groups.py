"""Which split each group of identical images goes to, so that no image is in two splits.

One letter at a time, both archives at once: valid and train draw from the large archive, test from the
small one, and every group of identical images (the same pixel digest, in either archive) goes to one
split or to none. A group that an earlier letter already placed stays where it is.

The preferred assignment keeps the seed's order wherever there are no repeats:
  1. test takes the small archive's images not seen in the large one; when those are too few, it takes
     the groups in both archives that cost the large archive least;
  2. groups with repeats go, largest first, to train (repeats there only weight an image; in valid or test
     they would weight the metric), until train has its share;
  3. every other group, in the seed's order, to valid until it has its share, then to train.
Without repeats this is exactly the seed's slicing: valid = order[:valid], train = order[valid:valid+train].

When that leaves a split short, an exact search decides: a dynamic programme over the groups found in
both archives (valid rows, test rows) -> most train rows, then a subset sum over the large archive's
remaining groups. So a letter is refused only when no assignment exists at all.
"""

from __future__ import annotations

import numpy as np

from core.errors import PipelineError

VALID, TRAIN, TEST, NOWHERE = 0, 1, 2, -1
CODES = {"valid": VALID, "train": TRAIN, "test": TEST}

# The exact search keeps one table of (valid rows + 1) x (test rows still missing + 1) cells per group
# found in both archives; past this many cells it would hold gigabytes, so it refuses instead.
MAX_SEARCH_CELLS = 200_000_000


class SearchTooLargeError(PipelineError):
    """The exact search would need more memory than it is allowed."""


def assign(
    large: np.ndarray, small: np.ndarray, needs: dict[str, int], *, unique: bool, placed: dict[bytes, str]
) -> dict[str, np.ndarray] | None:
    """Positions in `large` for valid and train and in `small` for test, each in the seed's order; None when none exists.

    Args:
        large, small: one letter's digests (16-byte strings) in the seed's shuffled order.
        needs: rows wanted per split ("valid", "train", "test").
        unique: at most one row of each group per split (dedup="all"); otherwise a split may repeat its images.
        placed: digest -> split of groups that earlier letters put in a split; this letter's are added.
    """
    digests, inverse = np.unique(np.concatenate([large, small]), return_inverse=True)
    in_large, in_small = inverse[: len(large)], inverse[len(large):]
    usable_large = _usable(in_large, len(digests), unique)
    usable_small = _usable(in_small, len(digests), unique)
    split = np.array([CODES[placed[d]] if d in placed else NOWHERE for d in digests.tolist()], dtype=np.int8)
    rank = np.full(len(digests), len(large))  # a group's first position in the large archive's seed order
    np.minimum.at(rank, in_large[::-1], np.arange(len(large))[::-1])

    free = split == NOWHERE
    split[free & (usable_large == 0)] = TEST  # seen only in the small archive: test is the only place for it
    spare = _spare(split, usable_large, usable_small, needs)
    choice = _preferred(split, free, usable_large, usable_small, rank, spare)
    if min(_spare(choice, usable_large, usable_small, needs).values()) < 0:
        choice = _searched(split, free, usable_large, usable_small, rank, spare)
        if choice is None:
            return None

    rows = {
        "valid": _walk(in_large, choice, VALID, needs["valid"], unique),
        "train": _walk(in_large, choice, TRAIN, needs["train"], unique),
        "test": _walk(in_small, choice, TEST, needs["test"], unique),
    }
    for name, positions in rows.items():
        taken = in_large[positions] if name != "test" else in_small[positions]
        placed.update(dict.fromkeys(digests[np.unique(taken)].tolist(), name))
    return rows


def _usable(groups: np.ndarray, count: int, unique: bool) -> np.ndarray:
    rows = np.bincount(groups, minlength=count)
    return np.minimum(rows, 1) if unique else rows


def _spare(split: np.ndarray, large: np.ndarray, small: np.ndarray, needs: dict[str, int]) -> dict[str, int]:
    """Rows each split has beyond its need (negative: that many short) with the groups placed so far."""
    return {
        "valid": int(large[split == VALID].sum()) - needs["valid"],
        "train": int(large[split == TRAIN].sum()) - needs["train"],
        "test": int(small[split == TEST].sum()) - needs["test"],
    }


def _preferred(split, free, large, small, rank, spare) -> np.ndarray:
    """The module docstring's steps 1-3 (kept, when they suffice, because they keep the seed's order)."""
    choice = split.copy()
    test_short = -spare["test"]
    both = np.flatnonzero(free & (large > 0) & (small > 0))
    for group in both[np.lexsort((rank[both], -small[both], large[both]))].tolist():  # least lost to the large archive
        if test_short <= 0:
            break
        choice[group], test_short = TEST, test_short - small[group]

    open_ = free & (choice == NOWHERE)
    train_short = -spare["train"]
    repeats = np.flatnonzero(open_ & (large > 1))
    for group in repeats[np.lexsort((rank[repeats], -large[repeats]))].tolist():
        if train_short <= 0:
            break
        choice[group], train_short = TRAIN, train_short - large[group]

    valid_short = -spare["valid"]
    rest = np.flatnonzero(free & (choice == NOWHERE))
    for group in rest[np.argsort(rank[rest], kind="stable")].tolist():
        choice[group] = VALID if valid_short > 0 else TRAIN
        valid_short -= large[group] if choice[group] == VALID else 0
    return choice


def _searched(split, free, large, small, rank, spare) -> np.ndarray | None:
    """An assignment that gives every split its rows, found by exact search; None when there is none."""
    need_valid, need_train, need_test = (max(0, -spare[name]) for name in ("valid", "train", "test"))
    both = np.flatnonzero(free & (large > 0) & (small > 0)) if need_test else np.empty(0, dtype=np.int64)
    rest = np.flatnonzero(free & (split == NOWHERE) & (large > 0) & ~np.isin(np.arange(len(split)), both))
    singles = rest[large[rest] == 1]
    singles = singles[np.argsort(rank[singles], kind="stable")]
    repeats = rest[large[rest] > 1]

    if (len(both) + 1) * (need_valid + 1) * (need_test + 1) > MAX_SEARCH_CELLS:
        raise SearchTooLargeError(
            f"deciding the splits of a letter with {len(both):,} groups of images in both archives, {need_valid:,} "
            f"valid and {need_test:,} test rows still to find, would take more than {MAX_SEARCH_CELLS:,} table cells; "
            "use smaller split sizes or a weaker dedup mode")
    tables = _both_tables(large[both], small[both], need_valid, need_train, need_test)
    reach, parent = _subset_sums(large[repeats])
    sums = np.flatnonzero(reach)
    total = int(large[repeats].sum())
    for valid_rows in np.flatnonzero(tables[-1][:, need_test] >= 0).tolist():
        train_rows = int(tables[-1][valid_rows, need_test])
        valid_more, train_more = max(0, need_valid - valid_rows), max(0, need_train - train_rows)
        from_singles = np.clip(valid_more - sums, 0, len(singles))
        fits = (sums + from_singles >= valid_more) & (total - sums + len(singles) - from_singles >= train_more)
        if not fits.any():
            continue
        at = int(np.argmax(fits))
        choice = split.copy()
        choice[rest] = TRAIN
        choice[repeats[_subset(int(sums[at]), parent, large[repeats])]] = VALID
        choice[singles[: int(from_singles[at])]] = VALID
        choice[both] = _trace(tables, large[both], small[both], need_train, valid_rows, need_test)
        return choice
    return None


def _both_tables(large, small, need_valid, need_train, need_test) -> list[np.ndarray]:
    """table[i][v, x]: most train rows (capped at need_train) once the first i groups give v valid and x test rows
    (each capped at its need), or -1 when no choice of those groups does."""
    table = np.full((need_valid + 1, need_test + 1), -1, dtype=np.int32)
    table[0, 0] = 0
    tables = [table]
    for rows_large, rows_small in zip(large.tolist(), small.tolist()):
        to_train = np.where(table >= 0, np.minimum(table + rows_large, need_train), -1)
        table = np.maximum.reduce([_shifted(table, 0, rows_large), to_train, _shifted(table, 1, rows_small)])
        tables.append(table)
    return tables


def _shifted(table: np.ndarray, axis: int, by: int) -> np.ndarray:
    """table moved `by` cells along `axis`, cells past the end piled (by maximum) onto the last one."""
    last = table.shape[axis] - 1
    moved = np.full_like(table, -1)
    if by == 0:
        return table.copy()
    keep = max(0, last + 1 - by)
    if keep:
        target = [slice(None)] * 2
        source = [slice(None)] * 2
        target[axis], source[axis] = slice(by, None), slice(0, keep)
        moved[tuple(target)] = table[tuple(source)]
    tail = [slice(None)] * 2
    tail[axis] = slice(max(0, last + 1 - by), None)
    piled = table[tuple(tail)].max(axis=axis)
    index = [slice(None)] * 2
    index[axis] = last
    moved[tuple(index)] = np.maximum(moved[tuple(index)], piled)
    return moved


def _trace(tables, large, small, need_train: int, valid_rows: int, test_rows: int) -> np.ndarray:
    """The split of each group in both archives that reaches tables[-1][valid_rows, test_rows]."""
    choice = np.empty(len(large), dtype=np.int8)
    last_valid, last_test = tables[0].shape[0] - 1, tables[0].shape[1] - 1
    for group in range(len(large) - 1, -1, -1):
        before, value = tables[group], tables[group + 1][valid_rows, test_rows]
        if before[valid_rows, test_rows] >= 0 and min(before[valid_rows, test_rows] + large[group], need_train) == value:
            choice[group] = TRAIN
        elif hits := [v for v in _sources(valid_rows, large[group], last_valid) if before[v, test_rows] == value]:
            choice[group], valid_rows = VALID, hits[0]
        else:
            hits = [x for x in _sources(test_rows, small[group], last_test) if before[valid_rows, x] == value]
            choice[group], test_rows = TEST, hits[0]
    return choice


def _sources(cell: int, by: int, last: int) -> list[int]:
    """Cells that moving `by` (capped at `last`) lands on `cell`."""
    if cell < last:
        return [cell - by] if cell - by >= 0 else []
    return list(range(max(0, last - by), last + 1)) if by else [last]


def _subset_sums(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """reach[s]: some subset of `weights` sums to s; parent[s]: the first weight (index) with which s was reached."""
    total = int(weights.sum())
    reach = np.zeros(total + 1, dtype=bool)
    reach[0] = True
    parent = np.full(total + 1, -1, dtype=np.int64)
    for index, weight in enumerate(weights.tolist()):
        new = np.zeros_like(reach)
        new[weight:] = reach[: total + 1 - weight] & ~reach[weight:]
        parent[new] = index
        reach |= new
    return reach, parent


def _subset(target: int, parent: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Indices of weights summing to `target`, following `parent` (each step's weight came earlier)."""
    picked = []
    while target:
        index = int(parent[target])
        picked.append(index)
        target -= int(weights[index])
    return np.array(picked, dtype=np.int64)


def _walk(groups: np.ndarray, choice: np.ndarray, code: int, need: int, unique: bool) -> np.ndarray:
    """The first `need` positions, in the seed's order, whose group went to `code` (with `unique`, one per group)."""
    mask = choice[groups] == code
    if unique:
        first = np.zeros(len(groups), dtype=bool)
        first[np.unique(groups, return_index=True)[1]] = True
        mask &= first
    return np.flatnonzero(mask)[:need]
