"""The pictures drawn before: filed by what they show, checked when read back, the oldest let go."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from flows import pictures
from storage import drawn
from storage.drawn import KEPT, recall, remember


def test_a_picture_filed_under_a_key_comes_back_only_under_that_key(tmp_path):
    assert recall("a" * 32, tmp_path) is None
    remember("a" * 32, b"first picture", tmp_path)
    assert recall("a" * 32, tmp_path) == b"first picture"
    assert recall("b" * 32, tmp_path) is None
    remember("a" * 32, b"second picture", tmp_path)  # filed again: the earlier one goes
    assert recall("a" * 32, tmp_path) == b"second picture"
    assert len(list(tmp_path.iterdir())) == 1


def test_a_damaged_picture_is_not_given_back(tmp_path):
    remember("a" * 32, b"the picture", tmp_path)
    (filed,) = tmp_path.iterdir()
    filed.write_bytes(b"the pictur3")  # same size, other bytes
    assert recall("a" * 32, tmp_path) is None


def test_only_the_newest_pictures_are_kept(tmp_path):
    for number in range(KEPT + 3):
        remember(f"{number:032x}", f"picture {number}".encode(), tmp_path)
        os.utime(next(tmp_path.glob(f"{number:032x}-*")), (number, number))  # strictly ordered, on any clock
    assert len(list(tmp_path.iterdir())) == KEPT
    assert recall(f"{0:032x}", tmp_path) is None and recall(f"{KEPT + 2:032x}", tmp_path) == f"picture {KEPT + 2}".encode()


def test_pruning_leaves_what_the_cache_did_not_file(tmp_path):
    (tmp_path / "my-holiday.png").write_bytes(b"someone else's")
    for number in range(KEPT + 1):
        remember(f"{number:032x}", f"picture {number}".encode(), tmp_path)
    assert (tmp_path / "my-holiday.png").read_bytes() == b"someone else's"


def test_a_cache_folder_that_cannot_be_written_only_costs_drawing_again(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_bytes(b"")
    remember("a" * 32, b"the picture", blocked / "pictures")
    assert recall("a" * 32, blocked / "pictures") is None


@pytest.fixture
def drawings(monkeypatch, tmp_path) -> list[int]:
    """How many figures were drawn to PNG, the cache in a folder of its own."""
    monkeypatch.setattr(drawn, "picture_cache", lambda: tmp_path)
    count = []
    png = pictures._png
    monkeypatch.setattr(pictures, "_png", lambda figure: count.append(1) or png(figure))
    return count


def test_a_picture_of_the_same_things_is_drawn_once(drawings):
    first = pictures.confusion_heatmap([[5, 1], [0, 7]], ["A", "B"], "confusion")
    assert pictures.confusion_heatmap([[5, 1], [0, 7]], ["A", "B"], "confusion") == first
    assert len(drawings) == 1
    assert pictures.confusion_heatmap([[5, 1], [0, 8]], ["A", "B"], "confusion") != first
    assert len(drawings) == 2


def test_a_picture_pinned_by_digests_is_found_again_without_reading_what_it_shows(drawings):
    read = []

    def drawing(samples):
        return lambda: read.append(1) or pictures.glyph_grid("notMNIST_small", samples, [])

    glyphs = {"A": np.full((3, 28, 28), 200, np.uint8)}
    first = pictures.drawn_once(pictures.glyph_grid, ["notMNIST_small", {"A": ["ab12", 3]}, []], drawing(glyphs))
    again = pictures.drawn_once(pictures.glyph_grid, ["notMNIST_small", {"A": ["ab12", 3]}, []], drawing(glyphs))
    assert again == first and len(read) == len(drawings) == 1  # the second never read the samples
    other = {"A": np.full((3, 28, 28), 90, np.uint8)}  # another shard: another digest, drawn from its own glyphs
    assert pictures.drawn_once(pictures.glyph_grid, ["notMNIST_small", {"A": ["cd34", 3]}, []], drawing(other)) != first
    assert len(read) == 2


def test_the_same_images_are_the_same_picture_and_their_order_another(drawings):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    pictures.misclassified(images, ["A", "B"], ["B", "A"], "wrong")
    pictures.misclassified(images.copy(), ["A", "B"], ["B", "A"], "wrong")
    assert len(drawings) == 1
    pictures.misclassified(images[::-1], ["A", "B"], ["B", "A"], "wrong")
    assert len(drawings) == 2


@pytest.mark.parametrize("array", [
    np.ma.masked_array(np.zeros(4, np.uint8), mask=[True, False, False, False]),
    np.zeros(2, dtype=[("a", np.uint8), ("b", np.uint8)]), np.array([object()]),
], ids=["masked", "structured", "object"])
def test_arrays_whose_bytes_do_not_say_what_they_show_are_refused(array):
    with pytest.raises(TypeError, match="cannot tell"):
        pictures._feed(hashlib.sha256(), array)


@pytest.mark.parametrize("one, other", [
    (np.zeros((2, 28, 28), np.uint8), np.zeros((28, 2, 28), np.uint8)),
    (np.zeros(4, np.uint8), np.zeros(2, np.uint16)),
    ([1], (1,)), ("1", 1), ({"A": 1, "B": 2}, {"B": 2, "A": 1}), (None, "None"),
], ids=["shape", "dtype", "list or tuple", "text or number", "order", "none or text"])
def test_arguments_that_differ_only_in_kind_are_told_apart(one, other):
    digests = []
    for value in (one, other):
        digest = hashlib.sha256()
        pictures._feed(digest, value)
        digests.append(digest.hexdigest())
    assert digests[0] != digests[1]


def test_a_damaged_picture_is_drawn_again(drawings, tmp_path):
    first = pictures.learning_curves({"loss": [0.5, 0.4], "accuracy": [0.8, 0.9]}, "curves")
    (filed,) = tmp_path.glob("*.png")
    filed.write_bytes(b"\x89PNG damaged")
    assert pictures.learning_curves({"loss": [0.5, 0.4], "accuracy": [0.8, 0.9]}, "curves") == first
    assert len(drawings) == 2
