"""The split assignment against a brute-force search on small random letters."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tasks import split_groups
from tasks.split_groups import assign

NAMES = ("valid", "train", "test")


def digests(values) -> np.ndarray:
    return np.array([int(v).to_bytes(16, "big") for v in values], dtype="S16")


def exists(large, small, needs, unique, placed) -> bool:
    """Whether some split (or none) per group gives every split its rows: every assignment tried at once."""
    groups = sorted(set(large.tolist()) | set(small.tolist()))
    rows_of = lambda archive: np.array([(archive == g).sum() for g in groups])  # noqa: E731
    in_large, in_small = rows_of(large), rows_of(small)
    if unique:
        in_large, in_small = np.minimum(in_large, 1), np.minimum(in_small, 1)
    options = [[NAMES.index(placed[g])] if g in placed else [0, 1, 2, 3] for g in groups]
    choices = np.array(list(itertools.product(*options)))  # (assignments, groups); 3 is no split
    rows = [((choices == 0) * in_large).sum(1), ((choices == 1) * in_large).sum(1), ((choices == 2) * in_small).sum(1)]
    return bool(np.all([have >= needs[name] for have, name in zip(rows, NAMES)], axis=0).any())


def check(rows, large, small, needs, unique, placed) -> None:
    """Every split has its rows, no group is in two splits (nor outside its earlier split), none repeats with unique."""
    taken = {"valid": large[rows["valid"]], "train": large[rows["train"]], "test": small[rows["test"]]}
    for name in NAMES:
        assert len(taken[name]) == needs[name]
        assert len(set(rows[name].tolist())) == len(rows[name])  # a position once
        if unique:
            assert len(set(taken[name].tolist())) == len(taken[name])
        for other in NAMES:
            if other != name:
                assert not set(taken[name].tolist()) & set(taken[other].tolist())
        assert all(placed.get(d, name) == name for d in taken[name].tolist())
    for name in ("valid", "train"):
        assert list(rows[name]) == sorted(rows[name])  # in the seed's order


def random_letter(rng: np.random.Generator):
    groups = int(rng.integers(1, 7))
    large = digests(rng.choice(groups, size=int(rng.integers(1, 12)), p=rng.dirichlet(np.ones(groups))))
    small = digests(rng.choice(groups + 2, size=int(rng.integers(1, 8))))
    needs = {"valid": int(rng.integers(0, 4)), "train": int(rng.integers(0, 7)), "test": int(rng.integers(0, 5))}
    present = sorted(set(large.tolist()) | set(small.tolist()))
    placed = {d: NAMES[int(rng.integers(3))] for d in present if rng.random() < 0.15}
    return large, small, needs, bool(rng.random() < 0.3), placed


def test_an_assignment_is_found_exactly_when_one_exists(monkeypatch):
    search, rescued = split_groups._searched, []

    def counted(*arguments):
        choice = search(*arguments)
        rescued.append(choice is not None)
        return choice

    monkeypatch.setattr(split_groups, "_searched", counted)
    rng = np.random.default_rng(21)
    found = refused = 0
    for _ in range(3000):
        large, small, needs, unique, placed = random_letter(rng)
        expected = exists(large, small, needs, unique, placed)
        rows = assign(large, small, needs, unique=unique, placed=dict(placed))
        assert (rows is not None) == expected, (large, small, needs, unique, placed)
        if rows is not None:
            check(rows, large, small, needs, unique, placed)
        found, refused = found + expected, refused + (not expected)
    assert found > 600 and refused > 600  # both answers were put to the test
    assert sum(rescued) > 25  # and letters that the preferred order leaves short, which only the search fills


def test_without_repeats_it_is_the_seeds_slicing():
    rng = np.random.default_rng(3)
    large, small = digests(rng.permutation(100)), digests(rng.permutation(np.arange(100, 140)))
    for unique in (False, True):
        rows = assign(large, small, {"valid": 10, "train": 70, "test": 30}, unique=unique, placed={})
        assert rows["valid"].tolist() == list(range(10))
        assert rows["train"].tolist() == list(range(10, 80))
        assert rows["test"].tolist() == list(range(30))


def test_a_letter_whose_big_group_must_go_to_train_and_test_to_unseen_images():
    """Letter I of the real notMNIST sample: 116 copies of one glyph in the large archive's 800 and 25 in the small
    one's 200; valid 68, train 680 and test 175 exist only with the big group in train and test from the small
    archive's images that train and valid do not hold."""
    rng = np.random.default_rng(9)
    large = np.concatenate([digests([0] * 116), digests(range(1, 683)), digests([1, 2])])  # 683 distinct
    small = np.concatenate([digests([0] * 25), digests(range(1000, 1174)), digests([5])])
    large, small = large[rng.permutation(len(large))], small[rng.permutation(len(small))]
    needs = {"valid": 68, "train": 680, "test": 175}
    placed: dict = {}
    rows = assign(large, small, needs, unique=False, placed=placed)
    check(rows, large, small, needs, False, {})
    assert placed[digests([0])[0]] == "train"


@pytest.mark.parametrize("unique", [False, True], ids=["cross-split", "all"])
def test_too_few_images_is_refused(unique):
    large, small = digests([1, 1, 2, 3]), digests([1, 4])
    assert assign(large, small, {"valid": 1, "train": 3, "test": 2}, unique=unique, placed={}) is None
